"""fit_lightgbm_dask when the workers' parts do not each hold every class (a store's rows sorted by class), and its
streamed validation curve of a selection metric."""

from __future__ import annotations

import math

import numpy as np
import pytest

from featcache.heads import LightGBMHead, LightGBMRegressorHead, fit_lightgbm_dask
from featcache.heads.metrics import metric_value


def _class_sorted(n_classes: int, per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Separable rows, sorted by class (as a store of class folders holds them)."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(n_classes), per_class)
    X = rng.normal(size=(y.size, 6)).astype(np.float32)
    X[:, 0] += 8.0 * y
    return X, y


@pytest.mark.parametrize("n_classes", [2, 3])
def test_parts_without_every_class_learn_the_global_labels(n_classes):
    """Part 1 holds class 0 (and some of 1), part 2 the rest: lightgbm.dask's classifier label-encoded each
    part alone (3 classes: a part of classes 1, 2 trained them as 0, 1 and the model came back binary, an
    AxisError in the early stopping; 2 classes: each part one class, every row predicted class 0). The booster
    learns every class."""
    import dask.array as da
    import distributed  # a declared dependency: missing it must fail, not skip

    X, y = _class_sorted(n_classes, 40, 0)
    X_val, y_val = _class_sorted(n_classes, 10, 1)
    params = {"n_estimators": 20, "min_child_samples": 2, "n_classes": n_classes}
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None)
    with cluster, distributed.Client(cluster) as client:
        head = fit_lightgbm_dask(client, da.from_array(X, chunks=(y.size // 2, -1)), y, X_val, y_val, **params)
    assert isinstance(head, LightGBMHead) and np.array_equal(head.classes_, np.arange(n_classes))
    proba = head.predict_proba(X_val)
    assert proba.shape == (y_val.size, n_classes)
    assert np.mean(np.argmax(proba, axis=1) == y_val) >= 0.9


def _in_memory_curve(booster, X_val, y_val, task, name):
    """The metric after each round, from the booster's own predictions and metric_value (no streaming)."""
    def scores(i):
        p = booster.predict(X_val, num_iteration=i)
        return np.column_stack([1.0 - p, p]) if task == "classification" and p.ndim == 1 else p

    return np.array([metric_value(task, name, y_val, scores(i), None)
                     for i in range(1, booster.current_iteration() + 1)])


@pytest.mark.parametrize(("data", "task", "kind"), [("clf_data", "classification", "multiclass"),
                                                    ("binary_data", "classification", "binary"),
                                                    ("reg_data", "regression", "regression")])
def test_metric_curve_streams_the_metric_of_each_round_in_blocks(request, monkeypatch, data, task, kind):
    """metric_curve scores every round as metric_value does on the whole val set, streaming dask chunks; with a
    budget of a few rounds it scores them in blocks (a pass each) and skips the blocks after early stopping."""
    import dask.array as da

    from featcache.heads import dask_boosting
    from featcache.heads.dask_boosting import _early_stop, metric_curve
    from featcache.heads.metrics import LOWER_IS_BETTER, SELECTION_METRICS

    d = request.getfixturevalue(data) if data != "binary_data" else _binary(request.getfixturevalue("clf_data"))
    cls = LightGBMHead if task == "classification" else LightGBMRegressorHead
    booster = cls(n_estimators=40, early_stopping_rounds=None, n_jobs=1).fit(
        d["X_train"], d["y_train"], d["X_val"], d["y_val"]).booster_
    X_val = da.from_array(d["X_val"], chunks=(23, -1))
    for name in SELECTION_METRICS[task]:
        expected = _in_memory_curve(booster, d["X_val"], d["y_val"], task, name)
        curve = metric_curve(booster, X_val, d["y_val"], kind, name)
        np.testing.assert_allclose(curve, expected, rtol=1e-9, err_msg=name)
        per_row = 8 if task == "regression" else 9  # the prediction; or the class (uint8) and its probability
        monkeypatch.setattr(dask_boosting, "VAL_BUFFER_BYTES", 3 * d["y_val"].size * per_row)  # 3 rounds a block
        key = -expected if name not in LOWER_IS_BETTER else expected
        best = _early_stop(key, 3)
        blocks = metric_curve(booster, X_val, d["y_val"], kind, name, early_stopping_rounds=3)
        monkeypatch.undo()
        np.testing.assert_array_equal(blocks, curve[:blocks.size])
        assert blocks.size == min(40, 3 * math.ceil((best + 3) / 3)), (name, best, blocks.size)


def _binary(d):
    """Two of ``d``'s classes (0 and 1)."""
    keep = {s: d[f"y_{s}"] < 2 for s in ("train", "val")}
    return {f"{k}_{s}": d[f"{k}_{s}"][keep[s]] for k in "Xy" for s in ("train", "val")}
