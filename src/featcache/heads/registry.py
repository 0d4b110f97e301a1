"""Head registry: one table from (head name, task) to estimator class.

The pipeline builds heads only through :func:`make_head`, so a typo in
``params.yaml`` fails early with the allowed names and a close-match hint.
The table holds import paths: a head's module (and its library: scikit-learn,
lightgbm, torch) is imported only when that head is built.

Checking a ``params.yaml`` section needs only the head's parameter names and
annotations: :func:`head_params` reads them from the head's source
(:mod:`~featcache.heads.param_source`), so ``featcache check`` and every stage
validate all heads' keys (:func:`check_head_params`) and values
(:func:`check_head_values`, against the types and rules of
:mod:`~featcache.heads.param_types`) without importing scikit-learn; what the
source reader cannot follow falls back to importing the class.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from featcache.errors import ParamError, UserError
from featcache.heads.param_source import ParamSource, SourceUnresolved, init_params
from featcache.heads.param_types import check_value
from featcache.store.schema import TASKS
from featcache.util.names import did_you_mean

if TYPE_CHECKING:
    from sklearn.base import BaseEstimator

__all__ = ["DEFAULT_HEADS", "HEADS", "HEAD_PATHS", "LABELS", "REGISTRY", "STORAGES", "STREAMING_HEADS", "TASKS",
           "HeadEntry", "UnknownHeadError", "check_head_params", "check_head_values", "head_class", "head_label",
           "head_names", "head_param_names", "head_params", "head_storage", "make_head", "task_params"]

log = logging.getLogger(__name__)


class UnknownHeadError(UserError, ValueError):
    """A head name (or a head's task) that the registry does not know; the message lists the registered ones."""


#: What a saved head holds besides head.json and the scaler/PCA arrays (:mod:`~featcache.heads.persistence`):
#: ``linear`` the final linear model's coef/intercept (in arrays.npz), ``lightgbm`` model.txt, ``torch`` module.pt,
#: ``neighbours`` the normalised training rows and their labels or targets (in arrays.npz).
STORAGES: tuple[str, ...] = ("linear", "lightgbm", "torch", "neighbours")


@dataclass(frozen=True)
class HeadEntry:
    """One registered head.

    Attributes
    ----------
    paths : mapping of str to str
        Task -> ``"module:Class"`` of its estimator (module relative to this package).
    storage : str
        One of :data:`STORAGES`: what its saved form holds.
    streaming : bool
        Whether it trains from dask arrays over the store's HDF5 chunks (out of core)
        instead of in-memory arrays.
    early_stopped : bool
        Whether its validation rows choose where its training stops (LightGBM's round, an MLP's epoch), rather
        than a value from a grid of hyper-parameters (logistic regression's C).
    """

    paths: Mapping[str, str]
    storage: str
    streaming: bool = False
    early_stopped: bool = False


#: Head name -> its entry: the one table of heads.
REGISTRY: dict[str, HeadEntry] = {
    "logreg": HeadEntry({"classification": ".linear:LogisticRegressionHead", "regression": ".linear:RidgeHead"},
                        "linear"),
    "lightgbm": HeadEntry({"classification": ".boosting:LightGBMHead",
                           "regression": ".boosting:LightGBMRegressorHead"}, "lightgbm", early_stopped=True),
    "mlp": HeadEntry({"classification": ".mlp:MLPHead", "regression": ".mlp:MLPRegressorHead"}, "torch",
                     early_stopped=True),
    # out-of-core twins: fit/predict stream numpy or dask arrays one row chunk at a time
    "sgd": HeadEntry({"classification": ".out_of_core:StreamingLogisticHead",
                      "regression": ".out_of_core:StreamingRidgeHead"}, "linear", streaming=True),
    "streaming_mlp": HeadEntry({"classification": ".out_of_core:StreamingMLPHead",
                                "regression": ".out_of_core:StreamingMLPRegressorHead"}, "torch", streaming=True,
                                early_stopped=True),
    # weighted k-NN on cosine similarity: no training, k chosen on val (not in DEFAULT_HEADS)
    "knn": HeadEntry({"classification": ".knn:KNNHead", "regression": ".knn:KNNRegressorHead"}, "neighbours"),
}

#: Head name -> task -> ``"module:Class"`` (module relative to this package), from :data:`REGISTRY`.
HEAD_PATHS: dict[str, dict[str, str]] = {name: dict(entry.paths) for name, entry in REGISTRY.items()}

#: Heads that train from dask arrays over the store's HDF5 chunks (out of core) instead of in-memory arrays.
STREAMING_HEADS: tuple[str, ...] = tuple(name for name, entry in REGISTRY.items() if entry.streaming)

#: ``train.heads`` when params.yaml leaves it out.
DEFAULT_HEADS: tuple[str, ...] = ("logreg", "lightgbm", "mlp")


#: What a head is called where its twin for a task is a different model (the report's name for it).
LABELS: dict[tuple[str, str], str] = {("logreg", "regression"): "ridge"}


def _load(path: str) -> type[BaseEstimator]:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module, __package__), name)


