"""Out-of-core heads on a real HDF5 store read through dask: accuracy, no full reads, memory."""

from __future__ import annotations

import contextlib
import gc
import logging
import tracemalloc
import weakref

import dask.array as da
import numpy as np
import pytest

from _support.blob_store import LAYER, peak_rss, write_store
from featcache.heads import (
    LightGBMHead,
    LogisticRegressionHead,
    MLPHead,
    StreamingLogisticHead,
    StreamingMLPHead,
    StreamingMLPRegressorHead,
    StreamingRidgeHead,
    fit_and_evaluate,
    fit_lightgbm_dask,
    load_head,
    make_head,
    save_head,
)
from featcache.heads.dask_boosting import _early_stop
from featcache.heads.metrics import log_loss_score
from featcache.store import FeatureStore

CHUNK = 256
SPLITS = ("train", "val", "test")
MLP = {"hidden_sizes": (64,), "batch_size": 128, "max_epochs": 30, "patience": 4, "n_threads": 1}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """2,000 x 64 float16, 5 classes (about 0.85 accuracy for a linear model), 256-row blocks."""
    return write_store(tmp_path_factory.mktemp("ooc") / "blobs.h5", n=2000, dim=64, n_classes=5,
                       block_rows=CHUNK, sep=0.6)


@pytest.fixture(scope="module")
def splits(store):
    """Per split: dask features (256-row chunks), in-memory features and labels."""
    with FeatureStore(store) as fs:
        return {s: (fs.to_dask(LAYER, s, rows_per_chunk=CHUNK), fs.read(LAYER, s), fs.labels(s)) for s in SPLITS}


def _args(splits, dask=True):
    i = 0 if dask else 1
    return [part for s in SPLITS for part in (splits[s][i], splits[s][2])]


def _accuracy(head, X, y):
    return float(np.mean(head.predict(X) == y))


class Held:
    """What a guarded block read from dask: rows per read, rows alive at once, traced bytes."""

    def __init__(self) -> None:
        self.reads: list[int] = []
        self.live_rows = 0
        self.peak_rows = 0
        self.peak_bytes = 0

    def release(self, rows: int) -> None:
        self.live_rows -= rows


@contextlib.contextmanager
def no_full_reads(monkeypatch, limit=CHUNK, max_held=None, max_bytes=None):
    """Fail if the guarded block reads or holds more of a dask array than out-of-core code may.

    * ``limit``: no single ``compute`` / ``np.asarray`` of a dask array taller than this many rows;
    * ``max_held``: the arrays those reads return are counted until they are freed
      (``weakref.finalize``); more than ``max_held`` rows alive at once fails, so a
      head that reads every chunk and keeps them (to concatenate, or in a list of
      tensors) is caught although each read is small;
    * ``max_bytes``: tracemalloc's peak (numpy's allocations are traced) above the
      level at entry; more fails at exit, so copying the chunks one by one into one
      preallocated array is caught too.
    """
    held = Held()
    compute, to_numpy = da.Array.compute, da.Array.__array__

    def check(arr):
        rows = int(arr.shape[0])
        if rows > limit:
            raise AssertionError(f"a dask array of {rows} rows was materialised (limit {limit})")
        held.reads.append(rows)

    def track(result):
        if isinstance(result, np.ndarray) and result.ndim >= 1:
            rows = int(result.shape[0])
            held.live_rows += rows
            weakref.finalize(result, held.release, rows)
            if max_held is not None and held.live_rows > max_held:
                gc.collect()  # chunks only kept by reference cycles are not "held"
            held.peak_rows = max(held.peak_rows, held.live_rows)
            if max_held is not None and held.live_rows > max_held:
                raise AssertionError(f"{held.live_rows} rows read from dask are held at once (limit {max_held})")
        return result

    monkeypatch.setattr(da.Array, "compute", lambda self, **kw: (check(self), track(compute(self, **kw)))[1])
    monkeypatch.setattr(da.Array, "__array__",
                        lambda self, *a, **kw: (check(self), track(to_numpy(self, *a, **kw)))[1])
    compute(da.zeros(2, chunks=1))  # dask imports its scheduler lazily on the first compute: not the head's memory
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    try:
        yield held
        held.peak_bytes = tracemalloc.get_traced_memory()[1] - base
    finally:
        if started:
            tracemalloc.stop()
        monkeypatch.undo()
    if max_bytes is not None and held.peak_bytes > max_bytes:
        raise AssertionError(f"the block's traced memory peaked at {held.peak_bytes / 2**20:.2f} MiB above its start "
                             f"(limit {max_bytes / 2**20:.2f} MiB): the rows were gathered in memory")


