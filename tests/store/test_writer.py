"""Tests of featcache.store.writer: round trip, resume, crash safety, determinism, locking."""

from __future__ import annotations

import errno
import logging
import os
import signal
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from _support import synth_store as synth
from featcache.store import FORMAT, FeatureStore, LayerSpec, StoreError, StoreLockedError, StoreWriter
from featcache.store.blocks import TMP_MARK


def _ref(tmp_path: Path, **kwargs) -> Path:
    """An uninterrupted reference run in its own directory."""
    return synth.write_all(tmp_path / "ref" / "ref.h5", **kwargs)


def _leftovers(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir() if p.name != path.name)


# --------------------------------------------------------------------------- round trip
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_round_trip_raw_h5py(tmp_path, dtype):
    path = synth.write_all(tmp_path / "out" / "tiny.h5", dtype=dtype)
    kept = [r for r in range(synth.N) if r not in synth.SKIP]
    ids = synth.make_ids()
    with h5py.File(path, "r") as f:  # readable without featcache
        assert f.attrs["format"] == FORMAT
        assert f.attrs["complete"] is np.True_ or f.attrs["complete"] == True  # noqa: E712
        assert (f.attrs["n_rows"], f.attrs["n_input"], f.attrs["n_skipped"]) == (34, 37, 3)
        assert f.attrs["n_rows"] + f.attrs["n_skipped"] == f.attrs["n_input"]
        assert f.attrs["backbone"] == "tiny" and f.attrs["n_params"] == 1234
        assert f.attrs["channels_last"] == False  # noqa: E712
        assert list(f["ids"].asstr()[()]) == [ids[r] for r in kept]
        np.testing.assert_array_equal(f["label"][()], np.array(kept) % 3)
        assert np.isnan(f["target"][()]).all()
        np.testing.assert_array_equal(f["split"][()], np.array(kept) % 3)
        assert h5py.check_enum_dtype(f["split"].dtype) == {"train": 0, "val": 1, "test": 2}
        assert list(f["classes"].asstr()[()]) == synth.CLASSES
        errs = f["errors"][()]
        assert [e.decode() for e in errs["id"]] == [ids[r] for r in sorted(synth.SKIP)]
        assert errs["reason"][0].decode() == synth.reason_for(ids[3])
        for spec in synth.LAYERS:
            ds = f["features"][spec.alias]
            assert ds.dtype == np.dtype(dtype) and ds.shape == (34, spec.dim)
            assert ds.chunks == (synth.BLOCK_ROWS, spec.dim) and ds.compression == "gzip"
            want = synth.features_for(spec.alias, kept).astype(dtype)
            np.testing.assert_array_equal(ds[()], want)
            assert ds.attrs["node"] == spec.node and ds.attrs["pooling"] == spec.pooling
            assert tuple(ds.attrs["map_shape"]) == spec.map_shape and ds.attrs["dim"] == spec.dim
            assert bool(ds.attrs["post_relu"]) is spec.post_relu
    assert _leftovers(path) == []  # no lock, parts or partial left beside the output


def test_finalize_logs_at_debug_and_counts_with_thousands_separators(tmp_path, caplog):
    """The writer's "wrote ..." line was a second INFO line after the extraction's own final line: now DEBUG."""
    with caplog.at_level(logging.INFO, logger="featcache.store.writer"):
        synth.write_all(tmp_path / "info.h5")
    assert not [r for r in caplog.records if r.getMessage().startswith("wrote ")]
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="featcache.store.writer"):
        synth.write_all(tmp_path / "debug.h5")
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("wrote ")]
    assert "34 rows (3 of 37 inputs skipped)" in line
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="featcache.store.writer"), \
            StoreWriter(tmp_path / "big.h5", **synth.make_kwargs(1200)):
        pass
    assert "big.h5: 1,200 rows in " in caplog.text, caplog.text


def test_regression_and_all_rows_kept(tmp_path):
    path = synth.write_all(tmp_path / "reg.h5", regression=True)
    with h5py.File(path, "r") as f:
        assert f["classes"].shape == (0,)
        assert (f["label"][()] == -1).all()
        kept = [r for r in range(synth.N) if r not in synth.SKIP]
        np.testing.assert_array_equal(f["target"][()], np.array(kept) * 0.5 - 1.0)


