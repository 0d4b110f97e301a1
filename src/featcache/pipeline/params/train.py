"""The ``train``, ``heads`` and ``features`` sections: which heads run on which features, and their settings."""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator

from featcache.heads.metrics import DEFAULT_METRIC, SELECTION_METRICS, STEP_METRICS
from featcache.heads.registry import (
    DEFAULT_HEADS,
    HEAD_PATHS,
    REGISTRY,
    check_head_params,
    check_head_values,
    head_names,
    task_params,
)
from featcache.pipeline.params.base import StageParams, Strict
from featcache.pipeline.params.extract import check_scheduler
from featcache.util.names import did_you_mean

__all__ = ["DASK_HEADS", "FeatureRef", "TrainParams", "TrainSection", "check_dask_heads", "check_heads_sections",
           "check_train_metric", "dask_refusal", "stage_head_params"]

#: The heads ``train.scheduler`` trains on a dask cluster (:func:`featcache.heads.fit_lightgbm_dask`), each with
#: the parameters its dask fit does not take (``selection_metric``, from ``train.metric`` too, it takes).
DASK_HEADS: dict[str, tuple[str, ...]] = {"lightgbm": ("pca_components",)}


class FeatureRef(Strict):
    """One (backbone, layer) pair that heads are trained on."""

    backbone: str
    layer: str


class TrainParams(Strict):
    """Which heads run and how they are scored."""

    heads: list[str] = Field(default_factory=lambda: list(DEFAULT_HEADS), min_length=1)
    #: Where LightGBM trains (the streaming and in-memory heads run here): none, local or a scheduler's address
    #: (``featcache.pipeline.train_dask``). Not speed only: LightGBM on dask fits another model.
    scheduler: str = Field("none", description="none | local | a dask scheduler address (tcp://host:8786)")
    n_workers: int = Field(2, ge=1, description="workers of the local dask cluster (scheduler: local)")
    n_boot: int = Field(1000, ge=0)
    seed: int = 0
    #: What the heads select on (on the validation rows: their ``selection_metric``, unless a section sets one;
    #: early-stopped heads keep their loss for accuracy-like metrics, :func:`stage_head_params`) and compare ranks
    #: by; null: each head's own criterion, and compare ranks by DEFAULT_METRIC[task].
    metric: str | None = None

    def ranking_metric(self, task: str) -> str:
        """The metric compare ranks by: ``metric``, or the task's default (accuracy, rmse)."""
        return self.metric or DEFAULT_METRIC[task]

    @field_validator("scheduler")
    @classmethod
    def _scheduler(cls, value: str) -> str:
        return check_scheduler(value)

    @field_validator("heads")
    @classmethod
    def _known_heads(cls, value: list[str]) -> list[str]:
        allowed = head_names()
        for name in value:
            if name not in allowed:
                raise ValueError(f"unknown head {name!r}; allowed: {', '.join(allowed)}.{did_you_mean(name, allowed)}")
        return value


class TrainSection(StageParams):
    """The ``train`` section alone: what ``featcache compare --params`` reads (``train.metric``)."""

    train: TrainParams = TrainParams()


def check_train_metric(metric: str | None, task: str) -> None:
    """Fail on a ``train.metric`` that is not a selection metric of ``task`` (:data:`SELECTION_METRICS`).

    Raises
    ------
    ValueError
        ``"train.metric: 'acuracy' is not a classification metric; allowed: accuracy, ... Did you mean
        'accuracy'?"``.
    """
    allowed = SELECTION_METRICS[task]
    if metric is not None and metric not in allowed:
        raise ValueError(f"train.metric: {metric!r} is not a {task} metric; allowed: {', '.join(allowed)} or null "
                         f"(default null: each head's own criterion, ranked by {DEFAULT_METRIC[task]})."
                         f"{did_you_mean(metric, allowed)} Hint: write one of them (data.task is {task}).")


