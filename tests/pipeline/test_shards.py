"""``data.source: webdataset`` end to end: prepare + extract on shards, local and over loopback HTTP.

* Shards written by webdataset's ``TarWriter`` from generated images give a
  store whose labels, splits and features are byte-equal to the same images
  read as a folder; the store records the shard list with each sha256.
* The same shards over HTTP (127.0.0.1), one of them failing twice during
  extraction, give the same features; a CSV of image URLs with a 404 reports
  that row by id with its reason and loses nothing else.
* ``kill -9`` of a sharded extraction once a block is committed, then a
  rerun: the same bytes as an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml

from _support.shards import LoopbackServer, shards_from_folder
from featcache.pipeline import extract, parse_params, prepare
from featcache.store import FeatureStore

BACKBONE = "efficientnet_lite0"


def _raw(params_factory, source: str, path, **data) -> dict:
    raw = params_factory("unused")
    raw["data"].update(source=source, path=path, **data)
    raw["data"]["io"] = {"timeout": 5.0, "tries": 3, "backoff": 0.01}
    raw["extract_run"].update(batch_size=8, block_rows=8, num_workers=0)
    raw["backbones"] = {BACKBONE: {"weights": "pretrained", "layers": ["pool", "block2"]}}
    raw["features"] = [{"backbone": BACKBONE, "layer": "pool"}]
    return raw


def _run(raw: dict, root: Path, name: str) -> Path:
    """prepare + extract in ``root`` (data.path relative to it, as in a project's params.yaml)."""
    params = parse_params(raw)
    cwd = Path.cwd()
    os.chdir(root)
    try:
        prepare(params, root / name)
        out = root / f"{name}.h5"
        extract(params, BACKBONE, root / name / "manifest.csv", out, progress=False)
    finally:
        os.chdir(cwd)
    return out


def _datasets(path: Path) -> dict[str, bytes]:
    with h5py.File(path, "r") as handle:
        return {name: handle[name][()].tobytes() for name in ("label", "split", "features/pool", "features/block2")}


@pytest.fixture(scope="module")
def project(tmp_path_factory, folder_factory, params_factory) -> dict:
    root = tmp_path_factory.mktemp("shards")
    folder_factory(root / "images", per_class=8)
    shards_from_folder(root / "images", root / "shards")  # one shard per class: ids <class>/<stem>
    folder = _run(_raw(params_factory, "folder", "images"), root, "folder")
    return {"root": root, "folder": folder, "params_factory": params_factory}


@pytest.fixture(scope="module")
def sharded(project) -> Path:
    return _run(_raw(project["params_factory"], "webdataset", "shards"), project["root"], "sharded")


def test_shards_give_the_features_of_the_same_images_as_a_folder(project, sharded):
    assert _datasets(sharded) == _datasets(project["folder"])
    with FeatureStore(sharded) as store, FeatureStore(project["folder"]) as folder:
        assert list(store.ids()) == [i.rsplit(".", 1)[0] for i in folder.ids()]
        assert store.errors() == []
    with h5py.File(sharded, "r") as handle:
        shards = json.loads(handle.attrs["shards"])["shards"]
    root = project["root"]
    assert [s["path"].rsplit("/", 1)[-1] for s in shards] == ["blue.tar", "green.tar", "red.tar"]
    assert shards[0]["sha256"] == hashlib.sha256((root / "shards" / "blue.tar").read_bytes()).hexdigest()
    with h5py.File(project["folder"], "r") as handle:
        assert "shards" not in handle.attrs  # a folder's store is as before


def test_shards_over_http_with_a_flaky_shard_give_the_same_features(project, sharded):
    root = project["root"]
    with LoopbackServer(root) as server:
        urls = [server.url + "shards/{blue,green,red}.tar"]
        raw = _raw(project["params_factory"], "webdataset", urls)
        params = parse_params(raw)
        prepare(params, root / "http")
        server.fail("shards/green.tar", 2)  # its first two range requests during extraction get 503
        out = root / "http.h5"
        extract(params, BACKBONE, root / "http" / "manifest.csv", out, progress=False)
        assert server.requests["shards/green.tar"] >= 3
    assert _datasets(out) == _datasets(sharded)
    with FeatureStore(out) as store:
        assert store.errors() == []


def test_a_csv_of_urls_reports_the_404_by_id_and_loses_nothing_else(project):
    root = project["root"]
    images = sorted((root / "images").rglob("*.png"))
    with LoopbackServer(root) as server:
        rows = [f"{server.url}{p.relative_to(root).as_posix()},{p.parent.name}" for p in images]
        rows.append(f"{server.url}images/red/missing.png,red")
        (root / "urls").mkdir()
        (root / "urls" / "labels.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
        server.fail(images[3].relative_to(root).as_posix(), 2)
        out = _run(_raw(project["params_factory"], "csv", "urls"), root, "urls-run")
    with FeatureStore(out) as store:
        assert store.errors() == [(f"{server.url}images/red/missing.png", "missing object (404 not found)")]
        assert len(store.ids()) == len(images)


def test_rows_a_server_kept_failing_are_named_with_the_way_to_read_them_again(project, caplog):
    """A server down for longer than data.io.tries leaves rows out of a finished store, which `dvc repro` then
    counts as done: the stage says they are not bad images and how to read them again (it said only
    'N rows written, M skipped', as for corrupt images)."""
    root = project["root"]
    images = sorted((root / "images").rglob("*.png"))[::2]  # 4 of each class
    with LoopbackServer(root) as server:
        rows = [f"{server.url}{p.relative_to(root).as_posix()},{p.parent.name}" for p in images]
        (root / "down").mkdir()
        (root / "down" / "labels.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
        raw = _raw(project["params_factory"], "csv", "down")
        server.fail(images[0].relative_to(root).as_posix(), 100)
        with caplog.at_level(logging.WARNING, logger="featcache"):
            _run(raw, root, "down-run")
    hints = [r.getMessage() for r in caplog.records if "not bad images" in r.getMessage()]
    assert len(hints) == 1, [r.getMessage() for r in caplog.records]
    assert hints[0].startswith("1 of the 1 skipped rows of ")
    assert f"{server.url}{images[0].relative_to(root).as_posix()}" in hints[0]
    assert "unreadable object (HTTP 503" in hints[0]
    assert f"dvc repro --force --single-item extract@{BACKBONE}, then dvc repro" in hints[0]


# ------------------------------------------------------------------ kill -9
def _env() -> dict[str, str]:
    import torch

    threads = str(torch.get_num_threads())
    return dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)


def test_a_killed_sharded_extraction_resumes_to_identical_bytes(project, sharded):
    root = project["root"]
    raw = _raw(project["params_factory"], "webdataset", "shards")
    raw["extract_run"].update(batch_size=4, block_rows=4)
    (root / "kill.yaml").write_text(yaml.safe_dump(raw))
    args = [sys.executable, "-m", "featcache.pipeline.cli", "extract", "--params", "kill.yaml", "--backbone",
            BACKBONE, "--manifest", "sharded/manifest.csv", "--no-progress"]
    reference = subprocess.run([*args, "--out", "reference4.h5"], cwd=root, env=_env(), capture_output=True,
                               text=True, timeout=600, check=False)
    assert reference.returncode == 0, reference.stderr
    out = root / "killed.h5"
    first = subprocess.Popen([*args, "--out", out.name], cwd=root, env=_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 600
        # a committed block: block-<n>.<ext>, whatever the block file type (temporary ones carry ".tmp-")
        while not any(".tmp-" not in p.name for p in root.glob("killed.h5.parts/*/block-*")):
            assert first.poll() is None, "the extraction ended before it was killed"
            assert time.monotonic() < deadline, "no block was committed"
            time.sleep(0.005)
        os.kill(first.pid, signal.SIGKILL)
    finally:
        if first.poll() is None:
            first.kill()
        first.wait()
    assert first.returncode == -signal.SIGKILL and not out.exists()
    rerun = subprocess.run([*args, "--out", out.name], cwd=root, env=_env(), capture_output=True, text=True,
                           timeout=600, check=False)
    assert rerun.returncode == 0, rerun.stderr
    assert "Resuming" in rerun.stderr
    assert hashlib.md5(out.read_bytes()).hexdigest() == hashlib.md5((root / "reference4.h5").read_bytes()).hexdigest()
    assert np.frombuffer(_datasets(out)["features/pool"], np.float16).size > 0
