"""What the machine records in the cache root: a file's sha256 while its stat holds, torch's default thread
count per thread environment."""

from __future__ import annotations

import hashlib
import sys


def _settled(path, seconds: float = 10.0) -> None:
    """Date ``path`` ``seconds`` back, past the racy window, as a file written a while ago."""
    import os
    import time

    when = time.time() - seconds
    os.utime(path, (when, when))


def _no_reads(monkeypatch):
    from featcache.util import machine_records

    def refuse(path, chunk=1 << 20):
        raise AssertionError(f"{path} was read")

    monkeypatch.setattr(machine_records, "file_sha256", refuse)


def test_a_file_hashed_once_is_not_read_again_while_its_stat_holds(tmp_path, monkeypatch):
    from featcache.util.machine_records import cached_file_sha256

    path = tmp_path / "weights.pth"
    path.write_bytes(b"weights" * 1000)
    _settled(path)
    expected = hashlib.sha256(path.read_bytes()).hexdigest()
    assert cached_file_sha256(path) == expected
    _no_reads(monkeypatch)
    assert cached_file_sha256(path) == expected
    assert cached_file_sha256(tmp_path / "." / "weights.pth") == expected  # the resolved path names the entry


def test_a_file_rewritten_with_the_same_size_is_hashed_again(tmp_path):
    """New bytes of the same size under a new modification time, or under the old one set back by ``touch``
    (the change time moves anyway), give the new hash."""
    import os

    from featcache.util.machine_records import cached_file_sha256

    path = tmp_path / "weights.pth"
    path.write_bytes(b"a" * 4096)
    _settled(path, 20)
    assert cached_file_sha256(path) == hashlib.sha256(b"a" * 4096).hexdigest()
    path.write_bytes(b"b" * 4096)
    _settled(path, 10)
    old = path.stat()
    assert cached_file_sha256(path) == hashlib.sha256(b"b" * 4096).hexdigest()
    path.write_bytes(b"c" * 4096)
    os.utime(path, ns=(old.st_atime_ns, old.st_mtime_ns))  # size and mtime as when "b" was hashed
    assert cached_file_sha256(path) == hashlib.sha256(b"c" * 4096).hexdigest()


def test_a_file_modified_just_now_is_not_recorded(tmp_path, hermetic_cache):
    """Within the racy window a rewrite could keep the stat, so the hash is not kept (the next call reads again)."""
    from pathlib import Path

    from featcache.util.machine_records import HASH_FOLDER, cached_file_sha256

    path = tmp_path / "fresh.bin"
    path.write_bytes(b"fresh")
    assert cached_file_sha256(path) == hashlib.sha256(b"fresh").hexdigest()
    assert not list((Path(hermetic_cache) / HASH_FOLDER).glob("fresh.bin-*.json"))
    _settled(path)
    cached_file_sha256(path)
    assert len(list((Path(hermetic_cache) / HASH_FOLDER).glob("fresh.bin-*.json"))) == 1


def test_a_damaged_entry_is_hashed_again_and_replaced(tmp_path, hermetic_cache):
    import json
    from pathlib import Path

    from featcache.util.cache_dir import entry_path
    from featcache.util.machine_records import HASH_FOLDER, cached_file_sha256

    path = tmp_path / "weights.pth"
    path.write_bytes(b"w" * 100)
    _settled(path)
    cached_file_sha256(path)
    entry = entry_path(HASH_FOLDER, {"path": str(path.resolve())}, path.name)
    assert entry.parent == Path(hermetic_cache) / HASH_FOLDER and entry.is_file()
    entry.write_text("{not json", encoding="utf-8")
    assert cached_file_sha256(path) == hashlib.sha256(b"w" * 100).hexdigest()
    record = json.loads(entry.read_text(encoding="utf-8"))
    assert record["value"] == hashlib.sha256(b"w" * 100).hexdigest()
    record["value"] = "0" * 64  # an entry of another key (another file's stat) is never used
    record["key"]["size"] = 99
    entry.write_text(json.dumps(record), encoding="utf-8")
    assert cached_file_sha256(path) == hashlib.sha256(b"w" * 100).hexdigest()


def test_a_cache_that_cannot_be_written_only_costs_the_hash(tmp_path, monkeypatch):
    from featcache.util.cache_dir import CACHE_ENV
    from featcache.util.machine_records import cached_file_sha256

    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache root should be")
    monkeypatch.setenv(CACHE_ENV, str(blocker))
    path = tmp_path / "weights.pth"
    path.write_bytes(b"x" * 10)
    _settled(path)
    assert cached_file_sha256(path) == hashlib.sha256(b"x" * 10).hexdigest()


def test_torch_default_threads_is_recorded_per_thread_environment(tmp_path):
    """The first call on a machine imports torch and records its count; the next reads it without torch. Another
    ``OMP_NUM_THREADS`` is another key: torch is imported again and takes that count."""
    import os
    import subprocess
    from pathlib import Path

    from featcache.util.cache_dir import CACHE_ENV

    code = ("import sys; from featcache.util.machine_records import torch_default_threads; "
            "print(torch_default_threads(), 'torch' in sys.modules)")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[2] / "src"), **{CACHE_ENV: str(tmp_path)})
    env.pop("OMP_NUM_THREADS", None)
    env.pop("MKL_NUM_THREADS", None)

    def run(**extra: str) -> list[str]:
        done = subprocess.run([sys.executable, "-c", code], env={**env, **extra}, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout.split()

    first = run()
    assert first[1] == "True" and int(first[0]) >= 1
    assert run() == [first[0], "False"]
    assert run(OMP_NUM_THREADS="1") == ["1", "True"]
    assert run(OMP_NUM_THREADS="1") == ["1", "False"]
    assert run() == [first[0], "False"]
