"""``selection_metric``: what each head selects on (validation rows only), from ``train.metric`` in the pipeline."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score

from _support.imbalanced import gaussians
from featcache.errors import ParamError
from featcache.heads import make_head
from featcache.heads.metrics import SELECTION_METRICS, STEP_METRICS, metric_value
from featcache.heads.param_types import param_type
from featcache.heads.registry import HEAD_PATHS, REGISTRY, head_params
from featcache.pipeline.params.train import TrainParams, check_heads_sections, check_train_metric, stage_head_params


@pytest.fixture(scope="module")
def imbalanced() -> tuple[np.ndarray, ...]:
    """90/10 train, 95/5 val: majority-leaning models win on accuracy, not on balanced accuracy."""
    rng = np.random.default_rng(1)
    return (*gaussians(rng, 450, 50), *gaussians(rng, 190, 10))


@pytest.mark.parametrize("name", list(HEAD_PATHS))
@pytest.mark.parametrize("task", ["classification", "regression"])
def test_the_annotation_allows_the_tasks_selection_metrics(name, task):
    """The annotation holds literals; here they are pinned to the one list, SELECTION_METRICS."""
    (kind,) = param_type(head_params(name, task)["selection_metric"].annotation).kinds
    assert kind.rules[0].choices == SELECTION_METRICS[task]


def test_logreg_picks_another_c_on_balanced_accuracy(imbalanced):
    heads = {m: make_head("logreg", "classification", {"selection_metric": m}).fit(*imbalanced)
             for m in (None, "accuracy", "balanced_accuracy")}
    assert heads[None].best_params_ == heads["accuracy"].best_params_  # accuracy is what it selected on before
    assert heads["balanced_accuracy"].best_params_ != heads["accuracy"].best_params_
    for metric in ("accuracy", "balanced_accuracy"):
        results = heads[metric].search_results_
        best = max(r[f"val_{metric}"] for r in results)
        chosen = next(r for r in results if r["C"] == heads[metric].best_params_["C"])
        assert chosen[f"val_{metric}"] == best


def test_mlp_picks_another_epoch_on_balanced_accuracy(imbalanced):
    params = {"n_threads": 1, "hidden_sizes": [16], "max_epochs": 30, "class_weight": "balanced"}
    heads = {m: make_head("mlp", "classification", {**params, "selection_metric": m}).fit(*imbalanced)
             for m in ("accuracy", "balanced_accuracy")}
    assert heads["accuracy"].best_epoch_ != heads["balanced_accuracy"].best_epoch_
    head = heads["balanced_accuracy"]
    scores = [h["val_score"] for h in head.history_]
    assert head.best_epoch_ == int(np.argmax(scores)) + 1
    X_val, y_val = imbalanced[2:]
    assert scores[head.best_epoch_ - 1] == pytest.approx(balanced_accuracy_score(y_val, head.predict(X_val)))


def test_lightgbm_keeps_the_iteration_of_the_best_metric(imbalanced):
    head = make_head("lightgbm", "classification", {"n_jobs": 1, "selection_metric": "balanced_accuracy",
                                                    "early_stopping_rounds": 10}).fit(*imbalanced)
    X_val, y_val = imbalanced[2:]
    curve = [balanced_accuracy_score(y_val, head.booster_.predict(X_val, num_iteration=i) > 0.5)
             for i in range(1, head.booster_.current_iteration() + 1)]
    assert head.best_iteration_ == int(np.argmax(curve)) + 1
    default = make_head("lightgbm", "classification", {"n_jobs": 1, "early_stopping_rounds": 10}).fit(*imbalanced)
    assert default.best_iteration_ != head.best_iteration_


def test_sgd_selects_alpha_and_epoch_on_the_metric(imbalanced):
    head = make_head("sgd", "classification", {"selection_metric": "macro_f1"}).fit(*imbalanced)
    chosen = next(r for r in head.search_results_ if r["alpha"] == head.best_params_["alpha"])
    assert chosen["val_macro_f1"] == max(r["val_macro_f1"] for r in head.search_results_)
    assert max(h["val_macro_f1"] for h in head.history_) == chosen["val_macro_f1"]


@pytest.mark.parametrize("metric,better", [("rmse", min), ("mae", min), ("r2", max)])
def test_regression_metric_direction(metric, better, reg_data):
    head = make_head("logreg", "regression", {"selection_metric": metric}).fit(
        reg_data["X_train"], reg_data["y_train"], reg_data["X_val"], reg_data["y_val"])
    key = f"val_{metric}"
    chosen = next(r for r in head.search_results_ if r["alpha"] == head.best_params_["alpha"])
    assert chosen[key] == better(r[key] for r in head.search_results_)
    mlp = make_head("mlp", "regression", {"selection_metric": metric, "n_threads": 1, "max_epochs": 10}).fit(
        reg_data["X_train"], reg_data["y_train"], reg_data["X_val"], reg_data["y_val"])
    scores = [h["val_score"] for h in mlp.history_]
    assert scores[mlp.best_epoch_ - 1] == better(scores)
    assert scores[mlp.best_epoch_ - 1] == pytest.approx(
        metric_value("regression", metric, reg_data["y_val"], mlp.predict(reg_data["X_val"])), rel=1e-5)


def test_check_names_the_close_match_of_a_misspelt_metric():
    with pytest.raises(ValueError, match=r"^train\.metric: 'acuracy' is not a classification metric; allowed: "
                                         r"accuracy, balanced_accuracy, macro_f1, log_loss or null .*Did you mean "
                                         r"'accuracy'\?"):
        check_train_metric("acuracy", "classification")
    with pytest.raises(ValueError, match=r"'rmse' is not a classification metric"):
        check_train_metric("rmse", "classification")
    check_train_metric("r2", "regression")
    check_train_metric(None, "classification")
    with pytest.raises(ParamError, match=r"^heads\.mlp\.selection_metric: 'balanced_acuracy' is not allowed; .* "
                                         r"Did you mean 'balanced_accuracy'\?"):
        check_heads_sections({"mlp": {"selection_metric": "balanced_acuracy"}}, "classification")
    with pytest.raises(ParamError, match=r"^heads\.mlp\.selection_metric: 'accuracy' is not allowed; allowed: "
                                         r"'rmse', 'mae' or 'r2'"):
        check_heads_sections({"mlp": {"selection_metric": "accuracy"}}, "regression")


def test_the_train_stage_passes_train_metric_unless_the_section_sets_one():
    class Params:
        train = TrainParams(metric="balanced_accuracy")
        heads = {"mlp": {"selection_metric": "log_loss"}, "logreg": {"max_iter": 10},
                 "lightgbm": {"selection_metric": None}}  # README's advice: rank by train.metric, keep the loss

    assert stage_head_params(Params.heads, Params.train, "logreg", "classification") == {"max_iter": 10,
                                                                      "selection_metric": "balanced_accuracy"}
    assert stage_head_params(Params.heads, Params.train, "mlp", "classification") == {"selection_metric": "log_loss"}
    assert stage_head_params(Params.heads, Params.train, "lightgbm", "classification") == {"selection_metric": None}
    Params.train = TrainParams()
    assert stage_head_params(Params.heads, Params.train, "logreg", "classification") == {"max_iter": 10}


@pytest.mark.parametrize("head", [name for name, entry in REGISTRY.items() if entry.early_stopped])
def test_early_stopped_heads_keep_their_loss_for_a_step_metric_from_train_metric(head):
    """Selecting a stopping point on balanced accuracy over a few minority val rows cost the MLP 3.7 and LightGBM
    4.7 points (benchmarks/README.md): train.metric's accuracy-like metrics go to the grid-selected heads only;
    smooth metrics (log_loss, every regression metric) and a section's own choice still reach every head."""
    for metric in sorted(STEP_METRICS & set(SELECTION_METRICS["classification"])):
        assert "selection_metric" not in stage_head_params({}, TrainParams(metric=metric), head, "classification")
        assert stage_head_params({"logreg": {}}, TrainParams(metric=metric), "logreg", "classification") == {
            "selection_metric": metric}
        assert stage_head_params({head: {"selection_metric": metric}}, TrainParams(metric=metric), head,
                                 "classification") == {"selection_metric": metric}  # asked for by its section
    assert stage_head_params({}, TrainParams(metric="log_loss"), head, "classification") == {
        "selection_metric": "log_loss"}
    for metric in SELECTION_METRICS["regression"]:
        assert stage_head_params({}, TrainParams(metric=metric), head, "regression") == {"selection_metric": metric}


