"""``featcache predict`` on a store made as ``dvc repro`` makes it (the shipped backend: onnxruntime on the CPU,
float16 storage): ``--images`` scores as ``--store`` does, the CSV keeps its columns, bad and hidden files,
quoted globs, an unwritable ONNX cache and broken model folders."""

from __future__ import annotations

import csv
import logging
import shutil
from pathlib import Path

import pytest

from featcache.pipeline import parse_params
from featcache.pipeline.cli import main

from .conftest import extract_and_train, shipped_backend

HEADS = ("logreg", "lightgbm", "mlp", "knn")  # knn: no params.yaml section (its defaults)
HEADER = ["id", "prediction", "p_blue", "p_green", "p_red", "error"]
#: A fused layer (pool and block6 side by side) and heads trained on it: in memory (logreg), streamed (sgd).
FUSED, FUSED_HEADS = "pool+block6", ("logreg", "sgd")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, folder_factory, params_factory) -> dict:
    root = tmp_path_factory.mktemp("predict")
    images = folder_factory(root / "images", per_class=8)
    raw = params_factory(str(images))
    raw["extract"]["backend"] = shipped_backend()  # auto: onnxruntime on this CPU, as the shipped params.yaml
    raw["backbones"]["efficientnet_lite0"]["layers"] = ["pool", "block6"]
    raw["features"] = [{"backbone": "efficientnet_lite0", "layer": FUSED}]
    params = parse_params(raw)
    assert params.extract.dtype == "float16"  # the shipped storage: the rounding predict --images must apply
    store, records = extract_and_train(params, root, {**{head: ("pool", head) for head in HEADS},
                                                      **{f"fused_{head}": (FUSED, head) for head in FUSED_HEADS}})
    runs = {head: records[f"fused_{head}"] for head in FUSED_HEADS}
    return {"root": root, "store": store, "images": images, "models": root / "models", "fused_runs": runs}


def _csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


def _predict(model: Path, *args: str, out: Path) -> tuple[list[str], list[dict[str, str]]]:
    assert main(["predict", "--model", str(model), *args, "--out", str(out)]) == 0
    return _csv(out)


@pytest.mark.parametrize("head", [*HEADS, *(f"fused_{head}" for head in FUSED_HEADS)])
def test_images_get_the_predictions_of_their_store_rows(trained, head, tmp_path):
    """Was: torch float32 features for --images against onnxruntime features stored as float16: other
    probabilities (logreg and MLP differed in the 6th decimal of every row). Now logreg and LightGBM are identical
    cell for cell; the MLP may differ by 1e-6 (its forward over other batch sizes: 32 images here, whole splits at
    training), and is compared with that tolerance. Heads on the fused pool+block6 too (was: no such layer)."""
    model = trained["models"] / head
    store_header, store_rows = _predict(model, "--store", str(trained["store"]), out=tmp_path / "store.csv")
    header, rows = _predict(model, "--images", str(trained["images"]), out=tmp_path / "images.csv")
    assert store_header == ["id", "split", "actual", *HEADER[1:]] and header == HEADER
    by_id = {Path(row["id"]).relative_to(trained["images"]).as_posix(): row for row in rows}
    assert sorted(by_id) == sorted(row["id"] for row in store_rows) and len(rows) == 24
    for stored in store_rows:
        scored = by_id[stored["id"]]
        assert scored["prediction"] == stored["prediction"] and scored["error"] == stored["error"] == ""
        for column in HEADER[2:5]:
            if head == "mlp":
                assert float(scored[column]) == pytest.approx(float(stored[column]), abs=2e-6), (stored["id"], column)
            else:
                assert scored[column] == stored[column], (stored["id"], column)


def test_the_train_stage_runs_the_knn_head(trained):
    """``train --head knn`` (not in train.heads by default): its run record has k chosen on the val rows, finite
    log loss (smoothed votes) and CIs; its saved folder loads back as the classifier twin."""
    from featcache.heads import load_head
    from featcache.runs import read_run

    run = read_run(trained["root"] / "metrics" / "knn.json")
    assert run["head"] == run["label"] == "knn" and run["task"] == "classification"
    assert set(run["best_params"]) == {"k"} and run["best_params"]["k"] >= 1
    assert 0 < run["log_loss"] < 10 and "ci" in run
    assert type(load_head(trained["models"] / "knn")).__name__ == "KNNHead"


@pytest.mark.parametrize("head", FUSED_HEADS)
def test_a_head_on_a_fused_layer_trains_on_both_layers_side_by_side(trained, head):
    """The train stage on pool+block6 (was: unknown layer): the run record names the fused layer, its nodes and
    poolings joined by '+', and the head saw 1280 + 192 features."""
    from featcache.runs import read_run, read_run_info
    from featcache.store import FeatureStore

    with FeatureStore(trained["store"]) as store:
        pool, block6 = store.layer_info("pool"), store.layer_info("block6")
    assert (pool["dim"], block6["dim"]) == (1280, 192)
    run = read_run(trained["root"] / "metrics" / f"fused_{head}.json")
    assert run == trained["fused_runs"][head]
    assert run["layer"] == FUSED and run["n_features"] == 1280 + 192
    assert run["node"] == f"{pool['node']}+{block6['node']}"
    assert run["pooling"] == f"{pool['pooling']}+{block6['pooling']}"
    assert read_run_info(trained["models"] / f"fused_{head}")["layer"] == FUSED


