"""``train.scheduler``: the train stage's LightGBM on a dask.distributed cluster.

``train.scheduler`` takes the values of ``extract_run.scheduler`` (checked and connected by the same code,
:mod:`featcache.util.dask_client`): ``none`` trains in this process; ``local`` starts a ``LocalCluster`` of
``train.n_workers`` processes for the fit and closes it afterwards; ``tcp://host:8786`` connects to a running
scheduler (one that does not answer: exit 2 naming ``train.scheduler``).

Per head:

* ``lightgbm`` trains through :func:`featcache.heads.fit_lightgbm_dask` on the store's train rows as a dask
  array (the workers read them from the feature file by its absolute path: one machine or a shared file
  system), split into at least one part per worker; val and test are read here as for the in-memory head,
  early stopping is replayed on the val rows on the client (on the loss, or on the head's ``selection_metric``:
  ``train.metric`` unless ``heads.lightgbm`` sets one; ``pca_components`` is refused, :data:`DASK_HEADS`).
  The fitted state is copied into the LightGBM head the stage made, so it is scored, saved and loaded
  (``featcache predict``) exactly as one fitted in memory.
  It is NOT the same model as the in-memory fit (each worker bins and histograms its own rows), hence
  ``train.scheduler`` and ``train.n_workers`` are params the train stages track.
* ``sgd`` and ``streaming_mlp`` stay in this process: they update one model chunk by chunk, in order, so
  under a client each chunk would be read on a worker and shipped back here one at a time (the same reads
  plus the transfer, nothing in parallel).
* ``logreg`` and ``mlp`` train in memory in this process.

For those heads one log line says that the scheduler is not used.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from featcache.errors import ParamError
from featcache.heads.registry import STREAMING_HEADS
from featcache.pipeline.params.train import DASK_HEADS, dask_refusal
from featcache.store import FeatureStore
from featcache.util.dask_client import ClientHandle

__all__ = ["DaskLightGBM", "dask_lightgbm"]

logger = logging.getLogger(__name__)

#: Threads of each LocalCluster worker: LightGBM trains with one thread per worker process.
THREADS_PER_WORKER = 1


class DaskLightGBM:
    """Stands in for a LightGBM head in :func:`~featcache.heads.fit_and_evaluate`: ``fit`` trains it on dask.

    ``fit`` opens the cluster, runs :func:`~featcache.heads.fit_lightgbm_dask` with the head's parameters,
    closes the cluster and copies the fitted state into ``head``; everything else (parameters, tags,
    ``predict_proba``, ``classes_``, ...) is the head's.

    Parameters
    ----------
    head : LightGBMHead or LightGBMRegressorHead
        The unfitted head of the stage (:func:`~featcache.heads.make_head`); fitted in place.
    task : {"classification", "regression"}
    scheduler : str
        ``local`` or a scheduler's address.
    n_workers : int
        Workers of the ``LocalCluster`` (``scheduler: local``).
    """

    _streaming = True  # fit_and_evaluate passes the dask train rows through (val and test are numpy)

    def __init__(self, head: Any, task: str, scheduler: str, n_workers: int) -> None:
        self.head, self.task, self.scheduler, self.n_workers = head, task, scheduler, n_workers
        self.record: dict[str, Any] = {}

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name == "head":
            raise AttributeError(name)
        return getattr(self.head, name)

    def __sklearn_tags__(self) -> Any:
        return self.head.__sklearn_tags__()

    def set_params(self, **params: Any) -> "DaskLightGBM":
        """Set the head's parameters."""
        self.head.set_params(**params)
        return self

    @staticmethod
    def train_rows(store_path: str | Path, layer: str) -> Any:
        """The train rows of ``layer`` as a dask array that reads the store by its absolute path."""
        with FeatureStore(Path(store_path).absolute()) as store:
            return store.to_dask(layer, "train")

    def fit(self, X: Any, y: Any, X_val: Any = None, y_val: Any = None) -> "DaskLightGBM":
        """Train the head on the cluster (``X``: dask train rows; ``X_val``/``y_val``: the val rows here).

        Raises
        ------
        ParamError
            Without val rows (the early stopping replays on them), or when the scheduler does not answer.
        """
        from featcache.heads import fit_lightgbm_dask

        if X_val is None or len(y_val) == 0:
            raise ParamError(
                f"train.scheduler={self.scheduler!r} trains lightgbm on dask, which needs val rows for its early "
                "stopping; the store has none. Hint: give data.split a val fraction (then prepare and extract "
                "again), or set train.scheduler: none.")
        address = None if self.scheduler == "local" else self.scheduler
        handle = ClientHandle(None, address, self.n_workers, THREADS_PER_WORKER, setting="train.scheduler",
                              error=ParamError)
        try:
            workers = len(handle.client.scheduler_info().get("workers", {}))
            if X.numblocks[0] < workers:  # one part per worker at least: each worker trains on rows it holds
                X = X.rechunk({0: max(1, math.ceil(X.shape[0] / workers))})
            logger.info("lightgbm trains on dask (train.scheduler=%s): %d workers, %d parts of the %d train rows",
                        self.scheduler, workers, X.numblocks[0], X.shape[0])
            fitted = fit_lightgbm_dask(handle.client, X, y, X_val, y_val, task=self.task,
                                       **self.head.get_params(deep=False))
        finally:
            handle.close()
        vars(self.head).update(vars(fitted))
        self.record = {"scheduler": self.scheduler, "n_workers": workers, "n_parts": int(X.numblocks[0])}
        return self


def dask_lightgbm(head: Any, name: str, task: str, train: Any) -> DaskLightGBM | None:
    """What trains ``head`` (the head ``name``) under ``train.scheduler``: a :class:`DaskLightGBM`, or None.

    None: the head trains in this process (``train.scheduler: none``, or a head that does not train on
    dask, for which one line is logged).

    Parameters
    ----------
    head : estimator
        The head made by :func:`~featcache.heads.make_head`.
    name : str
        Its name (``train.heads``).
    task : {"classification", "regression"}
    train : TrainParams
        ``scheduler`` and ``n_workers``.
    """
    if train.scheduler == "none":
        return None
    if name in DASK_HEADS:
        unsupported = {key: getattr(head, key) for key in DASK_HEADS[name] if getattr(head, key) is not None}
        if unsupported:  # before the store is opened or a cluster started
            raise ParamError(dask_refusal(train.scheduler, unsupported))
        return DaskLightGBM(head, task, train.scheduler, train.n_workers)
    why = ("it streams its chunks through one model in order, which a cluster would only ship back here"
           if name in STREAMING_HEADS else "it trains in memory")
    logger.info("train.scheduler=%s is not used for head %s: %s in this process", train.scheduler, name, why)
    return None
