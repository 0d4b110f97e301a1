"""Data loading: bad images come back as error strings, batches keep the requested row order."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest
import torch
from PIL import Image

from _support.files import write_image_folder
from featcache.extract.decode.images import load_rgb
from featcache.extract.decode.loaders import (
    ImageDataset,
    ImageReader,
    default_num_workers,
    iter_array_batches,
    make_loader,
)
from featcache.extract.decode.preprocess import Preprocessor
from featcache.extract.inputs.manifest import Manifest

PRE = Preprocessor(input_size=32, resize_size=36, interpolation="bilinear", mean=(0.5,) * 3, std=(0.25,) * 3)


@pytest.fixture
def manifest(tmp_path):
    ids = write_image_folder(tmp_path, classes=("a", "b"), per_class=5, size=20)
    (tmp_path / "a" / "zz_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    ids = sorted(ids + ["a/zz_corrupt.png", "b/zz_missing.png"])
    labels = np.array([0 if i.startswith("a/") else 1 for i in ids], dtype=np.int64)
    return Manifest(ids, list(ids), np.zeros(len(ids), dtype=np.uint8), labels=labels, classes=["a", "b"],
                    root=tmp_path)


def test_good_rows_are_preprocessed(manifest):
    dataset = ImageDataset(manifest, PRE)
    assert len(dataset) == len(manifest)
    row = manifest.ids.index("a/001.png")
    index, tensor, error = dataset[row]
    assert (index, error) == (row, "")
    assert tensor.shape == (3, 32, 32) and tensor.dtype == torch.uint8  # workers hand over uint8 pixels
    assert torch.equal(PRE.normalize_batch(tensor[None])[0], PRE(load_rgb(manifest.absolute_path(row))))


def test_corrupt_and_missing_files_return_errors(manifest):
    dataset = ImageDataset(manifest, PRE)
    corrupt = manifest.ids.index("a/zz_corrupt.png")
    row, tensor, error = dataset[corrupt]  # no exception
    assert row == corrupt and isinstance(error, str) and error
    assert "Error" in error and "\n" not in error
    # The reason ends up in the feature file: no machine-specific absolute path in it.
    assert str(manifest.root) not in error and "zz_corrupt.png" in error
    assert tensor.shape == (3, 32, 32) and tensor.dtype == torch.uint8 and not tensor.any()
    missing = manifest.ids.index("b/zz_missing.png")
    row, tensor, error = dataset[missing]
    assert (row, error) == (missing, "missing file")
    assert not tensor.any()


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_keeps_row_order(manifest, workers):
    dataset = ImageDataset(manifest, PRE)
    rows = [7, 0, 11, 3, 2, 10, 1]  # any order, including the bad rows
    seen, errors = [], {}
    for batch_rows, images, reasons in make_loader(dataset, rows, batch_size=3, num_workers=workers):
        assert batch_rows.dtype == torch.int64
        assert images.shape == (len(batch_rows), 3, 32, 32) and images.dtype == torch.uint8
        assert len(reasons) == len(batch_rows) <= 3
        for position, row in enumerate(batch_rows.tolist()):
            seen.append(row)
            errors[row] = reasons[position]
            if not reasons[position]:
                assert torch.equal(images[position], dataset[row][1])
    assert seen == rows
    bad = {manifest.ids.index("a/zz_corrupt.png"), manifest.ids.index("b/zz_missing.png")}
    assert {row for row, reason in errors.items() if reason} == bad & set(rows)


def test_loader_of_no_rows_is_empty(manifest):
    assert list(make_loader(ImageDataset(manifest, PRE), [], batch_size=4, num_workers=0)) == []


def test_default_num_workers():
    assert 1 <= default_num_workers() <= 8


def test_dataset_uses_the_preprocessor_background(tmp_path):
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    manifest = Manifest(["clear.png"], ["clear.png"], np.zeros(1, np.uint8), labels=np.zeros(1, np.int64),
                        classes=["x"], root=tmp_path)
    black = Preprocessor(32, 36, "bilinear", (0.0,) * 3, (1.0,) * 3, background=(0, 0, 0))
    white = Preprocessor(32, 36, "bilinear", (0.0,) * 3, (1.0,) * 3)
    assert black.normalize_batch(ImageDataset(manifest, black)[0][1]).max() == 0
    assert white.normalize_batch(ImageDataset(manifest, white)[0][1]).min() == 1


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_uint8_then_normalize_batch_is_bitwise_totensor_normalize(manifest, interpolation):
    """The features of the uint8 transfer equal today's: ToTensor + Normalize, bit for bit on CPU."""
    from torchvision import transforms

    pre = Preprocessor(32, 36, interpolation, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    images = [load_rgb(manifest.absolute_path(row)) for row in range(4)]
    crops = [transforms.functional.to_pil_image(pre.pixels(image)) for image in images]  # same geometry as before
    reference = transforms.Compose([transforms.ToTensor(), transforms.Normalize(pre.mean, pre.std)])
    expected = torch.stack([reference(crop) for crop in crops])
    batch = pre.normalize_batch(torch.stack([pre.pixels(image) for image in images]))
    assert batch.dtype == torch.float32 and torch.equal(batch, expected)
    assert torch.equal(torch.stack([pre(image) for image in images]), expected)
    with pytest.raises(TypeError, match="uint8"):
        pre.normalize_batch(expected)


def test_normalize_batch_builds_its_channel_constants_once_per_device(monkeypatch):
    """Per batch, building mean/std on a CUDA device is a blocking copy that waits for the queued forward:
    they are made once per device (and preprocessor values) and reused, with the same results."""
    pre = Preprocessor(32, 36, "bilinear", (0.125, 0.25, 0.375), (0.5, 0.625, 0.75))  # values no other test uses
    made = []
    as_tensor = torch.as_tensor
    monkeypatch.setattr(torch, "as_tensor", lambda *a, **k: made.append(a[0]) or as_tensor(*a, **k))
    batch = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    first = pre.normalize_batch(batch)
    for _ in range(3):
        assert torch.equal(pre.normalize_batch(batch), first)
    assert made == [pre.mean, pre.std]
    mean = torch.tensor(pre.mean).view(-1, 1, 1)
    assert torch.equal(first, batch.float().div_(255.0).sub_(mean).div_(torch.tensor(pre.std).view(-1, 1, 1)))


# ------------------------------------------------------------ the array loader (CPU runners, no torch)
@pytest.mark.parametrize("workers", [0, 2])
def test_array_loader_gives_the_torch_loaders_batches(manifest, workers):
    rows = [7, 0, 11, 3, 2, 10, 1]  # any order, including the bad rows
    dataset = ImageDataset(manifest, PRE)
    reference = list(make_loader(dataset, rows, batch_size=3, num_workers=0))
    batches = list(iter_array_batches(ImageReader(manifest, PRE), rows, batch_size=3, num_workers=workers))
    assert len(batches) == len(reference) == 3
    for (rows_a, images_a, reasons_a), (rows_b, images_b, reasons_b) in zip(batches, reference):
        assert rows_a.dtype == np.int64 and images_a.dtype == np.uint8 and images_a.shape[1:] == (3, 32, 32)
        assert rows_a.tolist() == rows_b.tolist() and reasons_a == reasons_b
        assert np.array_equal(images_a, images_b.numpy())
    assert list(iter_array_batches(ImageReader(manifest, PRE), [], batch_size=4, num_workers=2)) == []


def test_array_loader_raises_a_worker_bug_with_its_note(manifest, monkeypatch):
    def failing(*args, **kwargs):
        raise KeyError("a bug in a decoder plugin")

    monkeypatch.setattr("featcache.extract.decode.loaders.load_rgb", failing)  # forked workers inherit the patch
    batches = iter_array_batches(ImageReader(manifest, PRE), list(range(8)), batch_size=2, num_workers=2)
    with pytest.raises(KeyError, match="decoder plugin") as info:
        list(batches)
    assert any("not a bad-image error" in note for note in info.value.__notes__)  # Python 3.10 too


class _NoAddNoteError(KeyError):
    """An exception without ``add_note``, as every exception is on Python 3.10."""

    add_note = None


@pytest.mark.parametrize("stage", ["decode", "preprocess"])
def test_a_bug_is_noted_without_add_note(manifest, monkeypatch, stage):
    """The note naming the file reaches ``__notes__`` where ``add_note`` does not exist (Python 3.10)."""
    def failing(*args, **kwargs):
        raise _NoAddNoteError("a bug")

    if stage == "decode":
        monkeypatch.setattr("featcache.extract.decode.loaders.load_rgb", failing)
    else:
        monkeypatch.setattr(Preprocessor, "pixels_array", failing)
    row = manifest.ids.index("a/001.png")
    with pytest.raises(_NoAddNoteError) as info:
        ImageReader(manifest, PRE).read(row)
    expected = "not a bad-image error" if stage == "decode" else "which decoded fine"
    assert [note for note in info.value.__notes__ if expected in note and "001.png" in note and f"row {row}" in note]


def test_closing_the_array_loader_early_stops_its_workers(manifest):
    import multiprocessing

    batches = iter_array_batches(ImageReader(manifest, PRE), list(range(12)), batch_size=2, num_workers=2)
    next(batches)
    assert multiprocessing.active_children()
    batches.close()
    assert not multiprocessing.active_children()


class _CountingReader(ImageReader):
    """Blank batches without decoding; every batch read appends a line to ``log`` (from any worker process)."""

    def __init__(self, n: int, log) -> None:
        super().__init__([f"{row}.png" for row in range(n)], PRE)
        self.log = str(log)

    def read_batch(self, rows):
        with open(self.log, "a") as handle:
            handle.write(f"{rows[0]}\n")
        size = self.preprocess.input_size
        return np.asarray(rows, np.int64), np.zeros((len(rows), 3, size, size), np.uint8), [""] * len(rows)


@pytest.mark.parametrize("prefetch", [1, 2])
def test_array_loader_reads_at_most_workers_x_prefetch_batches_ahead(tmp_path, prefetch):
    """A slow consumer: the workers read ahead up to the bound, never more; stopping early leaves the rest unread."""
    import time

    log, workers, n = tmp_path / "reads.txt", 2, 40

    def reads() -> int:
        return len(log.read_text().splitlines()) if log.exists() else 0

    batches = iter_array_batches(_CountingReader(n, log), range(n), batch_size=1, num_workers=workers,
                                 prefetch_factor=prefetch)
    for consumed in range(1, 4):
        assert next(batches)[0].tolist() == [consumed - 1]
        time.sleep(0.3)  # the workers are idle long before this: an unbounded loader would read all n by now
        assert consumed <= reads() <= consumed + workers * prefetch
    batches.close()
    assert reads() <= 3 + workers * prefetch < n


class _DyingReader(_CountingReader):
    """Its worker is killed (as by the out-of-memory killer) on the batch that starts at ``row``."""

    def __init__(self, n: int, log, row: int) -> None:
        super().__init__(n, log)
        self.row = row

    def read_batch(self, rows):
        if rows[0] == self.row:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().read_batch(rows)


@pytest.mark.timeout(60)
def test_a_killed_worker_is_an_error_naming_its_rows_not_a_hang(tmp_path):
    from featcache.extract.decode.loaders import DecodeWorkerDiedError

    batches = iter_array_batches(_DyingReader(12, tmp_path / "log", row=6), list(range(12)), batch_size=2,
                                 num_workers=2)
    with pytest.raises(DecodeWorkerDiedError, match=r"rows 6\.\.7 .*Hint: lower extract_run\.num_workers"):
        for _ in batches:
            pass
    import multiprocessing

    assert not multiprocessing.active_children()


class _InterruptedReader(_CountingReader):
    """Its worker gets the SIGINT that Ctrl-C sends to the whole process group, on the batch that starts at ``row``."""

    def __init__(self, n: int, log, row: int) -> None:
        super().__init__(n, log)
        self.row = row

    def read_batch(self, rows):
        if rows[0] == self.row:
            os.kill(os.getpid(), signal.SIGINT)
        return super().read_batch(rows)


@pytest.mark.timeout(60)
def test_ctrl_c_leaves_the_decode_workers_to_the_consumer(tmp_path, capfd):
    """Ctrl-C in a terminal signals the decode workers too: they go on (the consumer, interrupted itself, stops
    the pool), instead of each printing a KeyboardInterrupt traceback and dying as if killed."""
    batches = iter_array_batches(_InterruptedReader(12, tmp_path / "log", row=6), list(range(12)), batch_size=2,
                                 num_workers=2)
    assert [int(rows[0]) for rows, _, _ in batches] == [0, 2, 4, 6, 8, 10]
    assert "Traceback" not in capfd.readouterr().err
