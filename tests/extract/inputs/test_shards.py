"""WebDataset shards: the shard list, member lists from tar headers, and the streamed manifest.

Shards are written with webdataset's own ``TarWriter`` from generated images;
the manifest must equal the same images read as a folder (labels, classes,
row order and so splits), and damaged shards must give rows, not silence.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image
from webdataset.tariterators import base_plus_ext

from _support.files import write_image_folder
from _support.shards import shards_from_folder
from featcache.extract.decode.loaders import ImageReader
from featcache.extract.decode.preprocess import Preprocessor
from featcache.extract.inputs.manifest import Manifest, ManifestError
from featcache.extract.inputs.sharded import from_shards
from featcache.extract.inputs.shards import expand_shards, scan_shard, shard_name, split_name
from featcache.extract.inputs.sources import from_folder

RATIOS = {"train": 0.5, "val": 0.25, "test": 0.25}
PRE = Preprocessor(32, 36, "bilinear", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def _png(value: int, size: int = 12) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), value, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    write_image_folder(root, per_class=8, size=20)
    return root


@pytest.fixture(scope="module")
def class_shards(images, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    shards_from_folder(images, out)
    return out


# ------------------------------------------------------------------ names
@pytest.mark.parametrize("name", ["0001.jpg", "a/b/0001.jpg", "dir.v2/0001.seg.png", "x.tar.gz", "noext",
                                  "d/.hidden", "k.JPG", "a.b/c"])
def test_member_names_split_exactly_as_webdataset(name):
    assert split_name(name) == base_plus_ext(name)


def test_shard_names_drop_the_tar_suffix_and_url_queries():
    assert shard_name("data/shards/000007.tar") == "000007"
    assert shard_name("https://host/x/000007.tar?sig=abc") == "000007"


def test_expand_shards_folder_pattern_and_list(tmp_path):
    for name in ("b.tar", "a.tar", ".hidden.tar", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    assert expand_shards(str(tmp_path)) == [str(tmp_path / "a.tar"), str(tmp_path / "b.tar")]
    assert expand_shards("s/{000..002}.tar") == ["s/000.tar", "s/001.tar", "s/002.tar"]
    assert expand_shards(["s/{b,a}.tar", "http://h/c.tar"]) == ["s/a.tar", "s/b.tar", "http://h/c.tar"]


@pytest.mark.parametrize("bad, match", [("s/x.tar.gz", "compressed"), (["a/x.tar", "b/x.tar"], "same name")])
def test_expand_shards_rejects_compressed_and_colliding_shards(bad, match):
    with pytest.raises(ValueError, match=match):
        expand_shards(bad)


def test_an_empty_folder_names_the_folder_and_the_forms(tmp_path):
    with pytest.raises(ValueError, match="No .tar shards in the folder"):
        expand_shards(str(tmp_path))


# ------------------------------------------------------------------ scans
def test_scan_lists_members_from_headers_with_the_shard_hash(tmp_path):
    path = tmp_path / "000000.tar"
    with wds.TarWriter(str(path)) as writer:
        for i in range(4):
            writer.write({"__key__": f"s{i}", "png": _png(10 * i), "json": {"label": f"c{i % 2}", "split": "test"},
                          "txt": "caption"})
    scan = scan_shard(str(path), label_key="label")
    data = path.read_bytes()
    assert scan.sha256 == hashlib.sha256(data).hexdigest() and scan.size == len(data) and not scan.problem
    assert [s.key for s in scan.samples] == ["s0", "s1", "s2", "s3"]
    assert [s.label for s in scan.samples] == ["c0", "c1", "c0", "c1"]
    assert {s.split for s in scan.samples} == {"test"}
    third = scan.samples[2]
    assert third.image == "s2.png" and data[third.offset:third.offset + third.size] == _png(20)


def test_image_key_preference_and_member_labels(tmp_path):
    path = tmp_path / "s.tar"
    with wds.TarWriter(str(path)) as writer:
        writer.write({"__key__": "k", "png": _png(1), "jpg": _png(2), "cls": "7"})
    sample = scan_shard(str(path)).samples[0]
    assert sample.image == "k.jpg" and sample.label == "7"  # jpg before png in the default image keys
    assert scan_shard(str(path), image_keys=("png",)).samples[0].image == "k.png"


def test_a_shard_cut_inside_a_member_keeps_the_samples_before_and_reports_the_cut_one(tmp_path):
    path = tmp_path / "cut.tar"
    with wds.TarWriter(str(path)) as writer:
        for i in range(5):
            writer.write({"__key__": f"s{i}", "png": _png(40 * i, size=64), "cls": "a"})
    data = path.read_bytes()
    scan = scan_shard(str(path))
    last = scan.samples[-1]
    path.write_bytes(data[: last.offset + last.size // 2])  # the last image is cut in half
    cut = scan_shard(str(path))
    assert [s.key for s in cut.samples] == [s.key for s in scan.samples]
    assert cut.problem, "the early end must be recorded"
    manifest_path = tmp_path / "prep" / "manifest.csv"
    from_shards(str(path), manifest_path, RATIOS, 0)
    summary = json.loads((tmp_path / "prep" / "manifest.shards.json").read_text())["shards"][0]
    assert summary["problem"] and summary["n_samples"] == 5
    manifest = Manifest.read(manifest_path)
    _, pixels, reasons = ImageReader(manifest, PRE).read_batch(range(len(manifest)))
    assert reasons[:4] == ["", "", "", ""]
    assert reasons[4] == f"truncated member (the shard ends after {last.size // 2:,} of its {last.size:,} bytes)"


def test_a_corrupt_member_is_a_bad_row_and_the_rest_of_the_shard_is_read(tmp_path):
    path = tmp_path / "c.tar"
    with wds.TarWriter(str(path)) as writer:
        for i in range(3):
            writer.write({"__key__": f"s{i}", "png": b"\x89PNG garbage" if i == 1 else _png(50 * i), "cls": "a"})
    from_shards(str(path), tmp_path / "m" / "manifest.csv", {"train": 1 / 3, "val": 1 / 3, "test": 1 / 3}, 0)
    manifest = Manifest.read(tmp_path / "m" / "manifest.csv")
    _, pixels, reasons = ImageReader(manifest, PRE).read_batch(range(3))
    assert reasons[0] == "" and reasons[2] == ""
    assert reasons[1].startswith(("not an image", "truncated or corrupt"))
    assert "s1.png" in reasons[1] and " at 0x" not in reasons[1]  # stored: no memory address in it
    assert pixels[2].mean() == pytest.approx(100, abs=1)


# --------------------------------------------------------------- manifest
def test_the_manifest_of_shards_equals_the_same_images_as_a_folder(images, class_shards, tmp_path):
    info = from_shards(str(class_shards), tmp_path / "manifest.csv", RATIOS, 3)
    folder = from_folder(images, RATIOS, 3)
    sharded = Manifest.read(tmp_path / "manifest.csv")
    assert sharded.ids == [i.rsplit(".", 1)[0] for i in folder.ids]
    assert sharded.classes == folder.classes == info.classes
    np.testing.assert_array_equal(sharded.labels, folder.labels)
    np.testing.assert_array_equal(sharded.splits, folder.splits)
    assert info.split_counts == folder.split_counts()
    reader = ImageReader(sharded, PRE)
    np.testing.assert_array_equal(reader.read_batch(range(len(sharded)))[1],
                                  ImageReader(folder, PRE).read_batch(range(len(folder)))[1])
    # the shard list, with each shard's sha256, is part of the manifest and of its hash
    assert [s["n_samples"] for s in sharded.shards] == [8, 8, 8]
    assert sharded.shards[0]["sha256"] == hashlib.sha256((class_shards / "ant.tar").read_bytes()).hexdigest()
    changed = Manifest.read(tmp_path / "manifest.csv")
    changed.shards[0]["sha256"] = "0" * 64
    assert changed.sha256() != sharded.sha256()


def test_samples_may_carry_their_split(tmp_path):
    path = tmp_path / "s.tar"
    with wds.TarWriter(str(path)) as writer:
        for i, split in enumerate(["test", "train", "test", "val"]):  # not the 2/1/1 that RATIOS would give
            writer.write({"__key__": f"k{i}", "png": _png(i), "cls": "a", "split": split})
    from_shards(str(path), tmp_path / "m.csv", RATIOS, 0)
    np.testing.assert_array_equal(Manifest.read(tmp_path / "m.csv").splits, [2, 0, 2, 1])


def test_a_sample_without_an_image_stays_a_row_reported_by_extract(tmp_path):
    path = tmp_path / "s.tar"
    with wds.TarWriter(str(path)) as writer:
        for i in range(4):
            writer.write({"__key__": f"k{i}", **({} if i == 2 else {"png": _png(i)}), "cls": "a"})
    info = from_shards(str(path), tmp_path / "m.csv", RATIOS, 0)
    assert info.n_rows == 4 and info.n_without_image == 1
    manifest = Manifest.read(tmp_path / "m.csv")
    reasons = ImageReader(manifest, PRE).read_batch(range(4))[2]
    assert reasons[2].startswith("no image member") and reasons.count("") == 3


def test_unlabeled_samples_and_mixed_splits_are_named(tmp_path):
    path = tmp_path / "s.tar"
    with wds.TarWriter(str(path)) as writer:
        writer.write({"__key__": "k0", "png": _png(0), "cls": "a"})
        writer.write({"__key__": "k1", "png": _png(1)})
    with pytest.raises(ManifestError, match=r"without a label.*'s/k1'.*data.label_key"):
        from_shards(str(path), tmp_path / "m.csv", RATIOS, 0)
    assert not (tmp_path / "m.csv").exists()
    with wds.TarWriter(str(path)) as writer:
        writer.write({"__key__": "k0", "png": _png(0), "cls": "a", "split": "train"})
        writer.write({"__key__": "k1", "png": _png(1), "cls": "a"})
    with pytest.raises(ManifestError, match="1 of 2 samples carry a split"):
        from_shards(str(path), tmp_path / "m.csv", RATIOS, 0)


def test_regression_targets_come_from_the_label_key(tmp_path):
    path = tmp_path / "s.tar"
    with wds.TarWriter(str(path)) as writer:
        for i in range(4):
            writer.write({"__key__": f"k{i}", "png": _png(i), "json": {"age": 10.5 * i}})
    from_shards(str(path), tmp_path / "m.csv", RATIOS, 0, task="regression", label_key="age")
    np.testing.assert_array_equal(Manifest.read(tmp_path / "m.csv").targets, [0.0, 10.5, 21.0, 31.5])


def test_prepare_reads_tar_headers_not_images(tmp_path, monkeypatch):
    """No image is opened by the manifest build (a decode would go through Pillow)."""
    path = tmp_path / "s.tar"
    with wds.TarWriter(str(path)) as writer:
        for i in range(3):
            writer.write({"__key__": f"k{i}", "png": _png(i), "cls": "a"})

    def no_decode(*args, **kwargs):
        raise AssertionError("prepare decoded an image")

    monkeypatch.setattr(Image, "open", no_decode)
    assert from_shards(str(path), tmp_path / "m.csv", {"train": 1 / 3, "val": 1 / 3, "test": 1 / 3}, 0).n_rows == 3
    assert tarfile.is_tarfile(path)


def test_every_reader_gets_a_members_bytes(tmp_path):
    """The GPU loader's dataset and ``ImageReader.source`` (CAM overlays, ONNX parity) read members, not the tar."""
    from featcache.extract.decode.device import DeviceDecodeDataset

    buffer = io.BytesIO()
    Image.fromarray(np.full((40, 30, 3), 90, dtype=np.uint8)).save(buffer, format="JPEG")
    jpeg = buffer.getvalue()
    path = tmp_path / "s.tar"
    with wds.TarWriter(str(path)) as writer:
        writer.write({"__key__": "a", "jpg": jpeg, "cls": "x"})
        writer.write({"__key__": "b", "png": _png(5), "cls": "x"})
    from_shards(str(path), tmp_path / "m.csv", {"train": 0.5, "val": 0.25, "test": 0.25}, 0, split_key=None)
    manifest = Manifest.read(tmp_path / "m.csv")
    assert ImageReader(manifest, PRE).source(0) == jpeg and ImageReader(manifest, PRE).source(1) == _png(5)
    item = DeviceDecodeDataset(manifest, PRE)[0]
    assert item.data == jpeg and item.reason == ""


