"""A fitted head as an ONNX graph: ``features (B, D) float32 -> scores``, the numbers ``predict_proba`` gives.

:func:`head_graph` writes what a head does at predict time as ONNX nodes, so a
head can run in onnxruntime (or be merged after a backbone's exported graph,
:mod:`featcache.extract.onnx.serve`) without scikit-learn, LightGBM or torch:

* the :class:`~featcache.heads.preprocessing.ClippedScaler`: each feature clipped to its fitted
  ``[data_min_, data_max_]`` and standardised, in float32 as scikit-learn does for float32 rows;
* the PCA, if fitted (float64, as scikit-learn projects float32 rows);
* the model: ``logreg`` (softmax, or the sigmoid of a binary fit; columns of classes absent
  from the training rows are 0) and its ``ridge`` twin; ``sgd`` (one-vs-rest sigmoids
  normalised, the target de-standardised); ``mlp`` and ``streaming_mlp`` (Gemm,
  BatchNormalization, Relu rebuilt from the state dict, then the softmax, or the target
  de-standardised); ``lightgbm`` (``ai.onnx.ml`` TreeEnsembleRegressor read from
  ``booster.dump_model()`` with float64 thresholds and leaves, then the softmax of a
  multiclass fit, the sigmoid of a binary one, the raw sum for regression); ``knn`` (its
  normalised training rows ship inside the graph: the cosine with each, TopK, the
  ``exp(cos / T)`` votes, smoothed as ``predict_proba``, or the weighted mean target).

``scores`` is (B, K) class probabilities in ``classes_`` order, or (B,) predictions in
target units, float32. Heads fitted on a DataFrame's named columns, and classes
registered later without an ONNX form here, are refused with :class:`HeadExportError`.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from sklearn.base import is_classifier

from featcache.errors import UserError

from .knn import PROBA_FLOOR

__all__ = ["CHECK_ROWS", "CHECK_TOLERANCE", "FEATURES", "ML_OPSET", "SCORES", "SUPPORTED_HEADS", "HeadExportError",
           "check_rows", "head_graph", "verify_head_graph"]

#: The graph's input and output names.
FEATURES, SCORES = "features", "scores"

#: ``ai.onnx.ml`` opset of the tree ensembles (TreeEnsembleRegressor with tensor attributes).
ML_OPSET = 3

#: Head class -> the ``train`` head name it is registered as, for the heads :func:`head_graph` writes.
SUPPORTED_HEADS: dict[str, str] = {
    "LogisticRegressionHead": "logreg", "RidgeHead": "logreg", "StreamingLogisticHead": "sgd",
    "StreamingRidgeHead": "sgd", "MLPHead": "mlp", "MLPRegressorHead": "mlp", "StreamingMLPHead": "streaming_mlp",
    "StreamingMLPRegressorHead": "streaming_mlp", "LightGBMHead": "lightgbm", "LightGBMRegressorHead": "lightgbm",
    "KNNHead": "knn", "KNNRegressorHead": "knn",
}

#: Rows :func:`verify_head_graph` scores with the graph and with the head itself.
CHECK_ROWS = 256

#: Largest difference :func:`verify_head_graph` allows: of probabilities (absolute), of predictions (relative to the
#: largest absolute prediction). float32 against scikit-learn's float64 measures 1e-8..1e-6 (benchmarks/README
#: "Serving"; tests/heads/test_onnx_graph.py).
CHECK_TOLERANCE = 1e-4

logger = logging.getLogger(__name__)

_HINT = "Hint: score it with `featcache predict --model <run folder> --images ...` (Python) instead."


class HeadExportError(UserError, ValueError):
    """A head that cannot be written as an ONNX graph: its kind, or something it was fitted with."""


class _Graph:
    """Nodes and initializers of one graph, with fresh value names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0
        self._bytes = 0

    def name(self, base: str) -> str:
        self._count += 1
        return f"head_{base}_{self._count}"

    def const(self, base: str, value: Any, dtype: Any = np.float32) -> str:
        name = self.name(base)
        array = np.ascontiguousarray(np.asarray(value, dtype=dtype))
        self._bytes += array.nbytes
        if self._bytes >= onnx.checker.MAXIMUM_PROTOBUF:  # protobuf cannot even hold it: refuse before copying
            raise HeadExportError(
                f"the head's constants take {self._bytes / 2**30:.2f} GiB at {base} {array.shape}, over the "
                f"{onnx.checker.MAXIMUM_PROTOBUF / 2**30:.0f} GiB one ONNX file holds (protobuf's limit; a knn head "
                f"ships its training rows). {_HINT}")
        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def op(self, op_type: str, inputs: list[str], base: str | None = None, domain: str = "", **attrs: Any) -> str:
        out = self.name(base or op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=f"{out}_node", domain=domain, **attrs))
        return out

    def cast(self, value: str, to: int) -> str:
        return self.op("Cast", [value], "cast", to=to)


