"""heads/onnx_graph.py: a fitted head as ONNX gives, in onnxruntime, the numbers of its predict_proba / predict.

Tiny heads on random features (some of them ReLU-like: exactly 0 on many rows), scored on rows that leave the
training range (the ClippedScaler's clip must act). float32 graph against scikit-learn's float64: probabilities
within 1e-6 absolute (rtol 1e-5), predictions within 1e-5 of the target's scale.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import pytest

from featcache.heads import load_head, make_head, onnx_graph, save_head
from featcache.heads.onnx_graph import (
    CHECK_ROWS,
    FEATURES,
    SCORES,
    HeadExportError,
    check_rows,
    head_graph,
    verify_head_graph,
)

ort = pytest.importorskip("onnxruntime")

N_FEATURES = 12


def _data(task: str, n_classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(240, N_FEATURES)).astype(np.float32)
    X[:, :4] = np.maximum(X[:, :4], 0)  # post-ReLU channels
    score = X @ rng.normal(size=N_FEATURES)
    if task == "regression":
        return X, score * 10 + 50
    return X, np.digitize(score, np.quantile(score, np.linspace(0, 1, n_classes + 1)[1:-1]))


def _fit(name: str, task: str, n_classes: int, **params: Any) -> tuple[Any, np.ndarray]:
    X, y = _data(task, n_classes)
    head = make_head(name, task, params).fit(X[:160], y[:160], X[160:200], y[160:200])
    rows = np.concatenate([X[200:], X[200:] * 3.0, -X[200:] * 2.0])  # out of the fitted range too
    return head, rows


def _run(head: Any, rows: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(head_graph(head).SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run([SCORES], {FEATURES: rows})[0]


def _expected(head: Any, rows: np.ndarray, task: str) -> np.ndarray:
    return head.predict_proba(rows) if task == "classification" else head.predict(rows)


def _check(got: np.ndarray, expected: np.ndarray, task: str) -> None:
    assert got.dtype == np.float32 and got.shape == expected.shape
    if task == "classification":
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-5)
    else:
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * float(np.abs(expected).max()))


MLP = {"hidden_sizes": [16], "max_epochs": 4, "batch_size": 32, "n_threads": 1}
LGBM = {"n_estimators": 25, "min_child_samples": 3, "n_jobs": 1}
CASES = [
    ("logreg", "classification", 3, {}),
    ("logreg", "classification", 2, {}),
    ("logreg", "classification", 4, {"pca_components": 5}),
    ("logreg", "regression", 0, {}),
    ("logreg", "regression", 0, {"pca_components": 0.9}),
    ("sgd", "classification", 3, {}),
    ("sgd", "classification", 2, {}),
    ("sgd", "regression", 0, {}),
    ("mlp", "classification", 3, MLP),
    ("mlp", "classification", 3, {**MLP, "hidden_sizes": [16, 8], "pca_components": 6}),
    ("mlp", "regression", 0, MLP),
    ("streaming_mlp", "classification", 3, MLP),
    ("streaming_mlp", "regression", 0, MLP),
    ("lightgbm", "classification", 3, LGBM),
    ("lightgbm", "classification", 2, LGBM),
    ("lightgbm", "classification", 3, {**LGBM, "pca_components": 4}),
    ("lightgbm", "regression", 0, LGBM),
    ("knn", "classification", 3, {}),
    ("knn", "classification", 3, {"class_weight": "balanced", "ks": [7]}),
    ("knn", "regression", 0, {}),
]


@pytest.mark.parametrize(("name", "task", "n_classes", "params"), CASES,
                         ids=[f"{n}-{t}-{k}{'-pca' if 'pca_components' in p else ''}" for n, t, k, p in CASES])
def test_onnxruntime_gives_the_heads_scores(name, task, n_classes, params):
    """Was: no ONNX form of a head. Every supported head and task: the graph's scores are the head's."""
    head, rows = _fit(name, task, n_classes, **params)
    _check(_run(head, rows), _expected(head, rows, task), task)


@pytest.mark.parametrize("name", ["logreg", "mlp", "lightgbm"])
def test_a_saved_and_loaded_head_exports_the_same_numbers(name, tmp_path):
    """The loaded head (coef from arrays.npz, LightGBM's model.txt cut at the best iteration, the MLP's
    state dict) gives the graph the fitted head gives."""
    head, rows = _fit(name, "classification", 3, **{"mlp": MLP, "lightgbm": LGBM}.get(name, {}))
    loaded = load_head(save_head(head, tmp_path / name))
    _check(_run(loaded, rows), _expected(head, rows, "classification"), "classification")


def test_the_clip_to_the_training_range_is_in_the_graph():
    """Rows far outside the training range score as the ClippedScaler clips them (without the clip the
    logistic regression's probabilities would move far beyond the tolerance)."""
    head, rows = _fit("logreg", "classification", 3)
    far = rows * 50.0
    _check(_run(head, far), head.predict_proba(far), "classification")


def test_classes_absent_from_the_training_rows_get_zero_columns():
    """n_classes=5 with labels 0..2 in train and val: columns 3 and 4 are 0, the others in classes_ order."""
    X, y = _data("classification", 3)
    for name, params in (("logreg", {}), ("lightgbm", LGBM)):
        head = make_head(name, "classification", {**params, "n_classes": 5}).fit(X[:160], y[:160], X[160:200],
                                                                                 y[160:200])
        got = _run(head, X[200:])
        assert got.shape == (40, 5) and not got[:, 3:].any()
        _check(got, head.predict_proba(X[200:]), "classification")


def test_an_unregistered_head_is_refused_naming_the_supported_heads():
    from sklearn.linear_model import LogisticRegression

    X, y = _data("classification", 3)
    with pytest.raises(HeadExportError, match=r"LogisticRegression cannot be exported.*allowed heads: knn, lightgbm, "
                                              r"logreg, mlp, sgd, streaming_mlp.*featcache predict"):
        head_graph(LogisticRegression().fit(X, y))


def test_a_head_fitted_on_named_columns_is_refused():
    pd = pytest.importorskip("pandas")
    X, y = _data("classification", 3)
    frame = pd.DataFrame(X, columns=[f"f{i}" for i in range(N_FEATURES)])
    head = make_head("logreg", "classification").fit(frame[:160], y[:160])
    with pytest.raises(HeadExportError, match=r"LogisticRegressionHead was fitted on a DataFrame.*'f0'.*Hint"):
        head_graph(head)


def test_a_head_over_what_one_onnx_file_holds_is_refused(monkeypatch):
    """A knn head ships its training rows: past protobuf's 2 GiB it is refused with the size and a way out."""
    head, _ = _fit("knn", "classification", 3)
    rows_bytes = 160 * N_FEATURES * 4  # the float32 training rows, the largest constant
    monkeypatch.setattr(onnx.checker, "MAXIMUM_PROTOBUF", rows_bytes)
    with pytest.raises(HeadExportError, match=r"the head's constants take 0\.00 GiB at train_rows_t \(12, 160\), over "
                                              r"the 0 GiB one ONNX file holds .*featcache predict"):
        head_graph(head)
    monkeypatch.setattr(onnx.checker, "MAXIMUM_PROTOBUF", 2 * rows_bytes)
    assert head_graph(head).graph.initializer


def test_the_check_rows_are_half_inside_the_fitted_range_and_half_clipped():
    head, _ = _fit("logreg", "classification", 3)
    rows = check_rows(head)
    low, high = head.scaler_.data_min_, head.scaler_.data_max_
    assert rows.shape == (CHECK_ROWS, N_FEATURES) and rows.dtype == np.float32
    np.testing.assert_array_equal(rows[:2], np.stack([low, high]).astype(np.float32))
    inside = ((rows >= low) & (rows <= high)).mean()
    assert 0.4 < inside < 0.6  # the clip is exercised (a graph without it fails the check) and the range too


def test_a_graph_that_does_not_compute_its_head_is_refused():
    head, _ = _fit("logreg", "classification", 3)
    graph = head_graph(head)
    assert verify_head_graph(head, graph) < 1e-6
    head.scaler_.data_max_ = head.scaler_.data_min_ + (head.scaler_.data_max_ - head.scaler_.data_min_) / 2
    with pytest.raises(HeadExportError, match=r"the ONNX graph of LogisticRegressionHead scores 256 rows around its "
                                              r"fitted range [\d.e-]+ away from the head's own predict_proba "
                                              r".*allowed: 0\.0001.*no file is written"):
        verify_head_graph(head, graph)  # the head now clips where its graph does not


def test_a_graph_with_another_output_shape_is_refused():
    regressor, _ = _fit("logreg", "regression", 0)
    classifier, _ = _fit("logreg", "classification", 3)
    with pytest.raises(HeadExportError, match=r"scores 256 rows .* inf away .*shapes \(256,\) and \(256, 3\)"):
        verify_head_graph(classifier, head_graph(regressor))


def test_head_graph_verifies_what_it_returns(monkeypatch):
    head, _ = _fit("mlp", "classification", 3, **MLP)
    seen = []
    monkeypatch.setattr(onnx_graph, "verify_head_graph", lambda head, model: seen.append((head, model)))
    graph = head_graph(head)
    assert seen == [(head, graph)]
    head_graph(head, verify=False)
    assert len(seen) == 1
