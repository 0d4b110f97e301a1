"""GraphedRunner: the forward replayed from a CUDA graph gives the eager forward's features (padded batches too)."""

from __future__ import annotations

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


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("autocast", [None, "fp16"])
def test_replays_give_the_eager_features_full_padded_and_oversized(random_backbone, monkeypatch, autocast):
    """Each replay reads the new input (a stale static input or output would repeat the first batch's
    features); a padded batch keeps only its rows; a batch above the captured size runs eagerly."""
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
        for name in want:
            assert got[name].shape == want[name].shape == (rows, want[name].shape[1])
            torch.testing.assert_close(got[name], want[name], rtol=tolerance, atol=tolerance)
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
