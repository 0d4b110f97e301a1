"""``featcache predict --images`` on a head trained on int8 features runs the store's very int8 graph: from the
ONNX cache (by its recorded sha256), else rebuilt from the manifest it was calibrated on, else float32 with one
warning; a cached graph with other bytes is never used."""

from __future__ import annotations

import csv
import json
import logging
import shutil
from pathlib import Path

import h5py
import pytest

from featcache.extract.onnx.cache import CACHE_ENV
from featcache.pipeline import parse_params
from featcache.pipeline.cli import main

from .conftest import extract_and_train

HEADS = ("logreg", "mlp")
PROBABILITIES = ("p_blue", "p_green", "p_red")
FALLBACK = "the head was trained on int8 features, but"


@pytest.fixture(scope="module")
def int8_run(tmp_path_factory, folder_factory, params_factory) -> dict:
    """An int8 store (its graph cached in ``cache/onnx``), and heads trained on its ``pool`` layer (and a logreg on
    ``pool+block6``)."""
    root = tmp_path_factory.mktemp("predict-int8")
    images = folder_factory(root / "images", per_class=12)
    raw = params_factory(str(images))
    raw["extract"].update({"backend": "onnx", "precision": "int8", "int8_calibration": 16, "int8_holdout": 8,
                           "dtype": "float16"})
    raw["extract_run"]["onnx_cache"] = str(root / "cache" / "onnx")
    params = parse_params(raw)
    store, _ = extract_and_train(params, root, {**{head: ("pool", head) for head in HEADS},
                                                # both layers side by side, from the one int8 graph
                                                "fused_logreg": ("pool+block6", "logreg")})
    with h5py.File(store, "r") as f:
        attrs = {key: f.attrs[key] for key in ("onnx_sha256", "int8_float_nodes")}
    return {"root": root, "store": store, "images": images, "models": root / "models", "attrs": attrs,
            "manifest": root / "prepared" / "manifest.csv"}


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _predict(model: Path, *args: str, out: Path) -> list[dict[str, str]]:
    assert main(["predict", "--model", str(model), *args, "--out", str(out)]) == 0
    return _csv(out)


def _assert_same_as_store(run: dict, head: str, tmp_path: Path, *args: str) -> None:
    """``--images`` of the store's images scores every row as ``--store`` does (the MLP within 2e-6)."""
    model = run["models"] / head
    stored = _predict(model, "--store", str(run["store"]), out=tmp_path / f"{head}-store.csv")
    scored = _predict(model, "--images", str(run["images"]), *args, out=tmp_path / f"{head}-images.csv")
    by_id = {Path(row["id"]).relative_to(run["images"]).as_posix(): row for row in scored}
    assert sorted(by_id) == sorted(row["id"] for row in stored) and len(scored) == 36
    for row in stored:
        assert by_id[row["id"]]["prediction"] == row["prediction"], row["id"]
        for column in PROBABILITIES:
            if head == "mlp":
                assert float(by_id[row["id"]][column]) == pytest.approx(float(row[column]), abs=2e-6)
            else:
                assert by_id[row["id"]][column] == row[column], (row["id"], column)


def _fallbacks(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith(FALLBACK)]


def test_the_store_config_records_its_int8_graph(int8_run):
    with h5py.File(int8_run["store"], "r") as f:
        record = json.loads(f.attrs["config"])["extract"]["int8_graph"]
    assert record == {"onnx_sha256": int8_run["attrs"]["onnx_sha256"],
                      "float_nodes": json.loads(int8_run["attrs"]["int8_float_nodes"]),
                      "manifest": str(int8_run["manifest"])}
    run_info = json.loads((int8_run["models"] / "logreg" / "featcache-run.json").read_text(encoding="utf-8"))
    assert run_info["extraction_config"]["extract"]["int8_graph"] == record


@pytest.mark.parametrize("head", [*HEADS, "fused_logreg"])
def test_images_of_an_int8_store_get_its_predictions(int8_run, head, tmp_path, monkeypatch, caplog):
    """Was: float32 features for --images ("scoring float32 features"), other probabilities than --store's.
    ``fused_logreg``: a head on pool+block6 (was: no such layer)."""
    monkeypatch.setenv(CACHE_ENV, str(int8_run["root"] / "cache"))  # auto: the extraction's cache
    with caplog.at_level(logging.INFO, logger="featcache"):
        _assert_same_as_store(int8_run, head, tmp_path)
    assert not _fallbacks(caplog)
    assert any("int8 graph of the head's features found in the ONNX cache" in r.getMessage()
               for r in caplog.records)


def test_an_empty_cache_gets_the_graph_rebuilt_from_the_manifest(int8_run, tmp_path, caplog):
    """Was: float32 features (and no --onnx-cache option to name the cache)."""
    cache = tmp_path / "empty-cache"
    with caplog.at_level(logging.INFO, logger="featcache"):
        _assert_same_as_store(int8_run, "logreg", tmp_path, "--onnx-cache", str(cache))
    assert not _fallbacks(caplog)
    rebuilt = [json.loads(p.read_text(encoding="utf-8")) for p in cache.glob("*-int8-*.onnx.json")]
    assert [record["sha256"] for record in rebuilt] == [int8_run["attrs"]["onnx_sha256"]]


