"""Chunked access to numpy or dask rows: the out-of-core heads never hold more than one chunk.

:class:`RowChunks` serves rows of an in-memory array or a dask array (e.g.
``FeatureStore(path).to_dask(layer, split)``) one row chunk at a time;
:func:`streaming_sources` builds the training and selection sources of a
streaming head; :func:`materialise` reads a dask array into memory chunk by chunk.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
from sklearn.base import is_classifier
from sklearn.utils.validation import column_or_1d

from featcache.util.checks import check_int

from .splits import holdout_indices
from .validation import (
    PARAM_HINT,
    check_feature_matrix,
    check_feature_names,
    check_fraction,
    check_targets,
    validate_xy,
)

__all__ = [
    "DEFAULT_CHUNK_ROWS",
    "is_dask_array",
    "as_labels",
    "RowChunks",
    "stream_outputs",
    "materialise",
    "xy",
    "streaming_sources",
]

log = logging.getLogger(__name__)


DEFAULT_CHUNK_ROWS = 4096
"""Rows per chunk when an in-memory array is streamed (dask arrays keep their chunks)."""


def is_dask_array(X: Any) -> bool:
    """True for a ``dask.array.Array`` (checked without importing dask)."""
    return type(X).__module__.split(".")[0] == "dask" and hasattr(X, "chunks") and hasattr(X, "blocks")


def as_labels(y: Any) -> np.ndarray:
    """Labels/targets as a 1-D numpy array (a dask ``y`` is small: it is computed)."""
    if is_dask_array(y):
        y = y.compute()
    return np.asarray(y).ravel()


class RowChunks:
    """Rows of an (n, D) numpy or dask matrix, one row chunk at a time.

    Parameters
    ----------
    X : ndarray or dask.array.Array of shape (n, D)
        A dask array keeps its row chunks (one chunk is computed at a time; column
        chunks are merged lazily); an in-memory array is cut into ``chunk_rows``.
    y : array-like of shape (n,) or None
        Labels or targets served alongside (sliced like ``X``).
    chunk_rows : int
        Rows per chunk of an in-memory ``X``.
    rows : ndarray of bool, shape (n,), or None
        Serve only these rows (e.g. the training rows left after a hold-out).
    name : str
        Name of ``X`` in error messages.

    Attributes
    ----------
    n_rows : int
        Rows served (``rows.sum()`` or n).
    n_features : int
    bounds : list of (int, int)
        ``(start, stop)`` of each chunk in ``X``.
    """

    def __init__(
        self, X: Any, y: Any = None, chunk_rows: int = DEFAULT_CHUNK_ROWS,
        rows: np.ndarray | None = None, name: str = "X",
    ) -> None:
        check_int("chunk_rows", chunk_rows, 1, hint=PARAM_HINT)
        self.name = name
        self.dask = is_dask_array(X)
        if self.dask:
            if X.ndim != 2:
                raise ValueError(f"{name} has shape {X.shape}; allowed: a 2-D (n, D) array.")
            if any(np.isnan(c) for c in X.chunks[0]):
                raise ValueError(
                    f"{name} is a dask array with unknown row chunk sizes; allowed: known chunk sizes. "
                    f"Hint: call {name}.compute_chunk_sizes() or index with a numpy mask."
                )
            if len(X.chunks[1]) > 1:
                X = X.rechunk({1: -1})
            sizes: Sequence[int] = [int(c) for c in X.chunks[0]]
        else:
            X = check_feature_matrix(X, name)
            n = X.shape[0]
            sizes = [min(chunk_rows, n - s) for s in range(0, n, chunk_rows)]
        self.X = X
        stops = np.cumsum(sizes, dtype=np.int64)
        self.bounds = [(int(b - s), int(b)) for b, s in zip(stops, sizes)]
        self.n_features = int(X.shape[1])
        n_total = int(X.shape[0])
        self.y = None if y is None else as_labels(y)
        if self.y is not None and self.y.shape[0] != n_total:
            raise ValueError(
                f"{name} has {n_total} rows but its labels have {self.y.shape[0]}; they must match. "
                "Hint: take X and y of the same split."
            )
        if rows is not None and rows.shape != (n_total,):
            raise ValueError(f"row mask of shape {rows.shape} does not match {name} with {n_total} rows.")
        self.rows = rows
        self.n_rows = n_total if rows is None else int(rows.sum())

    def __len__(self) -> int:
        return len(self.bounds)

    @property
    def served_y(self) -> np.ndarray | None:
        """Labels/targets of the rows served, shape (n_rows,); None without ``y``."""
        return self.y if self.rows is None or self.y is None else self.y[self.rows]

    def chunk(self, i: int) -> tuple[np.ndarray, np.ndarray | None] | None:
        """Rows of chunk ``i`` as ``(X_chunk, y_chunk)``; None when none is selected."""
        start, stop = self.bounds[i]
        sel = None if self.rows is None else self.rows[start:stop]
        if sel is not None and not sel.any():
            return None
        Xc = self.X.blocks[i].compute() if self.dask else self.X[start:stop]
        Xc = check_feature_matrix(Xc, self.name)
        yc = None if self.y is None else self.y[start:stop]
        if sel is not None and not sel.all():
            Xc = Xc[sel]
            yc = None if yc is None else yc[sel]
        return Xc, yc

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        return self.iter()

    def iter(self, order: Sequence[int] | None = None) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        """Yield ``(X_chunk, y_chunk)`` in ``order`` (chunk indices; default: in order)."""
        for i in range(len(self)) if order is None else order:
            part = self.chunk(int(i))
            if part is not None:
                yield part


def stream_outputs(head: Any, X: Any, fn: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """``fn`` of the scaled rows of each chunk of ``X`` (numpy or dask), concatenated.

    ``head`` supplies ``chunk_rows``, ``scaler_`` and ``n_features_in_``.
    """
    check_feature_names(head, X)
    chunks = RowChunks(X, chunk_rows=head.chunk_rows, name="X")
    if chunks.n_features != head.n_features_in_:
        raise ValueError(
            f"X has {chunks.n_features} features, but {type(head).__name__} is expecting "
            f"{head.n_features_in_} features as input. Hint: use the same backbone layer (and pooling) "
            "for training and prediction."
        )
    return np.concatenate([fn(head.scaler_.transform(Xc)) for Xc, _ in chunks])


def materialise(X: Any, name: str = "X") -> Any:
    """A dask ``X`` read chunk by chunk into one preallocated array; anything else as is.

    For in-memory heads given dask arrays: the full array is built by copying one
    chunk at a time (peak = result + one chunk), never by ``np.asarray`` on the graph.
    """
    if not is_dask_array(X):
        return X
    chunks = RowChunks(X, name=name)
    dtype = np.float64 if X.dtype == np.float64 else np.float32
    out = np.empty((chunks.n_rows, chunks.n_features), dtype=dtype)
    pos = 0
    for Xc, _ in chunks:
        out[pos:pos + Xc.shape[0]] = Xc
        pos += Xc.shape[0]
    log.info("materialised dask %s %s into memory for an in-memory head", name, out.shape)
    return out


def xy(head: Any, X: Any, y: Any, name: str) -> tuple[Any, np.ndarray]:
    """Validate (X, y): fully for in-memory X (sklearn messages), y only for dask X."""
    classification = is_classifier(head)
    if y is None:
        raise ValueError(
            f"{type(head).__name__} requires y to be passed, but the target y is None. "
            "Hint: pass the labels (or targets) of the training rows."
        )
    if not is_dask_array(X):
        return validate_xy(X, y, classification, name)
    y = column_or_1d(as_labels(y) if is_dask_array(y) else np.asarray(y), warn=True)
    return X, check_targets(y, classification, "y" + name[1:])


def streaming_sources(
    head: Any, X: Any, y: Any, X_val: Any, y_val: Any, *, random_state: int | None
) -> tuple[RowChunks, RowChunks]:
    """Training and selection rows of a streaming head as :class:`RowChunks`.

    Without ``X_val`` a (stratified, for classifiers) ``head.validation_fraction`` of
    the training rows is held out by row mask, so both sources stream the same chunks.

    Parameters
    ----------
    head : estimator
        Supplies ``chunk_rows`` and ``validation_fraction``;
        a classifier (``sklearn.base.is_classifier``) gets class-label checks.
    X : ndarray or dask.array.Array of shape (n_train, D)
    y : array-like of shape (n_train,)
    X_val, y_val : as X and y with n_val rows, or None
    random_state : int or None
        Seed of the hold-out (the head's ``_seed()``).

    Returns
    -------
    train, val : RowChunks
    """
    classification = is_classifier(head)
    if (X_val is None) != (y_val is None):
        raise ValueError(
            "X_val and y_val must be given together; got "
            f"X_val={'None' if X_val is None else 'array'}, y_val={'None' if y_val is None else 'array'}."
        )
    X, y = xy(head, X, y, "X")
    if X_val is not None:
        X_val, y_val = xy(head, X_val, y_val, "X_val")
        train = RowChunks(X, y, head.chunk_rows, name="X")
        val = RowChunks(X_val, y_val, head.chunk_rows, name="X_val")
        if val.n_features != train.n_features:
            raise ValueError(
                f"X_val has {val.n_features} features but X has {train.n_features}. "
                "Hint: train and val must come from the same layer."
            )
    else:
        check_fraction("validation_fraction", head.validation_fraction)
        fit_idx, _ = holdout_indices(y, head.validation_fraction, random_state, classification)
        keep = np.zeros(y.shape[0], dtype=bool)
        keep[fit_idx] = True
        train = RowChunks(X, y, head.chunk_rows, rows=keep, name="X")
        val = RowChunks(X, y, head.chunk_rows, rows=~keep, name="X")
    if train.n_rows < 2 or val.n_rows < 1:
        raise ValueError(
            f"{train.n_rows} training / {val.n_rows} validation rows; need >= 2 / >= 1. "
            "Hint: pass more rows or X_val/y_val."
        )
    if classification and np.unique(train.y if train.rows is None else train.y[train.rows]).size < 2:
        raise ValueError("the training rows contain a single class; a classifier needs >= 2. "
                         "Hint: check the split assignment in the manifest.")
    return train, val
