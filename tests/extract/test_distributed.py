"""Sharded extraction on dask.distributed: byte-identical to one process, resumable, fails cleanly."""

from __future__ import annotations

import hashlib
import re
import sys
import time
from pathlib import Path

import cloudpickle
import distributed  # a declared dependency: without it this module fails, it does not skip
import numpy as np
import pytest
import torch
from PIL import Image

from _support.files import md5
from featcache.errors import ExtractionError, UserError
from featcache.extract.dask_tasks import WorkerJob, plan_tasks
from featcache.extract.decode.preprocess import Preprocessor
from featcache.extract.distributed import _adopt_blocks, _check_onnx_sha256, _run_tasks, extract_distributed
from featcache.extract.engine import extract_to_store
from featcache.extract.inputs.sources import from_folder
from featcache.extract.plan import plan_extraction
from featcache.extract.runner_spec import RunnerSpec
from featcache.store.schema import LayerSpec, sha256_text
from featcache.store.writer import StoreWriter
from featcache.util.dask_client import CONNECT_TRIES, ClientHandle, connect_client

#: One process decodes (the default loader of a runner on the CPU).
CPU_PLAN = plan_extraction(device="cpu", backend="torch", num_workers=0)

# Functions of this module submitted to the workers travel by value (the
# workers cannot import pytest's test modules).
cloudpickle.register_pickle_by_value(sys.modules[__name__])