# ------------------------------------------------------------------ unreadable shards
def test_an_unreadable_shard_is_a_user_error_naming_it(tmp_path, capsys):
    """A missing shard stops prepare with one line (exit 2), not a traceback."""
    from featcache.errors import UserError
    from featcache.extract.inputs.shards import ShardReadError
    from featcache.pipeline.cli import main

    with pytest.raises(ShardReadError, match=r"gone\.tar' cannot be read: missing object") as caught:
        scan_shard(str(tmp_path / "gone.tar"))
    assert isinstance(caught.value, UserError) and isinstance(caught.value, OSError)
    (tmp_path / "params.yaml").write_text(f"data: {{source: webdataset, path: {tmp_path / 'gone.tar'}}}\n")
    assert main(["prepare", "--params", str(tmp_path / "params.yaml"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "gone.tar' cannot be read" in err and "Traceback" not in err


def test_a_server_that_ignores_ranges_is_named_as_the_problem(tmp_path):
    """``python -m http.server`` answers Range requests with the whole file: a shard over one read block
    (8 MiB) cannot be listed, and the error says why and what to do instead."""
    from _support.shards import LoopbackServer
    from featcache.extract.inputs.shards import ShardReadError
    from featcache.extract.inputs.storage import StorageOptions

    with wds.TarWriter(str(tmp_path / "big.tar")) as writer:
        writer.write({"__key__": "a", "bin": bytes(9 << 20), "cls": "x"})
        writer.write({"__key__": "b", "png": _png(5), "cls": "x"})
    with LoopbackServer(tmp_path, ranges=False) as server:
        with pytest.raises(ShardReadError, match=r"big\.tar' cannot be read: its server ignores HTTP Range requests"
                                                 r".*Hint: serve the shards with a server that supports Range"):
            scan_shard(server.url + "big.tar", options=StorageOptions(timeout=5, tries=1, backoff=0))


def _tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    """A shard with exactly these members, in this order (webdataset's writer sorts a sample's members)."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_a_shard_cut_before_a_samples_label_leaves_that_sample_out_by_name(tmp_path):
    """img2dataset-style shards hold ``jpg`` before ``json``: a cut between them leaves a sample without its label.
    The samples before the cut are rows (as the README says), and the cut one is named, not a 'no label' error."""
    path = tmp_path / "s.tar"
    members = []
    for i in range(4):
        members += [(f"k{i}.jpg", _png(30 * i, size=40)), (f"k{i}.json", json.dumps({"cls": "ab"[i % 2]}).encode())]
    _tar(path, members)
    last = scan_shard(str(path)).samples[-1]
    path.write_bytes(path.read_bytes()[: last.offset + last.size + 100])  # after k3's image, before its json
    info = from_shards(str(path), tmp_path / "p" / "manifest.csv", RATIOS, 0, split_key=None)
    assert info.n_rows == 3 and info.shards[0]["left_out"] == ["s/k3"] and info.shards[0]["problem"]
    assert Manifest.read(tmp_path / "p" / "manifest.csv").ids == ["s/k0", "s/k1", "s/k2"]
    recorded = json.loads((tmp_path / "p" / "manifest.shards.json").read_text())["shards"][0]
    assert recorded["left_out"] == ["s/k3"] and recorded["n_samples"] == 3


@pytest.mark.parametrize("label_first", [True, False])
def test_the_early_end_warning_counts_the_samples_really_kept(tmp_path, caplog, label_first):
    """A shard cut in the middle of its last image: the samples before the cut are counted as kept, the cut one
    apart (a row when its label came first, else left out), so the counts add up to the manifest's rows."""
    import logging
    import re

    path = tmp_path / "s.tar"
    members = []
    for i in range(4):
        sample = [(f"k{i}.cls", "ab"[i % 2].encode()), (f"k{i}.png", _png(30 * i, size=40))]
        members += sample if label_first else sample[::-1]
    _tar(path, members)
    last = scan_shard(str(path)).samples[-1]
    path.write_bytes(path.read_bytes()[: last.offset + last.size // 2])  # inside k3's image
    with caplog.at_level(logging.WARNING, logger="featcache.extract.inputs"):
        info = from_shards(str(path), tmp_path / "p" / "manifest.csv", RATIOS, 0, split_key=None)
    [warning] = [r.getMessage() for r in caplog.records if "ends early" in r.getMessage()]
    kept = int(re.search(r"its (\d+) samples before that point are kept", warning).group(1))
    assert kept == 3
    if label_first:
        assert "and so is sample s/k3" in warning and info.n_rows == kept + 1
    else:
        assert "sample s/k3, which the early end cuts before its label ('cls'), is left out" in warning
        assert info.n_rows == kept and info.shards[0]["left_out"] == ["s/k3"]


def test_a_label_cut_short_is_no_label(tmp_path):
    """A label member the shard's end cuts in two would be a wrong class ('ca' for 'cat'): it is no label."""
    path = tmp_path / "s.tar"
    _tar(path, [("a.png", _png(1)), ("a.cls", b"a"), ("b.png", _png(2)), ("b.cls", b"cat" * 200)])
    data = path.read_bytes()
    path.write_bytes(data[: data.index(b"catcat") + 2])
    scan = scan_shard(str(path))
    assert scan.problem and scan.cut == "b" and [s.label for s in scan.samples] == ["a", None]


def test_members_with_the_same_name_are_named(tmp_path):
    """A shard written twice into (or two concatenated) repeats members: which image or label is meant is
    ambiguous, so prepare stops naming them rather than pick one silently."""
    path = tmp_path / "s.tar"
    _tar(path, [("a.png", _png(1)), ("a.cls", b"x"), ("b.png", _png(2)), ("b.cls", b"y"), ("a.png", _png(3)),
                ("a.cls", b"y")])
    with pytest.raises(ManifestError, match=r"Members with the same name in shard .*'s/a\.png', 's/a\.cls'"):
        from_shards(str(path), tmp_path / "m.csv", RATIOS, 0)
    assert not (tmp_path / "m.csv").exists()


def _stored_png(value: int) -> bytes:
    """A 12x12 PNG whose byte size does not depend on its pixels (no compression)."""
    buffer = io.BytesIO()
    Image.fromarray(np.full((12, 12, 3), value, dtype=np.uint8)).save(buffer, format="PNG", compress_level=0)
    return buffer.getvalue()


def test_a_shard_rewritten_after_prepare_is_never_read_as_other_samples_images(tmp_path):
    """The manifest locates each image by byte offset: a shard rewritten since prepare (repacked in another
    order, replaced under the same name: remote shards are read in place) holds other members there. Each such
    row is a bad image saying so, never another sample's image under this sample's label (the old reader
    decoded ``b``'s pixels as ``a`` when the two images had the same size)."""
    path = tmp_path / "s.tar"
    a, b = (_stored_png(value) for value in (10, 200))
    assert len(a) == len(b)
    _tar(path, [("a.png", a), ("a.cls", b"x"), ("b.png", b), ("b.cls", b"y"), ("c.png", _png(7, 30)),
                ("c.cls", b"x"), ("d.png", _png(9, 20)), ("d.cls", b"y")])
    from_shards(str(path), tmp_path / "m" / "manifest.csv", {"train": 0.5, "val": 0.25, "test": 0.25}, 0)
    manifest = Manifest.read(tmp_path / "m" / "manifest.csv")
    _, before, reasons = ImageReader(manifest, PRE).read_batch(range(4))
    assert reasons == ["", "", "", ""]
    _tar(path, [("b.png", b), ("b.cls", b"y"), ("a.png", a), ("a.cls", b"x"), ("c.png", _png(7, 30)),
                ("c.cls", b"x"), ("d.png", _stored_png(9)), ("d.cls", b"y")])  # a, b swapped; d re-encoded
    _, after, reasons = ImageReader(manifest, PRE).read_batch(range(4))
    assert reasons[2] == "" and np.array_equal(after[2], before[2])  # c: the same member at the same offset
    for row in (0, 1, 3):
        assert reasons[row].startswith("shard changed since prepare (at byte "), reasons[row]
        assert "Hint: rerun featcache prepare" in reasons[row]
    assert "it holds member 'b.png' of" in reasons[0] and f"not 'a.png' of {len(a):,} bytes" in reasons[0]


def test_prepare_logs_progress_not_a_line_per_shard(tmp_path, monkeypatch, caplog):
    """10,000 shards made 10,000 INFO lines in a `dvc repro` log: now the first and last shard, a shard that
    ended early, and a line at most every PROGRESS_SECONDS, each with the shards and samples so far and an ETA."""
    import logging
    import types

    from featcache.extract.inputs import sharded

    (tmp_path / "s").mkdir()
    for i in range(12):
        _tar(tmp_path / "s" / f"{i:03d}.tar", [(f"k{i}.png", _png(i)), (f"k{i}.cls", b"ab"[i % 2:i % 2 + 1])])
    clock = iter([0.0, 0.0] + [1.0] * 5 + [6.0] * 20)  # the start, shard 000, shards 001-005, then 5 s later
    monkeypatch.setattr(sharded, "time", types.SimpleNamespace(monotonic=lambda: next(clock)), raising=False)
    with caplog.at_level(logging.INFO, logger="featcache.extract.inputs.sharded"):
        from_shards(str(tmp_path / "s"), tmp_path / "m" / "manifest.csv", RATIOS, 0)
    lines = [r.getMessage() for r in caplog.records if r.name == "featcache.extract.inputs.sharded"]
    assert lines[0].startswith("prepare: 1 of 12 shards read, 1 samples (shard 000: 1 samples), ETA ")
    assert len(lines) == 3 and lines[1] == "prepare: 7 of 12 shards read, 7 samples (shard 006: 1 samples), ETA 0:04"
    assert lines[2].startswith("prepare: 12 of 12 shards read, 12 samples (shard 011: 1 samples), ETA 0:00")


@pytest.mark.parametrize("content, message", [
    (b"", r"is an empty file \(0 bytes\): none of its samples can be listed"),
    (b"<html>403 Forbidden</html>\n", r"is not a tar archive \(the archive ends inside a header at byte 0; 27 bytes\)"),
    (bytes(range(256)) * 8, r"is not a tar archive \(bad header checksum at byte 0 .*; 2,048 bytes\)"),
])
def test_a_shard_that_is_no_tar_at_all_stops_prepare_naming_it(tmp_path, content, message):
    """A failed download (an empty file, an error page saved as 000003.tar) gave a shard of 0 samples, with no
    warning at all for the empty file: its samples were lost unseen, where a missing shard stops prepare."""
    from featcache.extract.inputs.shards import ShardReadError

    (tmp_path / "s").mkdir()
    _tar(tmp_path / "s" / "000000.tar", [("a.png", _png(1)), ("a.cls", b"x"), ("b.png", _png(2)), ("b.cls", b"y")])
    (tmp_path / "s" / "000001.tar").write_bytes(content)
    with pytest.raises(ShardReadError, match=r"Shard '.*000001\.tar' " + message + r".*Hint: download the shard"):
        from_shards(str(tmp_path / "s"), tmp_path / "m" / "manifest.csv", RATIOS, 0)
    assert not (tmp_path / "m" / "manifest.csv").exists()


def test_a_tar_without_samples_is_warned_about(tmp_path, caplog):
    import logging

    _tar(tmp_path / "empty.tar", [])
    with caplog.at_level(logging.WARNING, logger="featcache"):
        assert scan_shard(str(tmp_path / "empty.tar")).samples == []
    assert "is a tar archive without samples" in caplog.text


def test_a_bad_shard_row_is_described_by_the_shards_absolute_path(tmp_path, monkeypatch):
    """Warnings name a bad row's shard as 'Bad image 000006/x003 (<shard>:x003.jpg)': the stored path is relative
    to the manifest's folder (../../shards/000006.tar from data/prepared/pets), which read from the project root
    names a file that is not there; a sample without an image ended in a bare ':'."""
    (tmp_path / "shards").mkdir()
    shard = tmp_path / "shards" / "000006.tar"
    _tar(shard, [("a.png", _png(1)), ("a.cls", b"x"), ("b.cls", b"y")])
    monkeypatch.chdir(tmp_path)
    from_shards("shards", tmp_path / "data" / "prepared" / "pets" / "manifest.csv", RATIOS, 0)
    manifest = Manifest.read(tmp_path / "data" / "prepared" / "pets" / "manifest.csv")
    assert manifest.paths[0] == "../../../shards/000006.tar"  # as stored: relative to the manifest
    assert manifest.describe(0) == f"{shard}:a.png"
    assert manifest.describe(1) == str(shard)  # b: no image member
