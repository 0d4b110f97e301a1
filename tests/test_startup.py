"""Cheap startup: commands that run no model import no torch, onnxruntime, lightgbm, torchvision or timm,
and those that fit nothing no scikit-learn either (``check`` validates every head's params from source).

Each command runs in a fresh interpreter (``featcache.pipeline.cli.main``)
that prints which heavy modules ended up in ``sys.modules``. No timings here:
those are in ``benchmarks/bench_loop.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

HEAVY = ("torch", "torchvision", "timm", "onnxruntime", "onnx", "lightgbm", "sklearn")

_WRAPPER = """
import json, sys
from featcache.pipeline.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as stop:
    code = stop.code
print("HEAVY-MODULES " + json.dumps(sorted(m for m in {heavy!r} if m in sys.modules)))
sys.exit(code)
"""


def heavy_modules(args: list[str], cwd: Path, heavy: tuple[str, ...] = HEAVY, code: int = 0) -> list[str]:
    """Run ``featcache ARGS`` in a fresh interpreter, checked to exit with ``code``; the modules of ``heavy`` it
    imported."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1] / "src"),
                                                       os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", _WRAPPER.format(heavy=heavy), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == code, done.stdout[-2000:] + done.stderr[-3000:]
    line = [line for line in done.stdout.splitlines() if line.startswith("HEAVY-MODULES ")]
    assert line, done.stdout[-2000:] + done.stderr[-2000:]
    return json.loads(line[-1].split(" ", 1)[1])


def _params(data: Path) -> dict:
    return {
        "data": {"name": "tiny", "source": "folder", "path": str(data),
                 "split": {"train": 0.5, "val": 0.25, "test": 0.25}},
        "extract": {"backend": "torch"},
        "extract_run": {"batch_size": 16, "num_workers": 0, "block_rows": 16},
        "backbones": {"efficientnet_lite0": {"weights": "pretrained", "layers": ["pool"]}},
        "features": [{"backbone": "efficientnet_lite0", "layer": "pool"}],
        "train": {"heads": ["logreg", "lightgbm", "mlp"], "n_boot": 20, "seed": 0},
        "heads": {"logreg": {"Cs": [0.1, 10.0], "refine": False}, "lightgbm": {"n_estimators": 5, "n_jobs": 1},
                  "mlp": {"hidden_sizes": [8], "max_epochs": 2}},
    }


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A params file over a tiny 3-class image folder, and one finished run's metrics."""
    root = tmp_path_factory.mktemp("startup")
    rng = np.random.default_rng(0)
    for channel, name in enumerate(("red", "green", "blue")):
        (root / "images" / name).mkdir(parents=True)
        for index in range(6):
            pixels = rng.integers(0, 90, size=(16, 16, 3))
            pixels[..., channel] += 150
            Image.fromarray(pixels.astype(np.uint8)).save(root / "images" / name / f"{index}.png")
    (root / "params.yaml").write_text(yaml.safe_dump(_params(root / "images")), encoding="utf-8")
    run = {"backbone": "efficientnet_lite0", "layer": "pool", "head": "logreg", "task": "classification",
           "dataset": "tiny", "accuracy": 0.9, "balanced_accuracy": 0.9, "macro_f1": 0.9, "log_loss": 0.3}
    (root / "metrics").mkdir()
    (root / "metrics" / "run.json").write_text(json.dumps(run), encoding="utf-8")
    return root


LIGHT_COMMANDS = {
    "help": ["--help"],
    "version": ["--version"],
    "check": ["check", "--params", "params.yaml"],
    "backbones": ["backbones"],
    "layers": ["layers", "resnet18"],
    "prepare": ["prepare", "--params", "params.yaml", "--out", "prepared"],
    "compare": ["compare", "--metrics-dir", "metrics", "--out", "reports/compare.md", "--plot", "reports/plot.csv"],
    "digits": ["digits", "digits"],
    "cache": ["cache", "--params", "params.yaml"],
}


#: What a light command may import: ``digits`` reads scikit-learn's bundled dataset.
ALLOWED = {"digits": ["sklearn"]}


@pytest.mark.parametrize("command", list(LIGHT_COMMANDS))
def test_commands_that_run_no_model_import_no_heavy_library(command, project):
    assert heavy_modules(LIGHT_COMMANDS[command], project) == ALLOWED.get(command, [])