def test_no_graph_and_no_manifest_scores_float32_with_one_warning(int8_run, tmp_path, caplog, monkeypatch):
    """Was: an info line only; the predictions silently came from float32 features."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "empty"))  # auto: an empty cache
    moved = int8_run["manifest"].with_name("manifest.moved")
    int8_run["manifest"].rename(moved)
    try:
        with caplog.at_level(logging.WARNING, logger="featcache"):
            rows = _predict(int8_run["models"] / "logreg", "--images", str(int8_run["images"]),
                            out=tmp_path / "p.csv")
    finally:
        moved.rename(int8_run["manifest"])
    [warning] = _fallbacks(caplog)
    assert "is missing, so it cannot be rebuilt" in warning and str(int8_run["manifest"]) in warning
    assert "scoring float32 features instead" in warning and "Hint: " in warning and "--onnx-cache" in warning
    assert len(rows) == 36 and all(row["prediction"] and not row["error"] for row in rows)


def _tampered_cache(int8_run: dict, tmp_path: Path, sidecar_too: bool) -> Path:
    """A copy of the extraction's cache whose int8 graph holds other bytes (the float32 graph's), as the
    ``auto`` cache (``$FEATCACHE_CACHE_DIR/onnx``) once ``FEATCACHE_CACHE_DIR`` is ``tmp_path``."""
    cache = tmp_path / "onnx"
    shutil.copytree(int8_run["root"] / "cache" / "onnx", cache)
    [graph] = cache.glob("*-int8-*.onnx")
    float32 = sorted(p for p in cache.glob("*.onnx") if p != graph)[0]
    shutil.copyfile(float32, graph)
    if sidecar_too:  # a consistent entry, but not the store's graph
        sidecar = graph.with_name(graph.name + ".json")
        record = json.loads(sidecar.read_text(encoding="utf-8"))
        record["sha256"] = json.loads(float32.with_name(float32.name + ".json").read_text(encoding="utf-8"))["sha256"]
        sidecar.write_text(json.dumps(record), encoding="utf-8")
    return cache


def test_a_tampered_cached_graph_is_rebuilt_not_used(int8_run, tmp_path, caplog, monkeypatch):
    """Was: float32 features; now the entry whose bytes are not its sidecar's is rebuilt from the manifest."""
    _tampered_cache(int8_run, tmp_path, sidecar_too=False)
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    with caplog.at_level(logging.INFO, logger="featcache"):
        _assert_same_as_store(int8_run, "logreg", tmp_path)
    assert not _fallbacks(caplog)
    assert any("is not the graph its sidecar names" in r.getMessage() for r in caplog.records)


def test_a_consistent_entry_of_other_bytes_is_refused(int8_run, tmp_path, caplog, monkeypatch):
    """A cache entry that verifies against its own sidecar but is not the recorded graph: float32, one warning.
    Was: float32 features after an info line only."""
    _tampered_cache(int8_run, tmp_path, sidecar_too=True)
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="featcache"):
        rows = _predict(int8_run["models"] / "logreg", "--images", str(int8_run["images"]), out=tmp_path / "p.csv")
    [warning] = _fallbacks(caplog)
    assert "the graph rebuilt from" in warning and "differs" in warning
    assert len(rows) == 36


@pytest.mark.parametrize("head", ["logreg", "fused_logreg"])
def test_export_serves_the_stores_int8_graph(int8_run, head, tmp_path):
    """``featcache export`` of a run on int8 features serves the store's very int8 graph (from the cache by its
    sha256): its scores are ``predict --store``'s (within predict's 6-decimal rounding), which a float32 backbone
    does not give (checked: the float32 export in its place moves the probabilities by up to 0.11 here)."""
    import numpy as np
    import onnxruntime as ort

    from featcache.pipeline.run_folder import stored_preprocessor
    from featcache.runs import read_run_info

    model = int8_run["models"] / head
    out = tmp_path / "served.onnx"
    assert main(["export", "--model", str(model), "--onnx-cache", str(int8_run["root"] / "cache" / "onnx"),
                 "--out", str(out)]) == 0
    stored = _predict(model, "--store", str(int8_run["store"]), out=tmp_path / "store.csv")
    preprocess = stored_preprocessor(read_run_info(model)["extraction_config"])
    pixels = np.stack([np.asarray(preprocess(preprocess.load(str(int8_run["images"] / row["id"])))) for row in stored])
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    scores, label = session.run(None, {"images": pixels})
    expected = np.array([[float(row[column]) for column in PROBABILITIES] for row in stored])
    np.testing.assert_allclose(scores, expected, rtol=0, atol=2e-6)
    assert [PROBABILITIES[k][2:] for k in label] == [row["prediction"] for row in stored]
