"""Feature preprocessing (scaler, optional PCA) and chunked access to numpy/dask rows.

Private to :mod:`featcache.heads`:

- :func:`fit_preprocess` / :func:`apply_preprocess`: StandardScaler then optional PCA,
  always fitted on training rows only; :class:`SelectionSets` builds them per
  selection set (validation split, hold-out, or each cross-validation fold).
- :class:`RowChunks`: rows of an in-memory array or a dask array (e.g.
  ``FeatureStore(path).to_dask(layer, split)``) served one row chunk at a time, so
  the out-of-core heads never hold more than one chunk of features.
"""

from __future__ import annotations

import logging
import numbers
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np
from sklearn.decomposition import PCA
from sklearn.preprocessing import StandardScaler
from sklearn.utils.validation import check_array, column_or_1d

from ._base import FLOAT_DTYPES, Split, _check_labels, _validate_xy, check_fraction, check_int, holdout_indices

__all__ = [
    "DEFAULT_CHUNK_ROWS",
    "RowChunks",
    "apply_preprocess",
    "as_labels",
    "average_rows",
    "check_pca_components",
    "fit_preprocess",
    "fit_scaler_streaming",
    "is_dask_array",
    "materialise",
    "SelectionSet",
    "SelectionSets",
    "stream_outputs",
    "streaming_sources",
]

log = logging.getLogger(__name__)

DEFAULT_CHUNK_ROWS = 4096
"""Rows per chunk when an in-memory array is streamed (dask arrays keep their chunks)."""


# ----------------------------------------------------------------------------- PCA
def check_pca_components(value: Any) -> None:
    """Raise ValueError unless ``value`` is None, an int >= 1 or a float in (0, 1)."""
    if value is None:
        return
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1:
        return
    if isinstance(value, numbers.Real) and not isinstance(value, (bool, numbers.Integral)) and 0 < value < 1:
        return
    raise ValueError(
        f"pca_components={value!r} is invalid; allowed: None (no reduction), an integer >= 1 "
        "(number of components) or a float in (0, 1) (fraction of explained variance to keep). "
        "Hint: e.g. pca_components=256 or pca_components=0.95."
    )


def fit_preprocess(
    X: np.ndarray, pca_components: int | float | None, random_state: int | None
) -> tuple[StandardScaler, PCA | None, np.ndarray]:
    """Fit a StandardScaler, then optionally a PCA on the scaled rows of ``X``.

    Parameters
    ----------
    X : ndarray of shape (n, D)
        The rows the statistics may come from (training rows only).
    pca_components : None, int or float
        See :func:`check_pca_components`.
    random_state : int or None
        Seed of the PCA solver (randomized SVD when sklearn picks it).

    Returns
    -------
    scaler : StandardScaler
    pca : PCA or None
    X_t : ndarray of shape (n, D) or (n, n_components)
        ``X`` transformed by both.
    """
    check_pca_components(pca_components)
    scaler = StandardScaler().fit(X)
    X_t = scaler.transform(X)
    if pca_components is None:
        return scaler, None, X_t
    top = min(X.shape)
    if isinstance(pca_components, numbers.Integral) and pca_components > top:
        raise ValueError(
            f"pca_components={pca_components} exceeds min(n_rows, n_features)={top} of the "
            f"training rows ({X.shape[0]} x {X.shape[1]}); allowed: 1..{top} or a float in (0, 1). "
            "Hint: lower pca_components or use a variance fraction such as 0.95."
        )
    pca = PCA(n_components=pca_components, random_state=random_state)
    X_t = pca.fit_transform(X_t)
    log.debug("PCA: %d -> %d components", X.shape[1], pca.n_components_)
    return scaler, pca, X_t


def apply_preprocess(X: np.ndarray, scaler: StandardScaler | None, pca: PCA | None) -> np.ndarray:
    """Apply a fitted scaler (if any), then a fitted PCA (if any), to ``X`` (n, D)."""
    if scaler is not None:
        X = scaler.transform(X)
    if pca is not None:
        X = pca.transform(X)
    return X