# ----------------------------------------------------------------------------- accuracy
@pytest.mark.parametrize(
    "streaming, in_memory",
    [(StreamingLogisticHead(), LogisticRegressionHead()), (StreamingMLPHead(**MLP), MLPHead(**MLP))],
    ids=["sgd", "mlp"],
)
def test_streaming_heads_match_in_memory_accuracy(streaming, in_memory, splits):
    X_tr, X_va, X_te = (splits[s][0] for s in SPLITS)
    (A_tr, y_tr), (A_va, y_va), (A_te, y_te) = ((splits[s][1], splits[s][2]) for s in SPLITS)
    streaming.fit(X_tr, y_tr, X_va, y_va)
    in_memory.fit(A_tr, y_tr, A_va, y_va)
    acc_stream, acc_memory = _accuracy(streaming, X_te, y_te), _accuracy(in_memory, A_te, y_te)
    assert acc_memory >= 0.75  # chance is 0.2
    assert acc_stream >= acc_memory - 0.04, (acc_stream, acc_memory)
    proba = streaming.predict_proba(X_te)
    assert isinstance(proba, np.ndarray) and proba.shape == (y_te.size, 5)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(proba, streaming.predict_proba(A_te), rtol=1e-4, atol=1e-9)  # numpy input
    # scaler: one streaming pass over the training rows only
    assert streaming.scaler_.n_samples_seen_ == y_tr.size
    np.testing.assert_allclose(streaming.scaler_.mean_, A_tr.mean(axis=0), atol=1e-5)


def test_sgd_search_and_early_stopping_bookkeeping(splits):
    X_tr, y_tr = splits["train"][0], splits["train"][2]
    X_va, y_va = splits["val"][0], splits["val"][2]
    head = StreamingLogisticHead(alphas=[1e-4, 1e-2], max_epochs=6, patience=2).fit(X_tr, y_tr, X_va, y_va)
    assert [r["alpha"] for r in head.search_results_] == [1e-4, 1e-2]
    for r in head.search_results_:
        assert 1 <= r["best_epoch"] <= r["epochs_run"] <= 6
        assert r["epochs_run"] == 6 or r["epochs_run"] == r["best_epoch"] + 2
    best = min(head.search_results_, key=lambda r: (-r["val_accuracy"], r["val_log_loss"], -r["alpha"]))
    assert head.best_params_ == {"alpha": best["alpha"], "epochs": best["best_epoch"]}
    # the kept model is the best epoch's: its validation scores reproduce
    proba = head.predict_proba(X_va)
    assert np.mean(proba.argmax(axis=1) == y_va) == pytest.approx(best["val_accuracy"])
    assert log_loss_score(y_va, proba) == pytest.approx(best["val_log_loss"])


def test_streaming_is_seeded(splits):
    X_tr, y_tr = splits["train"][0], splits["train"][2]
    fit = lambda **kw: StreamingLogisticHead(alphas=[1e-3], max_epochs=3, **kw).fit(X_tr, y_tr)  # noqa: E731
    a, b, c = fit(), fit(), fit(random_state=1)
    np.testing.assert_array_equal(a.estimator_.coef_, b.estimator_.coef_)
    assert not np.array_equal(a.estimator_.coef_, c.estimator_.coef_)