def test_the_probe_sees_a_heavy_import(project):
    """The check above can fail: ``layers --nodes`` builds a model, and the probe reports torch."""
    assert "torch" in heavy_modules(["layers", "resnet18", "--nodes"], project)


@pytest.fixture(scope="module")
def model_folders(project) -> Path:
    """Run folders as ``featcache predict --model`` reads them: one whose two JSON files are readable (its head
    is never loaded here), one without ``head.json``, one with a truncated ``head.json``."""
    from featcache.runs import write_run_info

    info = {"backbone": "efficientnet_lite0", "layer": "pool", "task": "classification",
            "classes": ["blue", "green", "red"],
            "extraction_config": {"weights": "pretrained", "preprocess": {}, "extract": {"pooling": "avg"}}}
    for name, head in (("ok", "{}"), ("no_head", None), ("bad_head", '{"format": "featcache-he')):
        folder = project / "models" / name
        write_run_info(folder, info)
        if head is not None:
            (folder / "head.json").write_text(head, encoding="utf-8")
    return project / "models"


#: ``featcache predict`` runs that exit 2 on an argument or the model folder, and the heavy modules each may
#: import (a missing --store is found by the store's reader: h5py).
PREDICT_ERRORS = {
    "no model folder": (["--model", "models/nope", "--images", "images"], []),
    "no head.json": (["--model", "models/no_head", "--images", "images"], []),
    "truncated head.json": (["--model", "models/bad_head", "--images", "images"], []),
    "missing images": (["--model", "models/ok", "--images", "images/nope"], []),
    "no images": (["--model", "models/ok", "--images", "metrics"], []),
    "batch size 0": (["--model", "models/ok", "--images", "images", "--batch-size", "0"], []),
    "no model folder, a store": (["--model", "models/nope", "--store", "nope.h5"], []),
    "missing store": (["--model", "models/ok", "--store", "nope.h5"], ["h5py"]),
}


@pytest.mark.parametrize("case", list(PREDICT_ERRORS))
def test_predict_names_a_bad_argument_or_model_folder_before_loading_libraries(case, project, model_folders):
    """Was: ``pipeline/predict.py`` imported scikit-learn (``load_head``), h5py and PIL at module level, so each of
    these took over a second to exit 2. Now they import none of them (nor the saved head's loader)."""
    args, allowed = PREDICT_ERRORS[case]
    heavy = (*HEAVY, "h5py", "PIL", "featcache.heads.persistence")
    assert heavy_modules(["predict", *args, "--out", "p.csv"], project, heavy, code=2) == allowed


@pytest.mark.parametrize("model", ["models/nope", "models/no_head", "models/bad_head"])
def test_export_names_a_bad_model_folder_before_loading_libraries(model, project, model_folders):
    """``featcache export`` with a missing folder, no ``head.json`` or a truncated one exits 2 having imported no
    scikit-learn, torch, onnx or onnxruntime (nor the head's loader or the ONNX serving module)."""
    heavy = (*HEAVY, "h5py", "featcache.heads.persistence", "featcache.extract.onnx.serve")
    assert heavy_modules(["export", "--model", model, "--out", "m.onnx"], project, heavy, code=2) == []


@pytest.fixture(scope="module")
def store(project) -> Path:
    """A feature store of the tiny folder, written in this process (torch backend)."""
    from featcache.pipeline import extract, load_params, prepare

    params = load_params(project / "params.yaml")
    prepare(params, project / "prepared")
    out = project / "features" / "lite0.h5"
    extract(params, "efficientnet_lite0", project / "prepared" / "manifest.csv", out, progress=False)
    return out


@pytest.mark.parametrize(("head", "needs"), [("logreg", {"sklearn"}), ("lightgbm", {"lightgbm", "sklearn"})])
def test_train_imports_only_what_its_head_needs(head, needs, project, store):
    args = ["train", "--params", "params.yaml", "--store", str(store), "--backbone", "efficientnet_lite0",
            "--layer", "pool", "--head", head, "--metrics", f"metrics/{head}.json", "--model-dir", f"models/{head}"]
    assert set(heavy_modules(args, project)) == needs


#: The other heads' modules.
OTHER_HEADS = ("featcache.heads.boosting", "featcache.heads.dask_boosting", "featcache.heads.mlp",
               "featcache.heads.out_of_core", "featcache.heads.streaming_mlp", "featcache.heads.training")