def test_no_skips_gives_empty_errors(tmp_path):
    with StoreWriter(tmp_path / "a.h5", **synth.make_kwargs()) as w:
        synth.commit(w, w.pending_blocks(), skip=frozenset())
        path = w.finalize()
    with h5py.File(path, "r") as f:
        assert f["errors"].shape == (0,) and f.attrs["n_skipped"] == 0
        assert f["features/pool"].shape == (synth.N, 5)


def test_unsorted_kept_rows_are_reordered(tmp_path):
    ref = _ref(tmp_path)
    with StoreWriter(tmp_path / "a.h5", **synth.make_kwargs()) as w:
        for b in w.pending_blocks():
            rows = [r for r in w.block_range(b) if r not in synth.SKIP][::-1]
            errs = [(w.ids[r], synth.reason_for(w.ids[r])) for r in w.block_range(b) if r in synth.SKIP]
            feats = {s.alias: synth.features_for(s.alias, rows) for s in synth.LAYERS}
            w.commit_block(b, np.array(rows), feats, errs[::-1])
        path = w.finalize()
    assert path.read_bytes() == ref.read_bytes()


# --------------------------------------------------------------------------- determinism
def test_two_runs_identical_bytes_across_time(tmp_path, file_md5):
    a = synth.write_all(tmp_path / "one" / "a.h5")
    time.sleep(1.1)  # timestamps, if any were stored, would now differ
    b = synth.write_all(tmp_path / "two" / "b.h5")
    assert file_md5(a) == file_md5(b)


def test_resume_after_drop_gives_identical_bytes(tmp_path, file_md5):
    ref = _ref(tmp_path)
    out = tmp_path / "out" / "x.h5"
    w = StoreWriter(out, **synth.make_kwargs())
    assert w.n_blocks == 5 and w.pending_blocks() == [0, 1, 2, 3, 4]
    synth.commit(w, [0, 2])
    w.close()  # dropped without finalize, as if the process had died
    with pytest.raises(RuntimeError):
        with StoreWriter(out, **synth.make_kwargs()) as w2:
            assert w2.pending_blocks() == [1, 3, 4]
            synth.commit(w2, [4])
            raise RuntimeError("interrupted")
    with StoreWriter(out, **synth.make_kwargs()) as w3:
        assert w3.pending_blocks() == [1, 3]
        synth.commit(w3, w3.pending_blocks())
        w3.finalize()
    assert file_md5(out) == file_md5(ref)
    assert _leftovers(out) == []


_KILL_CHILD = r"""
import sys, time
from _support import synth_store as synth
from featcache.store import StoreWriter, blocks
real_options, calls = blocks.feature_dataset_options, [0]
def half_then_hang(compression):  # the 4th block file: hang while it is open for writing (half written)
    calls[0] += 1
    if calls[0] > 3 * len(synth.make_kwargs()["layers"]):
        print("HALF", flush=True)
        time.sleep(120)
    return real_options(compression)
blocks.feature_dataset_options = half_then_hang
with StoreWriter(sys.argv[1], **synth.make_kwargs()) as w:
    synth.commit(w, w.pending_blocks())
    w.finalize()
"""


def test_kill_9_mid_commit_then_resume_identical_bytes(tmp_path, spawn, file_md5):
    ref = _ref(tmp_path)
    out = tmp_path / "out" / "x.h5"
    proc = spawn(_KILL_CHILD, str(out))
    line = proc.stdout.readline()
    assert line.strip() == "HALF", proc.stderr.read()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    parts = out.with_name("x.h5.parts")
    files = sorted(p.name for d in parts.iterdir() for p in d.iterdir())
    assert files[:3] == ["block-000000.h5", "block-000001.h5", "block-000002.h5"]
    assert len(files) == 4 and TMP_MARK in files[3]  # the half-written temp file
    assert out.with_name("x.h5.lock").read_text().strip() == str(proc.pid)  # stale lock
    assert not out.exists()
    with StoreWriter(out, **synth.make_kwargs()) as w:  # the kernel dropped the lock
        assert w.pending_blocks() == [3, 4]
        synth.commit(w, w.pending_blocks())
        w.finalize()
    assert file_md5(out) == file_md5(ref)
    assert _leftovers(out) == []


