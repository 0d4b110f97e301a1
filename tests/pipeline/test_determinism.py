"""prepare -> extract -> train -> compare, twice from scratch in two folders: the same bytes.

Each run is a fresh Python process (different ``PYTHONHASHSEED``, so nothing may
depend on set or dict-of-str iteration order) that generates its own copy of
the tiny ImageFolder and runs every stage through the Python API (the stages
the CLI calls), with relative paths inside its own folder. Then:

* the prepared folder (``manifest.csv``, ``manifest.classes.json``, ``summary.json``),
* the HDF5 feature store,
* every file of every saved head (logreg, LightGBM, MLP),
* the prediction CSVs,

have identical md5 sums, and the metrics JSON files and ``compare.json`` are
equal once the timing fields are removed.

Timings (``fit_seconds``, ``predict_seconds``, and the "fit s" / "predict s"
columns of ``compare.md`` that show them) are the only non-deterministic
outputs: they are wall-clock measurements of this machine (its load, CPU
frequency, caches and the other processes running), not results computed from
the data, so two runs never agree on them. Everything else is a function of
the inputs and params alone, and the test fails if any other field differs.

The full pipeline runs on the extraction backend that ``params.yaml`` ships;
every other backend of ``BACKENDS`` (torch) runs prepare and extract twice, and
its feature store must be byte-identical too (the heads do not depend on the
backend that made their features).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from featcache.runs import read_run

from .conftest import BACKENDS, shipped_backend

DEFAULT_BACKEND = shipped_backend()
TIMING = {"fit_seconds", "predict_seconds"}
HEADS = ("logreg", "lightgbm", "mlp")

_DRIVER = """
import sys
from pathlib import Path

sys.path.insert(0, sys.argv[1])  # tests/pipeline: the fixtures' corpus and params
from conftest import fast_params, make_image_folder
backend, full = sys.argv[2], sys.argv[3] == "full"

from featcache.pipeline import compare, extract, parse_params, prepare, train

make_image_folder(Path("images"), per_class=8)
raw = fast_params("images", name="det")
raw["extract"]["backend"] = backend
raw["extract_run"].update(block_rows=8, num_workers=0)
raw["backbones"] = {"efficientnet_lite0": {"weights": "pretrained", "layers": ["pool"]}}
raw["features"] = [{"backbone": "efficientnet_lite0", "layer": "pool"}]
params = parse_params(raw)
prepare(params, "prepared")
extract(params, "efficientnet_lite0", "prepared/manifest.csv", "features/efficientnet_lite0.h5", progress=False)
if not full:
    sys.exit(0)
for head in params.train.heads:
    train(params, "features/efficientnet_lite0.h5", "efficientnet_lite0", "pool", head, f"metrics/pool/{head}.json",
          model_dir=f"models/pool/{head}", predictions_path=f"plots/pool/{head}.csv")
compare("metrics", "reports", plot_path="plots/compare.csv")
"""


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _tree(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): _md5(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def _without_timing(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_timing(v) for k, v in value.items() if k not in TIMING}
    if isinstance(value, list):
        return [_without_timing(v) for v in value]
    return value


def _run_twice(tmp_path_factory, backend: str, full: bool) -> tuple[Path, Path]:
    here = Path(__file__).resolve().parent
    runs, processes = [], []
    for index, hash_seed in enumerate(("1", "2")):
        root = tmp_path_factory.mktemp(f"det-{backend}-{index}")
        env = dict(os.environ, PYTHONHASHSEED=hash_seed, PYTHONDONTWRITEBYTECODE="1")
        args = [sys.executable, "-c", _DRIVER, str(here), backend, "full" if full else "extract"]
        processes.append(subprocess.Popen(args, cwd=root, env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True))
        runs.append(root)
    for process in processes:
        output, _ = process.communicate(timeout=900)
        assert process.returncode == 0, output
    return runs[0], runs[1]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory) -> tuple[Path, Path]:
    """The whole pipeline twice on the shipped default backend."""
    return _run_twice(tmp_path_factory, DEFAULT_BACKEND, full=True)


@pytest.fixture(scope="module", params=BACKENDS)
def two_stores(request, tmp_path_factory) -> tuple[Path, Path]:
    """prepare + extract twice per backend (the default's come from ``two_runs``)."""
    if request.param == DEFAULT_BACKEND:
        return request.getfixturevalue("two_runs")
    return _run_twice(tmp_path_factory, request.param, full=False)


def test_manifest_is_identical(two_runs):
    first, second = two_runs
    files = _tree(first / "prepared")
    assert {"manifest.csv", "manifest.classes.json", "summary.json"} <= set(files)
    assert files == _tree(second / "prepared")


def test_feature_store_is_identical(two_stores):
    first, second = two_stores
    store = Path("features") / "efficientnet_lite0.h5"
    assert _md5(first / store) == _md5(second / store)
    assert sorted(p.name for p in (first / "features").iterdir()) == ["efficientnet_lite0.h5"]


@pytest.mark.parametrize("head", HEADS)
def test_saved_heads_and_predictions_are_identical(two_runs, head):
    first, second = two_runs
    model = Path("models") / "pool" / head
    files = _tree(first / model)
    assert "featcache-run.json" in files and len(files) >= 2
    assert files == _tree(second / model)
    predictions = Path("plots") / "pool" / f"{head}.csv"
    assert _md5(first / predictions) == _md5(second / predictions)
    rows = Path("metrics") / "pool" / f"{head}.rows.npz"  # compare's paired CIs: a cache: false output git keeps
    assert _md5(first / rows) == _md5(second / rows)


@pytest.mark.parametrize("head", HEADS)
def test_metrics_differ_only_in_timings(two_runs, head):
    metrics = Path("metrics") / "pool" / f"{head}.json"
    for run in two_runs:  # the DVC metrics file holds the scores only: no timings in it
        scores = json.loads((run / metrics).read_text())
        assert not TIMING & set(scores["efficientnet_lite0"]["pool"][head])
    a, b = (read_run(run / metrics) for run in two_runs)
    assert TIMING <= set(a)
    differing = {key for key in set(a) | set(b) if a.get(key) != b.get(key)}
    assert differing <= TIMING, f"non-timing fields differ: {sorted(differing - TIMING)}"
    assert _without_timing(a) == _without_timing(b)


def test_compare_report_is_identical_without_timings(two_runs):
    first, second = two_runs
    a, b = (json.loads((run / "reports" / "compare.json").read_text()) for run in two_runs)
    assert len(a["runs"]) == len(HEADS)
    assert _without_timing(a) == _without_timing(b)
    assert _md5(first / "plots" / "compare.csv") == _md5(second / "plots" / "compare.csv")
    tables = [_drop_timing_columns((run / "reports" / "compare.md").read_text()) for run in two_runs]
    assert tables[0] == tables[1]


def _drop_timing_columns(markdown: str) -> list[list[str]]:
    """compare.md's table rows without the "fit s" and "predict s" columns."""
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in markdown.splitlines()
            if line.startswith("|")]
    drop = {rows[0].index("fit s"), rows[0].index("predict s")}
    return [[cell for i, cell in enumerate(row) if i not in drop] for row in rows]
