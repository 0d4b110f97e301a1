"""GraphedRunner: the forward replayed from a CUDA graph gives the eager forward's features (padded batches too)."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from featcache.extract.runners.graphs import GraphedRunner
from featcache.extract.runners.torch_runner import TorchFeatureExtractor

LAYERS = ["default", "layer3"]
SIZE = 64
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _eager(random_backbone, device: str, autocast: str | None = None) -> TorchFeatureExtractor:
    loaded = random_backbone("resnet18")
    return TorchFeatureExtractor(loaded.model, loaded.spec, LAYERS, pooling="avg", device=device, autocast=autocast)


def _batch(rows: int, seed: int, device: str = "cpu") -> torch.Tensor:
    return torch.randn(rows, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed)).to(device)


def test_on_the_cpu_it_is_the_eager_runner(random_backbone):
    eager = _eager(random_backbone, "cpu")
    graphed = GraphedRunner(eager, batch_size=4, input_size=SIZE)
    assert not graphed.graphed and graphed.input_device == torch.device("cpu")
    assert graphed.layer_specs(SIZE) == eager.layer_specs(SIZE)
    assert graphed.spec is eager.spec and graphed.pooling == "avg"  # the eager runner's attributes
    batch = _batch(3, 0)
    for name, value in graphed(batch).items():
        np.testing.assert_array_equal(value, eager(batch)[name])
    with pytest.raises(ValueError, match="batch_size and input_size must be >= 1, got 0"):
        GraphedRunner(eager, batch_size=0, input_size=SIZE)


class _FakeCuda:
    """The ``torch.cuda`` calls of a capture, on the CPU: which stream is current, and a capture that fails as
    torch 2.11's ``torch.cuda.graph`` does when ``capture_end`` raises (before it restores the caller's stream)."""

    def __init__(self) -> None:
        self.current = "caller"

    def _stream(self, name: str) -> SimpleNamespace:
        return SimpleNamespace(name=name, wait_stream=lambda other: None)

    def Stream(self, device=None) -> SimpleNamespace:
        return self._stream("side")

    def current_stream(self, device=None) -> SimpleNamespace:
        return self._stream(self.current)

    def set_stream(self, stream) -> None:
        self.current = stream.name

    @contextlib.contextmanager
    def stream(self, stream):
        previous, self.current = self.current, stream.name
        yield
        self.current = previous

    def CUDAGraph(self) -> object:
        return object()

    def graph(self, graph):
        cuda = self

        class Capture:
            def __enter__(self) -> None:
                cuda.current = "capture"

            def __exit__(self, *exc) -> None:
                raise RuntimeError("CUDA error: operation failed due to a previous error during capture")

        return Capture()

    def synchronize(self, device=None) -> None:
        pass


def test_a_failed_capture_runs_eagerly_on_the_callers_stream(monkeypatch):
    """A failed capture falls back to the eager forward, with the caller's stream current again."""
    from featcache.extract.runners import graphs

    cuda = _FakeCuda()

    def zeros(shape, dtype, device):  # the static input, on the CPU
        return torch.zeros(shape, dtype=dtype)

    fake_torch = SimpleNamespace(cuda=cuda, inference_mode=torch.inference_mode, float32=torch.float32,
                                 device=torch.device, zeros=zeros)
    monkeypatch.setattr(graphs, "torch", fake_torch)
    runner = SimpleNamespace(input_device="cuda", forward_pooled=lambda batch: {"pool": batch.mean(dim=(2, 3))})
    graphed = GraphedRunner(runner, batch_size=4, input_size=SIZE)
    assert not graphed.graphed and cuda.current == "caller"
    assert graphed.forward_pooled(torch.ones(2, 3, SIZE, SIZE))["pool"].shape == (2, 3)  # the eager forward


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("autocast", [None, "fp16"])
def test_replays_give_the_eager_features_full_padded_and_oversized(random_backbone, monkeypatch, autocast):
    """Each replay reads the new input (a stale static input or output would repeat the first batch's
    features); a padded batch keeps only its rows; a batch above the captured size runs eagerly.

    The replay is held tightly to what it computes, the eager forward of the batch padded to the captured
    size; against the eager forward of the rows alone only loosely: cuDNN may choose other kernels for fewer
    rows, and float32 convolutions run in TF32 by default (``torch.backends.cudnn.allow_tf32``), so their
    sums differ beyond 1e-5. A padding row mixed into the others would differ far more."""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    eager = _eager(random_backbone, "cuda", autocast)
    graphed = GraphedRunner(eager, batch_size=8, input_size=SIZE)
    assert graphed.graphed
    tolerance = 1e-5 if autocast is None else 2e-2
    first = None
    for rows, seed in ((8, 0), (8, 1), (5, 2), (1, 3), (12, 4)):
        batch = _batch(rows, seed, "cuda")
        got = {name: value.cpu() for name, value in graphed.forward_pooled(batch).items()}
        want = {name: value.cpu() for name, value in eager.forward_pooled(batch).items()}
        padded = torch.cat([batch, batch.new_zeros(8 - rows, 3, SIZE, SIZE)]) if rows < 8 else batch
        same = {name: value[:rows].cpu() for name, value in eager.forward_pooled(padded).items()}
        for name in want:
            assert got[name].shape == want[name].shape == (rows, want[name].shape[1])
            torch.testing.assert_close(got[name], same[name], rtol=tolerance, atol=tolerance)
            torch.testing.assert_close(got[name], want[name], rtol=2e-2, atol=2e-2)
        if first is None:
            first = got
        else:
            assert not torch.equal(got["layer3"][:1], first["layer3"][:1])


@pytest.mark.gpu
@needs_cuda
def test_extraction_with_the_graphed_runner(random_backbone, tmp_path):
    """Through the engine's overlapped CUDA loop (copy-out on a side stream after each replay): every row, and
    the eager store's features."""
    from PIL import Image

    from _support.similarity import row_cosines
    from featcache.extract.decode.preprocess import Preprocessor
    from featcache.extract.engine import extract_to_store
    from featcache.extract.inputs.sources import from_folder
    from featcache.extract.plan import plan_extraction
    from featcache.store import FeatureStore

    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (tmp_path / "images" / name).mkdir(parents=True)
        for index in range(21):
            pixels = rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "images" / name / f"{index:03d}.jpg", quality=90)
    manifest = from_folder(tmp_path / "images", {"train": 0.6, "val": 0.2, "test": 0.2}, seed=0)
    eager = _eager(random_backbone, "cuda", "fp16")
    preprocess = Preprocessor(SIZE, 73, "bilinear", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    plan = plan_extraction(device="cuda", backend="torch", decode="gpu", autocast="fp16", num_workers=2)
    stores = {}
    for label, runner in (("eager", eager), ("graphed", GraphedRunner(eager, batch_size=8, input_size=SIZE))):
        report = extract_to_store(manifest, runner, preprocess, tmp_path / f"{label}.h5", plan=plan, batch_size=8,
                                  block_rows=16, progress=False, config={"test": label}, dtype="float32")
        assert report.n_written == 42 and report.decode_stats.device == 42  # 42 rows: the last batch is padded
        stores[label] = FeatureStore(report.path)
    for layer in stores["eager"].layers:
        cosines = row_cosines(stores["graphed"].read(layer), stores["eager"].read(layer))
        assert cosines.min() > 0.9999, (layer, cosines.min())
