"""The ONNX export's self-description: enough to preprocess an image without featcache."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from featcache.extract.decode.preprocess import Preprocessor
from featcache.extract.zoo.registry import get_backbone
from featcache.finetune.config import FinetuneConfig
from featcache.finetune.export import model_description


def _described(resize_mode: str) -> dict:
    run = SimpleNamespace(spec=get_backbone("efficientnet_lite0"), weights_id="random:seed=0", classes=["a", "b"],
                          config=FinetuneConfig(mode="frozen", input_size=32, resize_mode=resize_mode))
    return model_description(run, "classification", 32)  # type: ignore[arg-type]


def _as_the_steps_say(image: Image.Image, preprocess: dict) -> np.ndarray:
    """An outside implementation of the crop-mode steps, from the description's words and values only."""
    size = preprocess["input_size"]
    width, height = image.size
    target = size if min(width, height) < size else preprocess["resize_size"]
    long = int(target * max(width, height) / min(width, height))
    new = (target, long) if width <= height else (long, target)
    filters = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}
    image = image.resize(new, filters[preprocess["interpolation"]])
    top, left = round((new[1] - size) / 2), round((new[0] - size) / 2)
    pixels = np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.float32) / 255
    mean, std = np.asarray(preprocess["mean"], np.float32), np.asarray(preprocess["std"], np.float32)
    return ((pixels - mean) / std).transpose(2, 0, 1)


@pytest.mark.parametrize("shape", [(8, 8), (28, 20), (300, 200)])
def test_the_described_preprocessing_is_the_one_the_model_was_trained_with(shape: tuple[int, int]):
    # An 8x8 digit goes to 32 (input_size), not to resize_size (37) then a crop that cuts its strokes off:
    # the description said only "resize, crop", so an outside implementation fed the model other pixels.
    described = _described("crop")
    steps = " ".join(described["preprocess_steps"])
    assert "`input_size` when the image's shorter side is below `input_size`" in steps
    assert "round((height - input_size) / 2)" in steps and "int(target * long / short)" in steps
    assert "preprocess_steps" in described["input"]["meaning"]
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, size=(*shape, 3), dtype=np.uint8))
    ours = Preprocessor.from_config(described["preprocess"])(image).numpy()
    np.testing.assert_allclose(_as_the_steps_say(image, described["preprocess"]), ours, atol=1e-6)


def test_squash_is_described_as_a_plain_resize():
    steps = _described("squash")["preprocess_steps"]
    assert any("resize to `input_size` x `input_size`" in step for step in steps)
    assert not any("center crop" in step for step in steps)
