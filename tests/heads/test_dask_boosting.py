"""fit_lightgbm_dask when the workers' parts do not each hold every class (a store's rows sorted by class)."""

from __future__ import annotations

import numpy as np
import pytest

from featcache.heads import LightGBMHead, fit_lightgbm_dask


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