def test_a_logreg_train_loads_no_other_head(project, store, tmp_path):
    """A logistic-regression train (the head-iteration loop's stage) imports no torch or LightGBM and none of
    the other heads' modules, saving its model included; its saved head loads back."""
    args = ["train", "--params", "params.yaml", "--store", str(store), "--backbone", "efficientnet_lite0",
            "--layer", "pool", "--head", "logreg", "--metrics", str(tmp_path / "logreg.json"),
            "--predictions", str(tmp_path / "logreg.csv"), "--model-dir", str(tmp_path / "model")]
    assert heavy_modules(args, project, HEAVY + OTHER_HEADS) == ["sklearn"]
    from featcache.heads import load_head

    assert type(load_head(tmp_path / "model")).__name__ == "LogisticRegressionHead"


def test_a_warm_onnx_extraction_builds_no_model(project, store, tmp_path):
    """With the export cached, ``extract`` imports no torch, timm, torchvision or onnx: it builds no model, loads
    no weights and decodes with the array loader (the first extraction, which exports, does; the probe sees it)."""
    params = yaml.safe_load((project / "params.yaml").read_text(encoding="utf-8"))
    params["extract"]["backend"] = "onnx"
    params["extract_run"]["onnx_cache"] = str(tmp_path / "onnx-cache")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")

    def extract(out: str) -> set[str]:
        return set(heavy_modules(["extract", "--params", str(tmp_path / "params.yaml"), "--backbone",
                                  "efficientnet_lite0", "--manifest", str(project / "prepared" / "manifest.csv"),
                                  "--out", str(tmp_path / out)], project))

    assert {"timm", "onnx"} <= extract("cold.h5")
    assert extract("warm.h5") == {"onnxruntime"}


def test_the_cpu_device_is_resolved_without_torch():
    """``extract_run.device: auto`` on a machine where CUDA is impossible, and ``cpu``, need no torch import."""
    code = ("import sys; from featcache.util.compute import cuda_impossible, resolve_device; "
            "print(resolve_device('auto'), resolve_device('cpu'), cuda_impossible(), 'torch' in sys.modules)")
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(Path(__file__).parents[1] / "src"))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["cpu", "cpu", "True", "False"], done.stderr[-2000:]


def test_an_up_to_date_torch_extraction_runs_no_torch(project, store, tmp_path, hermetic_cache):
    """A torch-on-CPU store records torch's thread count; its up-to-date check reads the count this machine recorded
    (``torch_default_threads``) instead of importing torch for it (2.2 s of the 2.4 s on the 2-core VM). A recorded
    count that is wrong (here 7) costs one rebuild: the rebuilt store records the count torch really ran with, and the
    record is corrected, so the next check keeps the store (not a rebuild at every run)."""
    import shutil

    import h5py

    from featcache.util.machine_records import THREADS_FOLDER, torch_threads_entry

    out = tmp_path / "lite0.h5"
    shutil.copy2(store, out)
    args = ["extract", "--params", "params.yaml", "--backbone", "efficientnet_lite0", "--manifest",
            str(project / "prepared" / "manifest.csv"), "--out", str(out)]
    heavy_modules(args, project)  # records the count (and rebuilds a store made in a process at another count)
    kept = out.stat().st_mtime_ns
    assert heavy_modules(args, project) == []
    assert out.stat().st_mtime_ns == kept

    entry, _ = torch_threads_entry()  # this environment's (a dask worker's, with OMP_NUM_THREADS=1, is another)
    assert entry.parent == Path(hermetic_cache) / THREADS_FOLDER
    record = json.loads(entry.read_text(encoding="utf-8"))
    record["value"] = 7
    entry.write_text(json.dumps(record), encoding="utf-8")
    assert "torch" in heavy_modules(args, project)  # rebuilt: the store has another count than 7
    # torch's count in the commands' environment (this process's torch may have been set otherwise by other tests)
    real = int(subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
                              capture_output=True, text=True, check=True).stdout)
    with h5py.File(out, "r") as handle:
        assert json.loads(handle.attrs["config"])["extract"]["torch_threads"] == real != 7
    assert json.loads(entry.read_text(encoding="utf-8"))["value"] == real  # the record corrected
    kept = out.stat().st_mtime_ns
    assert heavy_modules(args, project) == [] and out.stat().st_mtime_ns == kept  # so no rebuild at every run