def test_a_temporary_file_that_vanishes_during_the_scan_is_no_error(tmp_path, monkeypatch):
    """A late writer (a cancelled dask task still running) renames or removes its temporary block file while a
    rerun scans the parts folder: the scan listed it, then unlink() raised FileNotFoundError (CI, 2026-12-07)."""
    out = tmp_path / "x.h5"
    with StoreWriter(out, **synth.make_kwargs()) as w:
        synth.commit(w, [0])
        parts_dir = w.parts_dir
    vanished = parts_dir / f"block-000001.h5{TMP_MARK}4242"
    listing = Path.iterdir

    def iterdir_with_a_vanished_file(self):
        yield from listing(self)
        if self == parts_dir:
            yield vanished  # listed, but gone before the scan removes it

    monkeypatch.setattr(Path, "iterdir", iterdir_with_a_vanished_file)
    with StoreWriter(out, **synth.make_kwargs()) as w2:
        assert w2.pending_blocks() == [1, 2, 3, 4]


def test_other_config_parts_are_discarded(tmp_path, caplog, file_md5):
    out = tmp_path / "x.h5"
    with StoreWriter(out, **synth.make_kwargs(config=synth.make_config(pooling="max"))) as w:
        synth.commit(w, [0, 1, 2])
        old_dir = w.parts_dir
    assert old_dir.is_dir()
    with caplog.at_level(logging.INFO, logger="featcache.store.writer"):
        w2 = StoreWriter(out, **synth.make_kwargs())
    assert not old_dir.exists() and "discarding parts of another config" in caplog.text
    assert [p.name for p in w2.parts_root.iterdir()] == [w2.parts_dir.name]
    assert w2.pending_blocks() == [0, 1, 2, 3, 4]
    synth.commit(w2, w2.pending_blocks())
    w2.finalize()
    assert file_md5(out) == file_md5(_ref(tmp_path))


def test_same_config_other_ids_blocks_are_not_reused(tmp_path):
    out = tmp_path / "x.h5"
    with StoreWriter(out, **synth.make_kwargs()) as w:
        synth.commit(w, [0, 1])
    kwargs = synth.make_kwargs(n=36)  # same config hash, one image less
    with StoreWriter(out, **kwargs) as w2:
        assert w2.pending_blocks() == [0, 1, 2, 3, 4]


def test_same_config_same_count_other_ids_blocks_are_not_reused(tmp_path):
    """Renamed images, same config and row count: the old blocks hold other images' features."""
    out = tmp_path / "x.h5"
    with StoreWriter(out, **synth.make_kwargs()) as w:
        synth.commit(w, [0, 1])
    renamed = [f"new/{i:04d}.png" for i in range(synth.N)]
    with StoreWriter(out, **synth.make_kwargs(ids=renamed)) as w2:
        assert w2.pending_blocks() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("override", [
    {"dtype": "float32"},  # float16 block bytes would be copied raw into a float32 store
    {"layers": synth.LAYERS[::-1]},  # features/0 would be another layer's
], ids=["dtype", "layer-order"])
def test_same_config_other_storage_blocks_are_not_reused(tmp_path, override):
    out = tmp_path / "x.h5"
    with StoreWriter(out, **synth.make_kwargs()) as w:
        synth.commit(w, w.pending_blocks())
    with StoreWriter(out, **synth.make_kwargs(**override)) as w2:
        assert w2.pending_blocks() == [0, 1, 2, 3, 4]


def test_same_config_other_block_rows_blocks_are_not_reused(tmp_path):
    """Block 1 holds one row with block_rows 3 (row 3) and with block_rows 1 (row 1): not the same block."""
    out = tmp_path / "x.h5"
    with StoreWriter(out, **synth.make_kwargs(n=4, block_rows=3)) as w:
        synth.commit(w, [1], skip=frozenset())
    with StoreWriter(out, **synth.make_kwargs(n=4, block_rows=1)) as w2:
        assert w2.pending_blocks() == [0, 1, 2, 3]


