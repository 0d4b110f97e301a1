"""timm backbone specs kept on disk, so that commands that run no model do not import torch and timm.

Building a timm model's :class:`~featcache.extract.zoo.registry.BackboneSpec`
(:func:`~featcache.extract.zoo.timm_models.timm_backbone`) imports torch and
timm (about 3 s on the 2-core VM) and traces the model on the ``meta`` device;
``featcache check``, ``featcache layers`` and an extraction's up-to-date check
need only the spec. It depends on nothing but the model name, the installed
timm and torch, and featcache's code that derives it, so it is kept as JSON in
``<cache root>/timm-specs/`` (:func:`~featcache.util.cache_dir.cache_root`)
under a key of exactly those: the model as given, the timm and torch versions,
and the sha256 of the modules that derive and hold it (``timm_models.py``,
``registry.py``, this one). Any of them changing gives another key, so an
entry is never stale; an entry that does not read back is built again and
replaced. A cache that cannot be written only costs the build.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.metadata
import logging
from pathlib import Path
from typing import Any

from featcache.extract.zoo import registry
from featcache.extract.zoo.registry import BackboneSpec, LayerAlias
from featcache.util.cache_dir import TIMM_SPEC_FOLDER, entry_path, read_entry, write_entry
from featcache.util.compute import torch_version

__all__ = ["SPEC_FOLDER", "cached_timm_backbone", "spec_key"]

logger = logging.getLogger(__name__)

#: The cache root's folder of timm specs.
SPEC_FOLDER = TIMM_SPEC_FOLDER

#: The spec fields a record holds (every field but ``name``, which is the caller's backbone name).
_RECORD_FIELDS = tuple(f.name for f in dataclasses.fields(BackboneSpec) if f.name != "name")


@functools.lru_cache(maxsize=1)
def _code_sha256() -> str:
    """sha256 of the modules that derive a timm spec and define it (their source files)."""
    from featcache.extract.zoo import timm_models

    digest = hashlib.sha256()
    for module in (timm_models, registry):
        digest.update(Path(module.__file__ or "").read_bytes())
    digest.update(Path(__file__).read_bytes())
    return digest.hexdigest()


def spec_key(model: str) -> dict[str, str]:
    """What a timm spec depends on: the model as given, the timm and torch versions, featcache's code.

    Raises
    ------
    importlib.metadata.PackageNotFoundError
        When timm (or torch) is not installed.
    """
    return {"model": model, "timm": importlib.metadata.version("timm"), "torch": torch_version(),
            "code_sha256": _code_sha256()}


def _to_record(spec: BackboneSpec) -> dict[str, Any]:
    record = {name: getattr(spec, name) for name in _RECORD_FIELDS}
    record["layers"] = {alias: dataclasses.asdict(layer) for alias, layer in spec.layers.items()}
    record["constructor_kwargs"] = dict(spec.constructor_kwargs)
    record["pretrained_source"] = dict(spec.pretrained_source)
    return record


def _from_record(name: str, record: dict[str, Any]) -> BackboneSpec:
    values = {field: record[field] for field in _RECORD_FIELDS}
    values["layers"] = {alias: LayerAlias(**layer) for alias, layer in record["layers"].items()}
    values["mean"], values["std"] = tuple(record["mean"]), tuple(record["std"])
    return BackboneSpec(name=name, **values)


def _read(path: Path, key: dict[str, str], name: str) -> BackboneSpec | None:
    """The spec of a cache entry, or None when there is none or it does not read back as one of ``key``."""
    record = read_entry(path, key)
    if record is None:
        return None
    try:
        return _from_record(name, record)
    except (ValueError, TypeError, KeyError, AttributeError) as error:  # a damaged entry: built again, replaced
        logger.debug("timm spec cache entry %s does not read back (%s: %s); building the spec", path,
                     type(error).__name__, error)
        return None


@functools.lru_cache(maxsize=64)
def cached_timm_backbone(name: str, model: str) -> BackboneSpec:
    """:func:`~featcache.extract.zoo.timm_models.timm_backbone`, from the disk cache when it holds the spec.

    Once per process, a model whose ``pretrained_cfg`` asks for another crop than featcache's center crop
    is warned about.

    Parameters
    ----------
    name : str
        The backbone's name (the ``backbones`` key).
    model : str
        ``timm/<architecture>[.<pretrained tag>]``.

    Raises
    ------
    UnknownNameError
        For a model or tag timm does not know (never cached).
    """
    from featcache.extract.zoo.timm_models import timm_backbone

    try:
        key = spec_key(model)
    except importlib.metadata.PackageNotFoundError:  # no timm: timm_backbone says so
        return timm_backbone(name, model)
    path = entry_path(SPEC_FOLDER, key, model)
    spec = _read(path, key, name)
    if spec is None:
        spec = timm_backbone(name, model)
        write_entry(path, key, _to_record(spec))  # the layers in network order
    if spec.crop_mode != "center":
        logger.warning("timm model %s asks for crop_mode %r in its pretrained_cfg; featcache resizes the shorter "
                       "side to %d and center-crops %d (extract.resize_mode: crop), or squashes the whole image "
                       "(resize_mode: squash)", spec.arch, spec.crop_mode, spec.resize_size, spec.input_size)
    return spec
