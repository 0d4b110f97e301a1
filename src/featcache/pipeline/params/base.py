"""The strict base of every params section, its error messages, and the loader of a stage's sections.

Every section is a pydantic model with ``extra="forbid"``: an unknown or
mistyped key fails at once with the key, the allowed keys and a close match.
A stage's model (:class:`StageParams`) lists the sections it reads and
ignores the others, so a stage validates and imports only what it uses.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from featcache.errors import UserError
from featcache.util.names import did_you_mean

__all__ = ["ConfigError", "Strict", "StageParams", "as_sections", "format_validation_error", "load_sections",
           "read_params_file", "validate_sections"]

SectionsT = TypeVar("SectionsT", bound=BaseModel)


class ConfigError(UserError, ValueError):
    """``params.yaml`` is invalid; the message names the key, value and allowed values."""


class Strict(BaseModel):
    """A params section: unknown keys are errors, defaults are validated too."""

    model_config = ConfigDict(extra="forbid", validate_default=True)


class StageParams(BaseModel):
    """The sections of ``params.yaml`` that one stage reads; the other sections are not looked at."""

    model_config = ConfigDict(extra="ignore", validate_default=True)


def _model_at(root: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model that validates the mapping at ``loc`` under ``root`` (to list its allowed keys)."""
    model: Any = root
    skip_key = False
    for part in loc:
        if isinstance(part, int) or skip_key:  # list index or a dict key (backbone name)
            skip_key = False
            continue
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return None
        annotation = field.annotation
        args = getattr(annotation, "__args__", ())
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
        elif args and isinstance(args[-1], type) and issubclass(args[-1], BaseModel):
            model = args[-1]  # dict[str, Model] or list[Model]
            skip_key = getattr(annotation, "__origin__", None) is dict
        else:
            return None
    return model


def format_validation_error(error: ValidationError, root: type[BaseModel]) -> str:
    """One line per invalid key: the key, the problem, the value, the allowed keys and a close match."""
    lines = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"])
        if item["type"] == "extra_forbidden":
            model = _model_at(root, item["loc"][:-1])
            allowed = list(model.model_fields) if model is not None else []
            hint = did_you_mean(item["loc"][-1], allowed)
            misplaced = getattr(model, "misplaced_key_hint", None)
            hint += misplaced(item["loc"][-1]) if misplaced is not None else ""
            lines.append(f"- unknown key {key!r}.{hint} Allowed keys here: {', '.join(allowed)}")
        elif item["type"] in ("model_type", "dict_type") and key:  # pydantic's words name a Python class
            value, name = item.get("input"), item["loc"][-1]
            fix = (f"a key with nothing under it is null in YAML: remove the line, or write `{name}: {{}}` for the "
                   "defaults" if value is None else f"indent its keys under `{name}:`, one `name: value` a line")
            lines.append(f"- {key}: a section (a mapping of keys) expected, got {value!r}. Hint: {fix}.")
        else:
            message = item["msg"].removeprefix("Value error, ")
            # A section's own check (a value error) names the keys it is about: the whole section after it is noise.
            own = item["type"] == "value_error" and isinstance(item.get("input"), Mapping)
            got = "" if own else f" (got {item.get('input')!r})"
            # A check of the whole file (no loc) names its keys in its message: no "params:" label before it.
            lines.append(f"- {key}: {message}{got}" if key else f"- {message}")
    return "Invalid params:\n" + "\n".join(lines)


def validate_sections(model: type[SectionsT], raw: Mapping[str, Any] | None) -> SectionsT:
    """Validate a params mapping against ``model`` (a whole file, or one stage's sections).

    Raises
    ------
    ConfigError
        Listing every invalid key with the value and the allowed values.
    """
    if raw is not None and not isinstance(raw, Mapping):
        raise ConfigError(f"Invalid params: the file must hold a mapping of sections, got {type(raw).__name__}.")
    try:
        return model.model_validate(dict(raw or {}))
    except ValidationError as error:
        raise ConfigError(format_validation_error(error, model)) from None
    except (UserError, ValueError) as error:  # raised by a check outside pydantic (a registry lookup)
        raise ConfigError(f"Invalid params: {error}") from None


def read_params_file(path: str | Path) -> Mapping[str, Any] | None:
    """The parsed YAML of a params file.

    Raises
    ------
    ConfigError
        If the file does not exist, is not UTF-8 text or is not valid YAML (naming the line and column).
    """
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"Params file {str(path)!r} is a folder; allowed: a YAML file. Hint: pass the file, e.g. "
                          f"{(path / 'params.yaml').as_posix()!r}.")
    if not path.is_file():
        raise ConfigError(f"Params file {str(path)!r} not found. Hint: run from the project root.")
    try:
        with open(path, encoding="utf-8") as handle:
            return yaml.safe_load(handle)
    except UnicodeDecodeError as error:
        raise ConfigError(f"Params file {str(path)!r} is not UTF-8 text ({error.reason} at byte {error.start}). "
                          "Hint: save it as UTF-8.") from None
    except yaml.YAMLError as error:
        raise ConfigError(_yaml_error_message(path, error)) from None


def _at(mark: Any) -> str:
    """``line L, column C`` of a yaml mark (1-based, as editors count)."""
    return f"line {mark.line + 1}, column {mark.column + 1}"


def _yaml_error_message(path: Path, error: yaml.YAMLError) -> str:
    """Where and what the YAML syntax error of a params file is, in one paragraph."""
    problem = getattr(error, "problem", None) or str(error)
    mark = getattr(error, "problem_mark", None)
    where = f" at {_at(mark)}" if mark is not None else ""
    context, context_mark = getattr(error, "context", None), getattr(error, "context_mark", None)
    if context and context_mark is not None:
        problem += f" ({context} started at {_at(context_mark)})"
    elif context:
        problem += f" ({context})"
    return (f"Params file {str(path)!r} is not valid YAML{where}: {problem}. Hint: check the brackets, quotes and "
            "indentation around that line (spaces only, no tabs).")


def load_sections(model: type[SectionsT], path: str | Path = "params.yaml") -> SectionsT:
    """Read ``path`` and validate the sections that ``model`` declares."""
    return validate_sections(model, read_params_file(path))


def as_sections(params: Any, model: type[SectionsT]) -> Any:
    """The validated params a stage function was given, however the caller gave them.

    Parameters
    ----------
    params : Params, StageParams, path or mapping
        The path of a params file (``"params.yaml"``: its ``model`` sections are read and validated), a
        parsed params mapping (validated the same way), or validated params (the whole file's
        :class:`~featcache.pipeline.config.Params`, a stage's sections, or any object with the sections the
        stage reads as attributes), returned as they are.
    model : type
        The stage's sections (e.g. ``TrainSections``), used for a path or a mapping.

    Raises
    ------
    ConfigError
        When the file or mapping is invalid (naming the key, the value and what is allowed).
    """
    if isinstance(params, (str, os.PathLike)):
        return load_sections(model, params)
    if isinstance(params, Mapping):
        return validate_sections(model, params)
    return params
