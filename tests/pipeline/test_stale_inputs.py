"""``featcache extract`` onto a finished store sees input files changed in place, as ``make`` does.

The manifest names images by path, so an image fixed or replaced under the same path left the store "up to date"
with the old features (also the blocks a killed run had committed). Now a local file (an image, a shard) modified
after the store (or the block) was written makes it stale: it is extracted again, the log naming the files;
URL inputs cannot be checked cheaply: the store is kept, the log says so.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from _support.shards import LoopbackServer, shards_from_folder
from featcache.pipeline import extract, parse_params, prepare
from featcache.store.writer import StoreWriter

BACKBONE = "efficientnet_lite0"
FIXED, DONOR = "red/001.png", "blue/002.png"  # FIXED is overwritten in place with DONOR's bytes


def _raw(params_factory, source: str, path: str) -> dict:
    raw = params_factory(path)
    raw["data"]["source"] = source
    raw["extract_run"].update(batch_size=4, block_rows=4, num_workers=0)
    raw["backbones"] = {BACKBONE: {"weights": "pretrained", "layers": ["pool"]}}
    raw["features"] = [{"backbone": BACKBONE, "layer": "pool"}]
    return raw


def copy_raw(raw: dict, **extract_run) -> dict:
    """``raw`` with ``extract_run`` settings changed (speed-only settings: the store's inputs stay the same)."""
    return {**raw, "extract_run": {**raw["extract_run"], **extract_run}}


def _extract(raw: dict, root: Path, name: str, **kwargs):
    return extract(parse_params(raw), BACKBONE, root / name / "manifest.csv", root / f"{name}.h5", progress=False,
                   **kwargs)


@pytest.fixture(scope="module")
def project(tmp_path_factory, folder_factory, params_factory) -> dict:
    """12 images (3 classes, 4-row blocks: one block per class) as a folder and as shards, prepared and extracted."""
    root = tmp_path_factory.mktemp("stale")
    folder_factory(root / "images", per_class=4)
    shards_from_folder(root / "images", root / "shards")
    raws = {"folder": _raw(params_factory, "folder", str(root / "images")),
            "sharded": _raw(params_factory, "webdataset", str(root / "shards"))}
    for name, raw in raws.items():
        prepare(parse_params(raw), root / name)
        _extract(raw, root, name)
    return {"root": root, "raws": raws}


@pytest.fixture
def copy(project, tmp_path) -> Path:
    """The project copied with its files' mtimes (each test changes its own images)."""
    shutil.copytree(project["root"], tmp_path / "p", copy_function=shutil.copy2)
    return tmp_path / "p"


def _log(caplog) -> str:
    return "\n".join(record.getMessage() for record in caplog.records)


def _pool(store: Path) -> dict[str, np.ndarray]:
    with h5py.File(store, "r") as handle:
        ids = [i.decode() if isinstance(i, bytes) else str(i) for i in handle["ids"][()]]
        return dict(zip(ids, handle["features/pool"][()].astype(np.float32)))


def _fix_in_place(root: Path) -> None:
    (root / "images" / FIXED).write_bytes((root / "images" / DONOR).read_bytes())


def _assert_new_content(store: Path, old: dict[str, np.ndarray], atol: float = 0.0) -> None:
    """``store`` holds the features of FIXED's new bytes and, within ``atol`` (0: equal), ``old``'s other rows."""
    new = _pool(store)
    assert not np.allclose(old[FIXED], old[DONOR], atol=1e-2)  # the old store held the old image's features
    np.testing.assert_allclose(new[FIXED], new[DONOR], atol=1e-3)  # now those of the new bytes
    assert all(np.allclose(new[i], old[i], rtol=0, atol=atol) for i in old if i != FIXED)


def test_an_image_fixed_in_place_rebuilds_the_store_then_it_is_kept(project, copy, caplog):
    out, old = copy / "folder.h5", _pool(copy / "folder.h5")
    _fix_in_place(copy)
    with caplog.at_level(logging.INFO):
        report = _extract(project["raws"]["folder"], copy, "folder")
    assert not report.up_to_date
    assert f"Rebuilding {out}: 1 of its input files were modified after it was written: " \
           f"{copy / 'images' / FIXED}" in _log(caplog)
    _assert_new_content(out, old)
    assert _extract(project["raws"]["folder"], copy, "folder").up_to_date  # not rebuilt on every run


def test_an_image_not_newer_than_the_store_keeps_it(project, copy, caplog):
    """An mtime equal to the store's is not newer (as for make); the store is kept as it is."""
    out = copy / "folder.h5"
    before = os.stat(out)
    os.utime(copy / "images" / FIXED, ns=(before.st_mtime_ns, before.st_mtime_ns))
    with caplog.at_level(logging.INFO):
        assert _extract(project["raws"]["folder"], copy, "folder").up_to_date
    assert os.stat(out).st_ino == before.st_ino
    assert "not checked" not in _log(caplog)  # every input is a local file, all of them checked


def test_a_touched_shard_rebuilds_the_store(project, copy, caplog):
    out = copy / "sharded.h5"
    before = os.stat(out)
    os.utime(copy / "shards" / "green.tar")  # touch: now
    with caplog.at_level(logging.INFO):
        assert not _extract(project["raws"]["sharded"], copy, "sharded").up_to_date
    assert f"Rebuilding {out}: 1 of its input files were modified after it was written: " \
           f"{copy / 'shards' / 'green.tar'}" in _log(caplog)
    assert os.stat(out).st_ino != before.st_ino
    with open(out, "rb") as new, open(project["root"] / "sharded.h5", "rb") as old:
        assert new.read() == old.read()  # same shard bytes, same store


@pytest.mark.parametrize("scheduler", ["none", "local"])
def test_a_resumed_run_extracts_again_the_blocks_of_an_image_fixed_since(project, copy, monkeypatch, caplog,
                                                                         scheduler):
    """A run killed with every block committed (it failed writing the final file); the image of one block fixed in
    place; the rerun extracts that block again (the others are kept): the store holds the new image's features.
    ``local``: the rerun resumes through dask (its driver checks the committed blocks as the single process does)."""
    out, old = copy / "folder.h5", _pool(copy / "folder.h5")
    raw = copy_raw(project["raws"]["folder"], scheduler=scheduler, n_workers=1)
    out.unlink()
    finalize = StoreWriter.finalize

    def full_disk(self, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(StoreWriter, "finalize", full_disk)
    with pytest.raises(OSError, match="disk full"):
        _extract(raw, copy, "folder")
    monkeypatch.setattr(StoreWriter, "finalize", finalize)
    _fix_in_place(copy)
    with caplog.at_level(logging.INFO):
        report = _extract(raw, copy, "folder")
    assert f"Extracting 1 committed blocks of {out} again: 1 of their input files were modified after they were " \
           f"committed: {copy / 'images' / FIXED}" in _log(caplog)
    assert (report.n_resumed_blocks, report.n_extracted) == (2, 4)
    _assert_new_content(out, old, atol=0.0 if scheduler == "none" else 1e-3)  # dask: torch, not onnx


def test_a_store_of_urls_is_kept_saying_they_are_not_checked(project, params_factory, tmp_path, caplog):
    root = project["root"]
    images = sorted((root / "images").rglob("*.png"))
    with LoopbackServer(root) as server:
        (tmp_path / "urls").mkdir()
        (tmp_path / "urls" / "labels.csv").write_text("path,label\n" + "\n".join(
            f"{server.url}{p.relative_to(root).as_posix()},{p.parent.name}" for p in images) + "\n")
        raw = _raw(params_factory, "csv", str(tmp_path / "urls"))
        prepare(parse_params(raw), tmp_path / "run")
        _extract(raw, tmp_path, "run")
        with caplog.at_level(logging.INFO):
            assert _extract(raw, tmp_path, "run").up_to_date
    assert f"{tmp_path / 'run.h5'}: not checked for changes made in place since it was written: 12 URL inputs " \
           "(a request each); --force rebuilds it" in _log(caplog)


def test_an_input_dated_in_the_future_rebuilds_the_store_with_a_warning(project, copy, caplog):
    """A clock set wrong: the store is rebuilt, and would be on every run until then; the warning says so."""
    future = os.stat(copy / "folder.h5").st_mtime_ns + 3600 * 10**9
    os.utime(copy / "images" / FIXED, ns=(future, future))
    with caplog.at_level(logging.INFO):
        assert not _extract(project["raws"]["folder"], copy, "folder").up_to_date
    assert f"1 input files of {copy / 'folder.h5'} are dated in the future ({copy / 'images' / FIXED}; a clock set " \
           "wrong?): the store is rebuilt on every run until then. Hint: touch them" in _log(caplog)
