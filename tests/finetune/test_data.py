"""Fine-tune data path: bad images are reported (id + reason), bugs raise, and training learns."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from _support.files import write_colour_folder
from featcache.extract.decode.preprocess import Preprocessor
from featcache.extract.inputs.manifest import Manifest
from featcache.extract.inputs.sources import from_folder
from featcache.extract.zoo.registry import get_backbone
from featcache.finetune import data as ft_data
from featcache.finetune.config import FinetuneConfig
from featcache.finetune.run import BAD_IMAGES_NAME, finetune

LITE = "efficientnet_lite0"
SIZE = 32


def _config(**overrides: Any) -> FinetuneConfig:
    values: dict[str, Any] = {"mode": "frozen", "epochs": 2, "batch_size": 8, "lr": 0.01, "input_size": SIZE,
                              "random_resized_crop": False, "hflip": False, "patience": 0, "n_boot": 0,
                              "progress": False, "num_threads": 1, "tta": False}
    values.update(overrides)
    return FinetuneConfig(**values)


@pytest.fixture(scope="module")
def manifest_with_bad_images(tmp_path_factory: pytest.TempPathFactory) -> Manifest:
    root = write_colour_folder(tmp_path_factory.mktemp("bad"), per_class=6)
    manifest = from_folder(root, {"train": 0.5, "val": 0.25, "test": 0.25}, seed=0)
    # Corrupt one train and one test image after the manifest was built (as a disk error would).
    for split in (0, 2):
        row = int(np.flatnonzero(manifest.splits == split)[0])
        Path(manifest.absolute_path(row)).write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    return manifest


def test_unreadable_images_are_reported_by_id_and_reason(manifest_with_bad_images: Manifest, tmp_path: Path):
    manifest = manifest_with_bad_images
    bad_rows = [int(np.flatnonzero(manifest.splits == split)[0]) for split in (0, 2)]
    result = finetune(manifest, LITE, "pretrained", _config(), out_dir=tmp_path)
    expected_ids = sorted(manifest.ids[row] for row in bad_rows)
    assert [item["id"] for item in result.bad_images] == expected_ids
    assert all(item["reason"] and "Traceback" not in item["reason"] for item in result.bad_images)
    assert result.metrics["n_bad_images"] == 2
    assert bad_rows[1] not in set(result.test_rows.tolist())
    assert len(result.test_rows) == int((manifest.splits == 2).sum()) - 1
    saved = json.loads((tmp_path / BAD_IMAGES_NAME).read_text())
    assert saved == {"n_bad_images": 2, "bad_images": result.bad_images}


def test_a_bug_in_augmentation_raises_instead_of_passing_as_a_bad_image(manifest_with_bad_images: Manifest,
                                                                        monkeypatch: pytest.MonkeyPatch):
    def broken(self: ft_data.TrainTransform, view: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("augmentation bug")

    monkeypatch.setattr(ft_data.TrainTransform, "__call__", broken)
    with pytest.raises(RuntimeError, match="augmentation bug"):
        finetune(manifest_with_bad_images, LITE, "pretrained", _config(random_resized_crop=True))


def test_a_bug_in_preprocessing_raises_instead_of_passing_as_a_bad_image(manifest_with_bad_images: Manifest,
                                                                         monkeypatch: pytest.MonkeyPatch):
    def broken(self: Preprocessor, image: Image.Image) -> np.ndarray:
        raise RuntimeError("preprocessing bug")

    monkeypatch.setattr(Preprocessor, "pixels_array", broken)  # what the loaders' workers call
    with pytest.raises(RuntimeError, match="preprocessing bug"):
        finetune(manifest_with_bad_images, LITE, "pretrained", _config())


def test_train_view_is_the_test_view_without_augmentation():
    pre = Preprocessor.from_spec(get_backbone(LITE), input_size=SIZE)
    view = torch.randint(0, 256, (3, SIZE, SIZE), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(ft_data.TrainTransform(pre, False, (0.5, 1.0), False)(view), view)
    flipped = ft_data.TrainTransform(pre, False, (0.5, 1.0), True)
    torch.manual_seed(0)
    outs = [flipped(view) for _ in range(16)]
    assert any(torch.equal(o, view) for o in outs) and any(torch.equal(o, view.flip(2)) for o in outs)
    cropped = ft_data.TrainTransform(pre, True, (0.3, 0.5), False)(view)
    assert cropped.shape == view.shape and cropped.dtype == torch.uint8 and not torch.equal(cropped, view)


def test_frozen_finetuning_scores_clearly_above_chance(tmp_path: Path):
    """3 colour classes (chance 1/3) and 12 test images: 9 or more right has p < 0.004 by luck."""
    root = write_colour_folder(tmp_path / "colours", per_class=10, seed=3)
    manifest = from_folder(root, {"train": 0.5, "val": 0.1, "test": 0.4}, seed=0)
    assert int((manifest.splits == 2).sum()) == 12
    result = finetune(manifest, LITE, "pretrained", _config(epochs=12, batch_size=15, lr=0.05))
    assert result.metrics["accuracy"] >= 0.75, result.metrics["accuracy"]
    assert result.metrics["n_bad_images"] == 0 and result.bad_images == []