def test_holdout_without_val_streams_only_fit_rows(splits):
    X_tr, A_tr, y_tr = splits["train"]
    head = StreamingMLPHead(**{**MLP, "validation_fraction": 0.25}).fit(X_tr, y_tr)
    assert head.scaler_.n_samples_seen_ == y_tr.size - int(np.ceil(0.25 * y_tr.size))
    assert _accuracy(head, splits["test"][0], splits["test"][2]) >= 0.7


def test_regression_twins(reg_data):
    d = reg_data  # numpy input, cut into 64-row chunks
    for head in (StreamingRidgeHead(chunk_rows=64), StreamingMLPRegressorHead(**MLP, chunk_rows=64)):
        head.fit(d["X_train"], d["y_train"], d["X_val"], d["y_val"])
        y, pred = d["y_test"], head.predict(d["X_test"])
        assert pred.shape == y.shape and pred.dtype == np.float64
        assert 1 - np.sum((y - pred) ** 2) / np.sum((y - y.mean()) ** 2) >= 0.8, type(head).__name__
        assert head.y_mean_ == pytest.approx(d["y_train"].mean())


@pytest.mark.parametrize(
    "head, data",
    [(StreamingLogisticHead(max_epochs=3), "clf_data"), (StreamingRidgeHead(max_epochs=3), "reg_data"),
     (StreamingMLPHead(**{**MLP, "max_epochs": 3}), "clf_data"),
     (StreamingMLPRegressorHead(**{**MLP, "max_epochs": 3}), "reg_data")],
    ids=lambda v: type(v).__name__ if not isinstance(v, str) else "",
)
def test_sklearn_contract(head, data, contract, request):
    d = request.getfixturevalue(data)
    contract(head, d["X_train"], d["y_train"], d["X_val"], d["y_val"])


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("head", [
    StreamingLogisticHead(max_epochs=5), StreamingRidgeHead(max_epochs=5),
    StreamingMLPHead(hidden_sizes=(16,), batch_size=128, max_epochs=100, patience=10, n_threads=1),
], ids=type)
def test_sklearn_estimator_checks(head, sklearn_checks):
    sklearn_checks(head)


# ----------------------------------------------------------------------------- no full reads
#: The guard's store: 16,000 x 128 float16, 9,600 training rows (4.7 MiB as float32). The limits
#: allow 4 chunks alive (1,024 rows) and 2.5 MiB of numpy temporaries (10 chunks as float64: the
#: scaler and SGD copy each chunk a few times; measured peak about 1.4 MiB), so gathering the
#: training rows fails either way.
BIG_ROWS, BIG_DIM, MAX_HELD = 16000, 128, 4 * CHUNK
MAX_BYTES = 10 * CHUNK * BIG_DIM * 8


@pytest.fixture(scope="module")
def big_splits(tmp_path_factory):
    path = write_store(tmp_path_factory.mktemp("ooc_big") / "big.h5", n=BIG_ROWS, dim=BIG_DIM, n_classes=5,
                       block_rows=CHUNK, sep=0.6)
    with FeatureStore(path) as fs:
        return {s: (fs.to_dask(LAYER, s, rows_per_chunk=CHUNK), fs.read(LAYER, s), fs.labels(s)) for s in SPLITS}


def _guard(monkeypatch):
    return no_full_reads(monkeypatch, max_held=MAX_HELD, max_bytes=MAX_BYTES)


class ConcatenatingLogisticHead(StreamingLogisticHead):
    """A deliberately broken "out-of-core" head: reads every chunk (each one small), then concatenates them."""

    def fit(self, X, y, X_val=None, y_val=None):
        chunks = [X.blocks[i].compute() for i in range(X.numblocks[0])]
        return super().fit(np.concatenate(chunks), y, X_val, y_val)


