"""The extract stage on a local dask cluster (2 workers) writes the very file a single process writes.

Through the stage itself (``featcache.pipeline.extract``), with the shipped
extraction params (``backend: auto``: onnxruntime on the CPU): the same md5 for
the whole HDF5 file, so the stage records the same root attributes on both
paths (the workers report the ONNX export they ran: ``onnx_sha256``). And the
thread count is recorded where it changes the bits (torch on the CPU) and only
there.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import h5py
import pytest

from featcache.extract.plan import plan_extraction
from featcache.pipeline import extract, parse_params, prepare
from featcache.pipeline.extract import store_config
from featcache.pipeline.params.extract import stored_choices

from .conftest import make_image_folder


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _params(data: Path, **extract_knobs):
    """Shipped extract params (backend/device/threads auto) with small blocks: several tasks per worker."""
    raw = {"data": {"name": "dist", "source": "folder", "path": str(data),
                    "split": {"train": 0.5, "val": 0.25, "test": 0.25}},
           "extract": {"batch_size": 8, "block_rows": 8, **extract_knobs},
           "backbones": {"efficientnet_lite0": {"weights": "pretrained", "layers": ["pool", "block6"]}},
           "features": [{"backbone": "efficientnet_lite0", "layer": "pool"}]}
    return parse_params(raw)


def test_two_local_workers_write_the_single_process_file(tmp_path):
    make_image_folder(tmp_path / "images", per_class=9)  # 27 rows: 4 blocks, the last one short
    single = _params(tmp_path / "images")
    prepare(single, tmp_path / "prepared")
    manifest = tmp_path / "prepared" / "manifest.csv"
    reference = extract(single, "efficientnet_lite0", manifest, tmp_path / "single.h5", progress=False).path

    dask = _params(tmp_path / "images", scheduler="local", n_workers=2)
    report = extract(dask, "efficientnet_lite0", manifest, tmp_path / "dask.h5", progress=False)

    assert report.n_written == 27
    with h5py.File(reference, "r") as handle:
        assert handle.attrs["backend"] == "onnx" and len(handle.attrs["onnx_sha256"]) == 64
        assert "torch_threads" not in json.loads(handle.attrs["config"])["extract"]
    assert _md5(report.path) == _md5(reference)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dask.h5", "images", "prepared", "single.h5"]


@pytest.mark.parametrize(("backend", "device", "recorded"), [("torch", "cpu", True), ("onnx", "cpu", False)])
def test_torch_threads_are_recorded_for_torch_on_the_cpu_only(tmp_path, backend, device, recorded):
    from featcache.extract.decode.preprocess import Preprocessor
    from featcache.extract.zoo.registry import get_backbone

    params = _params(tmp_path, backend=backend, device=device)
    plan = plan_extraction(device=device, backend=backend)
    preprocess = Preprocessor.from_spec(get_backbone("efficientnet_lite0"), "crop")
    config = store_config(params, "efficientnet_lite0", plan, preprocess, torch_threads=3)
    assert ("torch_threads" in config["extract"]) is recorded
    if recorded:
        assert config["extract"]["torch_threads"] == 3
        # 1 thread per dask worker vs 3 in one process: another config, so blocks are never mixed on resume
        assert store_config(params, "efficientnet_lite0", plan, preprocess, torch_threads=1) != config
        # and the train stage takes a store of any thread count for the same params
        assert stored_choices(params.extract, config["extract"])["torch_threads"] == 3


def test_dask_workers_decode_on_their_device_through_the_stage(tmp_path):
    """``extract.decode: gpu`` under ``extract_run.scheduler`` (the ``auto`` pick for torch on CUDA): every worker
    decodes its JPEGs in batches on its device (here the CPU, the same code path), and the stage writes the
    very file one process writes with the same decode (torch at one thread in both, as a dask worker runs)."""
    from PIL import Image

    from featcache.util.compute import torch_threads

    make_image_folder(tmp_path / "images", per_class=6, size=40)
    for png in sorted((tmp_path / "images").rglob("*.png")):
        Image.open(png).save(png.with_suffix(".jpg"), quality=90)
        png.unlink()
    knobs = {"backend": "torch", "device": "cpu", "decode": "gpu"}
    single = _params(tmp_path / "images", **knobs)
    prepare(single, tmp_path / "prepared")
    manifest = tmp_path / "prepared" / "manifest.csv"
    with torch_threads(1):
        reference = extract(single, "efficientnet_lite0", manifest, tmp_path / "single.h5", progress=False).path

    dask = _params(tmp_path / "images", scheduler="local", n_workers=2, num_workers=2, **knobs)
    report = extract(dask, "efficientnet_lite0", manifest, tmp_path / "dask.h5", progress=False)

    assert report.n_written == 18
    with h5py.File(report.path, "r") as handle:
        assert handle.attrs["decode"] == "gpu" and json.loads(handle.attrs["config"])["extract"]["decode"] == "gpu"
    assert _md5(report.path) == _md5(reference)
