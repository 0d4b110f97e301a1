"""save_head / load_head: no pickle, identical predictions after a round trip."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.exceptions import NotFittedError

from featcache.heads import load_head, make_head, save_head

FAST = {
    "logreg": {},
    "lightgbm": {"n_estimators": 100, "learning_rate": 0.1, "early_stopping_rounds": 10, "n_jobs": 1},
    "mlp": {"hidden_sizes": (32, 16), "batch_size": 128, "max_epochs": 10, "patience": 3, "n_threads": 1},
    "knn": {"ks": (1, 5, 20), "batch_size": 50},
}
FILES = {"logreg": {"head.json", "arrays.npz"}, "lightgbm": {"head.json", "arrays.npz", "model.txt"},
         "mlp": {"head.json", "arrays.npz", "module.pt"}, "knn": {"head.json", "arrays.npz"}}


@pytest.mark.parametrize("name", list(FAST))
@pytest.mark.parametrize("task", ["classification", "regression"])
def test_round_trip_predictions_identical(name, task, clf_data, reg_data, tmp_path):
    d = clf_data if task == "classification" else reg_data
    head = make_head(name, task, FAST[name]).fit(d["X_train"], d["y_train"], d["X_val"], d["y_val"])
    out = save_head(head, tmp_path / "head")
    assert {p.name for p in out.iterdir()} == FILES[name]
    # no pickle anywhere: npz loads with allow_pickle=False, state_dict with weights_only=True
    np.load(out / "arrays.npz", allow_pickle=False).close()
    if name == "mlp":
        torch.load(out / "module.pt", weights_only=True)
    meta = json.loads((out / "head.json").read_text())
    assert meta["class"] == type(head).__name__ and meta["format"] == "featcache-head/1"

    loaded = load_head(out)
    assert type(loaded) is type(head)
    assert loaded.get_params().keys() == head.get_params().keys()
    assert loaded.best_params_ == head.best_params_
    X = d["X_test"]
    np.testing.assert_array_equal(loaded.predict(X), head.predict(X))
    if task == "classification":
        np.testing.assert_array_equal(loaded.predict_proba(X), head.predict_proba(X))
        np.testing.assert_array_equal(loaded.classes_, head.classes_)


@pytest.mark.parametrize("name", list(FAST))
def test_round_trip_keeps_dataframe_column_names(name, clf_data, tmp_path):
    """A head fitted on a DataFrame refuses reordered columns at predict, before and after a round trip."""
    pd = pytest.importorskip("pandas")
    columns = [f"f{i}" for i in range(clf_data["X_train"].shape[1])]
    frame = pd.DataFrame(clf_data["X_train"], columns=columns)
    head = make_head(name, "classification", FAST[name]).fit(frame, clf_data["y_train"])
    loaded = load_head(save_head(head, tmp_path / "head"))
    np.load(tmp_path / "head" / "arrays.npz", allow_pickle=False).close()
    test = pd.DataFrame(clf_data["X_test"], columns=columns)
    for fitted in (head, loaded):
        assert list(fitted.feature_names_in_) == columns
        np.testing.assert_array_equal(fitted.predict(test), head.predict(test))
        with pytest.raises(ValueError, match="feature names should match"):
            fitted.predict(test[columns[::-1]])  # reordered: silently wrong predictions before
        with pytest.warns(UserWarning, match="does not have valid feature names"):  # scikit-learn's rule
            fitted.predict(clf_data["X_test"])
    assert not hasattr(head.fit(clf_data["X_train"], clf_data["y_train"]), "feature_names_in_")


def test_round_trip_keeps_absent_class_columns(missing_class_data, tmp_path):
    d = missing_class_data
    head = make_head("lightgbm", "classification", FAST["lightgbm"], n_classes=6)
    head.fit(d["X_train"], d["y_train"], d["X_val"], d["y_val"])
    loaded = load_head(save_head(head, tmp_path))
    proba = loaded.predict_proba(d["X_test"])
    assert proba.shape[1] == 6
    np.testing.assert_array_equal(proba, head.predict_proba(d["X_test"]))


def test_loaded_mlp_keeps_tuple_params_and_history(clf_data, tmp_path):
    head = make_head("mlp", "classification", FAST["mlp"]).fit(clf_data["X_train"], clf_data["y_train"])
    loaded = load_head(save_head(head, tmp_path))
    assert loaded.hidden_sizes == (32, 16)
    assert loaded.history_ == head.history_ and loaded.best_epoch_ == head.best_epoch_
    assert not loaded.module_.training


def test_saving_is_byte_reproducible_and_replaces_stale_files(clf_data, tmp_path):
    d = clf_data
    fit = lambda: make_head("mlp", "classification", FAST["mlp"]).fit(  # noqa: E731
        d["X_train"], d["y_train"], d["X_val"], d["y_val"]
    )
    a, b = save_head(fit(), tmp_path / "a"), save_head(fit(), tmp_path / "b")
    for name in FILES["mlp"]:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    # overwrite the MLP directory with a LightGBM head: no module.pt is left behind
    lgbm = make_head("lightgbm", "classification", FAST["lightgbm"]).fit(d["X_train"], d["y_train"])
    save_head(lgbm, a)
    assert {p.name for p in a.iterdir()} == FILES["lightgbm"]
    np.testing.assert_array_equal(load_head(a).predict_proba(d["X_test"]), lgbm.predict_proba(d["X_test"]))


def test_errors(tmp_path, clf_data):
    with pytest.raises(NotFittedError):
        save_head(make_head("logreg", "classification"), tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="no such folder; a saved head is a folder holding head.json"):
        load_head(tmp_path / "missing")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "head.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"head\.json is a file; allowed: a saved head's folder \(it holds "
                                                r"head\.json and arrays\.npz\)\. Hint: pass its folder, .*/run, "):
        load_head(tmp_path / "run" / "head.json")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "head.json").write_text(json.dumps({"format": "featcache-head/1", "class": "os.system", "params": {}}))
    with pytest.raises(ValueError, match=r"class 'os.system'; allowed: KNNHead, KNNRegressorHead, LightGBMHead"):
        load_head(bad)


@pytest.fixture(scope="module")
def saved_heads(clf_data, tmp_path_factory):
    """One saved folder per head kind (linear, LightGBM, MLP, k-NN), to be copied and damaged."""
    root = tmp_path_factory.mktemp("saved")
    d = clf_data
    return {name: save_head(make_head(name, "classification", FAST[name]).fit(d["X_train"], d["y_train"]),
                            root / name) for name in FAST}


#: (head, file): every file a saved head of that kind needs.
NEEDED = [("logreg", "head.json"), ("logreg", "arrays.npz"), ("lightgbm", "arrays.npz"), ("lightgbm", "model.txt"),
          ("mlp", "head.json"), ("mlp", "module.pt"), ("knn", "arrays.npz")]


def _copy(saved_heads, name, tmp_path):
    import shutil

    return Path(shutil.copytree(saved_heads[name], tmp_path / "models" / name))


def _is_user_message(message: str, folder, piece: str) -> None:
    assert str(folder) in message and piece in message and "Hint: rerun `dvc repro train`" in message, message


def test_an_absent_folder_is_a_saved_head_not_found_error(tmp_path):
    from featcache.errors import SavedHeadNotFoundError, UserError

    with pytest.raises(SavedHeadNotFoundError) as err:
        load_head(tmp_path / "models" / "logreg")
    assert isinstance(err.value, FileNotFoundError) and isinstance(err.value, UserError)
    _is_user_message(str(err.value), tmp_path / "models" / "logreg", "no such folder")


@pytest.mark.parametrize(("name", "piece"), NEEDED)
def test_a_missing_file_is_named_not_a_raw_error(saved_heads, tmp_path, name, piece):
    """Was: FileNotFoundError of numpy, LightGBMError 'Could not open', torch's own error: no folder, no hint."""
    from featcache.errors import SavedHeadNotFoundError

    folder = _copy(saved_heads, name, tmp_path)
    (folder / piece).unlink()
    with pytest.raises(SavedHeadNotFoundError) as err:
        load_head(folder)
    _is_user_message(str(err.value), folder, f"{piece} (")
    assert "is missing" in str(err.value)