def test_a_bad_image_gets_a_row_and_hidden_files_are_skipped(trained, tmp_path, capsys, caplog):
    """Was: macOS ``._green.png`` and ``.hidden/`` were scored (a bad-image row each), and a bad image first in the
    folder moved ``error`` before the probabilities (``id,prediction,error,p_blue,...``). Was too: ``p.csv: 2
    predictions`` for one image and one failure, and the folder's ``notes.txt`` dropped without a word. Now the
    summary counts failures apart, the skipped file is warned about, and a non-image named on the command line
    gets its error row (as a file a CSV manifest lists does at extraction)."""
    folder = tmp_path / "new"
    (folder / ".hidden").mkdir(parents=True)
    green = sorted((trained["images"] / "green").glob("*.png"))[0]
    (folder / "0_bad.png").write_bytes(b"not an image")
    shutil.copy(green, folder / "green.png")
    shutil.copy(green, folder / ".hidden" / "copy.png")
    (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (folder / "._green.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble resource fork")
    (folder / "notes.txt").write_text("taken on the 3rd")
    header, rows = _predict(trained["models"] / "logreg", "--images", str(folder), out=tmp_path / "p.csv")
    assert header == HEADER
    assert [Path(row["id"]).name for row in rows] == ["0_bad.png", "green.png"]
    bad, good = rows
    assert bad["error"] and bad["prediction"] == bad["p_green"] == ""
    assert good["prediction"] == "green" and good["error"] == ""
    assert capsys.readouterr().out == f"{tmp_path / 'p.csv'}: 1 prediction, 1 image failed (see the error column)\n"
    skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Skipped ")]
    assert len(skipped) == 1 and "Skipped 1 file in the folders given" in skipped[0]
    assert str(folder / "notes.txt") in skipped[0] and ".DS_Store" not in skipped[0]

    _, named = _predict(trained["models"] / "logreg", "--images", str(folder / "notes.txt"), str(folder / "green.png"),
                        out=tmp_path / "q.csv")
    assert [Path(row["id"]).name for row in named] == ["notes.txt", "green.png"]
    assert named[0]["error"] and named[0]["prediction"] == "" and named[1]["prediction"] == "green"


def test_a_quoted_glob_is_expanded(trained, tmp_path):
    """Was: 'No such file or folder: [.../green/*.png]' (exit 2) when the shell did not expand the pattern."""
    _, rows = _predict(trained["models"] / "lightgbm", "--images", str(trained["images"] / "green" / "*.png"),
                       out=tmp_path / "p.csv")
    assert len(rows) == 8 and {row["prediction"] for row in rows} == {"green"}
    assert main(["predict", "--model", str(trained["models"] / "lightgbm"), "--images",
                 str(trained["images"] / "green" / "*.jpg"), "--out", str(tmp_path / "q.csv")]) == 2


def test_urls_are_scored_as_their_local_files(trained, tmp_path):
    """``--images`` takes URLs beside files (read as a CSV's URLs are): the rows of the same images, as given."""
    from _support.shards import LoopbackServer

    names = ["green/000.png", "red/001.png"]
    _, local = _predict(trained["models"] / "logreg", "--images", *(str(trained["images"] / n) for n in names),
                        out=tmp_path / "local.csv")
    with LoopbackServer(trained["images"]) as server:
        urls = list(server.urls(names))
        _, remote = _predict(trained["models"] / "logreg", "--images", *urls, out=tmp_path / "urls.csv")
    assert [row["id"] for row in remote] == urls
    assert [{k: v for k, v in row.items() if k != "id"} for row in remote] == \
        [{k: v for k, v in row.items() if k != "id"} for row in local]


def test_an_unwritable_onnx_cache_exports_to_a_temporary_file(trained, tmp_path, monkeypatch, caplog):
    """Was: NotADirectoryError from the cache's mkdir (a file where the cache folder should be; a read-only home
    is the same for a non-root user)."""
    from featcache.extract.onnx.cache import CACHE_ENV

    images = str(trained["images"] / "red")
    _, before = _predict(trained["models"] / "logreg", "--images", images, out=tmp_path / "before.csv")
    (tmp_path / "a_file").write_text("in the way")
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "a_file"))
    with caplog.at_level(logging.WARNING, logger="featcache.extract.onnx.cache"):
        _, after = _predict(trained["models"] / "logreg", "--images", images, out=tmp_path / "after.csv")
    assert after == before
    assert any("is not writable" in r.getMessage() and "temporary file" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("damage", ["no arrays.npz", "no featcache-run.json", "truncated model.txt", "absent",
                                    "no head.json", "truncated head.json"])
def test_a_broken_model_folder_exits_2_naming_it(trained, tmp_path, capsys, damage):
    """Was: a traceback (FileNotFoundError of numpy, a LightGBM crash) instead of one line with the fix."""
    model = tmp_path / "models" / "lightgbm"
    shutil.copytree(trained["models"] / "lightgbm", model)
    if damage == "absent":
        shutil.rmtree(model)
    elif damage.startswith("truncated "):
        text = (model / damage.split()[-1]).read_text()
        (model / damage.split()[-1]).write_text(text[: len(text) // 2])
    else:
        (model / damage.removeprefix("no ")).unlink()
    code = main(["predict", "--model", str(model), "--store", str(trained["store"]), "--out", str(tmp_path / "p.csv")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("featcache predict: error: ") and "Traceback" not in err
    assert str(model) in err and ("dvc repro train" in err or damage == "absent")
    assert damage.split()[-1] in err or damage == "absent"
