"""ClippedScaler: the heads' scaler clips each feature to its fitted range, then standardises."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.preprocessing import StandardScaler

from featcache.heads import load_head, make_head, save_head
from featcache.heads.preprocessing import ClippedScaler, fit_preprocess
from featcache.util.hashing import file_sha256


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fitted_rows_are_transformed_exactly_as_by_a_standard_scaler(dtype):
    X = np.random.default_rng(0).normal(size=(200, 12)).astype(dtype)
    got = ClippedScaler().fit(X).transform(X)
    assert got.dtype == dtype
    np.testing.assert_array_equal(got, StandardScaler().fit(X).transform(X))


def test_values_outside_the_fitted_range_are_clipped_to_it():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(100, 4))
    scaler = ClippedScaler().fit(X)
    np.testing.assert_array_equal(scaler.data_min_, X.min(axis=0))
    np.testing.assert_array_equal(scaler.data_max_, X.max(axis=0))
    new = np.array([[1e6, -1e6, 0.0, np.nan]])
    z = scaler.transform(new)
    reference = StandardScaler().fit(X)
    expected = reference.transform(np.array([[X[:, 0].max(), X[:, 1].min(), 0.0, np.nan]]))
    np.testing.assert_array_equal(z[:, :3], expected[:, :3])
    assert np.isnan(z[0, 3])  # NaN passes through as StandardScaler lets it


def test_partial_fit_over_chunks_keeps_the_range_of_every_chunk():
    X = np.random.default_rng(2).normal(size=(90, 5))
    streamed = ClippedScaler()
    for start in range(0, 90, 25):
        streamed.partial_fit(X[start:start + 25])
    whole = ClippedScaler().fit(X)
    np.testing.assert_array_equal(streamed.data_min_, whole.data_min_)
    np.testing.assert_array_equal(streamed.data_max_, whole.data_max_)
    # a second fit starts over
    refit = whole.fit(X[:10])
    np.testing.assert_array_equal(refit.data_max_, X[:10].max(axis=0))


def test_a_feature_count_mismatch_is_standard_scalers_error():
    scaler = ClippedScaler().fit(np.ones((5, 3)))
    with pytest.raises(ValueError, match="3 features"):
        scaler.transform(np.ones((2, 4)))


def test_fit_preprocess_uses_the_clipped_scaler():
    scaler, pca, _ = fit_preprocess(np.random.default_rng(3).normal(size=(30, 4)), None, 0)
    assert isinstance(scaler, ClippedScaler) and pca is None


def _near_dead_channel_data() -> dict[str, np.ndarray]:
    """Two classes told apart by feature 0; feature 1 is a post-ReLU channel that fired weakly on four training
    rows (two of each class)."""
    rng = np.random.default_rng(4)
    n = 200
    y = np.arange(n) % 2
    X = np.zeros((n, 6))
    X[:, 0] = np.where(y == 1, 1.0, -1.0) + rng.normal(scale=0.5, size=n)
    X[:, 2:] = rng.normal(size=(n, 4))
    X[:4, 1] = 1e-3
    X_test = np.zeros((40, 6))
    y_test = np.arange(40) % 2
    X_test[:, 0] = np.where(y_test == 1, 1.5, -1.5)
    X_test[:, 1] = 5.0  # ...and fires on every test image: a z of ~35,000 without the clip
    return {"X": X, "y": y, "X_test": X_test, "y_test": y_test}


@pytest.mark.parametrize("name", ["logreg", "mlp"])
def test_a_near_dead_channel_firing_on_test_images_does_not_decide_their_class(name):
    d = _near_dead_channel_data()
    params = {"logreg": {}, "mlp": {"hidden_sizes": (16,), "max_epochs": 30, "patience": 5, "n_threads": 1}}[name]
    head = make_head(name, "classification", params).fit(d["X"], d["y"])
    assert np.mean(head.predict(d["X_test"]) == d["y_test"]) == 1.0


def test_a_head_saved_before_the_range_was_kept_loads_with_a_standard_scaler(clf_data, tmp_path):
    head = make_head("logreg", "classification", {}).fit(clf_data["X_train"], clf_data["y_train"])
    folder = save_head(head, tmp_path / "head")
    with np.load(folder / "arrays.npz", allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    assert {"scaler_min", "scaler_max"} <= set(arrays)
    del arrays["scaler_min"], arrays["scaler_max"]
    np.savez(folder / "arrays.npz", **arrays)
    meta = json.loads((folder / "head.json").read_text())
    meta["sha256"]["arrays.npz"] = file_sha256(folder / "arrays.npz")
    (folder / "head.json").write_text(json.dumps(meta))
    old = load_head(folder)
    assert type(old.scaler_) is StandardScaler
    assert isinstance(load_head(tmp_path / "head").scaler_, StandardScaler)
    X = clf_data["X_test"] * 3  # beyond the training range: only a clipping scaler changes it
    manual = old.estimator_.predict_proba(StandardScaler.transform(old.scaler_, X))
    np.testing.assert_allclose(old.predict_proba(X), manual)