class _HeadTable(Mapping[str, dict[str, "type[BaseEstimator]"]]):
    """:data:`HEAD_PATHS` with classes for values, each imported when looked up."""

    def __getitem__(self, name: str) -> dict[str, type[BaseEstimator]]:
        return {task: _load(path) for task, path in HEAD_PATHS[name].items()}

    def __iter__(self) -> Iterator[str]:
        return iter(HEAD_PATHS)

    def __len__(self) -> int:
        return len(HEAD_PATHS)


#: Head name -> task -> estimator class (read-only mapping; looking a head up imports its module).
HEADS: Mapping[str, dict[str, type[BaseEstimator]]] = _HeadTable()


def _read_params(name: str, task: str) -> dict[str, ParamSource]:
    """The head's parameters from its source, or from its imported class where the source cannot be followed."""
    path = _registered_path(name, task)
    try:
        return init_params(Path(__file__).parent, path)
    except (SourceUnresolved, OSError, SyntaxError) as why:
        log.debug("head_params(%s, %s): importing %s (%s)", name, task, path, why)
        signature = inspect.signature(_load(path))
        return {key: ParamSource(key, param.annotation if isinstance(param.annotation, str) else None,
                                 None if param.default is param.empty else repr(param.default))
                for key, param in sorted(signature.parameters.items())}


@functools.lru_cache(maxsize=None)
def head_param_names(name: str, task: str) -> tuple[str, ...]:
    """The constructor parameter names of the head registered for ``(name, task)``, without importing it.

    Read from the estimator's source (its ``__init__`` signature or its
    dataclass fields: the names ``get_params()`` returns) by
    :func:`~featcache.heads.param_source.init_params`; falls back to
    importing the class where the source cannot be followed.

    Raises
    ------
    UnknownHeadError
        For an unknown head or task (as :func:`head_class`).
    """
    return tuple(_read_params(name, task))


@functools.lru_cache(maxsize=None)
def head_params(name: str, task: str) -> dict[str, ParamSource]:
    """The constructor parameters of the ``(name, task)`` head, with their annotation and default source text.

    Read as :func:`head_param_names` (without importing the head); do not modify the returned dict.

    Raises
    ------
    UnknownHeadError
        For an unknown head or task (as :func:`head_class`).
    """
    return _read_params(name, task)


def check_head_values(name: str, task: str, params: Mapping[str, Any] | None, where: str | None = None) -> None:
    """Fail on a value of the wrong type or out of range for the ``(name, task)`` head, without importing it.

    Each value is checked against its parameter's annotation
    (:func:`~featcache.heads.param_types.check_value`); keys the head does not
    take are left to :func:`check_head_params`.

    Parameters
    ----------
    name, task : str
    params : mapping, optional
        Parameter values as parsed from YAML.
    where : str, optional
        The section's place in the message; default ``heads.<name>``.

    Raises
    ------
    ParamError
        ``"heads.lightgbm.learning_rate: 'fast' is not a float; allowed: a number > 0 (default 0.1). Hint: ..."``.
    """
    declared = head_params(name, task)
    for key, value in dict(params or {}).items():
        if key in declared:
            check_value(f"{where or 'heads.' + name}.{key}", value, declared[key].annotation, declared[key].default)


def check_head_params(name: str, task: str, params: Mapping[str, Any] | None, *, shared: bool = False) -> None:
    """Fail on a key that the ``(name, task)`` head does not take, without importing the head.

    Parameters
    ----------
    name, task : str
    params : mapping, optional
        Parameter names (values are not looked at).
    shared : bool
        ``params`` come from a section that both task twins share (``heads.<name>`` in params.yaml, after
        :func:`task_params`): the message also names the other twin's keys, which the section accepts, and
        looks for the closest match among them too (``max_itr`` -> ``max_iter`` under regression).

    Raises
    ------
    ParamError
        (a ValueError) Naming the unknown key, the head, the allowed keys and the closest match.
    """
    allowed = head_param_names(name, task)
    others = sorted({key for twin in HEAD_PATHS[name] if twin != task for key in head_param_names(name, twin)}
                    - set(allowed)) if shared else []
    also = f"; and, not used for {task} (the other task's twin takes them): {', '.join(others)}" if others else ""
    for key in dict(params or {}):
        if key not in allowed:
            raise ParamError(
                f"unknown parameter {key!r} for head {name!r} ({HEAD_PATHS[name][task].partition(':')[2]}, "
                f"{task}); allowed: {', '.join(allowed)}{also}.{did_you_mean(str(key), [*allowed, *others])}"
            )


