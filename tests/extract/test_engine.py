"""extract_to_store: a tiny ImageFolder through a random-weight resnet18 into one HDF5 store.

3 classes x 6 random-colour 20x20 PNGs plus one corrupt file (19 rows), input
64 px, batch 2, blocks of 4 rows (5 blocks). Most runs use ``num_workers=0``.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from _support.files import md5, write_image_folder
from featcache.errors import ExtractionError
from featcache.extract.decode.images import load_rgb
from featcache.extract.decode.preprocess import Preprocessor
from featcache.extract.engine import extract_to_store
from featcache.extract.inputs.sources import from_folder
from featcache.extract.plan import plan_extraction
from featcache.extract.runners.torch_runner import TorchFeatureExtractor
from featcache.extract.zoo.registry import IMAGENET_MEAN, IMAGENET_STD

PRE = Preprocessor(input_size=64, resize_size=73, interpolation="bilinear", mean=IMAGENET_MEAN, std=IMAGENET_STD)
LAYERS = ["pool5", "res4"]
CONFIG = {"backbone": "resnet18", "weights": "random", "layers": LAYERS, "pooling": "avg",
          "preprocess": PRE.config()}
ATTRS = {"backbone": "resnet18", "weights_id": "random:seed=0", "weights_sha256": "", "backend": "torch"}
CORRUPT = "ant/0-corrupt.png"  # sorts first: row 0, in the first block
RATIOS = {"train": 0.5, "val": 0.25, "test": 0.25}
N_GOOD = 18


def _make_folder(root: Path) -> Path:
    write_image_folder(root, classes=("ant", "bee", "cat"), per_class=6, size=20, seed=0)
    (root / CORRUPT).write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    return root


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return _make_folder(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def manifest(images):
    manifest = from_folder(images, RATIOS, seed=0)
    assert len(manifest) == N_GOOD + 1 and manifest.ids[0] == CORRUPT
    return manifest


@pytest.fixture(scope="module")
def runner(random_backbone):
    loaded = random_backbone("resnet18")
    return TorchFeatureExtractor(loaded.model, loaded.spec, LAYERS, pooling="avg")


def _extract(manifest, runner, out, **kwargs):
    num_workers = kwargs.pop("num_workers", 0)
    kwargs.setdefault("plan", plan_extraction(device="cpu", backend="torch", num_workers=num_workers))
    kwargs.setdefault("batch_size", 2)
    kwargs.setdefault("block_rows", 4)
    kwargs.setdefault("progress", False)
    kwargs.setdefault("config", CONFIG)
    kwargs.setdefault("attrs", ATTRS)
    return extract_to_store(manifest, runner, PRE, out, **kwargs)


@pytest.fixture(scope="module")
def first_run(manifest, runner, tmp_path_factory):
    out = tmp_path_factory.mktemp("first") / "features" / "resnet18.h5"
    report = _extract(manifest, runner, out)
    return out, report, md5(out)


def _leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name != out.name)


# -------------------------------------------------------------- the store
def test_store_is_written(first_run, manifest):
    out, report, _ = first_run
    assert report.path == out and out.is_file()
    assert (report.n_input, report.n_written, report.n_skipped, report.n_resumed_blocks) == (19, 18, 1, 0)
    assert [e[0] for e in report.errors] == [CORRUPT]
    assert _leftovers(out) == []  # no .partial, .parts or .lock left behind
    with h5py.File(out, "r") as f:
        ids = [i.decode() for i in f["ids"][()]]
        assert ids == [i for i in manifest.ids if i != CORRUPT]
        assert f.attrs["n_rows"] == 18 and f.attrs["n_input"] == 19 and f.attrs["n_skipped"] == 1
        assert bool(f.attrs["complete"])
        assert f.attrs["backbone"] == "resnet18" and f.attrs["backend"] == "torch"
        assert f.attrs["manifest_sha256"] == manifest.sha256()
        errors = f["errors"][()]
        assert [e["id"].decode() for e in errors] == [CORRUPT]
        assert errors[0]["reason"]
        rows = [manifest.ids.index(i) for i in ids]
        np.testing.assert_array_equal(f["label"][()], manifest.labels[rows])
        np.testing.assert_array_equal(f["split"][()], manifest.splits[rows])
        assert [c.decode() for c in f["classes"][()]] == ["ant", "bee", "cat"]
        assert f["features/pool5"].shape == (18, 512) and f["features/res4"].shape == (18, 256)
        assert f["features/pool5"].dtype == np.float16
        assert f["features/res4"].attrs["pooling"] == "avg"
        assert f["features/pool5"].attrs["node"] == "flatten"


def _direct(runner, manifest, ids):
    batch = torch.stack([PRE(load_rgb(manifest.absolute_path(manifest.ids.index(i)))) for i in ids])
    return runner(batch)


def test_features_equal_a_direct_extractor_call(first_run, manifest, runner):
    out, _, _ = first_run
    with h5py.File(out, "r") as f:
        ids = [i.decode() for i in f["ids"][()]]
        stored = {layer: f[f"features/{layer}"][()] for layer in LAYERS}
    direct = _direct(runner, manifest, ids)
    for layer in LAYERS:
        expected = direct[layer]
        assert np.abs(expected).max() > 0
        # float16 storage: ~3 significant digits
        np.testing.assert_allclose(stored[layer].astype(np.float32), expected, rtol=2e-3,
                                   atol=1e-3 * np.abs(expected).max())
        assert not np.allclose(stored[layer][0], stored[layer][1])  # rows are not all the same


def test_float32_store(manifest, runner, tmp_path):
    out = tmp_path / "f32.h5"
    _extract(manifest, runner, out, dtype="float32", block_rows=7, batch_size=5)
    with h5py.File(out, "r") as f:
        ids = [i.decode() for i in f["ids"][()]]
        stored = f["features/pool5"][()]
    assert stored.dtype == np.float32
    expected = _direct(runner, manifest, ids)["pool5"]
    np.testing.assert_allclose(stored, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())


# ----------------------------------------------------------- determinism
def test_rerun_is_byte_identical(first_run, manifest, runner):
    out, _, digest = first_run
    report = _extract(manifest, runner, out)  # same path, nothing deleted
    assert report.n_resumed_blocks == 0 and report.n_written == 18
    assert md5(out) == digest
    assert _leftovers(out) == []


def test_other_output_path_and_one_worker_are_byte_identical(first_run, manifest, runner, tmp_path):
    _, _, digest = first_run
    out = tmp_path / "elsewhere.h5"
    report = _extract(manifest, runner, out, num_workers=1)
    assert report.n_written == 18 and md5(out) == digest


def test_moved_image_folder_gives_identical_bytes(first_run, images, runner, tmp_path):
    """Nothing machine-specific (like the absolute image path in an error message) reaches the file."""
    _, _, digest = first_run
    moved = tmp_path / "a" / "different" / "place"
    shutil.copytree(images, moved)
    manifest = from_folder(moved, RATIOS, seed=0)
    out = tmp_path / "moved.h5"
    _extract(manifest, runner, out)
    assert md5(out) == digest


def test_different_config_changes_the_file(first_run, manifest, runner, tmp_path):
    _, _, digest = first_run
    out = tmp_path / "other.h5"
    _extract(manifest, runner, out, config={**CONFIG, "note": "changed"})
    assert md5(out) != digest


# ---------------------------------------------------------------- errors
def test_on_error_fail_names_the_file_and_writes_nothing(manifest, runner, tmp_path):
    out = tmp_path / "fail.h5"
    with pytest.raises(ExtractionError) as info:
        _extract(manifest, runner, out, on_error="fail")
    message = str(info.value)
    assert CORRUPT in message and str(manifest.absolute_path(0)) in message
    assert not out.exists()
    assert not out.with_name(out.name + ".partial").exists()
    assert not out.with_name(out.name + ".lock").exists()


def test_invalid_on_error(manifest, runner, tmp_path):
    with pytest.raises(ValueError, match="on_error"):
        _extract(manifest, runner, tmp_path / "x.h5", on_error="ignore")


def test_missing_image_is_reported(images, runner, tmp_path):
    copy = tmp_path / "images"
    shutil.copytree(images, copy)
    manifest = from_folder(copy, RATIOS, seed=0)
    (copy / "cat" / "002.png").unlink()
    report = _extract(manifest, runner, tmp_path / "m.h5")
    assert dict(report.errors)["cat/002.png"] == "missing file"
    assert report.n_written == 17 and report.n_skipped == 2


# ---------------------------------------------------------------- resume
class CrashingRunner:
    """Delegates to a real runner, then raises ``error`` on call number ``after + 1`` (a crash, or Ctrl-C)."""

    def __init__(self, runner, after: int, error: type[BaseException] = RuntimeError) -> None:
        self.runner, self.after, self.calls, self.error = runner, after, 0, error

    def __call__(self, batch):
        self.calls += 1
        if self.calls > self.after:
            raise self.error("simulated crash")
        return self.runner(batch)

    def layer_specs(self, input_size=None):
        return self.runner.layer_specs(input_size)


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_crash_then_resume_is_byte_identical(first_run, manifest, runner, tmp_path, error):
    _, _, digest = first_run
    out = tmp_path / "crash" / "resnet18.h5"
    crashing = CrashingRunner(runner, after=2, error=error)
    with pytest.raises(error, match="simulated crash"):
        _extract(manifest, crashing, out)
    assert not out.exists()
    parts = sorted(p.name for p in out.with_name(out.name + ".parts").rglob("block-*.h5"))
    assert parts == ["block-000000.h5"]  # rows 0-3 (two batches) were committed before the crash
    resumed_calls = CrashingRunner(runner, after=10**6)
    report = _extract(manifest, resumed_calls, out)
    assert report.n_resumed_blocks == 1
    assert resumed_calls.calls == 8  # rows 4..18 in batches of 2; block 0 was not run again
    assert md5(out) == digest
    assert _leftovers(out) == []
    # The report counts the whole store, including the bad image of the resumed block.
    assert (report.n_input, report.n_written, report.n_skipped) == (19, 18, 1)
    assert [e[0] for e in report.errors] == [CORRUPT]


def _wrote_line(caplog) -> str:
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Wrote ")]
    return line


def test_a_resume_says_how_many_rows_earlier_runs_extracted(manifest, runner, tmp_path, caplog):
    """The speed of a resumed run is over its own rows, and the lines say how many rows came from earlier runs."""
    out = tmp_path / "part.h5"
    with pytest.raises(RuntimeError):
        _extract(manifest, CrashingRunner(runner, after=2), out)  # block 0 (4 rows) committed
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="featcache.extract.engine"):
        report = _extract(manifest, runner, out)
    line = _wrote_line(caplog)
    assert line.endswith(f"18 rows written, 1 skipped (1 not an image or unsupported format), "
                         f"{report.images_per_second:.1f} img/s over the 15 rows "
                         "extracted now (4 rows from earlier runs)")
    assert "1 of 5 blocks (4 of 19 rows) already committed; extracting the other 15 rows" in caplog.text
    assert report.n_extracted == 15 and report.images_per_second == pytest.approx(15 / report.seconds)


def test_a_run_with_nothing_left_to_extract_says_so_not_zero_img_s(manifest, runner, tmp_path, caplog,
                                                                   monkeypatch):
    """Every block committed by a run that failed to write the final file: the rerun only finalizes, and its
    lines say that, not "0.0 img/s"."""
    from featcache.store.writer import StoreWriter

    out = tmp_path / "done.h5"
    finalize = StoreWriter.finalize

    def full_disk(self, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(StoreWriter, "finalize", full_disk)
    with pytest.raises(OSError, match="disk full"):
        _extract(manifest, runner, out)
    monkeypatch.setattr(StoreWriter, "finalize", finalize)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="featcache.extract.engine"):
        report = _extract(manifest, CrashingRunner(runner, after=0), out)  # the backbone is never run
    line = _wrote_line(caplog)
    assert line.endswith("18 rows written, 1 skipped (1 not an image or unsupported format); nothing left to "
                         "extract: all 19 rows from earlier runs")
    assert "img/s" not in line and "img/s" not in report.summary()
    assert "all 5 blocks (19 rows) already committed; nothing left to extract" in caplog.text
    assert (report.n_extracted, report.n_resumed_blocks, report.images_per_second) == (0, 5, 0.0)


def test_many_bad_images_log_the_first_ones_and_count_all_by_reason(images, runner, tmp_path, caplog):
    """A long run with many bad images: the first 20 are warnings, then one note (the rest only with -v), and
    the final line counts every skipped row by reason, so the progress lines are not buried."""
    folder = tmp_path / "images"
    shutil.copytree(images, folder)
    for i in range(24):
        (folder / "bee" / f"empty-{i:02d}.png").write_bytes(b"")
    manifest = from_folder(folder, RATIOS, seed=0)
    with caplog.at_level(logging.DEBUG, logger="featcache.extract.engine"):
        report = _extract(manifest, runner, tmp_path / "bad.h5", max_bad_fraction=1.0)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum(line.startswith("Bad image ") for line in warnings) == 20
    assert sum(line.startswith("More than 20 bad images: the others are logged only with featcache -v")
               for line in warnings) == 1
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert sum(line.startswith("Bad image ") for line in debug) == 5
    assert report.n_skipped == 25 and _wrote_line(caplog).split(": ", 1)[1].startswith(
        "18 rows written, 25 skipped (24 empty file, 1 not an image or unsupported format), ")


def test_a_run_ends_with_one_wrote_line(manifest, runner, tmp_path, caplog):
    """Each run ended with three "wrote" lines (the store writer's at INFO, the engine's and the CLI's print): the
    writer's is DEBUG now, so the log has one final line."""
    with caplog.at_level(logging.INFO, logger="featcache"):
        _extract(manifest, runner, tmp_path / "one.h5")
    wrote = [r.getMessage() for r in caplog.records if r.getMessage().lower().startswith("wrote ")]
    assert len(wrote) == 1 and wrote[0].startswith("Wrote "), wrote


def test_the_summary_counts_rows_with_thousands_separators(tmp_path):
    """The summary said "1797 rows written" where the progress lines say "1,797"."""
    from featcache.extract.report import ExtractionReport

    report = ExtractionReport(path=tmp_path / "x.h5", n_input=2397, n_written=1797, n_skipped=1200,
                              n_resumed_blocks=0, n_extracted=2397, seconds=10.0, images_per_second=239.7)
    assert report.summary() == "1,797 rows written, 1,200 skipped, 239.7 img/s"
    report.up_to_date = True
    assert report.summary() == "up to date: 1,797 rows, 1,200 skipped; --force rebuilds it"


def test_changed_config_does_not_resume_old_blocks(manifest, runner, tmp_path):
    out = tmp_path / "cfg.h5"
    with pytest.raises(RuntimeError):
        _extract(manifest, CrashingRunner(runner, after=3), out)
    report = _extract(manifest, runner, out, config={**CONFIG, "pooling": "max"})
    assert report.n_resumed_blocks == 0
    with h5py.File(out, "r") as f:
        assert '"pooling":"max"' in f.attrs["config"]


# ------------------------------------------------------ the hot loop's pieces
def test_block_assembler_slices_out_of_order_rows_with_bad_ones():
    from featcache.extract.blockloop import BlockAssembler

    ids = [f"id{r}" for r in range(10)]
    assembler = BlockAssembler(4, 10, {"f": 2}, ids)
    feats = lambda rows: np.array([[r, -r] for r in rows], dtype=np.float32)  # noqa: E731
    # batch 1: rows 5, 0, 9 (row 9 bad); batch 2: 8, 1, 2, 3 (block 0 completes); batch 3: the rest
    assert assembler.add(np.array([5, 0, 9]), np.array([True, True, False]), {"f": feats([5, 0])},
                         ["", "", "bad 9"]) == []
    done = assembler.add(np.array([8, 1, 2, 3]), np.array([True, False, True, True]), {"f": feats([8, 2, 3])},
                         ["", "bad 1", "", ""])
    assert [d.block for d in done] == [0, 2]  # the short last block (8, 9) completes too
    assert done[1].kept_rows.tolist() == [8] and done[1].errors == [("id9", "bad 9")]
    np.testing.assert_array_equal(done[0].kept_rows, [0, 2, 3])
    np.testing.assert_array_equal(done[0].features["f"], feats([0, 2, 3]))
    assert done[0].errors == [("id1", "bad 1")]
    done = assembler.add(np.array([4, 6, 7]), np.array([True, True, True]), {"f": feats([4, 6, 7])}, [""] * 3)
    assert [d.block for d in done] == [1] and done[0].kept_rows.tolist() == [4, 5, 6, 7]
    np.testing.assert_array_equal(done[0].features["f"], feats([4, 5, 6, 7]))
    assert assembler.add(np.array([], dtype=np.int64), np.array([], dtype=bool), {}, []) == []


def test_short_last_block_is_handed_out():
    from featcache.extract.blockloop import BlockAssembler

    assembler = BlockAssembler(4, 6, {"f": 1}, [str(r) for r in range(6)])
    done = assembler.add(np.arange(6), np.ones(6, bool), {"f": np.arange(6, dtype=np.float32)[:, None]}, [""] * 6)
    assert [(d.block, d.kept_rows.tolist()) for d in done] == [(0, [0, 1, 2, 3]), (1, [4, 5])]


def test_custom_batches_in_any_order_give_the_same_bytes(first_run, manifest, runner, tmp_path):
    """The batch contract: any iterable of (rows, uint8 images, reasons) in any order -> the same store."""
    from featcache.extract.decode.loaders import ImageDataset

    _, _, digest = first_run
    dataset = ImageDataset(manifest, PRE)
    order = [1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14, 17, 16, 18]  # pairs swapped: same batches

    def factory(rows, batch_size):
        assert list(rows) == list(range(len(manifest))) and batch_size == 2
        for start in range(0, len(order), batch_size):
            items = [dataset[row] for row in order[start:start + batch_size]]
            yield (torch.tensor([i[0] for i in items]), torch.stack([i[1] for i in items]), [i[2] for i in items])

    out = tmp_path / "custom.h5"
    _extract(manifest, runner, out, loader_factory=factory)
    assert md5(out) == digest


def test_threaded_writer_gives_the_same_bytes(first_run, manifest, runner, tmp_path):
    from featcache.extract.engine import run_blocks
    from featcache.store.writer import StoreWriter

    _, _, digest = first_run
    from featcache.extract.engine import build_root_attrs

    out = tmp_path / "threaded.h5"
    specs = runner.layer_specs(PRE.input_size)
    with StoreWriter(out, ids=manifest.ids, splits=manifest.splits, classes=manifest.classes, labels=manifest.labels,
                     targets=manifest.targets, layers=specs, attrs=build_root_attrs(manifest, CONFIG, ATTRS),
                     block_rows=4) as writer:
        errors = run_blocks(manifest, runner, writer, writer.pending_blocks(), preprocess=PRE, layer_specs=specs,
                            batch_size=2, num_workers=0, overlap=True)
        writer.finalize()
    assert [e[0] for e in errors] == [CORRUPT]
    assert md5(out) == digest


def test_an_error_in_the_writer_thread_propagates(manifest, runner, tmp_path):
    from featcache.extract.engine import run_blocks

    class FailingSink:
        block_rows, n_rows = 4, len(manifest)

        def __init__(self):
            self.committed = []

        def block_range(self, block):
            return range(4 * block, min(4 * block + 4, self.n_rows))

        def commit_block(self, block, kept_rows, features, errors=()):
            if block == 1:
                raise OSError("disk full")
            self.committed.append(block)

    sink = FailingSink()
    specs = runner.layer_specs(PRE.input_size)
    with pytest.raises(OSError, match="disk full"):
        run_blocks(manifest, runner, sink, range(5), preprocess=PRE, layer_specs=specs, batch_size=2,
                   num_workers=0, overlap=True)
    assert sink.committed == [0]


def test_progress_logs_a_line_per_committed_block(manifest, runner, tmp_path, caplog, monkeypatch):
    from featcache.extract import blockloop

    monkeypatch.setattr(blockloop.Progress.__init__, "__defaults__", (0.0,))  # no rate limit
    with caplog.at_level(logging.INFO, logger="featcache.extract.engine"):
        _extract(manifest, runner, tmp_path / "p.h5", progress=True)
    lines = [r.getMessage() for r in caplog.records if "img/s, ETA" in r.getMessage()]
    assert len(lines) == 5  # 19 rows in blocks of 4
    assert lines[0].startswith("extract p.h5: 4/19 rows (21.1%)") and lines[-1].startswith("extract p.h5: 19/19")
    assert all("ETA " in line for line in lines) and lines[-1].endswith("ETA 0:00")


def test_format_eta():
    from featcache.extract.blockloop import format_eta

    assert (format_eta(65), format_eta(3725), format_eta(float("nan"))) == ("1:05", "1:02:05", "?")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_overlapped_loop_matches_the_synchronous_one(manifest, random_backbone, tmp_path):
    """On CUDA: pinned double buffers + side-stream copy + writer thread == the plain loop, row for row."""
    loaded = random_backbone("resnet18")
    cuda = TorchFeatureExtractor(loaded.model, loaded.spec, LAYERS, pooling="avg", device="cuda")
    cpu = TorchFeatureExtractor(loaded.model, loaded.spec, LAYERS, pooling="avg")
    overlapped = _extract(manifest, cuda, tmp_path / "gpu.h5", dtype="float32", batch_size=3)
    reference = _extract(manifest, cpu, tmp_path / "cpu.h5", dtype="float32", batch_size=3)
    with h5py.File(overlapped.path, "r") as a, h5py.File(reference.path, "r") as b:
        assert list(a["ids"][()]) == list(b["ids"][()]) and list(a["errors"][()]) == list(b["errors"][()])
        for layer in LAYERS:
            x, y = a[f"features/{layer}"][()], b[f"features/{layer}"][()]
            np.testing.assert_allclose(x, y, rtol=1e-3, atol=1e-3 * np.abs(y).max())


@pytest.fixture(scope="module")
def jpeg_manifest(tmp_path_factory):
    """96 noisy JPEGs of varied sizes (the device decode path), two classes."""
    from PIL import Image

    root = tmp_path_factory.mktemp("jpegs")
    rng = np.random.default_rng(1)
    for name in ("ant", "bee"):
        (root / name).mkdir()
        for index in range(48):
            width, height = (int(v) for v in rng.integers(160, 520, size=2))
            pixels = rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
            Image.fromarray(pixels).resize((width, height), Image.BILINEAR).save(root / name / f"{index:03d}.jpg",
                                                                                quality=90)
    return from_folder(root, RATIOS, seed=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_overlapped_device_decode_loop_is_byte_identical_to_the_synchronous_one(
        jpeg_manifest, random_backbone, tmp_path, monkeypatch, caplog):
    """Decode thread on its own stream + event handoff + side-stream copy-out + writer thread, against every step
    in order on one thread: the same device, runner and pinned copies, deterministic kernels, equal bytes. A batch
    torn by a missing stream wait (the forward reading pixels the decode stream has not written yet) differs."""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    loaded = random_backbone("resnet18")
    cuda = TorchFeatureExtractor(loaded.model, loaded.spec, LAYERS, pooling="avg", device="cuda")
    preprocess = Preprocessor.from_spec(loaded.spec)
    plan = plan_extraction(device="cuda", backend="torch", decode="gpu", autocast="none", num_workers=2)
    assert plan.loader == "device"

    def run(name, overlap):
        return extract_to_store(jpeg_manifest, cuda, preprocess, tmp_path / name, plan=plan, overlap=overlap,
                                batch_size=16, block_rows=32, progress=False, config=CONFIG, attrs=ATTRS,
                                dtype="float32")

    with caplog.at_level(logging.INFO, logger="featcache.extract.decode.device"):
        overlapped, synchronous = run("overlapped.h5", None), run("synchronous.h5", False)
    assert caplog.text.count("96 rows on the device, 0 on the CPU path") == 2, caplog.text
    with h5py.File(overlapped.path, "r") as a, h5py.File(synchronous.path, "r") as b:
        assert a["ids"].shape == (96,) and list(a["errors"][()]) == list(b["errors"][()]) == []
        for layer in LAYERS:
            np.testing.assert_array_equal(a[f"features/{layer}"][()], b[f"features/{layer}"][()])


def test_the_dvc_extract_stage_shows_progress():
    """Under `dvc repro` the block log lines are the progress: the stage must not pass --no-progress."""
    import yaml

    stage = yaml.safe_load((Path(__file__).resolve().parents[2] / "dvc.yaml").read_text())["stages"]["extract"]
    assert "featcache extract" in stage["do"]["cmd"] and "--no-progress" not in stage["do"]["cmd"]