def _scaler(g: _Graph, x: str, scaler: Any) -> str:
    """Float32 rows -> clipped to the fitted range (a ClippedScaler), minus the mean, over the scale (float32)."""
    if hasattr(scaler, "data_min_"):
        x = g.op("Max", [x, g.const("data_min", scaler.data_min_)], "clip_low")
        x = g.op("Min", [x, g.const("data_max", scaler.data_max_)], "clip_high")
    if getattr(scaler, "with_mean", True) and scaler.mean_ is not None:
        x = g.op("Sub", [x, g.const("scaler_mean", scaler.mean_)], "centred")
    if getattr(scaler, "with_std", True) and scaler.scale_ is not None:
        x = g.op("Div", [x, g.const("scaler_scale", scaler.scale_)], "scaled")
    return x


def _pca(g: _Graph, x: str, pca: Any) -> str:
    """Float64 rows (B, D) -> ``x @ components.T - mean @ components.T`` (whitened if fitted so), float64."""
    components = np.asarray(pca.components_, dtype=np.float64)
    x = g.op("MatMul", [x, g.const("pca_components_t", components.T, np.float64)], "pca")
    x = g.op("Sub", [x, g.const("pca_offset", np.asarray(pca.mean_, np.float64) @ components.T, np.float64)])
    if pca.whiten:
        scale = np.sqrt(np.maximum(np.asarray(pca.explained_variance_, np.float64), np.finfo(np.float64).eps))
        x = g.op("Div", [x, g.const("pca_whiten", scale, np.float64)], "whitened")
    return x


def _preprocess(g: _Graph, head: Any) -> tuple[str, bool]:
    """The head's scaler and PCA on :data:`FEATURES`; returns the value and whether it is float64 (PCA)."""
    x = FEATURES
    if getattr(head, "scaler_", None) is not None:
        x = _scaler(g, x, head.scaler_)
    if getattr(head, "pca_", None) is None:
        return x, False
    return _pca(g, g.cast(x, TensorProto.DOUBLE), head.pca_), True


def _expand(g: _Graph, proba: str, seen: np.ndarray, n_classes: int) -> str:
    """(B, n_seen) probabilities -> (B, K): column j of ``proba`` to column ``seen[j]``, the others 0."""
    seen = np.asarray(seen, dtype=np.int64)
    if seen.size == n_classes and np.array_equal(seen, np.arange(n_classes)):
        return proba
    place = np.zeros((seen.size, n_classes), dtype=np.float64)
    place[np.arange(seen.size), seen] = 1.0
    return g.op("MatMul", [proba, g.const("expand_columns", place, np.float64)], "expanded")


def _binary(g: _Graph, z: str) -> str:
    """(B, 1) float64 logit -> (B, 2) ``[1 - sigmoid(z), sigmoid(z)]``."""
    p = g.op("Sigmoid", [z])
    return g.op("Concat", [g.op("Sub", [g.const("one", [1.0], np.float64), p]), p], "binary", axis=1)


def _squeeze(g: _Graph, x: str) -> str:
    """(B, 1) -> (B,)."""
    return g.op("Squeeze", [x, g.const("axis_1", [1], np.int64)], "column")


def _unscale(g: _Graph, x: str, head: Any) -> str:
    """Standardised (B,) float64 predictions -> target units (``* y_scale_ + y_mean_``)."""
    x = g.op("Mul", [x, g.const("y_scale", head.y_scale_, np.float64)])
    return g.op("Add", [x, g.const("y_mean", head.y_mean_, np.float64)], "target_units")