def check_heads_sections(heads: dict[str, dict[str, Any]], task: str) -> None:
    """Check each ``heads.<name>`` section against its head's parameters: keys, then values (no head is imported).

    One section serves both tasks' twins; a key that neither twin takes is an
    error naming the key and a close match. Each value is checked against the
    declaration (its field's annotation: type, range, each list item) of the
    ``task`` twin, or, for a key that only the other task's twin takes (``Cs``,
    ``max_iter`` of ``logreg`` under regression), of that twin: the key is not used
    for ``task``, but the section is shared and a bad value there would fail only
    when the task changes, after the extraction.

    Raises
    ------
    ValueError
        Prefixed with the section's key (``heads.logreg: unknown parameter 'max_itr' ...``) or the value's
        (``heads.lightgbm.learning_rate: 'fast' is not a float ...``, ``heads.mlp.hidden_sizes[1]: 0 is out of
        range ...``).
    """
    for name, section in heads.items():
        params = task_params(name, task, section)
        try:
            check_head_params(name, task, params, shared=True)
        except ValueError as error:  # named by its place in params.yaml, as pydantic names a section's keys
            raise ValueError(f"heads.{name}: {error}") from None
        check_head_values(name, task, params)
        others = {key: value for key, value in dict(section or {}).items() if key not in params}
        for other in HEAD_PATHS[name]:
            if other != task:
                check_head_values(name, other, others)


def stage_head_params(heads: dict[str, dict[str, Any]], train: TrainParams, head: str, task: str) -> dict[str, Any]:
    """The constructor parameters the train stage gives ``head`` for ``task``: its ``heads.<head>`` section (the
    ``task`` twin's keys, :func:`~featcache.heads.registry.task_params`), with ``selection_metric`` from
    ``train.metric`` unless the section sets one (null included: the head's own criterion).

    An early-stopped head (LightGBM, the MLPs: ``HeadEntry.early_stopped``) does not get a metric of
    :data:`~featcache.heads.metrics.STEP_METRICS` from ``train.metric``: it keeps stopping on its validation loss
    (class-weighted under ``class_weight: balanced``), smooth where accuracy-like metrics on a few validation
    rows per class flip by chance (measured: selecting on balanced accuracy cost the MLP 3.7 and LightGBM 4.7
    points of test balanced accuracy, benchmarks/README.md "Imbalanced classes"). Its section can still ask for
    one (``heads.mlp.selection_metric: balanced_accuracy``).
    """
    found = task_params(head, task, heads.get(head, {}))
    if train.metric is not None and not (REGISTRY[head].early_stopped and train.metric in STEP_METRICS):
        found.setdefault("selection_metric", train.metric)
    return found


def dask_refusal(scheduler: str, unsupported: dict[str, Any]) -> str:
    """The message for a LightGBM head that ``train.scheduler`` would train on dask with ``unsupported`` keys set."""
    return (f"train.scheduler={scheduler!r} trains lightgbm on dask (fit_lightgbm_dask), which does not take "
            f"{', '.join(f'{k}={v!r}' for k, v in unsupported.items())}; allowed there: null. Hint: set "
            "train.scheduler: none for this run (LightGBM in memory takes them), or leave those keys null in "
            "heads.lightgbm.")


def check_dask_heads(heads: dict[str, dict[str, Any]], train: TrainParams, task: str) -> None:
    """Fail when ``train.scheduler`` would train a head of :data:`DASK_HEADS` with a key its dask fit refuses.

    Raises
    ------
    ValueError
        :func:`dask_refusal`'s message.
    """
    if train.scheduler == "none":
        return
    for name, keys in DASK_HEADS.items():
        if name in train.heads:
            found = stage_head_params(heads, train, name, task)
            unsupported = {key: found[key] for key in keys if found.get(key) is not None}
            if unsupported:
                raise ValueError(dask_refusal(train.scheduler, unsupported))
