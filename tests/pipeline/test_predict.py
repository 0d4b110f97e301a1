"""featcache.pipeline.predict: new images go through the preprocessing the store's extraction recorded."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from featcache.extract.decode.loaders import ImageDataset
from featcache.pipeline.config import parse_params
from featcache.pipeline.params.extract import extraction_config
from featcache.pipeline.predict import PredictError, feature_config, predict_images
from featcache.pipeline.run_folder import stored_preprocessor
from featcache.store.schema import DEFAULT_MAX_IMAGE_PIXELS


def _store_config(max_image_pixels) -> dict:
    """A store config as the extract stage writes it: the params' extraction config plus the preprocessing."""
    params = parse_params({"extract": {"max_image_pixels": max_image_pixels}})
    config = extraction_config(params, "efficientnet_lite0")
    config["preprocess"] = {"input_size": 32, "resize_size": 36, "interpolation": "bilinear",
                            "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "resize_mode": "crop",
                            "background": [255, 255, 255]}
    return config


@pytest.mark.parametrize("limit", [DEFAULT_MAX_IMAGE_PIXELS, 200_000_000, None, 1000])
def test_stored_preprocessor_keeps_the_extractions_pixel_limit(limit):
    """A raised or disabled ``extract.max_image_pixels`` (recorded only when not the default) reaches predict."""
    config = _store_config(limit)
    assert ("max_image_pixels" in config["extract"]) == (limit != DEFAULT_MAX_IMAGE_PIXELS)
    preprocess = stored_preprocessor(config)
    assert preprocess.max_image_pixels == limit
    assert preprocess.config() == config["preprocess"]


def test_stored_preprocessor_decodes_what_the_extraction_did(tmp_path):
    """An image over the default limit but within the store's: accepted at predict time as at extraction."""
    Image.fromarray(np.zeros((50, 40, 3), np.uint8)).save(tmp_path / "big.png")  # 2,000 pixels
    lowered = stored_preprocessor(_store_config(1000))
    assert ImageDataset([tmp_path / "big.png"], lowered)[0][2].startswith("image too large")
    allowed = stored_preprocessor(_store_config(2000))
    assert ImageDataset([tmp_path / "big.png"], allowed)[0][2] == ""


def test_feature_config_keeps_what_changes_features_and_drops_the_rest():
    config = _store_config(None)
    config["data"] = {"name": "another_dataset", "task": "classification"}
    kept = feature_config(config)
    assert kept["backbone"] == "efficientnet_lite0" and kept["preprocess"] == config["preprocess"]
    assert kept["extract"]["pooling"] == config["extract"]["pooling"]
    assert "data" not in kept and "layers" not in kept and "dtype" not in kept["extract"]


@pytest.mark.parametrize("inputs", [["nope_folder"], ["empty"]])
def test_predict_images_names_a_missing_path_or_an_empty_folder(tmp_path, inputs):
    (tmp_path / "empty").mkdir()
    with pytest.raises(PredictError, match="No such file or folder|No images found"):
        predict_images(tmp_path / "model_not_read_yet", [tmp_path / name for name in inputs])


def test_a_batch_size_below_one_fails_before_the_model_loads(tmp_path):
    from featcache.errors import ParamError

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    with pytest.raises(ParamError, match=r"^batch_size=0 is invalid; allowed: an integer >= 1\."):
        predict_images(tmp_path / "no-model", [tmp_path / "a.png"], batch_size=0)


def test_a_folder_that_is_no_run_is_a_run_not_found_error(tmp_path):
    from featcache.errors import UserError
    from featcache.runs import RunNotFoundError, read_run_info

    with pytest.raises(RunNotFoundError, match="is not a featcache run directory") as err:
        read_run_info(tmp_path)
    assert isinstance(err.value, FileNotFoundError) and isinstance(err.value, UserError)


def _write_run_file(folder, **edits) -> None:
    import json

    info = {"dataset": "tiny", "backbone": "efficientnet_lite0", "layer": "pool", "head": "logreg",
            "task": "classification", "classes": ["a", "b"], "extraction_config": _store_config(None)}
    info.update(edits)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "featcache-run.json").write_text(json.dumps({k: v for k, v in info.items() if v is not None}))


@pytest.mark.parametrize(("edits", "named"), [
    ({"extraction_config": None, "config": {}}, "'extraction_config'"),  # an older key name
    ({"classes": None, "class_names": ["a", "b"]}, "'classes'"),
    ({"extraction_config": {"backbone": "efficientnet_lite0", "extract": {}}},
     "'extraction_config.weights', 'extraction_config.preprocess', 'extraction_config.extract.pooling'"),
])
def test_a_run_file_of_an_older_version_is_refused_naming_the_key(tmp_path, edits, named):
    """Was: a KeyError traceback (``info["extraction_config"]``) from deep in predict."""
    from featcache.errors import SavedHeadError
    from featcache.runs import read_run_info

    _write_run_file(tmp_path / "run", **edits)
    with pytest.raises(SavedHeadError) as err:
        read_run_info(tmp_path / "run")
    message = str(err.value)
    assert f"lacks {named}" in message and str(tmp_path / "run" / "featcache-run.json") in message
    assert "older featcache version" in message and "dvc repro train" in message