def _linear(g: _Graph, x: str, head: Any) -> str:
    """logreg / ridge / sgd: ``x @ coef.T + intercept`` in float64, then each head's link."""
    name = type(head).__name__
    model = head.estimator_
    coef = np.atleast_2d(np.asarray(model.coef_, dtype=np.float64))
    z = g.op("MatMul", [x, g.const("coef_t", coef.T, np.float64)], "linear")
    z = g.op("Add", [z, g.const("intercept", np.atleast_1d(model.intercept_), np.float64)], "decision")
    if name in ("RidgeHead", "StreamingRidgeHead"):
        z = _squeeze(g, z)
        return _unscale(g, z, head) if name == "StreamingRidgeHead" else z
    if coef.shape[0] == 1:
        proba = _binary(g, z)
    elif name == "LogisticRegressionHead":  # multinomial: scikit-learn's softmax of the decision
        proba = g.op("Softmax", [z], axis=1)
    else:  # SGD's one-vs-rest: each class's sigmoid, normalised
        p = g.op("Sigmoid", [z])
        proba = g.op("Div", [p, g.op("ReduceSum", [p, g.const("axis_1", [1], np.int64)], keepdims=1)], "ovr")
    if name == "LogisticRegressionHead":
        proba = _expand(g, proba, head.train_classes_, int(head.classes_.size))
    return proba


def _mlp(g: _Graph, x: str, head: Any) -> str:
    """mlp / streaming_mlp: the ``build_mlp`` Sequential (eval mode) in float32, then softmax or de-standardise."""
    from torch import nn

    for layer in head.module_:
        state = {k: v.detach().cpu().numpy() for k, v in layer.state_dict().items()}
        if isinstance(layer, nn.Linear):
            inputs = [x, g.const("weight", state["weight"])] + ([g.const("bias", state["bias"])]
                                                                if "bias" in state else [])
            x = g.op("Gemm", inputs, "linear", transB=1)
        elif isinstance(layer, nn.BatchNorm1d):
            weight = state.get("weight", np.ones_like(state["running_mean"]))
            bias = state.get("bias", np.zeros_like(state["running_mean"]))
            x = g.op("BatchNormalization", [x, g.const("bn_scale", weight), g.const("bn_bias", bias),
                                            g.const("bn_mean", state["running_mean"]),
                                            g.const("bn_var", state["running_var"])], "batchnorm",
                     epsilon=float(layer.eps))
        elif isinstance(layer, nn.ReLU):
            x = g.op("Relu", [x])
        elif not isinstance(layer, nn.Dropout):  # dropout: the identity in eval mode
            raise HeadExportError(f"{type(head).__name__}: module layer {type(layer).__name__} has no ONNX form "
                                  f"here; allowed: Linear, BatchNorm1d, ReLU, Dropout (featcache's build_mlp). {_HINT}")
    x = g.cast(x, TensorProto.DOUBLE)  # the head applies its output transform in float64
    if type(head).__name__ in ("MLPHead", "StreamingMLPHead"):
        return g.op("Softmax", [x], axis=1)
    return _unscale(g, _squeeze(g, x), head)