class PreallocatingLogisticHead(StreamingLogisticHead):
    """Broken the other way: copies chunk after chunk into one preallocated array (no chunk is kept)."""

    def fit(self, X, y, X_val=None, y_val=None):
        out, start = np.empty(X.shape, dtype=np.float32), 0
        for i in range(X.numblocks[0]):
            block = X.blocks[i].compute()
            out[start:start + block.shape[0]] = block
            start += block.shape[0]
        return super().fit(out, y, X_val, y_val)


def test_the_guard_catches_full_materialisation(big_splits, monkeypatch):
    X_tr, A_tr, y_tr = big_splits["train"]
    assert y_tr.size * BIG_DIM * 4 > 1.8 * MAX_BYTES and y_tr.size > 4 * MAX_HELD  # the limits can tell
    with pytest.raises(AssertionError, match="was materialised"):
        with _guard(monkeypatch):
            X_tr.compute()  # one read of everything
    with pytest.raises(AssertionError, match="was materialised"):
        with _guard(monkeypatch):
            np.asarray(X_tr)
    with pytest.raises(AssertionError, match="held at once"):
        with _guard(monkeypatch):
            ConcatenatingLogisticHead(max_epochs=1).fit(X_tr, y_tr)  # every chunk read, all kept
    with pytest.raises(AssertionError, match="traced memory peaked"):
        with _guard(monkeypatch):
            PreallocatingLogisticHead(max_epochs=1).fit(X_tr, y_tr)
    with pytest.raises(AssertionError, match="held at once|traced memory peaked"):
        with _guard(monkeypatch):  # an in-memory head given dask arrays gathers them (as it must)
            fit_and_evaluate(make_head("logreg", "classification"), "classification", *_args(big_splits), n_boot=0)


def test_out_of_core_path_never_materialises_the_full_array(big_splits, clf_data, monkeypatch):
    X_tr, y_tr = big_splits["train"][0], big_splits["train"][2]
    # Warm-up on small numpy data: modules imported on first use (torch, sklearn internals) are not rows held.
    fit_and_evaluate(make_head("sgd", "classification", {"max_epochs": 1}), "classification",
                     *(clf_data[k] for k in ("X_train", "y_train", "X_val", "y_val", "X_test", "y_test")), n_boot=0)
    StreamingMLPHead(**{**MLP, "max_epochs": 1}).fit(clf_data["X_train"],
                                                     clf_data["y_train"]).predict(clf_data["X_test"])
    with _guard(monkeypatch) as held:
        head = make_head("sgd", "classification", {"max_epochs": 3})
        result = fit_and_evaluate(head, "classification", *_args(big_splits), n_boot=0)
    assert held.reads and max(held.reads) <= CHUNK and held.peak_rows <= MAX_HELD
    assert result.metrics["accuracy"] >= 0.75 and result.metrics["n_train"] == y_tr.size
    assert result.metrics["val"]["accuracy"] >= 0.75  # the val rows predicted chunk by chunk, under the guard
    with _guard(monkeypatch) as held:
        StreamingMLPHead(**{**MLP, "max_epochs": 2}).fit(X_tr, y_tr).predict(big_splits["test"][0])
    assert held.reads and held.peak_rows <= MAX_HELD and held.peak_bytes <= MAX_BYTES
    # An in-memory head given dask arrays gathers them (it must), but chunk by chunk: never one whole read.
    with no_full_reads(monkeypatch) as held:
        memory = fit_and_evaluate(make_head("logreg", "classification"), "classification", *_args(big_splits),
                                  n_boot=0)
    assert held.reads and max(held.reads) <= CHUNK
    in_numpy = fit_and_evaluate(make_head("logreg", "classification"), "classification",
                                *_args(big_splits, dask=False), n_boot=0)
    np.testing.assert_array_equal(memory.scores, in_numpy.scores)
    assert memory.metrics["val"] == in_numpy.metrics["val"] is not None


