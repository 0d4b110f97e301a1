"""Features of some images as numpy arrays, in one call: the extract stage without a project.

For a notebook or a script that wants a backbone's layers for a few hundred images, not a DVC pipeline::

    from featcache.pipeline import extract_features
    result = extract_features("photos/", "resnet50", ["pool5", "res4"])
    result.features["pool5"]      # (N, 2048) float32, one row per image of result.paths
    result.errors                 # [(path, reason)] of the images that could not be read

It runs the extract stage itself (:func:`featcache.pipeline.extract`: the same plan and runtime, ``backend: auto``
picking the fastest one here, the same preprocessing, ONNX export cache, bad-image handling) into a store in a
temporary folder, and reads the store back: the arrays are the rows a pipeline's store holds for those images,
bit for bit (with ``dtype="float16"``, the pipeline's default storage, as well). Every ``extract`` and
``extract_run`` setting is a keyword, checked as strictly as in ``params.yaml`` (a mistyped one fails naming the
close match). For data that does not fit in memory, or to train heads on, use the pipeline and its store.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from featcache.errors import UserError

__all__ = ["ArraysError", "ImageFeatures", "extract_features"]

logger = logging.getLogger(__name__)


class ArraysError(UserError, ValueError):
    """Bad input to :func:`extract_features`: no images, a missing path, a backbone named twice."""


@dataclasses.dataclass(frozen=True)
class ImageFeatures:
    """What :func:`extract_features` returns.

    Attributes
    ----------
    paths : list of str
        (N,) the images that gave features, in the order they were given (a folder's images: sorted): resolved
        local paths, URLs as given, ``<image i>`` for the i-th input given in memory.
    features : dict of str to numpy.ndarray
        Per requested layer, (N, D) float32 features, row i of ``paths[i]``.
    errors : list of (str, str)
        The images that could not be read, with the reason (``on_error="skip"``, the default).
    attrs : dict
        The store's root attributes: backbone, weights id and sha256, backend, provider, precision...
    config : dict
        The extraction config the store recorded (the params that change the features, the preprocessing).
    """

    paths: list[str]
    features: dict[str, np.ndarray]
    errors: list[tuple[str, str]]
    attrs: dict[str, Any]
    config: dict[str, Any]


def _backbone_entry(backbone: str) -> tuple[str, str | None]:
    """The ``backbones`` key and ``model`` of ``backbone``: a registry name, or ``timm/<model>[.<tag>]``."""
    if backbone.startswith("timm/"):
        return backbone.split("/", 1)[1].replace(".", "_") or "timm", backbone
    return backbone, None


def _in_memory(item: Any) -> Any:
    """``item`` as a PIL image when it is one or an image array ((H, W) or (H, W, 3|4) uint8), else None."""
    from PIL import Image

    if isinstance(item, Image.Image):
        return item
    if isinstance(item, np.ndarray):
        if item.dtype != np.uint8 or not (item.ndim == 2 or (item.ndim == 3 and item.shape[2] in (3, 4))):
            raise ArraysError(f"An image array must be uint8 (H, W), (H, W, 3) RGB or (H, W, 4) RGBA; got "
                              f"{item.dtype} {item.shape}. Hint: np.clip(x * 255, 0, 255).astype(np.uint8) for "
                              "floats in [0, 1], x.transpose(1, 2, 0) for (3, H, W).")
        return Image.fromarray(item)
    return None


def _sources(inputs: Sequence[Any], folder: Path) -> tuple[list[str], list[str]]:
    """The manifest paths of ``inputs`` and the names the result gives them, both in input order.

    Local files, folders and patterns: their resolved paths (both); URLs as given (both); an image in memory
    (PIL, or a uint8 array): a lossless PNG written in ``folder`` (decoded back to the same pixels), named
    ``<image i>`` by its index in ``inputs``.
    """
    from featcache.extract.inputs.storage import is_url
    from featcache.pipeline.image_inputs import image_paths

    paths: list[str] = []
    names: list[str] = []
    for index, item in enumerate(inputs):
        image = _in_memory(item)
        if image is not None:
            path = folder / f"image-{index:09d}.png"
            image.save(path, format="PNG", compress_level=1)
            paths.append(str(path))
            names.append(f"<image {index}>")
        else:  # URLs as given (read as the pipeline reads a CSV's URLs: data.io), local paths resolved
            found = [path if is_url(path) else str(Path(path).resolve()) for path in image_paths([item], ArraysError)]
            paths += found
            names += found
    if len(set(paths)) != len(paths):
        repeated = sorted({path for path in paths if paths.count(path) > 1})
        raise ArraysError(f"Images given more than once: {repeated[:3]}. Hint: name each image once (a folder "
                          "and a file inside it name that file twice).")
    return paths, names


def extract_features(images: Any, backbone: str,
                     layers: Sequence[str] | None = None, *, weights: str = "pretrained", pooling: str | None = None,
                     dtype: str = "float32", progress: bool = False, **settings: Any) -> ImageFeatures:
    """Extract ``layers`` of ``backbone`` for ``images`` and return them as arrays.

    Parameters
    ----------
    images : str, Path, PIL image, array, or a sequence of them
        Image files, folders (searched recursively for images; hidden files skipped), glob patterns, URLs
        (``http(s)://``, ``s3://``...: read as the pipeline reads a CSV's URLs, with ``data.io``'s defaults), or
        images in memory: PIL images and uint8 arrays (H, W), (H, W, 3) RGB or (H, W, 4) RGBA (or a batch of them,
        (N, H, W[, C])), decoded as the same pixels in a PNG file would be (alpha composited as the pipeline does).
    backbone : str
        A registry name (``featcache backbones``) or a timm model, ``timm/<model>[.<pretrained tag>]``.
    layers : sequence of str, optional
        Layer aliases or graph nodes (``featcache layers <backbone>``); default: the backbone's default layer.
    weights : str
        ``pretrained``, ``random`` or the path of a state dict, as ``backbones.<name>.weights``.
    pooling : str, optional
        As ``backbones.<name>.pooling`` (``avg``, ``max``, ``avg2x2``, ``none``, ``cls``); default
        ``extract.pooling``'s (``avg``).
    dtype : {"float32", "float16"}
        The store's dtype (``extract.dtype``); the arrays are float32 either way, float16-rounded with
        ``float16`` as a pipeline's store holds them.
    progress : bool
        Log a line per block (and a bar on a terminal), as ``featcache extract`` does.
    **settings
        Any other ``extract`` or ``extract_run`` setting of ``params.yaml`` (``backend="onnx"``,
        ``batch_size=128``, ``device="cuda"``, ``on_error="fail"``, ``precision="int8"``...).

    Returns
    -------
    ImageFeatures
        ``features[layer]`` (N, D) float32 for the N readable images, ``paths`` their paths, ``errors`` the others.

    Raises
    ------
    ArraysError
        For a missing path, or inputs with no image.
    ConfigError
        For an unknown backbone, layer or setting (naming the close match) or a bad value, before any work.
    ExtractionError
        When every image, or more than ``max_bad_fraction`` of them, cannot be read (or any, with
        ``on_error="fail"``), naming them.
    """
    from featcache.extract.inputs.manifest import Manifest
    from featcache.pipeline.config import parse_params
    from featcache.pipeline.extract import extract
    from featcache.store.reader import FeatureStore

    if isinstance(images, np.ndarray):  # one image, or a batch (N, H, W[, C]) of them
        inputs = list(images) if images.ndim == 4 or (images.ndim == 3 and images.shape[2] not in (3, 4)) \
            else [images]
    else:
        inputs = [images] if isinstance(images, (str, Path)) or _in_memory(images) is not None else list(images)
    key, model = _backbone_entry(backbone)
    entry: dict[str, Any] = {"weights": weights, "layers": list(layers) if layers else ["default"]}
    if model is not None:
        entry["model"] = model
    if pooling is not None:
        entry["pooling"] = pooling
    params = parse_params({"data": {"name": "images"}, "extract": {"dtype": dtype, **settings},
                           "backbones": {key: entry}, "features": []})
    with tempfile.TemporaryDirectory(prefix="featcache-arrays-") as folder:
        paths, names = _sources(inputs, Path(folder))
        ids = [f"{row:09d}" for row in range(len(paths))]  # sorted, unique; row order = the order given
        manifest = Manifest(ids, paths, np.zeros(len(paths), dtype=np.uint8),
                            labels=np.zeros(len(paths), np.int64), classes=["image"])
        manifest_path = manifest.write(Path(folder) / "manifest.csv")
        report = extract(params, key, manifest_path, Path(folder) / "features.h5", progress=progress)
        with FeatureStore(report.path) as store:
            features = {name: store.read(name) for name in store.layers}
            rows = [int(row) for row in store.ids()]
            errors = [(names[int(row)], reason) for row, reason in store.errors()]
            attrs, config = dict(store.attrs), dict(store.config)
    if errors:
        logger.warning("%d of %d images could not be read and have no features (ImageFeatures.errors), e.g. %s: %s",
                       len(errors), len(names), *errors[0])
    return ImageFeatures([names[row] for row in rows], features, errors, attrs, config)