def _trees(dump: dict[str, Any], n_targets: int, head_name: str) -> dict[str, Any]:
    """TreeEnsembleRegressor attributes of LightGBM's ``dump_model()``: tree i adds to target ``i % n_targets``."""
    nodes: dict[str, list[Any]] = {key: [] for key in ("treeids", "nodeids", "featureids", "modes", "values",
                                                       "truenodeids", "falsenodeids", "missing")}
    targets: dict[str, list[Any]] = {key: [] for key in ("treeids", "nodeids", "ids", "weights")}
    for tree in dump["tree_info"]:
        tree_id, counter = int(tree["tree_index"]), [0]

        def walk(node: dict[str, Any], tree_id: int = tree_id, counter: list[int] = counter) -> int:
            node_id = counter[0]
            counter[0] += 1
            row = {"treeids": tree_id, "nodeids": node_id}
            if "leaf_value" in node:
                row.update(featureids=0, modes="LEAF", values=0.0, truenodeids=0, falsenodeids=0, missing=0)
                targets["treeids"].append(tree_id)
                targets["nodeids"].append(node_id)
                targets["ids"].append(tree_id % n_targets)
                targets["weights"].append(float(node["leaf_value"]))
            else:
                if node["decision_type"] != "<=" or node.get("missing_type", "None") == "Zero":
                    raise HeadExportError(
                        f"{head_name}: a LightGBM split of decision type {node['decision_type']!r}, missing type "
                        f"{node.get('missing_type')!r}; allowed: numerical '<=' splits without zero-as-missing "
                        f"(featcache's features). {_HINT}")
                row.update(featureids=int(node["split_feature"]), modes="BRANCH_LEQ", truenodeids=0, falsenodeids=0,
                           values=float(node["threshold"]), missing=int(bool(node["default_left"])))
            index = len(nodes["treeids"])
            for key, value in row.items():
                nodes[key].append(value)
            if "leaf_value" not in node:
                nodes["truenodeids"][index] = walk(node["left_child"])
                nodes["falsenodeids"][index] = walk(node["right_child"])
            return node_id

        walk(tree["tree_structure"])
    return {
        "n_targets": n_targets, "aggregate_function": "SUM", "post_transform": "NONE",
        "nodes_treeids": nodes["treeids"], "nodes_nodeids": nodes["nodeids"], "nodes_featureids": nodes["featureids"],
        "nodes_modes": nodes["modes"], "nodes_truenodeids": nodes["truenodeids"],
        "nodes_falsenodeids": nodes["falsenodeids"], "nodes_missing_value_tracks_true": nodes["missing"],
        "nodes_values_as_tensor": numpy_helper.from_array(np.asarray(nodes["values"], np.float64)),
        "target_treeids": targets["treeids"], "target_nodeids": targets["nodeids"], "target_ids": targets["ids"],
        "target_weights_as_tensor": numpy_helper.from_array(np.asarray(targets["weights"], np.float64)),
    }


def _lightgbm(g: _Graph, x: str, head: Any) -> str:
    """lightgbm: the trees up to ``best_iteration_`` summed per class, then each objective's link."""
    name = type(head).__name__
    dump = head.booster_.dump_model(num_iteration=head.best_iteration_)
    objective = str(dump.get("objective", ""))
    kind = objective.split(" ")[0]
    if kind not in ("binary", "multiclass", "regression") or dump.get("average_output") or any(
            "leaf_features" in tree["tree_structure"] for tree in dump["tree_info"]):
        raise HeadExportError(f"{name}: LightGBM objective {objective!r}; allowed: binary, multiclass, regression "
                              f"(L2) gradient boosting without linear trees. {_HINT}")
    n_targets = int(dump.get("num_tree_per_iteration", 1))
    raw = g.op("TreeEnsembleRegressor", [x], "trees", domain="ai.onnx.ml", **_trees(dump, n_targets, name))
    raw = g.cast(raw, TensorProto.DOUBLE)
    if kind == "regression":
        return _squeeze(g, raw)
    if kind == "binary":
        match = re.search(r"sigmoid:([0-9.eE+-]+)", objective)
        coef = float(match.group(1)) if match else 1.0
        proba = _binary(g, g.op("Mul", [raw, g.const("sigmoid_coef", [coef], np.float64)]))
    else:
        proba = g.op("Softmax", [raw], axis=1)
    return _expand(g, proba, head.train_classes_, int(head.classes_.size))