@pytest.mark.parametrize(("name", "piece"), NEEDED)
@pytest.mark.parametrize("keep", [0.5, 0.98])
def test_a_truncated_file_is_a_saved_head_error(saved_heads, tmp_path, name, piece, keep):
    """Was: JSONDecodeError, BadZipFile, LightGBMError, torch's 'PytorchStreamReader failed', or (a model.txt cut
    between two trees) a head that loaded and answered with fewer trees."""
    from featcache.errors import SavedHeadError, SavedHeadNotFoundError

    folder = _copy(saved_heads, name, tmp_path)
    data = (folder / piece).read_bytes()
    (folder / piece).write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(SavedHeadError) as err:
        load_head(folder)
    assert not isinstance(err.value, SavedHeadNotFoundError)
    _is_user_message(str(err.value), folder, piece)
    assert "truncated" in str(err.value)


def test_a_model_txt_cut_between_trees_is_refused(saved_heads, tmp_path):
    """A model.txt with trees cut out: LightGBM aborts the whole process on it (``Fatal Python error: Aborted``,
    no exception to catch); the sha256 that head.json records refuses it before LightGBM reads it."""
    from featcache.errors import SavedHeadError

    folder = _copy(saved_heads, "lightgbm", tmp_path)
    text = (folder / "model.txt").read_text()
    cut = text.index("Tree=3")
    (folder / "model.txt").write_text(text[:cut] + text[text.index("end of trees"):])
    with pytest.raises(SavedHeadError, match=r"model\.txt .*does not match the sha256 head\.json records"):
        load_head(folder)