def test_errors_listed_out_of_order_are_stored_in_row_order(tmp_path):
    with StoreWriter(tmp_path / "x.h5", **synth.make_kwargs(n=8)) as w:
        kept = np.array([0, 2, 4, 6], dtype=np.int64)
        errors = [(w.ids[r], f"bad {r}") for r in (7, 1, 5, 3)]
        w.commit_block(0, kept, {s.alias: synth.features_for(s.alias, kept) for s in synth.LAYERS}, errors)
        assert w.committed_errors() == [(w.ids[r], f"bad {r}") for r in (1, 3, 5, 7)]
        path = w.finalize()
    with FeatureStore(path) as fs:
        assert fs.errors() == [(synth.make_ids(8)[r], f"bad {r}") for r in (1, 3, 5, 7)]
        np.testing.assert_array_equal(fs.ids(), np.array(synth.make_ids(8))[kept])


def test_finalize_replaces_whole_file_and_spares_hard_links(tmp_path, file_md5):
    out = synth.write_all(tmp_path / "x.h5", config=synth.make_config(size=160))
    cache = tmp_path / "dvc-cache-copy"
    os.link(out, cache)  # DVC may hard-link outputs into its cache
    before = file_md5(cache)
    synth.write_all(out)
    assert file_md5(cache) == before and file_md5(out) == file_md5(_ref(tmp_path))


# --------------------------------------------------------------------------- failures
def test_with_block_error_logs_progress_and_releases_lock(tmp_path, caplog):
    out = tmp_path / "x.h5"
    with caplog.at_level(logging.WARNING, logger="featcache.store.writer"):
        with pytest.raises(KeyError, match="boom"):
            with StoreWriter(out, **synth.make_kwargs()) as w:
                synth.commit(w, [1])
                raise KeyError("boom")
    assert "stopped by KeyError; 1 of 5 blocks committed, rerun to resume" in caplog.text
    caplog.clear()
    with StoreWriter(out, **synth.make_kwargs(), lock_timeout=0.3) as w2:  # the lock was released
        assert w2.pending_blocks() == [0, 2, 3, 4]
        synth.commit(w2, w2.pending_blocks())
        w2.finalize()
    assert "stopped by" not in caplog.text  # a clean exit logs nothing


def test_finalize_with_missing_blocks_lists_them(tmp_path):
    with StoreWriter(tmp_path / "x.h5", **synth.make_kwargs()) as w:
        synth.commit(w, [0, 2])
        with pytest.raises(StoreError, match=r"3 of 5 blocks are not committed \(1, 3-4\)"):
            w.finalize()
    assert not (tmp_path / "x.h5").exists()


def test_write_error_keeps_previous_file(tmp_path, monkeypatch, file_md5):
    out = synth.write_all(tmp_path / "x.h5", config=synth.make_config(size=160))
    before = file_md5(out)
    real_setitem = h5py.Dataset.__setitem__
    calls = [0]

    def disk_full(self, key, value):
        calls[0] += 1
        if calls[0] > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_setitem(self, key, value)

    with StoreWriter(out, **synth.make_kwargs()) as w:
        synth.commit(w, w.pending_blocks())
        monkeypatch.setattr(h5py.Dataset, "__setitem__", disk_full)
        with pytest.raises(StoreError, match="No space left on device.*untouched") as info:
            w.finalize()
        monkeypatch.undo()
    assert isinstance(info.value.__cause__, OSError) and calls[0] == 3
    assert file_md5(out) == before
    assert not out.with_name("x.h5.partial").exists()
    with StoreWriter(out, **synth.make_kwargs()) as w:  # blocks were kept: finalize only
        assert w.pending_blocks() == []
        w.finalize()
    assert file_md5(out) == file_md5(_ref(tmp_path))