def test_streaming_input_errors(splits, clf_data):
    X_tr, _, y_tr = splits["train"]
    with pytest.raises(ValueError, match="X has 2000 rows but its labels have 10"):
        StreamingLogisticHead().fit(da.zeros((2000, 4), chunks=500), y_tr[:10])
    unknown = X_tr[X_tr[:, 0] > 0]  # dask-boolean indexing: unknown chunk sizes
    with pytest.raises(ValueError, match=r"unknown row chunk sizes.*Hint: call X.compute_chunk_sizes\(\)"):
        StreamingLogisticHead().fit(unknown, y_tr[: 10])
    with pytest.raises(ValueError, match="X_val and y_val must be given together"):
        StreamingLogisticHead().fit(X_tr, y_tr, X_val=X_tr)
    with pytest.raises(ValueError, match=r"alphas=\[0\] is invalid"):
        StreamingLogisticHead(alphas=[0]).fit(X_tr, y_tr)
    head = StreamingLogisticHead(max_epochs=1).fit(clf_data["X_train"], clf_data["y_train"])
    with pytest.raises(ValueError, match="X has 64 features, but StreamingLogisticHead is expecting 32"):
        head.predict(X_tr)


@pytest.mark.parametrize("name", ["sgd", "streaming_mlp"])
@pytest.mark.parametrize("task", ["classification", "regression"])
def test_round_trip(name, task, clf_data, reg_data, tmp_path):
    d = clf_data if task == "classification" else reg_data
    params = {"max_epochs": 3} if name == "sgd" else {**MLP, "max_epochs": 3}
    head = make_head(name, task, params).fit(d["X_train"], d["y_train"], d["X_val"], d["y_val"])
    loaded = load_head(save_head(head, tmp_path / "h"))
    assert type(loaded) is type(head) and loaded.best_params_ == head.best_params_
    np.testing.assert_array_equal(loaded.predict(d["X_test"]), head.predict(d["X_test"]))
    if task == "classification":
        np.testing.assert_array_equal(loaded.predict_proba(d["X_test"]), head.predict_proba(d["X_test"]))


# ----------------------------------------------------------------------------- memory
def test_peak_rss_does_not_grow_with_rows(tmp_path):
    """Fresh processes: 4x the training rows (~41 MB float16 on disk) keep the same peak RSS."""
    n, n_val = 10_000, 2_000
    path = write_store(tmp_path / "big.h5", n=4 * n + n_val, dim=512, n_classes=5, block_rows=1024, sep=0.5)
    rss_n, _, acc = peak_rss(path, n, n_val)
    rss_4n, _, _ = peak_rss(path, 4 * n, n_val)
    assert acc > 0.5  # it learned something
    assert rss_4n <= 1.2 * rss_n, (rss_n, rss_4n)
    # contrast: materialising 4N rows would break the bound
    rss_memory, _, _ = peak_rss(path, 4 * n, n_val, mode="memory")
    assert rss_memory > 1.2 * rss_n, (rss_n, rss_memory)


# ----------------------------------------------------------------------------- lightgbm.dask
def test_early_stop_emulates_the_lightgbm_callback():
    curve = np.array([5.0, 4.0, 3.0, 3.5, 3.2, 2.9, 3.0, 3.1, 3.3])
    assert _early_stop(curve, 2) == 3  # rounds 4 and 5 do not beat round 3: stop
    assert _early_stop(curve, 3) == 6
    assert _early_stop(curve, None) == curve.size


