"""Fixtures for pipeline tests: a tiny, learnable ImageFolder and fast params."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

TESTS = Path(__file__).resolve().parents[1]
if str(TESTS) not in sys.path:  # _support importable here and in the child drivers that import this file
    sys.path.insert(0, str(TESTS))

from _support.files import write_colour_folder as make_image_folder  # noqa: E402

REPO = TESTS.parent


def shipped_backend() -> str:
    """``extract.backend`` as the repo's ``params.yaml`` ships it (the schema's default if it leaves it out).

    The fault, determinism and DVC tests run this backend, so they follow the
    default whatever it becomes.
    """
    import yaml

    from featcache.pipeline.params.extract import ExtractParams

    raw = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8")) or {}
    value = (raw.get("extract") or {}).get("backend")
    return str(value if value is not None else ExtractParams.model_fields["backend"].default)


#: The backends the fault and determinism tests run: torch and the shipped default (one if they agree).
BACKENDS = sorted({"torch", shipped_backend()})


def fast_params(data_path: str, name: str = "tiny") -> dict[str, Any]:
    """Params that run every stage in seconds on 2 cores."""
    return {
        "data": {"name": name, "source": "folder", "path": data_path, "task": "classification",
                 "split": {"train": 0.5, "val": 0.25, "test": 0.25}},
        # torch: the runner these tests were written for (the shipped `auto` is onnxruntime on the CPU;
        # the fault, determinism and DVC tests also run shipped_backend())
        "extract": {"backend": "torch"},
        "extract_run": {"batch_size": 16, "num_workers": 0, "block_rows": 16},
        "backbones": {"efficientnet_lite0": {"weights": "pretrained", "layers": ["pool", "block6"]}},
        "features": [{"backbone": "efficientnet_lite0", "layer": "pool"},
                     {"backbone": "efficientnet_lite0", "layer": "block6"}],
        # metric, scheduler, n_workers: params of the dvc.yaml train stages (DVC needs every tracked key present)
        "train": {"heads": ["logreg", "lightgbm", "mlp"], "n_boot": 100, "seed": 0, "metric": None,
                  "scheduler": "none", "n_workers": 2},
        "heads": {
            "logreg": {"Cs": [0.01, 1.0, 100.0], "refine": False},
            "lightgbm": {"n_estimators": 30, "min_child_samples": 2, "n_jobs": 1},
            "mlp": {"hidden_sizes": [32], "max_epochs": 15, "patience": 5, "batch_size": 8, "n_threads": 1},
        },
    }


def extract_and_train(params: Any, root: Path, runs: dict[str, tuple[str, str]],
                      backbone: str = "efficientnet_lite0") -> tuple[Path, dict[str, dict[str, Any]]]:
    """Prepare, extract ``backbone`` into ``root/features.h5`` and train each run ``name: (layer, head)`` into
    ``root/models/<name>`` (metrics ``root/metrics/<name>.json``), as ``dvc repro`` does.

    Returns
    -------
    store : Path
    records : dict
        ``name`` -> the run record ``train`` returned.
    """
    from featcache.pipeline import extract, prepare, train

    prepare(params, root / "prepared")
    store = root / "features.h5"
    extract(params, backbone, root / "prepared" / "manifest.csv", store, progress=False)
    records = {name: train(params, store, backbone, layer, head, root / "metrics" / f"{name}.json",
                           model_dir=root / "models" / name) for name, (layer, head) in runs.items()}
    return store, records


@pytest.fixture(scope="session")
def folder_factory():
    """``folder_factory(root, per_class=12)`` writes a tiny learnable ImageFolder."""
    return make_image_folder


@pytest.fixture(scope="session")
def params_factory():
    """``params_factory(data_path)`` returns fast params as a plain dict."""
    return fast_params
