"""Head registry: one table from (head name, task) to estimator class.

The pipeline builds heads only through :func:`make_head`, so a typo in
``params.yaml`` fails early with the allowed names and a close-match hint.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from sklearn.base import BaseEstimator

from featcache.store.schema import TASKS
from featcache.util.names import did_you_mean

from .boosting import LightGBMHead, LightGBMRegressorHead
from .linear import LogisticRegressionHead, RidgeHead
from .mlp import MLPHead, MLPRegressorHead
from .out_of_core import StreamingLogisticHead, StreamingMLPHead, StreamingMLPRegressorHead, StreamingRidgeHead

__all__ = ["HEADS", "TASKS", "head_class", "head_label", "head_names", "make_head", "task_params"]

log = logging.getLogger(__name__)

HEADS: dict[str, dict[str, type[BaseEstimator]]] = {
    "logreg": {"classification": LogisticRegressionHead, "regression": RidgeHead},
    "lightgbm": {"classification": LightGBMHead, "regression": LightGBMRegressorHead},
    "mlp": {"classification": MLPHead, "regression": MLPRegressorHead},
    # out-of-core twins: fit/predict stream numpy or dask arrays one row chunk at a time
    "sgd": {"classification": StreamingLogisticHead, "regression": StreamingRidgeHead},
    "streaming_mlp": {"classification": StreamingMLPHead, "regression": StreamingMLPRegressorHead},
}


#: What a head is called where its twin for a task is a different model (the report's name for it).
LABELS: dict[tuple[str, str], str] = {("logreg", "regression"): "ridge"}


def head_names() -> list[str]:
    """Registered head names, in table order."""
    return list(HEADS)


def head_class(name: str, task: str) -> type[BaseEstimator]:
    """The estimator class registered for ``(name, task)``.

    Raises
    ------
    ValueError
        Naming the unknown head or task and the allowed values.
    """
    if name not in HEADS:
        raise ValueError(
            f"unknown head {name!r}; allowed: {', '.join(HEADS)}.{did_you_mean(str(name), list(HEADS))}"
        )
    if task not in HEADS[name]:
        raise ValueError(
            f"unknown task {task!r} for head {name!r}; allowed: {', '.join(HEADS[name])}."
            f"{did_you_mean(str(task), list(HEADS[name]))}"
        )
    return HEADS[name][task]


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