def test_the_run_file_names_its_format_and_another_format_is_refused(tmp_path):
    import json

    from featcache.errors import SavedHeadError
    from featcache.runs import RUN_INFO_FORMAT, read_run_info, write_run_info

    _write_run_file(tmp_path / "old")  # no format: a file from before formats, read as before
    info = read_run_info(tmp_path / "old")
    write_run_info(tmp_path / "new", info)
    written = json.loads((tmp_path / "new" / "featcache-run.json").read_text())
    assert written["format"] == RUN_INFO_FORMAT and read_run_info(tmp_path / "new")["layer"] == "pool"
    _write_run_file(tmp_path / "future", format="featcache-run/2")
    with pytest.raises(SavedHeadError, match=r"has format 'featcache-run/2'; this featcache .*cannot read it"):
        read_run_info(tmp_path / "future")


def test_a_truncated_run_file_is_a_saved_head_error(tmp_path):
    from featcache.errors import SavedHeadError
    from featcache.runs import read_run_info

    _write_run_file(tmp_path / "run")
    path = tmp_path / "run" / "featcache-run.json"
    path.write_text(path.read_text()[:50])
    with pytest.raises(SavedHeadError, match=r"could not be read \(JSONDecodeError: .*truncated or damaged"):
        read_run_info(tmp_path / "run")
    _write_run_file(tmp_path / "ok")
    assert read_run_info(tmp_path / "ok")["layer"] == "pool"


def test_a_relative_weights_path_is_the_projects_not_the_cwds(tmp_path, monkeypatch):
    """The extract stage read ``weights/mine.pth`` in the project root; predict runs from anywhere."""
    from featcache.pipeline.run_folder import stored_weights

    project = tmp_path / "project"
    (project / "weights").mkdir(parents=True)
    (project / "dvc.yaml").write_text("stages: {}\n")
    (project / "weights" / "mine.pth").write_bytes(b"a state dict")
    model_dir = project / "models" / "tiny" / "efficientnet_lite0" / "pool" / "logreg"
    model_dir.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert stored_weights({"weights": "weights/mine.pth"}, model_dir) == str(project / "weights" / "mine.pth")
    monkeypatch.chdir(project)
    assert stored_weights({"weights": "weights/mine.pth"}, "models/tiny/efficientnet_lite0/pool/logreg") == str(
        project / "weights" / "mine.pth")
    for kept in ("pretrained", "random", str(project / "weights" / "mine.pth"), "weights/absent.pth"):
        assert stored_weights({"weights": kept}, model_dir) == kept


def test_a_folders_files_that_are_not_images_are_named_in_one_warning(tmp_path, caplog):
    """Was: ``notes.txt`` and the other non-images of a folder were dropped without a word (``prepare`` warns). Now
    one warning counts them and names a few; hidden files stay silent; the images are scored."""
    import logging

    from featcache.runs import RunNotFoundError

    folder = tmp_path / "new"
    (folder / "sub").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "a.png")
    for name in ("notes.txt", "labels.csv", "sub/readme", "sub/z.json", ".DS_Store"):
        (folder / name).write_text("not an image")
    with caplog.at_level(logging.WARNING, logger="featcache.pipeline.predict"):
        with pytest.raises(RunNotFoundError):  # the paths are checked (and warned about) before the model
            predict_images(tmp_path / "no-model", [folder])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith("Skipped 4 files in the folders given whose extensions are not images (")
    shown = sorted(str(folder / name) for name in ("labels.csv", "notes.txt", "sub/readme", "sub/z.json"))[:3]
    assert ", ".join(shown) + ", ...)" in warnings[0] and ".DS_Store" not in warnings[0] and ".png" in warnings[0]


def test_the_summary_line_counts_failed_images_apart(tmp_path, monkeypatch, capsys):
    """Was: ``p.csv: 3 predictions`` for two predictions and one unreadable image."""
    import featcache.pipeline.predict as predict
    from featcache.pipeline.cli import main

    def rows(n_good: int, n_bad: int) -> list[dict]:
        return ([{"id": f"{k}.png", "prediction": "a", "error": ""} for k in range(n_good)]
                + [{"id": f"bad{k}.png", "prediction": "", "error": "cannot identify image file"}
                   for k in range(n_bad)])

    out = tmp_path / "p.csv"
    for (n_good, n_bad), expected in [((2, 1), "2 predictions, 1 image failed (see the error column)"),
                                      ((1, 2), "1 prediction, 2 images failed (see the error column)"),
                                      ((3, 0), "3 predictions")]:
        scored = rows(n_good, n_bad)
        monkeypatch.setattr(predict, "predict_images", lambda *args, scored=scored, **kwargs: scored)
        assert main(["predict", "--model", "m", "--images", "x", "--out", str(out)]) == 0
        assert capsys.readouterr().out == f"{out}: {expected}\n"