class SelectionSet(NamedTuple):
    """One preprocessed selection set; ``scaler``/``pca`` were fitted on its fit rows."""

    X_fit: np.ndarray
    y_fit: np.ndarray
    X_sel: np.ndarray
    y_sel: np.ndarray
    scaler: StandardScaler
    pca: PCA | None


class SelectionSets:
    """Preprocessed selection sets of a :class:`~featcache.heads._base.Split`.

    Iterating yields one :class:`SelectionSet` (train, or train minus the hold-out,
    against the validation or hold-out rows; built once and cached) or one per
    cross-validation fold (rebuilt on every iteration, so the k preprocessed folds
    are never all in memory). Each set's scaler and PCA are fitted on its fit rows.

    Parameters
    ----------
    split : Split
    pca_components : None, int or float
    random_state : int or None
    dtype : numpy dtype or None
        Cast of the preprocessed features (float64 for lbfgs: the solver would
        otherwise copy float32 input on every fit); None keeps the scaler's dtype.
    """

    def __init__(self, split: Split, pca_components: int | float | None, random_state: int | None,
                 dtype: Any = None) -> None:
        self.split, self.pca_components, self.random_state, self.dtype = split, pca_components, random_state, dtype
        self._cached = None if split.folds is not None else [self._build(split.X_fit, split.y_fit, split.X_sel,
                                                                          split.y_sel)]

    def _build(self, X_fit: np.ndarray, y_fit: np.ndarray, X_sel: np.ndarray, y_sel: np.ndarray) -> SelectionSet:
        scaler, pca, X_fit_t = fit_preprocess(X_fit, self.pca_components, self.random_state)
        X_sel_t = apply_preprocess(X_sel, scaler, pca)
        if self.dtype is not None:
            X_fit_t, X_sel_t = X_fit_t.astype(self.dtype, copy=False), X_sel_t.astype(self.dtype, copy=False)
        return SelectionSet(X_fit_t, y_fit, X_sel_t, y_sel, scaler, pca)

    def __iter__(self) -> Iterator[SelectionSet]:
        if self._cached is not None:
            yield from self._cached
            return
        X, y = self.split.X_train, self.split.y_train
        for fit_idx, sel_idx in self.split.folds:
            yield self._build(X[fit_idx], y[fit_idx], X[sel_idx], y[sel_idx])

    def final(self, X_final: np.ndarray) -> tuple[StandardScaler, PCA | None, np.ndarray]:
        """Scaler, PCA and transformed rows for the final refit on ``X_final``.

        Reuses the cached set's preprocessing when ``X_final`` is its fit rows (a
        validation split was given), else fits anew on ``X_final`` only.
        """
        if self._cached is not None and X_final is self.split.X_fit:
            cached = self._cached[0]
            return cached.scaler, cached.pca, cached.X_fit
        scaler, pca, X_t = fit_preprocess(X_final, self.pca_components, self.random_state)
        return scaler, pca, (X_t if self.dtype is None else X_t.astype(self.dtype, copy=False))


def average_rows(
    name: str, values: np.ndarray, stage: str, per_set: list[list[dict[str, Any]]], folds: bool
) -> list[dict[str, Any]]:
    """One result row per value: the scores of each selection set, averaged over sets.

    ``n_iter`` is the maximum and ``converged`` the conjunction over sets; with
    ``folds`` a ``cv_folds`` entry records the number of folds.
    """
    rows = []
    for i, value in enumerate(values):
        scores = [per[i] for per in per_set]
        row: dict[str, Any] = {name: float(value), "stage": stage}
        for key in scores[0]:
            vals = [sc[key] for sc in scores]
            if key == "n_iter":
                row[key] = int(max(vals))
            elif key == "converged":
                row[key] = bool(all(vals))
            else:
                row[key] = float(np.mean(vals))
        if folds:
            row["cv_folds"] = len(per_set)
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- chunks
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
        check_int("chunk_rows", chunk_rows, 1)
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
            X = check_array(X, dtype=FLOAT_DTYPES, input_name=name)
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

    def chunk(self, i: int) -> tuple[np.ndarray, np.ndarray | None] | None:
        """Rows of chunk ``i`` as ``(X_chunk, y_chunk)``; None when none is selected."""
        start, stop = self.bounds[i]
        sel = None if self.rows is None else self.rows[start:stop]
        if sel is not None and not sel.any():
            return None
        Xc = self.X.blocks[i].compute() if self.dask else self.X[start:stop]
        Xc = check_array(Xc, dtype=FLOAT_DTYPES, input_name=self.name)
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
    chunks = RowChunks(X, chunk_rows=head.chunk_rows, name="X")
    if chunks.n_features != head.n_features_in_:
        raise ValueError(
            f"X has {chunks.n_features} features, but {type(head).__name__} is expecting "
            f"{head.n_features_in_} features as input. Hint: use the same backbone layer (and pooling) "
            "for training and prediction."
        )
    return np.concatenate([fn(head.scaler_.transform(Xc)) for Xc, _ in chunks])


