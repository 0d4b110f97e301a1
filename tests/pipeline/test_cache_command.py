"""``featcache cache``: the cache root's folders listed, and ``--prune DAYS`` removing the entries no command used for
that long, whole (an ONNX export's graph and sidecar, a killed writer's partial files), never one in use."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import yaml

from featcache.extract.onnx.cache import cached_build, entry_path, lookup
from featcache.pipeline.cache import cache_folders, prune_cache
from featcache.pipeline.cli import main
from featcache.store.lock import FileLock
from featcache.util.cache_dir import CACHE_ENV, ONNX_FOLDER, TORCH_THREADS_FOLDER, read_entry, write_entry
from featcache.util.cache_dir import entry_path as json_entry_path

DAY = 86400.0


@pytest.fixture
def root(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


def _age(paths, days: float) -> None:
    when = time.time() - days * DAY
    for path in paths:
        os.utime(path, (when, when))


def _export(folder: Path, backbone: str, days: float) -> Path:
    """A published ONNX cache entry (graph + sidecar) last used ``days`` ago."""
    key = {"backbone": backbone, "weights_sha256": backbone}
    path, _ = cached_build(folder, key, lambda partial: partial.write_bytes(b"graph of " + backbone.encode()) and None)
    _age([path, path.with_name(path.name + ".json")], days)
    return path


def _record(folder: str, name: str, days: float) -> Path:
    key = {"name": name}
    path = json_entry_path(folder, key, name)
    write_entry(path, key, 1)
    _age([path], days)
    return path


def test_prune_removes_whole_entries_not_used_for_that_long(root):
    onnx = root / ONNX_FOLDER
    old, new = _export(onnx, "old", 40), _export(onnx, "new", 1)
    partial = onnx / f".{old.name.replace('old', 'dead')}.1234.abcd1234.tmp"  # a killed writer's graph + sidecar
    partial.write_bytes(b"half")
    partial.with_name(partial.name + ".json").write_text("{}")
    _age([partial, partial.with_name(partial.name + ".json")], 40)
    orphan = onnx / "gone-0123.onnx.json"  # a sidecar whose graph was deleted by hand
    orphan.write_text("{}")
    _age([orphan], 40)
    old_record, new_record = _record(TORCH_THREADS_FOLDER, "old", 40), _record(TORCH_THREADS_FOLDER, "new", 1)

    removed, kept = prune_cache(30)

    assert kept == []
    assert sorted(entry.name for entry in removed) == sorted([old.name, partial.name, orphan.name, old_record.name])
    left = sorted(path.name for path in onnx.iterdir())
    assert left == sorted([new.name, new.name + ".json"])
    assert not old_record.exists() and new_record.exists()
    assert lookup(onnx, {"backbone": "new", "weights_sha256": "new"}) is not None


def test_a_dry_run_removes_nothing(root):
    path = _export(root / ONNX_FOLDER, "old", 40)
    removed, _ = prune_cache(30, dry_run=True)
    assert [entry.name for entry in removed] == [path.name] and path.exists()


def test_an_export_being_written_is_kept(root):
    """Its lock is held (another process exports or publishes it): pruning waits for nothing and keeps it."""
    path = _export(root / ONNX_FOLDER, "busy", 40)
    lock = FileLock(path.with_name(path.name + ".lock"))
    try:
        removed, kept = prune_cache(0)
    finally:
        lock.release()
    assert removed == [] and [entry.name for entry in kept] == [path.name] and path.exists()


def test_a_read_marks_an_entry_used(root):
    """A cache hit refreshes the entry's last use (at most once a day), so what runs read is never pruned."""
    onnx = root / ONNX_FOLDER
    key = {"backbone": "hit", "weights_sha256": "hit"}
    path = _export(onnx, "hit", 40)
    assert lookup(onnx, key) is not None
    record = _record(TORCH_THREADS_FOLDER, "read", 40)
    assert read_entry(record, {"name": "read"}) == 1
    assert prune_cache(30) == ([], [])
    assert path.exists() and record.exists()


def test_the_command_lists_prunes_and_reads_the_onnx_cache_of_params(root, tmp_path, capsys):
    own = tmp_path / "team-onnx"
    path = _export(own, "team", 40)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"extract_run": {"onnx_cache": str(own)}}), encoding="utf-8")
    assert main(["cache", "--params", str(params)]) == 0
    listing = capsys.readouterr().out
    assert f"featcache cache root: {root}" in listing and str(own) in listing
    assert [folder.name for folder in cache_folders(own)][0] == ONNX_FOLDER
    assert main(["cache", "--params", str(params), "--prune", "30"]) == 0
    assert "Removed 1 cache entries" in capsys.readouterr().out and not path.exists()
    assert not entry_path(own, {"backbone": "team", "weights_sha256": "team"}).exists()
    with pytest.raises(SystemExit):
        main(["cache", "--prune", "-1"])