def _knn(g: _Graph, x: str, head: Any) -> str:
    """knn: rows L2-normalised as ``l2_normalise`` (float64, to float32), cosine with the training rows (float32),
    the top k (ties: the lower training row, as the head), ``exp((sim - max) / T)`` votes in float64."""
    axis = g.const("axis_1", [1], np.int64)
    zero = g.const("zero", 0.0, np.float64)
    one = g.const("one", 1.0, np.float64)

    def safe(value: str) -> str:  # a zero row stays zero: divide it by 1
        return g.op("Where", [g.op("Greater", [value, zero]), value, one], "safe")

    x = g.cast(x, TensorProto.DOUBLE)
    x = g.op("Div", [x, safe(g.op("ReduceMax", [g.op("Abs", [x]), axis], keepdims=1))], "max_scaled")
    x = g.op("Div", [x, safe(g.op("Sqrt", [g.op("ReduceSumSquare", [x, axis], keepdims=1)]))], "normalised")
    train = np.asarray(head.train_rows_, dtype=np.float32)
    sims = g.op("MatMul", [g.cast(x, TensorProto.FLOAT), g.const("train_rows_t", train.T)], "cosine")
    k = int(head.best_params_["k"])
    top, index = g.name("top_sims"), g.name("top_rows")
    g.nodes.append(helper.make_node("TopK", [sims, g.const("k", [k], np.int64)], [top, index], name=f"{top}_node",
                                    axis=1, largest=1, sorted=1))
    top = g.cast(top, TensorProto.DOUBLE)
    shifted = g.op("Sub", [top, g.op("ReduceMax", [top, axis], keepdims=1)])
    weights = g.op("Exp", [g.op("Div", [shifted, g.const("temperature", float(head.temperature), np.float64)])])
    total = g.op("ReduceSum", [weights, axis], keepdims=1)
    if not is_classifier(head):
        targets = g.op("Gather", [g.const("train_targets", head.train_targets_, np.float64), index], axis=0)
        mean = g.op("Div", [g.op("ReduceSum", [g.op("Mul", [weights, targets]), axis], keepdims=1), total])
        return _squeeze(g, mean)
    n_classes = int(head.classes_.size)
    labels = np.asarray(head.train_labels_, dtype=np.int64)
    votes_of = np.zeros((labels.size, n_classes), dtype=np.float64)  # each training row's vote, class-weighted
    votes_of[np.arange(labels.size), labels] = 1.0 if head.class_weight_ is None else head.class_weight_[labels]
    each = g.op("Gather", [g.const("train_votes", votes_of, np.float64), index], axis=0)  # (B, k, K)
    each = g.op("Mul", [each, g.op("Unsqueeze", [weights, g.const("axis_2", [2], np.int64)])])
    votes = g.op("ReduceSum", [each, axis], keepdims=0)
    votes = g.op("Div", [votes, g.op("ReduceSum", [votes, axis], keepdims=1)], "vote_share")
    floor = float(PROBA_FLOOR)
    votes = g.op("Add", [votes, g.const("floor", floor, np.float64)])
    return g.op("Div", [votes, g.const("smoothing", 1.0 + n_classes * floor, np.float64)], "smoothed")


def _check_supported(head: Any) -> str:
    """The head's class name, or :class:`HeadExportError` naming it, what is supported, and a hint."""
    name = type(head).__name__
    if name not in SUPPORTED_HEADS:
        allowed = ", ".join(sorted(set(SUPPORTED_HEADS.values())))
        raise HeadExportError(f"{name} cannot be exported as ONNX; allowed heads: {allowed} (both tasks). {_HINT}")
    if hasattr(head, "feature_names_in_"):
        raise HeadExportError(f"{name} was fitted on a DataFrame with named columns "
                              f"({list(head.feature_names_in_)[:3]}...); allowed: heads fitted on arrays (ONNX "
                              f"takes the features by position). Hint: refit it on a numpy array.")
    return name


def check_rows(head: Any, n_rows: int = CHECK_ROWS, seed: int = 0) -> np.ndarray:
    """(n_rows, D) float32 rows around the range the head was fitted on, to score it with.

    Uniform in each feature's ``[data_min_, data_max_]`` (its ClippedScaler's) widened by half its width on each
    side, so that half the values are inside (every tree of a LightGBM head, every neighbour of a k-NN head sees
    values like its training rows') and half are clipped (as an image unlike the training set's would be); rows 0
    and 1 are the corners ``data_min_`` and ``data_max_``. Without that range: normal around the scaler's mean with
    its scale, else standard normal.
    """
    rng = np.random.default_rng(seed)
    width = int(head.n_features_in_)
    scaler = getattr(head, "scaler_", None)
    if scaler is not None and hasattr(scaler, "data_min_"):
        low, high = np.asarray(scaler.data_min_, np.float64), np.asarray(scaler.data_max_, np.float64)
        rows = low + (high - low) * (2.0 * rng.random((n_rows, width)) - 0.5)
        rows[:2] = low, high
    else:
        mean, scale = getattr(scaler, "mean_", None), getattr(scaler, "scale_", None)
        rows = rng.normal(size=(n_rows, width)) * (1.0 if scale is None else scale) + (0.0 if mean is None else mean)
    return rows.astype(np.float32)