PREPROCESS = Preprocessor(input_size=64, resize_size=73, interpolation="bilinear",
                          mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
SPEC = RunnerSpec(backbone="resnet18", weights="random", layers=("default", "layer3"), pooling="avg")
CONFIG = {"backbone": "resnet18", "weights": "random", "layers": ["default", "layer3"], "pooling": "avg",
          "dtype": "float16", "preprocess": PREPROCESS.config()}
ATTRS = {"backbone": "resnet18", "weights_id": "random:seed=0", "weights_sha256": "", "dataset": "tiny",
         "backend": "torch", "provider": "cpu"}
CLASSES = ("ant", "bee", "cat")
PER_CLASS = 7
CORRUPT_ID = "bee/003_corrupt.png"


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def image_root(tmp_path_factory) -> Path:
    """21 small PNGs of varied sizes in 3 class folders, plus one corrupt PNG (22 rows)."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for channel, name in enumerate(CLASSES):
        (root / name).mkdir()
        for index in range(PER_CLASS):
            height, width = rng.integers(40, 90, size=2)
            pixels = rng.integers(0, 100, size=(height, width, 3))
            pixels[..., channel] += 150
            Image.fromarray(pixels.astype(np.uint8)).save(root / name / f"{index:03d}.png")
    (root / CORRUPT_ID).write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    return root


@pytest.fixture(scope="module")
def manifest(image_root):
    built = from_folder(image_root, {"train": 0.6, "val": 0.2, "test": 0.2}, seed=0)
    assert len(built) == 3 * PER_CLASS + 1 and CORRUPT_ID in built.ids
    return built


@pytest.fixture(scope="module")
def clean_manifest(tmp_path_factory):
    """The same images without the corrupt one (for on_error='fail' references)."""
    root = tmp_path_factory.mktemp("clean")
    rng = np.random.default_rng(1)
    for name in CLASSES:
        (root / name).mkdir()
        for index in range(3):
            Image.fromarray(rng.integers(0, 255, size=(50, 60, 3)).astype(np.uint8)).save(root / name / f"{index}.png")
    return from_folder(root, {"train": 0.6, "val": 0.2, "test": 0.2}, seed=0)


@pytest.fixture(scope="module")
def client():
    """One 2-worker process cluster for the whole module (startup is the slow part)."""
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0")
    dask_client = distributed.Client(cluster)
    try:
        yield dask_client
    finally:
        dask_client.close()
        cluster.close()


def _single(manifest, out, *, batch_size=4, block_rows=4, on_error="skip"):
    return extract_to_store(manifest, SPEC.build(), PREPROCESS, out, config=CONFIG, attrs=ATTRS,
                            block_rows=block_rows, batch_size=batch_size, plan=CPU_PLAN, on_error=on_error,
                            progress=False)


def _distributed(manifest, out, client, *, batch_size=4, block_rows=4, on_error="skip", **kwargs):
    return extract_distributed(manifest, SPEC, PREPROCESS, out, config=CONFIG, attrs=ATTRS, block_rows=block_rows,
                               batch_size=batch_size, on_error=on_error, client=client, progress=False, **kwargs)


def _open_writer(manifest, path, layers=None) -> StoreWriter:
    """A StoreWriter over ``manifest`` with the runner's layers (or ``layers``), blocks of 4 rows, an empty config."""
    layers = SPEC.build().layer_specs(PREPROCESS.input_size) if layers is None else layers
    return StoreWriter(path, ids=manifest.ids, splits=manifest.splits, classes=manifest.classes,
                       labels=manifest.labels, targets=manifest.targets, layers=layers,
                       attrs={"config": "{}", "config_sha256": sha256_text("{}")}, block_rows=4)


def _state_digest(spec: RunnerSpec) -> str:
    """sha256 of the built extractor's parameters and buffers (runs on a worker or here)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(spec.build().module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _content(path: Path) -> dict[str, object]:
    """Every dataset (raw bytes of numeric data) and attribute of a store, for exact comparison."""
    import h5py

    items: dict[str, object] = {}
    with h5py.File(path, "r") as handle:
        def visit(name, obj):
            items[f"{name}@attrs"] = {key: repr(obj.attrs[key]) for key in sorted(obj.attrs)}
            if isinstance(obj, h5py.Dataset):
                value = obj[()]
                raw = value.tobytes() if value.dtype.kind in "biuf" else repr(value.tolist())
                items[name] = (str(value.dtype), value.shape, obj.chunks, obj.compression, raw)
        visit("/", handle)
        handle.visititems(visit)
    return items


def _assert_same_bytes(actual: Path, expected: Path) -> None:
    """md5 equality; on a mismatch, say which datasets or attributes differ."""
    if md5(actual) == md5(expected):
        return
    a, b = _content(actual), _content(expected)
    diffs = sorted(key for key in set(a) | set(b) if a.get(key) != b.get(key))
    raise AssertionError(f"{actual} and {expected} differ in {diffs or 'the bytes only (same content)'}")


def _leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name != out.name)


# --------------------------------------------------------------------- plan
def test_plan_tasks_cuts_only_at_batch_boundaries():
    # batch_size divides block_rows: one task per block (the last block may be short).
    assert plan_tasks([0, 1, 2, 3], [4, 4, 4, 2], 4, 1) == [(0,), (1,), (2,), (3,)]
    assert plan_tasks([0, 1, 2, 3], [4, 4, 4, 2], 2, 1) == [(0,), (1,), (2,), (3,)]
    # batch_size = 2 blocks: a single-process batch spans two blocks, so a task does too.
    assert plan_tasks([0, 1, 2, 3, 4], [4, 4, 4, 4, 1], 8, 1) == [(0, 1), (2, 3), (4,)]
    # 3-row batches over 4-row blocks only realign every 3 blocks.
    assert plan_tasks([0, 1, 2, 3], [4, 4, 4, 4], 3, 1) == [(0, 1, 2), (3,)]
    # blocks_per_task is a minimum; resumed (non-contiguous) pending blocks keep their order.
    assert plan_tasks([1, 3, 4, 6, 7], [4] * 5, 4, 2) == [(1, 3), (4, 6), (7,)]
    assert plan_tasks([], [], 4, 1) == []


def test_runner_spec_is_picklable_hashable_and_cached():
    spec = RunnerSpec("resnet18", "random", ["default"], "avg")
    assert spec.layers == ("default",)
    assert cloudpickle.loads(cloudpickle.dumps(spec)) == spec
    assert spec.build() is RunnerSpec("resnet18", "random", ("default",), "avg").build()
    with pytest.raises(ValueError, match="empty"):
        RunnerSpec("resnet18", "random", (), "avg")
    with pytest.raises(TypeError, match="string"):
        RunnerSpec("resnet18", "random", "default", "avg")
    with pytest.raises(ValueError, match="autocast"):
        RunnerSpec("resnet18", "random", ("default",), "avg", autocast="int8")


# ------------------------------------------------------------- end to end
def test_workers_build_identical_random_weights(client):
    local = _state_digest(SPEC)
    remote = client.run(_state_digest, SPEC)  # every worker, {address: digest}
    assert len(remote) == 2
    assert set(remote.values()) == {local}


@pytest.mark.parametrize("batch_size", [4, 8], ids=["batch=block", "batch=2blocks"])
def test_byte_identical_to_single_process(client, manifest, tmp_path, batch_size):
    reference = _single(manifest, tmp_path / "single" / "resnet18.h5", batch_size=batch_size)
    out = tmp_path / "dask" / "resnet18.h5"
    report = _distributed(manifest, out, client, batch_size=batch_size)

    _assert_same_bytes(out, reference.path)
    assert _leftovers(out) == []  # no lock, no parts, no partial
    assert report.path == out
    assert (report.n_input, report.n_written, report.n_skipped, report.n_resumed_blocks) == (
        reference.n_input, reference.n_written, reference.n_skipped, 0)
    assert report.n_skipped == 1 and report.errors == reference.errors
    assert report.errors[0][0] == CORRUPT_ID


def test_default_lzf_content_identical(client, manifest, tmp_path):
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(StoreWriter.__init__.__kwdefaults__, "compression", "lzf")
        reference = _single(manifest, tmp_path / "single" / "resnet18.h5")
        report = _distributed(manifest, tmp_path / "dask" / "resnet18.h5", client)
    content = _content(report.path)
    assert content["features/pool5"][3] == "lzf"
    assert content == _content(reference.path)


def test_resume_after_single_process_crash(client, manifest, tmp_path):
    reference = _single(manifest, tmp_path / "single" / "resnet18.h5")
    out = tmp_path / "dask" / "resnet18.h5"

    class CrashingRunner:
        """Delegates to the real extractor, dies on the third batch (2 blocks committed)."""

        def __init__(self) -> None:
            self.calls = 0
            self.inner = SPEC.build()

        def __call__(self, batch: torch.Tensor):
            self.calls += 1
            if self.calls == 3:
                raise RuntimeError("simulated crash")
            return self.inner(batch)

        def layer_specs(self, input_size=None):
            return self.inner.layer_specs(input_size)

    with pytest.raises(RuntimeError, match="simulated crash"):
        extract_to_store(manifest, CrashingRunner(), PREPROCESS, out, config=CONFIG, attrs=ATTRS, block_rows=4,
                         batch_size=4, plan=CPU_PLAN, progress=False)
    parts = sorted(p.name for p in (out.parent / f"{out.name}.parts").rglob("block-*.h5"))
    assert parts == ["block-000000.h5", "block-000001.h5"]
    assert not out.exists()

    report = _distributed(manifest, out, client)
    assert report.n_resumed_blocks == 2
    assert (report.n_skipped, report.errors) == (reference.n_skipped, reference.errors)
    _assert_same_bytes(out, reference.path)
    assert _leftovers(out) == []


def test_on_error_fail_names_the_file_and_writes_nothing(client, manifest, image_root, tmp_path):
    out = tmp_path / "resnet18.h5"
    with pytest.raises(ExtractionError) as info:
        _distributed(manifest, out, client, on_error="fail")
    message = str(info.value)
    assert CORRUPT_ID in message and str((image_root / CORRUPT_ID).resolve()) in message
    assert not out.exists()
    assert not (out.parent / f"{out.name}.lock").exists()  # lock released
    # Blocks that were committed stay for a resume; a skip run then completes the store.
    _distributed(manifest, out, client, on_error="skip")
    assert out.exists()


def test_on_error_fail_without_bad_images_matches_single(client, clean_manifest, tmp_path):
    reference = _single(clean_manifest, tmp_path / "single.h5", on_error="fail")
    report = _distributed(clean_manifest, tmp_path / "dask.h5", client, on_error="fail", blocks_per_task=2)
    assert report.n_skipped == 0
    _assert_same_bytes(report.path, reference.path)


def test_worker_task_failure_is_wrapped_and_keeps_blocks(client, manifest, tmp_path):
    """A task that dies on a worker -> ExtractionError with a resume hint; the driver's lock is fine."""
    specs = SPEC.build().layer_specs(PREPROCESS.input_size)
    wrong = [LayerSpec(s.alias, s.node, s.dim + 1, "none", (s.dim + 1,), s.post_relu) for s in specs]
    with _open_writer(manifest, tmp_path / "x.h5", wrong) as writer:
        job = WorkerJob(manifest, PREPROCESS, SPEC, writer.block_committer(), tuple(wrong), 4, "skip", 1)
        with pytest.raises(ExtractionError, match="rerun to resume") as info:
            list(_run_tasks(client, job, [(0,), (1,)], writer, progress=False))
        assert "StoreError" in str(info.value)
        assert writer.pending_blocks() == list(range(writer.n_blocks))


def test_a_task_the_scheduler_cancelled_is_explained(client, manifest, tmp_path, monkeypatch):
    """Every worker holding the scattered job dying (one worker, or all at once) makes dask cancel the tasks
    without a reason: the error said 'failed in the task for blocks 0..0: NoneType: None'."""
    submit = client.submit

    def cancelled(*args, **kwargs):
        future = submit(*args, **kwargs)
        client.cancel([future])
        return future

    monkeypatch.setattr(client, "submit", cancelled)
    specs = SPEC.build().layer_specs(PREPROCESS.input_size)
    with _open_writer(manifest, tmp_path / "x.h5", specs) as writer:
        job = WorkerJob(manifest, PREPROCESS, SPEC, writer.block_committer(), tuple(specs), 4, "skip", 1)
        with pytest.raises(ExtractionError) as info:
            list(_run_tasks(client, job, [(0,), (1,)], writer, progress=False))
    message = str(info.value)
    assert "NoneType" not in message and "dask cancelled it (status 'cancelled'): most often every worker" in message
    assert "cannot recompute scattered data" in message and message.endswith("rerun to resume (only missing "
                                                                             "blocks are extracted).")


def _fail_once_the_other_runs(job, blocks):
    distributed.Event("featcache-test-long-task-started").wait(timeout=30)
    raise RuntimeError(f"task for blocks {blocks} failed")


def _run_long(job, blocks):
    distributed.Event("featcache-test-long-task-started").set()
    time.sleep(4.0)
    raise RuntimeError("the long task should have been cancelled and left alone")


def _still_executing(dask_worker=None) -> list[str]:
    return [str(key) for key, task in dask_worker.state.tasks.items()
            if str(key).startswith("featcache-extract-") and task.state in ("executing", "cancelled", "resumed")]


def test_a_failed_run_returns_only_once_its_tasks_stopped_writing(client, manifest, tmp_path, monkeypatch):
    """dask cannot stop a task a worker executes: cancelled, it runs on and may commit a block. The driver
    released the output while such tasks still wrote into the parts folder, and a rerun's scan raced them (CI:
    FileNotFoundError on a temporary block file)."""
    submit = client.submit

    def first_fails_the_other_runs_long(function, job, blocks, **kwargs):
        return submit(_fail_once_the_other_runs if blocks[0] == 0 else _run_long, job, blocks, **kwargs)

    monkeypatch.setattr(client, "submit", first_fails_the_other_runs_long)
    specs = SPEC.build().layer_specs(PREPROCESS.input_size)
    with _open_writer(manifest, tmp_path / "x.h5", specs) as writer:
        job = WorkerJob(manifest, PREPROCESS, SPEC, writer.block_committer(), tuple(specs), 4, "skip", 1)
        with pytest.raises(ExtractionError, match="RuntimeError: task for blocks"):
            list(_run_tasks(client, job, [(0,), (1,)], writer, progress=False))
        assert all(keys == [] for keys in client.run(_still_executing).values())


def test_build_failure_on_worker_via_scheduler_address(client, manifest, tmp_path):
    spec = RunnerSpec("resnet18", str(tmp_path / "missing.pth"), ("default",), "avg")
    with pytest.raises(ExtractionError, match="Building resnet18.*missing.pth"):
        extract_distributed(manifest, spec, PREPROCESS, tmp_path / "out.h5", config=CONFIG,
                            scheduler_address=client.scheduler.address, progress=False)
    assert not (tmp_path / "out.h5").exists()


def test_connecting_retries_dasks_handshake_race_only(monkeypatch, caplog):
    """distributed's Client asserts its first read holds one message; a busy scheduler can batch two there."""
    calls: list[str] = []

    def flaky(failures: int, error: Exception):
        def make(address):
            calls.append(address)
            if len(calls) <= failures:
                raise error
            return f"client of {address}"
        return make

    monkeypatch.setattr(distributed, "Client", flaky(2, AssertionError()))
    with caplog.at_level("WARNING"):
        assert connect_client("tcp://h:1") == "client of tcp://h:1" and len(calls) == 3
    assert "client handshake failed" in caplog.text and "(3/3)" in caplog.text
    calls.clear()
    monkeypatch.setattr(distributed, "Client", flaky(3, AssertionError()))
    with pytest.raises(AssertionError):
        connect_client("tcp://h:1")
    assert len(calls) == CONNECT_TRIES
    calls.clear()
    monkeypatch.setattr(distributed, "Client", flaky(1, OSError("Timed out trying to connect")))
    with pytest.raises(ExtractionError, match="Timed out"):  # not the race: raised at once
        connect_client("tcp://h:1")
    assert len(calls) == 1


def test_a_scheduler_that_does_not_answer_is_named_with_what_to_do():
    """extract_run.scheduler: tcp://host:port with nothing there ended in distributed's traceback after 30 s
    ('OSError: Timed out trying to connect'): now one line (exit 2) naming the address, dask's reason and the fix."""
    import socket

    import dask

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        address = f"tcp://127.0.0.1:{probe.getsockname()[1]}"
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        with pytest.raises(ExtractionError) as info:
            connect_client(address)
    message = str(info.value)
    assert message.startswith(f"Cannot connect to the dask scheduler at extract_run.scheduler={address!r}: ")
    assert f"`dask worker {address}`" in message and "extract_run.scheduler: local" in message
    assert isinstance(info.value, UserError)


def test_own_local_cluster_is_closed_when_the_client_fails(monkeypatch):
    """A Client that cannot attach to our LocalCluster: the cluster's workers are closed, the error raised."""
    closed: list[str] = []

    class FakeCluster:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

        def close(self):
            closed.append("cluster")

    def failing_client(cluster):
        raise OSError("Timed out during handshake")

    monkeypatch.setattr(distributed, "LocalCluster", FakeCluster)
    monkeypatch.setattr(distributed, "Client", failing_client)
    with pytest.raises(OSError, match="handshake"):
        ClientHandle(None, None, n_workers=2, threads_per_worker=1)
    assert closed == ["cluster"]


def test_own_local_cluster(clean_manifest, tmp_path):
    """Without client/address a LocalCluster is started and closed again."""
    reference = _single(clean_manifest, tmp_path / "single.h5")
    report = extract_distributed(clean_manifest, SPEC, PREPROCESS, tmp_path / "dask.h5", config=CONFIG, attrs=ATTRS,
                                 block_rows=4, batch_size=4, n_workers=1, progress=False)
    _assert_same_bytes(report.path, reference.path)


def test_invalid_arguments(manifest, tmp_path):
    with pytest.raises(ValueError, match="on_error"):
        extract_distributed(manifest, SPEC, PREPROCESS, tmp_path / "o.h5", config=CONFIG, on_error="ignore")
    with pytest.raises(ValueError, match="block_rows"):
        extract_distributed(manifest, SPEC, PREPROCESS, tmp_path / "o.h5", config=CONFIG, block_rows=0)
    with pytest.raises(TypeError, match="RunnerSpec"):
        extract_distributed(manifest, SPEC.build(), PREPROCESS, tmp_path / "o.h5", config=CONFIG)


def test_driver_refuses_a_block_the_worker_did_not_write_here(manifest, tmp_path):
    """A worker that committed into another folder (no shared file system): a clear error, nothing adopted."""
    with _open_writer(manifest, tmp_path / "x.h5") as writer:
        with pytest.raises(ExtractionError, match="worker-7.*block 1.*missing.*same absolute path"):
            _adopt_blocks(writer, [1], "worker-7")
        assert writer.pending_blocks() == list(range(writer.n_blocks))


# ------------------------------------------------------------ backends, GPUs
ONNX_SPEC = RunnerSpec(backend="onnx", backbone="resnet18", weights="random", layers=("default", "layer3"),
                       pooling="avg")


@pytest.mark.slow  # each worker exports the model to ONNX: minutes on a shared 2-core machine
def test_onnx_workers_are_byte_identical_to_a_single_onnx_process(client, clean_manifest, tmp_path):
    """The dask path runs onnxruntime too (the CPU's auto pick): same bytes as one process, same threads."""
    from featcache.extract.plan import build_runner, plan_extraction
    from featcache.extract.zoo.weights import load_backbone

    loaded = load_backbone("resnet18", "random")
    runner, _ = build_runner(loaded, ["default", "layer3"], plan_extraction(device="cpu", backend="onnx"),
                             input_size=PREPROCESS.input_size, intra_op_threads=1)
    attrs = {**ATTRS, "backend": "onnx", "provider": "CPUExecutionProvider"}
    reference = extract_to_store(clean_manifest, runner, PREPROCESS, tmp_path / "single.h5", config=CONFIG,
                                 attrs=attrs, block_rows=4, batch_size=4, plan=CPU_PLAN, progress=False)
    report = extract_distributed(clean_manifest, ONNX_SPEC, PREPROCESS, tmp_path / "dask.h5", config=CONFIG,
                                 attrs=attrs, block_rows=4, batch_size=4, client=client, progress=False)
    _assert_same_bytes(report.path, reference.path)
    torch_store = _single(clean_manifest, tmp_path / "torch.h5")
    assert md5(torch_store.path) != md5(report.path)  # it really ran another runtime


def test_worker_device_pins_one_gpu_per_worker(monkeypatch, caplog):
    from featcache.extract.runner_spec import local_workers, worker_device

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert [worker_device("cuda", name) for name in (0, 1, 5, "3")] == ["cuda:0", "cuda:1", "cuda:1", "cuda:3"]
    assert worker_device("cuda:2", 0) == "cuda:2" and worker_device("cpu", 1) == "cpu"
    assert worker_device("cuda", "tcp://10.0.0.5:4000") == "cuda"
    assert "CUDA_VISIBLE_DEVICES" in caplog.text
    assert worker_device("cuda") == "cuda"  # not on a dask worker
    assert (local_workers("auto", "cuda"), local_workers("auto", "cpu"), local_workers(3, "cuda")) == (4, 2, 3)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert worker_device("cuda", 3) == "cuda"


def test_dask_scheduler_accepts_every_backend():
    from featcache.pipeline.config import parse_params

    for backend in ("auto", "onnx", "torch"):
        assert parse_params({"extract": {"scheduler": "local", "backend": backend}}).extract.backend == backend
    with pytest.raises(ValueError, match="backend"):
        RunnerSpec("resnet18", "random", ("default",), "avg", backend="tensorrt")


def test_workers_running_another_onnx_export_are_refused():
    """Two exports may give other features: a worker whose onnx_sha256 differs from the store's stops the run."""
    _check_onnx_sha256("a" * 64, "a" * 64, "worker-1")
    with pytest.raises(ExtractionError, match="worker-2 runs the ONNX export bbbbbbbbbbbb.*records aaaaaaaaaaaa"):
        _check_onnx_sha256("a" * 64, "b" * 64, "worker-2")


@pytest.fixture(scope="module")
def jpeg_manifest(tmp_path_factory):
    """12 JPEGs of varied sizes (one with EXIF orientation 6), a PNG (the CPU path) and a corrupt JPEG."""
    root = tmp_path_factory.mktemp("jpegs")
    rng = np.random.default_rng(2)
    for channel, name in enumerate(CLASSES):
        (root / name).mkdir()
        for index in range(4):
            height, width = rng.integers(50, 120, size=2)
            pixels = rng.integers(0, 100, size=(height, width, 3))
            pixels[..., channel] += 150
            image = Image.fromarray(pixels.astype(np.uint8))
            exif = Image.Exif()
            if index == 1:
                exif[0x0112] = 6  # rotated: the device path turns it upright like PIL's exif_transpose
            image.save(root / name / f"{index:03d}.jpg", quality=90, exif=exif)
    Image.fromarray(rng.integers(0, 255, size=(60, 70, 3)).astype(np.uint8)).save(root / "ant" / "png.png")
    good = (root / "bee" / "000.jpg").read_bytes()
    (root / "bee" / "corrupt.jpg").write_bytes(good[:200])  # the header probes fine; decoding fails everywhere
    return from_folder(root, {"train": 0.6, "val": 0.2, "test": 0.2}, seed=0)


def test_device_decode_workers_write_the_single_device_process_file(client, jpeg_manifest, tmp_path, caplog):
    """``loader="device"`` (``extract.decode: gpu``): each worker decodes its JPEGs in batches on its runner's
    device, reading with a thread pool (a dask worker cannot start loader processes); here that device is
    the CPU. Same bytes as one process with the device loader, another file than PIL's, and the driver logs
    the workers' summed decode counts."""
    device_plan = plan_extraction(device="cpu", backend="torch", decode="gpu", num_workers=0)
    reference = extract_to_store(jpeg_manifest, SPEC.build(), PREPROCESS, tmp_path / "single.h5", config=CONFIG,
                                 attrs=ATTRS, block_rows=4, batch_size=4, plan=device_plan, progress=False)
    with caplog.at_level("INFO", logger="featcache.extract.distributed"):
        report = _distributed(jpeg_manifest, tmp_path / "dask.h5", client, loader="device", read_threads=2)
    inline = _distributed(jpeg_manifest, tmp_path / "inline.h5", client, loader="device", read_threads=0)
    _assert_same_bytes(inline.path, reference.path)  # extract_run.num_workers: 0 reads in the task's thread
    _assert_same_bytes(report.path, reference.path)
    assert report.n_skipped == 1 and report.errors == reference.errors and "corrupt" in report.errors[0][0]
    assert re.search(r"device decode \([12] dask workers\): 12 rows on the device, 2 on the CPU path "
                     r"\(\d+ rejected by the device decoder\), 1 bad", caplog.text), caplog.text
    assert (reference.decode_stats.device, reference.decode_stats.bad) == (12, 1)
    assert report.decode_stats == reference.decode_stats  # the report sums the workers' counts
    pil = _distributed(jpeg_manifest, tmp_path / "pil.h5", client)
    assert md5(pil.path) != md5(report.path)  # the default worker decode is PIL's, another file
    assert pil.decode_stats is None


def test_device_loader_arguments_are_checked(manifest, tmp_path):
    with pytest.raises(ValueError, match=r"loader 'nvjpeg' is not one of 'arrays', 'torch', 'device'"):
        extract_distributed(manifest, SPEC, PREPROCESS, tmp_path / "x.h5", config=CONFIG, loader="nvjpeg")
    with pytest.raises(ValueError, match="read_threads must be an integer >= 0 or None, got -1"):
        extract_distributed(manifest, SPEC, PREPROCESS, tmp_path / "x.h5", config=CONFIG, loader="device",
                            read_threads=-1)


def test_a_task_whose_blocks_are_committed_extracts_nothing(manifest, tmp_path, monkeypatch):
    """dask recomputes the finished tasks whose results a killed worker held: their blocks are on disk already,
    so the recomputed task must not extract them again (nor build a runner)."""
    import featcache.extract.dask_tasks as dask_tasks

    specs = SPEC.build().layer_specs(PREPROCESS.input_size)
    with _open_writer(manifest, tmp_path / "x.h5", specs) as writer:
        rows = np.arange(4, 8)
        writer.commit_block(1, rows, {s.alias: np.zeros((4, s.dim), np.float32) for s in specs})
        job = WorkerJob(manifest, PREPROCESS, SPEC, writer.block_committer(), tuple(specs), 4, "skip", 1)

        def no_work(*args, **kwargs):
            raise AssertionError("a committed block was extracted again")

        monkeypatch.setattr(dask_tasks, "_build", no_work)
        monkeypatch.setattr(dask_tasks, "run_blocks", no_work)
        result = dask_tasks.extract_task(job, (1,))
        assert result.blocks == (1,) and result.n_rows == 4 and result.errors == []
        with pytest.raises(AssertionError, match="extracted again"):  # block 2 is not committed: it is extracted
            dask_tasks.extract_task(job, (1, 2))
