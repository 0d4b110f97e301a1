"""Head registry: one table from (head name, task) to estimator class.

The pipeline builds heads only through :func:`make_head`, so a typo in
``params.yaml`` fails early with the allowed names and a close-match hint.
The table holds import paths: a head's module (and its library: lightgbm,
torch) is imported only when that head is built.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from featcache.store.schema import TASKS
from featcache.util.names import did_you_mean

if TYPE_CHECKING:
    from sklearn.base import BaseEstimator

__all__ = ["HEADS", "HEAD_PATHS", "LABELS", "TASKS", "head_class", "head_label", "head_names", "make_head",
           "task_params"]

log = logging.getLogger(__name__)


#: Head name -> task -> ``"module:Class"`` (module relative to this package).
HEAD_PATHS: dict[str, dict[str, str]] = {
    "logreg": {"classification": ".linear:LogisticRegressionHead", "regression": ".linear:RidgeHead"},
    "lightgbm": {"classification": ".boosting:LightGBMHead", "regression": ".boosting:LightGBMRegressorHead"},
    "mlp": {"classification": ".mlp:MLPHead", "regression": ".mlp:MLPRegressorHead"},
    # out-of-core twins: fit/predict stream numpy or dask arrays one row chunk at a time
    "sgd": {"classification": ".out_of_core:StreamingLogisticHead", "regression": ".out_of_core:StreamingRidgeHead"},
    "streaming_mlp": {"classification": ".out_of_core:StreamingMLPHead",
                      "regression": ".out_of_core:StreamingMLPRegressorHead"},
}


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


def head_names() -> list[str]:
    """Registered head names, in table order."""
    return list(HEAD_PATHS)


def head_class(name: str, task: str) -> type[BaseEstimator]:
    """The estimator class registered for ``(name, task)``.

    Raises
    ------
    ValueError
        Naming the unknown head or task and the allowed values.
    """
    if name not in HEAD_PATHS:
        raise ValueError(
            f"unknown head {name!r}; allowed: {', '.join(HEAD_PATHS)}.{did_you_mean(str(name), list(HEAD_PATHS))}"
        )
    if task not in HEAD_PATHS[name]:
        raise ValueError(
            f"unknown task {task!r} for head {name!r}; allowed: {', '.join(HEAD_PATHS[name])}."
            f"{did_you_mean(str(task), list(HEAD_PATHS[name]))}"
        )
    return _load(HEAD_PATHS[name][task])


def make_head(
    name: str, task: str, params: Mapping[str, Any] | None = None, **overrides: Any
) -> BaseEstimator:
    """Build an unfitted head.

    Parameters
    ----------
    name : str
        One of :func:`head_names` (``"logreg"``, ``"lightgbm"``, ``"mlp"``, and the
        out-of-core ``"sgd"``, ``"streaming_mlp"``).
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
    cls = head_class(name, task)
    merged = {**dict(params or {}), **overrides}
    allowed = sorted(cls().get_params(deep=False))
    for key in merged:
        if key not in allowed:
            raise ValueError(
                f"unknown parameter {key!r} for head {name!r} ({cls.__name__}, {task}); "
                f"allowed: {', '.join(allowed)}.{did_you_mean(str(key), allowed)}"
            )
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
    if name not in HEADS or task not in HEADS[name]:
        return params  # make_head names the unknown head or task
    own = set(HEADS[name][task]().get_params(deep=False))
    others = {key for other, cls in HEADS[name].items() if other != task
              for key in cls().get_params(deep=False)}
    dropped = sorted(key for key in params if key not in own and key in others)
    if dropped:
        log.debug("heads.%s: %s apply to the other task only; not used for %s", name, dropped, task)
    return {key: value for key, value in params.items() if key not in dropped}