def test_a_head_saved_before_the_sha256_were_recorded_still_loads(saved_heads, tmp_path, clf_data):
    folder = _copy(saved_heads, "lightgbm", tmp_path)
    meta = json.loads((folder / "head.json").read_text())
    assert set(meta.pop("sha256")) == {"arrays.npz", "model.txt"}
    (folder / "head.json").write_text(json.dumps(meta))
    np.testing.assert_array_equal(load_head(folder).predict_proba(clf_data["X_test"]),
                                  load_head(saved_heads["lightgbm"]).predict_proba(clf_data["X_test"]))


@pytest.mark.parametrize("edit", ["no params", "a list", "unknown param"])
def test_a_head_json_of_another_version_is_a_saved_head_error(saved_heads, tmp_path, edit):
    from featcache.errors import SavedHeadError

    folder = _copy(saved_heads, "logreg", tmp_path)
    meta = json.loads((folder / "head.json").read_text())
    if edit == "no params":
        meta.pop("params")
    elif edit == "unknown param":
        meta["params"]["penalty_strength"] = 1.0
    (folder / "head.json").write_text(json.dumps([meta] if edit == "a list" else meta))
    with pytest.raises(SavedHeadError) as err:
        load_head(folder)
    _is_user_message(str(err.value), folder, "head.json")


def test_every_registered_head_has_the_storage_of_its_kind():
    """The registry's storage kind of each head (what it saves besides head.json) matches each class's kind."""
    from featcache.heads.boosting import LightGBMBase
    from featcache.heads.knn import KNNBase
    from featcache.heads.linear import LinearSearchBase
    from featcache.heads.mlp import MLPBase
    from featcache.heads.out_of_core import StreamingLogisticHead, StreamingRidgeHead
    from featcache.heads.registry import HEADS, STORAGES, head_storage

    kinds = {LinearSearchBase: "linear", StreamingLogisticHead: "linear", StreamingRidgeHead: "linear",
             LightGBMBase: "lightgbm", MLPBase: "torch", KNNBase: "neighbours"}
    assert set(kinds.values()) == set(STORAGES)
    for name, tasks in HEADS.items():
        for cls in tasks.values():
            assert {kind for base, kind in kinds.items() if issubclass(cls, base)} == {head_storage(name)}, cls