_HOLD_CHILD = r"""
import sys, time
from _support import synth_store as synth
from featcache.store import StoreWriter
with StoreWriter(sys.argv[1], **synth.make_kwargs()) as w:
    print("LOCKED", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def test_lock_contention_names_holder(tmp_path, spawn):
    out = tmp_path / "x.h5"
    proc = spawn(_HOLD_CHILD, str(out), "60")
    assert proc.stdout.readline().strip() == "LOCKED", proc.stderr.read()
    t0 = time.monotonic()
    with pytest.raises(StoreLockedError) as info:
        StoreWriter(out, **synth.make_kwargs(), lock_timeout=0.3)
    assert time.monotonic() - t0 >= 0.3
    msg = str(info.value)
    assert f"x.h5.lock is locked by pid {proc.pid}" in msg
    assert "another featcache extract is writing this output" in msg
    assert "remove the stale lock" in msg


def test_lock_waits_for_holder(tmp_path, spawn):
    out = tmp_path / "x.h5"
    proc = spawn(_HOLD_CHILD, str(out), "0.5")
    assert proc.stdout.readline().strip() == "LOCKED", proc.stderr.read()
    t0 = time.monotonic()
    with StoreWriter(out, **synth.make_kwargs(), lock_timeout=30) as w:
        assert time.monotonic() - t0 > 0.3  # we got it only after the holder let go
        assert w.pending_blocks() == [0, 1, 2, 3, 4]
    assert proc.wait(timeout=10) == 0


def test_lock_is_exclusive_within_one_process(tmp_path):
    out = tmp_path / "x.h5"
    with StoreWriter(out, **synth.make_kwargs()):
        with pytest.raises(StoreLockedError, match=f"pid {os.getpid()}"):
            StoreWriter(out, **synth.make_kwargs())
    with StoreWriter(out, **synth.make_kwargs()):  # released on exit
        pass


# --------------------------------------------------------------------------- validation
@pytest.fixture
def writer(tmp_path):
    with StoreWriter(tmp_path / "x.h5", **synth.make_kwargs()) as w:
        yield w


def _block0(w):
    rows = [r for r in w.block_range(0) if r != 3]
    return rows, {s.alias: synth.features_for(s.alias, rows) for s in synth.LAYERS}


def test_commit_rejects_missing_alias(writer):
    rows, feats = _block0(writer)
    del feats["fc"]
    with pytest.raises(StoreError, match=r"missing \['fc'\]"):
        writer.commit_block(0, np.array(rows), feats, [(writer.ids[3], "bad")])


def test_commit_rejects_wrong_dim(writer):
    rows, feats = _block0(writer)
    feats["pool"] = feats["pool"][:, :4]
    with pytest.raises(StoreError, match=r"features\['pool'\].*expected float \(7, 5\)"):
        writer.commit_block(0, np.array(rows), feats, [(writer.ids[3], "bad")])


def test_commit_rejects_rows_outside_block(writer):
    rows, feats = _block0(writer)
    rows[-1] = 8
    with pytest.raises(StoreError, match=r"kept_rows \[8\].*outside the block"):
        writer.commit_block(0, np.array(rows), feats, [(writer.ids[3], "bad")])


def test_commit_rejects_unaccounted_rows(writer):
    rows, feats = _block0(writer)
    with pytest.raises(StoreError, match=r"8 input rows but 7 kept \+ 0 skipped.*img/0003.png"):
        writer.commit_block(0, np.array(rows), feats)


def test_commit_rejects_foreign_error_id(writer):
    rows, feats = _block0(writer)
    with pytest.raises(StoreError, match="error id 'img/0030.png' is not an id of this block"):
        writer.commit_block(0, np.array(rows), feats, [(writer.ids[30], "bad")])


def test_commit_rejects_float16_overflow(writer):
    rows, feats = _block0(writer)
    feats["fc"] = feats["fc"] * 1e6
    with pytest.raises(StoreError, match="float16.*use dtype='float32'"):
        writer.commit_block(0, np.array(rows), feats, [(writer.ids[3], "bad")])


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ({"dtype": "float64"}, r"dtype 'float64' not allowed; allowed: \['float16', 'float32'\]"),
        ({"compression": "zstd"}, "compression 'zstd' not allowed"),
        ({"splits": np.full(synth.N, 7, np.uint8)}, r"split codes \[7\] not allowed"),
        ({"labels": np.full(synth.N, 3)}, r"labels \[3\] out of range"),
        ({"ids": ["a"] * synth.N}, "ids must be unique"),
        ({"attrs": {"config": "{}"}}, r"attrs lack \['config_sha256'\]"),
        ({"attrs": {"config": "{}", "config_sha256": "0" * 64}}, "is not the sha256"),
        ({"attrs": {**synth.make_kwargs()["attrs"], "n_rows": 3}}, r"may not set \['n_rows'\]"),
        ({"attrs": {**synth.make_kwargs()["attrs"], "torch_version": None}},
         "attribute 'torch_version' has unsupported value None"),
        ({"layers": (LayerSpec("pool", "n", 6, "avg", (5, 3, 3), True),)},
         r"dim 6 does not match pooling 'avg' of map_shape \(5, 3, 3\)"),
        ({"layers": (LayerSpec("pool", "n", 5, "mean", (5,), True),)}, "pooling 'mean' not in"),
    ],
)
def test_constructor_validation(tmp_path, override, pattern):
    with pytest.raises(StoreError, match=pattern):
        StoreWriter(tmp_path / "x.h5", **synth.make_kwargs(**override))
    assert not (tmp_path / "x.h5.lock").exists()


def test_closed_writer_refuses_commits(tmp_path):
    w = StoreWriter(tmp_path / "x.h5", **synth.make_kwargs())
    w.close()
    with pytest.raises(StoreError, match="is closed"):
        synth.commit(w, [0])


@pytest.mark.parametrize(("n", "skip"), [(0, frozenset()), (5, frozenset(range(5)))])
def test_empty_and_all_skipped_stores(tmp_path, n, skip):
    with StoreWriter(tmp_path / "x.h5", **synth.make_kwargs(n=n)) as w:
        assert w.n_blocks == (0 if n == 0 else 1)
        synth.commit(w, w.pending_blocks(), skip=skip)
        path = w.finalize()
    with h5py.File(path, "r") as f:
        assert f["features/pool"].shape == (0, 5) and f["ids"].shape == (0,)
        assert (f.attrs["n_rows"], f.attrs["n_input"], f.attrs["n_skipped"]) == (0, n, n)
        assert f["errors"].shape == (n,)


def test_config_must_be_json(tmp_path):
    from featcache.store.schema import sha256_text

    attrs = {"config": "pooling=avg", "config_sha256": sha256_text("pooling=avg")}
    with pytest.raises(StoreError, match=r"attrs\['config'\] is not JSON"):
        StoreWriter(tmp_path / "x.h5", **synth.make_kwargs(attrs=attrs))


# --------------------------------------------------------------------------- sharded writers
def _commit_with(committer, block: int) -> None:
    """Commit ``block`` through a committer exactly as synth.commit does through the writer."""
    rows = [r for r in committer.block_range(block) if r not in synth.SKIP]
    errs = [(committer.ids[r], synth.reason_for(committer.ids[r])) for r in committer.block_range(block)
            if r in synth.SKIP]
    committer.commit_block(block, np.array(rows, dtype=np.int64),
                           {s.alias: synth.features_for(s.alias, rows) for s in synth.LAYERS}, errs)


def test_block_committer_in_another_process_then_adopt_is_byte_identical(tmp_path, file_md5):
    import pickle
    ref = _ref(tmp_path)
    with StoreWriter(tmp_path / "out" / "ref.h5", **synth.make_kwargs()) as w:
        shipped = pickle.loads(pickle.dumps(w.block_committer()))  # what a dask worker receives
        assert shipped.parts_dir.is_absolute() and shipped == w.block_committer()
        for b in w.pending_blocks():
            _commit_with(shipped, b)
        assert w.pending_blocks() == list(range(w.n_blocks))  # not counted until adopted
        for b in range(w.n_blocks):
            w.adopt_block(b)
        assert w.pending_blocks() == []
        assert w.committed_errors() == [(w.ids[r], synth.reason_for(w.ids[r])) for r in sorted(synth.SKIP)]
        path = w.finalize()
    assert file_md5(path) == file_md5(ref)


def test_adopt_block_rejects_missing_and_foreign_files(tmp_path):
    kwargs = synth.make_kwargs()
    with StoreWriter(tmp_path / "a.h5", **kwargs) as w:
        with pytest.raises(StoreError, match="block 1 .* is missing"):
            w.adopt_block(1)
        foreign_attrs = {**kwargs["attrs"], "config": '{"other":1}'}
        from featcache.store.schema import sha256_text
        foreign_attrs["config_sha256"] = sha256_text(foreign_attrs["config"])
        with StoreWriter(tmp_path / "b.h5", **{**kwargs, "attrs": foreign_attrs}) as other:
            _commit_with(other.block_committer(), 1)
            other_file = other.block_committer().block_path(1)
        w.block_committer().block_path(1).write_bytes(other_file.read_bytes())
        with pytest.raises(StoreError, match="of another run"):
            w.adopt_block(1)
        w.block_committer().block_path(2).write_bytes(b"not a zip")
        with pytest.raises(StoreError, match="unreadable"):
            w.adopt_block(2)
        assert w.pending_blocks() == list(range(w.n_blocks))
