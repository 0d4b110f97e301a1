"""``featcache.extract.freshness``: which of a manifest's files are checked, and their times."""

from __future__ import annotations

import os

import numpy as np

from featcache.extract.freshness import UNCHECKED, input_times, named_files
from featcache.extract.inputs.manifest import Manifest


def _manifest(root, paths):
    ids = [f"{i:03d}" for i in range(len(paths))]
    return Manifest(ids=ids, paths=paths, splits=np.zeros(len(paths), np.uint8), labels=np.zeros(len(paths), np.int64),
                    classes=["a"], root=root)


def test_each_distinct_local_file_is_stat_ed_once_urls_and_missing_files_are_not_checked(tmp_path):
    for name, when in (("a.png", 100), ("shard.tar", 200)):
        (tmp_path / name).write_bytes(b"x")
        os.utime(tmp_path / name, ns=(when, when))
    url = (tmp_path / "shard.tar").as_uri()  # file:// is a local file: checked
    times = input_times(_manifest(tmp_path, ["a.png", "shard.tar", url, "https://h/x.png", "gone.png", "shard.tar"]))
    assert times.files == [str(tmp_path / "a.png"), str(tmp_path / "shard.tar"), str(tmp_path / "shard.tar"),
                           str(tmp_path / "gone.png")]
    assert times.row_mtime_ns().tolist() == [100, 200, 200, UNCHECKED, UNCHECKED, 200]
    assert (times.n_urls, times.n_missing) == (1, 1)
    assert times.not_checked() == "1 URL inputs (a request each), 1 missing files"
    assert times.newer_than(150) == [str(tmp_path / "shard.tar")] * 2
    assert times.newer_than(200) == []


def test_a_re_pointed_symlink_is_newer_though_its_target_is_old(tmp_path):
    """``ln -sf other.png img.png``: the link is new, its target old; the newer of the two counts."""
    (tmp_path / "other.png").write_bytes(b"x")
    os.utime(tmp_path / "other.png", ns=(100, 100))
    (tmp_path / "img.png").symlink_to(tmp_path / "other.png")
    mtime = input_times(_manifest(tmp_path, ["img.png"])).mtime_ns[0]
    assert mtime == os.lstat(tmp_path / "img.png").st_mtime_ns > 100
    os.utime(tmp_path / "other.png")  # the target edited later: its time
    assert input_times(_manifest(tmp_path, ["img.png"])).mtime_ns[0] == os.stat(tmp_path / "other.png").st_mtime_ns


def test_named_files_names_the_first_three_and_counts_the_rest():
    assert named_files(["p/../a", "b"]) == "a, b"
    assert named_files(list("abcde")) == "a, b, c (and 2 more)"