def _unknown_head(name: Any) -> str:
    return (f"unknown head {name!r}; allowed: {', '.join(HEAD_PATHS)}.{did_you_mean(str(name), list(HEAD_PATHS))}"
            " Hint: train.heads in params.yaml and `featcache train --head` take these names.")


def head_names() -> list[str]:
    """Registered head names, in table order.

    Returns
    -------
    list of str
        The names :func:`make_head` and ``train.heads`` in params.yaml take.
    """
    return list(HEAD_PATHS)


def head_storage(name: str) -> str:
    """What the saved form of head ``name`` holds: one of :data:`STORAGES`.

    Raises
    ------
    UnknownHeadError
        For an unknown head, naming the allowed ones.
    """
    if name not in REGISTRY:
        raise UnknownHeadError(_unknown_head(name))
    return REGISTRY[name].storage


def head_class(name: str, task: str) -> type[BaseEstimator]:
    """The estimator class registered for ``(name, task)``, importing its module only.

    Parameters
    ----------
    name : str
        One of :func:`head_names`.
    task : {"classification", "regression"}

    Returns
    -------
    type
        The head class (e.g. ``LogisticRegressionHead``, or its twin ``RidgeHead`` for regression).

    Raises
    ------
    UnknownHeadError
        Naming the unknown head or task and the allowed values.
    """
    return _load(_registered_path(name, task))


def _registered_path(name: str, task: str) -> str:
    """The ``module:Class`` of ``(name, task)``; UnknownHeadError naming the allowed heads or tasks."""
    if name not in HEAD_PATHS:
        raise UnknownHeadError(_unknown_head(name))
    if task not in HEAD_PATHS[name]:
        raise UnknownHeadError(
            f"unknown task {task!r} for head {name!r}; allowed: {', '.join(HEAD_PATHS[name])}."
            f"{did_you_mean(str(task), list(HEAD_PATHS[name]))}"
        )
    return HEAD_PATHS[name][task]


def make_head(
    name: str, task: str, params: Mapping[str, Any] | None = None, **overrides: Any
) -> BaseEstimator:
    """Build an unfitted head.

    Parameters
    ----------
    name : str
        One of :func:`head_names` (``"logreg"``, ``"lightgbm"``, ``"mlp"``, the
        out-of-core ``"sgd"``, ``"streaming_mlp"``, and the k-nearest-neighbour ``"knn"``).
    task : {"classification", "regression"}
    params : mapping, optional
        Constructor parameters (e.g. a ``params.yaml`` section).
    **overrides
        Parameters that take precedence over ``params``.

    Returns
    -------
    sklearn.base.BaseEstimator

    Raises
    ------
    ValueError
        For an unknown head, task or parameter; the message names the bad value, the
        allowed values and the closest match.
    """
    merged = {**dict(params or {}), **overrides}
    check_head_params(name, task, merged)
    cls = head_class(name, task)
    log.debug("make_head(%s, %s): %s", name, task, merged)
    return cls(**merged)


def head_label(name: str, task: str) -> str:
    """The head's name for ``task`` as a reader knows it: ``logreg`` is ``ridge`` for regression."""
    return LABELS.get((name, task), name)


def task_params(name: str, task: str, params: Mapping[str, Any] | None) -> dict[str, Any]:
    """The part of a head's ``params.yaml`` section that its twin for ``task`` takes.

    One section serves both tasks (``heads.logreg`` configures the logistic
    regression and its ridge twin), so a key that only the *other* task's twin
    takes (``max_iter`` under regression) is left out. Any other key is kept, so
    :func:`make_head` still rejects a key that neither twin takes.

    Returns
    -------
    dict
        The parameters to pass to :func:`make_head`.
    """
    params = dict(params or {})
    if name not in HEAD_PATHS or task not in HEAD_PATHS[name]:
        return params  # make_head names the unknown head or task
    own = set(head_param_names(name, task))
    others = {key for other in HEAD_PATHS[name] if other != task for key in head_param_names(name, other)}
    dropped = sorted(key for key in params if key not in own and key in others)
    if dropped:
        log.debug("heads.%s: %s apply to the other task only; not used for %s", name, dropped, task)
    return {key: value for key, value in params.items() if key not in dropped}