def fit_scaler_streaming(chunks: RowChunks) -> StandardScaler:
    """StandardScaler fitted in one pass over ``chunks`` with ``partial_fit``."""
    if chunks.n_rows < 1:
        raise ValueError(f"{chunks.name} has no rows to fit a scaler on; allowed: >= 1 row.")
    scaler = StandardScaler()
    for Xc, _ in chunks:
        scaler.partial_fit(Xc)
    return scaler


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


def _check_targets(y: np.ndarray, classification: bool, name: str) -> np.ndarray:
    if classification:
        return _check_labels(y, name)
    if y.dtype.kind not in "iuf" or not np.all(np.isfinite(y)):
        raise ValueError(
            f"{name} holds non-numeric or non-finite targets; allowed: finite numbers. "
            "Hint: drop rows whose target is NaN."
        )
    return y.astype(np.float64, copy=False)


def _xy(head: Any, X: Any, y: Any, name: str) -> tuple[Any, np.ndarray]:
    """Validate (X, y): fully for in-memory X (sklearn messages), y only for dask X."""
    classification = bool(head._classification)
    if y is None:
        raise ValueError(
            f"{type(head).__name__} requires y to be passed, but the target y is None. "
            "Hint: pass the labels (or targets) of the training rows."
        )
    if not is_dask_array(X):
        return _validate_xy(X, y, classification, name)
    y = column_or_1d(as_labels(y) if is_dask_array(y) else np.asarray(y), warn=True)
    return X, _check_targets(y, classification, "y" + name[1:])


def streaming_sources(head: Any, X: Any, y: Any, X_val: Any, y_val: Any) -> tuple[RowChunks, RowChunks]:
    """Training and selection rows of a streaming head as :class:`RowChunks`.

    Without ``X_val`` a (stratified, for classifiers) ``head.validation_fraction`` of
    the training rows is held out by row mask, so both sources stream the same chunks.

    Parameters
    ----------
    head : estimator
        Supplies ``chunk_rows``, ``validation_fraction``, ``random_state`` and
        ``_classification``.
    X : ndarray or dask.array.Array of shape (n_train, D)
    y : array-like of shape (n_train,)
    X_val, y_val : as X and y with n_val rows, or None

    Returns
    -------
    train, val : RowChunks
    """
    classification = bool(head._classification)
    if (X_val is None) != (y_val is None):
        raise ValueError(
            "X_val and y_val must be given together; got "
            f"X_val={'None' if X_val is None else 'array'}, y_val={'None' if y_val is None else 'array'}."
        )
    X, y = _xy(head, X, y, "X")
    if X_val is not None:
        X_val, y_val = _xy(head, X_val, y_val, "X_val")
        train = RowChunks(X, y, head.chunk_rows, name="X")
        val = RowChunks(X_val, y_val, head.chunk_rows, name="X_val")
        if val.n_features != train.n_features:
            raise ValueError(
                f"X_val has {val.n_features} features but X has {train.n_features}. "
                "Hint: train and val must come from the same layer."
            )
    else:
        check_fraction("validation_fraction", head.validation_fraction)
        fit_idx, _ = holdout_indices(y, head.validation_fraction, head.random_state, classification)
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