def test_lightgbm_dask_on_local_cluster(splits, tmp_path, caplog):
    import distributed  # a declared dependency: missing it must fail, not skip
    params = {"n_estimators": 60, "learning_rate": 0.1, "num_leaves": 15, "early_stopping_rounds": 10}
    (X_tr, A_tr, y_tr), (X_va, A_va, y_va), (X_te, A_te, y_te) = (splits[s] for s in SPLITS)
    caplog.set_level(logging.WARNING)
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None)
    with cluster, distributed.Client(cluster) as client:
        head = fit_lightgbm_dask(client, X_tr, y_tr, X_va, y_va, **params)
    assert isinstance(head, LightGBMHead)
    assert head.best_params_ == {"n_estimators": head.best_iteration_}
    assert head.best_iteration_ == _early_stop(head.val_curve_, 10)
    # the curve is the validation log-loss of the truncated model
    assert head.val_curve_[head.best_iteration_ - 1] == pytest.approx(log_loss_score(y_va, head.predict_proba(A_va)))
    in_memory = LightGBMHead(**params, n_jobs=1).fit(A_tr, y_tr, A_va, y_va)
    acc = _accuracy(head, A_te, y_te)
    assert acc >= 0.7 and acc >= _accuracy(in_memory, A_te, y_te) - 0.05
    loaded = load_head(save_head(head, tmp_path / "lgbm"))
    np.testing.assert_array_equal(loaded.predict_proba(A_te), head.predict_proba(A_te))


def test_row_chunks_serve_the_labels_of_their_rows():
    from featcache.heads.chunks import RowChunks

    X, y = np.zeros((6, 2), dtype=np.float32), np.arange(6.0)
    rows = np.array([True, False, True, True, False, True])
    assert np.array_equal(RowChunks(X, y, 4, rows=rows).served_y, [0.0, 2.0, 3.0, 5.0])
    assert np.array_equal(RowChunks(X, y, 4).served_y, y)
    assert RowChunks(X, None, 4, rows=rows).served_y is None


@pytest.mark.parametrize("cls", [StreamingRidgeHead, StreamingMLPRegressorHead])
def test_streaming_regressors_standardise_on_the_fitted_rows(cls, monkeypatch):
    # without X_val a hold-out is carved out; the target scale comes from the remaining rows only
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(200, 4)).astype(np.float32), rng.normal(size=200)
    seen = []
    real = cls._fit_target_scale
    monkeypatch.setattr(cls, "_fit_target_scale", lambda self, y_fit: (seen.append(y_fit), real(self, y_fit)))
    params = {"max_epochs": 1} if cls is StreamingRidgeHead else {**MLP, "max_epochs": 1}
    head = cls(**params, chunk_rows=64).fit(X, y)
    assert seen[0].size == 160 and head.y_mean_ == pytest.approx(float(np.mean(seen[0])))


@pytest.mark.parametrize("cls, data", [(StreamingMLPHead, "clf_data"), (StreamingMLPRegressorHead, "reg_data")])
def test_streaming_mlp_random_state_none_means_0_for_the_holdout_too(cls, data, request):
    # as MLPHead: None means 0, the hold-out of the training rows included (it used to be random)
    d = request.getfixturevalue(data)
    params = {**MLP, "max_epochs": 2, "random_state": None, "chunk_rows": 100}
    a, b = (cls(**params).fit(d["X_train"], d["y_train"]) for _ in range(2))
    assert a.history_ == b.history_
    np.testing.assert_array_equal(a.predict(d["X_test"]), b.predict(d["X_test"]))
    assert cls(**{**params, "random_state": 0}).fit(d["X_train"], d["y_train"]).history_ == a.history_


def test_streaming_logistic_predict_proba_is_float64_for_float32_input(clf_data):
    # it returned float32 for float32 features; every other head returns float64 (ClassifierHead)
    d = {k: v.astype(np.float32) if k.startswith("X") else v for k, v in clf_data.items()}
    head = StreamingLogisticHead(max_epochs=2).fit(d["X_train"], d["y_train"], d["X_val"], d["y_val"])
    assert head.predict_proba(d["X_test"]).dtype == np.float64
    assert head.predict_proba(da.from_array(d["X_test"], chunks=(50, -1))).dtype == np.float64