def verify_head_graph(head: Any, model: onnx.ModelProto, rows: np.ndarray | None = None) -> float:
    """Score ``rows`` with ``model`` in onnxruntime and with the head itself; raise if they differ.

    Parameters
    ----------
    head : estimator
        The fitted head.
    model : onnx.ModelProto
        Its :func:`head_graph`.
    rows : ndarray of shape (N, D), optional
        Default :func:`check_rows` (:data:`CHECK_ROWS` rows around the fitted range).

    Returns
    -------
    float
        The largest difference: of probabilities (absolute), of predictions (relative to the largest one).

    Raises
    ------
    HeadExportError
        When it exceeds :data:`CHECK_TOLERANCE` or is not finite: the graph does not compute the head.
    """
    import onnxruntime

    rows = check_rows(head) if rows is None else np.asarray(rows, dtype=np.float32)
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run([SCORES], {FEATURES: rows})[0].astype(np.float64)
    if is_classifier(head):
        expected, scale = np.asarray(head.predict_proba(rows), np.float64), 1.0
    else:
        expected = np.asarray(head.predict(rows), np.float64)
        scale = max(float(np.abs(expected).max(initial=0.0)), float(np.finfo(np.float32).tiny))
    diff = float(np.abs(got - expected).max(initial=0.0)) / scale if got.shape == expected.shape else np.inf
    if not diff <= CHECK_TOLERANCE:
        raise HeadExportError(
            f"the ONNX graph of {type(head).__name__} scores {len(rows)} rows around its fitted range {diff:.3g} away "
            f"from the head's own {'predict_proba' if is_classifier(head) else 'predict'} (shapes {got.shape} and "
            f"{expected.shape}; allowed: {CHECK_TOLERANCE}): featcache's converter does not compute this head, so "
            f"no file is written. {_HINT} And report it with the head's params.")
    logger.info("%s's ONNX graph gives its scores on %d rows around its fitted range (largest difference %.2g)",
                type(head).__name__, len(rows), diff)
    return diff


def head_graph(head: Any, opset: int = 18, *, name: str = "featcache_head", verify: bool = True) -> onnx.ModelProto:
    """The fitted ``head`` as an ONNX model: ``features`` (B, D) float32 -> ``scores`` float32.

    Parameters
    ----------
    head : estimator
        A fitted head of :data:`SUPPORTED_HEADS` (as trained, or :func:`~featcache.heads.load_head`).
    opset : int
        The default domain's opset (>= 13; :data:`ML_OPSET` for ``ai.onnx.ml`` when LightGBM).
    name : str
        The graph's name.
    verify : bool
        Score :func:`check_rows` with the graph and the head (:func:`verify_head_graph`) before returning it.

    Returns
    -------
    onnx.ModelProto
        Checked; ``scores`` is (B, K) probabilities in ``head.classes_`` order (a classifier) or
        (B,) predictions in target units (a regressor), equal to ``predict_proba`` / ``predict``
        up to float32 rounding.

    Raises
    ------
    HeadExportError
        For a head that is not supported (naming the supported ones) or fitted on named columns, whose constants
        exceed one ONNX file, or whose graph does not give its scores (``verify``).
    """
    kind = _check_supported(head)
    g = _Graph()
    x, is_double = _preprocess(g, head)
    family = SUPPORTED_HEADS[kind]
    if family in ("mlp", "streaming_mlp"):
        scores = _mlp(g, g.cast(x, TensorProto.FLOAT) if is_double else x, head)
    elif family == "knn":
        scores = _knn(g, x, head)
    else:  # scikit-learn's linear models and LightGBM compute in float64
        x = x if is_double else g.cast(x, TensorProto.DOUBLE)
        scores = _linear(g, x, head) if family in ("logreg", "sgd") else _lightgbm(g, x, head)
    g.nodes.append(helper.make_node("Cast", [scores], [SCORES], name="head_scores_cast", to=TensorProto.FLOAT))
    shape = ["batch", int(head.classes_.size)] if is_classifier(head) else ["batch"]
    features = helper.make_tensor_value_info(FEATURES, TensorProto.FLOAT, ["batch", int(head.n_features_in_)])
    graph = helper.make_graph(g.nodes, name, [features], [helper.make_tensor_value_info(SCORES, TensorProto.FLOAT,
                                                                                        shape)], g.initializers)
    imports = [helper.make_opsetid("", opset)]
    if family == "lightgbm":
        imports.append(helper.make_opsetid("ai.onnx.ml", ML_OPSET))
    model = helper.make_model(graph, opset_imports=imports, producer_name="featcache")
    model.ir_version = min(model.ir_version, 10)  # readable by onnxruntime releases of the last two years
    onnx.checker.check_model(model, full_check=True)
    if verify:
        verify_head_graph(head, model)
    return model