@pytest.fixture(scope="module")
def noisy_regression() -> tuple[np.ndarray, ...]:
    """400 train / 150 val rows, one informative feature under much noise: early stopping stops early."""
    rng = np.random.default_rng(2)
    X = rng.normal(size=(550, 6))
    y = 2.0 * X[:, 0] + 2.0 * rng.normal(size=550)
    return X[:400], y[:400], X[400:], y[400:]


@pytest.fixture(scope="module")
def one_worker():
    """A client of one in-process worker with one thread: lightgbm.dask then grows the in-memory head's trees."""
    import distributed  # a declared dependency: missing it must fail, not skip

    cluster = distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None)
    with cluster, distributed.Client(cluster) as client:
        yield client


@pytest.mark.parametrize(("task", "params"), [
    ("classification", {"selection_metric": "balanced_accuracy"}),
    ("classification", {"selection_metric": "balanced_accuracy", "class_weight": "balanced"}),
    ("classification", {"selection_metric": "macro_f1"}),
    ("classification", {"selection_metric": "log_loss", "class_weight": "balanced"}),
    ("regression", {"selection_metric": "mae"}),
    ("regression", {"selection_metric": "r2"}),
])
def test_fit_lightgbm_dask_keeps_the_in_memory_iteration_of_the_metric(one_worker, imbalanced, noisy_regression,
                                                                       task, params):
    """Its post-hoc early stopping replays LightGBMHead's on the metric (it was refused): on the same booster the
    same round, unweighted under class_weight as the in-memory custom eval metric (it ignores the eval weights)."""
    import dask.array as da

    from featcache.heads import fit_lightgbm_dask

    data = imbalanced if task == "classification" else noisy_regression
    params = {"n_estimators": 80, "early_stopping_rounds": 10, **params}
    memory = make_head("lightgbm", task, {**params, "n_jobs": 1}).fit(*data)
    X_val = da.from_array(data[2], chunks=(37, -1))  # streamed in uneven chunks
    head = fit_lightgbm_dask(one_worker, data[0], data[1], X_val, data[3], task=task, **params)
    final = memory.booster_.current_iteration()
    np.testing.assert_array_equal(head.booster_.predict(data[2], num_iteration=final, raw_score=True),
                                  memory.booster_.predict(data[2], num_iteration=final, raw_score=True))
    assert head.best_iteration_ == memory.best_iteration_ < params["n_estimators"]
    scored = head.predict_proba(data[2]) if task == "classification" else head.predict(data[2])
    assert head.val_curve_[head.best_iteration_ - 1] == pytest.approx(metric_value(task, params["selection_metric"],
                                                                                  data[3], scored), rel=1e-9)
    if params["selection_metric"] in ("balanced_accuracy", "mae"):  # not the round of the loss
        loss = {k: v for k, v in params.items() if k != "selection_metric"}
        assert fit_lightgbm_dask(one_worker, *data, task=task, **loss).best_iteration_ != head.best_iteration_
