"""Batched JPEG decoding, resizing and cropping on the runner's device.

On a GPU the input pipeline is the product: PIL decoding in a few workers
feeds 1,000-1,500 img/s while the forward pass takes 10,000-20,000. Here the
workers only read file bytes and probe headers (:mod:`featcache.extract.image_probe`);
JPEGs are decoded in batches on the device (TorchCodec's ``decode_jpeg`` when
it is installed, else torchvision's), turned upright (EXIF orientation), then
resized and center-cropped in batches grouped by decoded size, with the
geometry of :class:`~featcache.extract.preprocess.Preprocessor` and
antialiasing (PIL's filters: ``interpolate(..., antialias=True)``).

Everything else takes the CPU path (PIL, exactly as
:class:`~featcache.extract.data.ImageDataset` decodes today) for that file
alone: non-JPEGs, CMYK/YCCK, truncated files, files over the
decompression-bomb limit, extreme aspect ratios, and any file the device
decoder rejects. One bad file never fails or drops the rest of its batch; a
file bad on both paths is reported with the CPU path's reason
(:func:`~featcache.extract.data.describe_error`).

The same code runs on the CPU device (torchvision decodes CPU tensors), which
is how the tests exercise it. Output batches follow the engine's contract:
``(rows int64 (B,), images uint8 (B, 3, S, S) on the device, reasons list[str])``,
bad rows zero-filled with a non-empty reason, rows in the order given.
Normalisation is the engine's job.
"""

from __future__ import annotations

import functools
import io
import logging
import os
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator, NamedTuple, Sequence

import torch
from torch.utils.data import DataLoader

from featcache.errors import UserError
from featcache.extract.data import ImageDataset, default_num_workers
from featcache.extract.image_probe import device_route, draft_scale, probe_header, resize_geometry
from featcache.extract.manifest import Manifest
from featcache.extract.preprocess import Preprocessor

__all__ = ["DeviceDecodeError", "DeviceDecoder", "select_decoder", "gpu_decode_status", "orient", "resize_crop",
           "DeviceDecodeDataset", "pack_items", "decode_items", "iter_device_batches"]

logger = logging.getLogger(__name__)

#: The DeprecationWarning torchvision >= 0.29 emits on every image-decoder call (silenced there only).
_TORCHVISION_DEPRECATION = r"The image decoding and encoding capabilities of TorchVision are deprecated"

#: Float pixels resized at once per size group (about 0.8 GB of float32): large photos go in smaller chunks.
_MAX_RESIZE_PIXELS = 64 * 2**20

#: Decoded pixels per device decode call (384 MB of uint8 RGB): a batch of large photos is decoded in parts,
#: each resized before the next is decoded. A batch of 256 JPEGs of 500x375 is one call.
_MAX_DECODE_PIXELS = 128 * 2**20

_MODES = {"bilinear": "bilinear", "bicubic": "bicubic", "nearest": "nearest-exact"}

Batch = tuple[torch.Tensor, torch.Tensor, list[str]]


class DeviceDecodeError(UserError, RuntimeError):
    """No batched JPEG decoder works on the requested device (the message says why and the fix)."""


@dataclass(frozen=True)
class DeviceDecoder:
    """A batched JPEG decoder bound to a device.

    Attributes
    ----------
    name : str
        ``torchcodec`` or ``torchvision``.
    device : str
        Where the decoded images live.
    decode : callable
        ``decode(list of 1-D uint8 CPU tensors) -> list of (3, H, W) uint8 tensors on device``;
        raises when any input is rejected.
    applies_exif : bool
        Whether the decoder already applies the EXIF orientation (checked on a test image).
    """

    name: str
    device: str
    decode: Callable[[list[torch.Tensor]], list[torch.Tensor]]
    applies_exif: bool


def _torchcodec(device: str) -> Callable[[list[torch.Tensor]], list[torch.Tensor]]:
    from torchcodec.decoders import decode_jpeg  # optional; imported only when used

    def decode(datas: list[torch.Tensor]) -> list[torch.Tensor]:
        out = decode_jpeg(datas, mode="RGB", device=device)
        return list(out) if isinstance(out, (list, tuple)) else [out]

    return decode


def _torchvision(device: str) -> Callable[[list[torch.Tensor]], list[torch.Tensor]]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_TORCHVISION_DEPRECATION, category=DeprecationWarning)
        from torchvision.io import ImageReadMode, decode_jpeg

    def decode(datas: list[torch.Tensor]) -> list[torch.Tensor]:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_TORCHVISION_DEPRECATION, category=DeprecationWarning)
            out = decode_jpeg(datas, mode=ImageReadMode.RGB, device=device)
        return list(out) if isinstance(out, (list, tuple)) else [out]

    return decode


def _probe_jpeg() -> torch.Tensor:
    """A 3x2 (width x height) JPEG whose EXIF orientation 6 makes it 2x3 upright."""
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    Image.new("RGB", (3, 2), (200, 30, 90)).save(buffer, "JPEG", exif=exif)
    return torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)


@functools.lru_cache(maxsize=None)
def select_decoder(device: str) -> DeviceDecoder:
    """The fastest working JPEG decoder for ``device``: TorchCodec, else torchvision.

    Each candidate decodes a tiny test JPEG on the device first, which also
    tells whether it applies the EXIF orientation itself.

    Raises
    ------
    DeviceDecodeError
        When no decoder works on ``device``; the message says why and how to fix it.
    """
    device = str(torch.device(device))
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceDecodeError(f"GPU decode on {device!r} needs a CUDA device, and torch {torch.__version__} "
                                "sees none. Hint: set extract.decode: cpu, or install a CUDA build of torch.")
    failures = []
    for name, build in (("torchcodec", _torchcodec), ("torchvision", _torchvision)):
        try:
            decode = build(device)
            shape = tuple(decode([_probe_jpeg()])[0].shape)
        except Exception as error:  # noqa: BLE001 - a missing or broken decoder is reported, the next one tried
            failures.append(f"{name}: {type(error).__name__}: {error}".replace("\n", " "))
            continue
        if shape in ((3, 2, 3), (3, 3, 2)):
            return DeviceDecoder(name, device, decode, applies_exif=shape == (3, 3, 2))
        failures.append(f"{name}: decoded a 3x2 test JPEG to shape {shape}")
    raise DeviceDecodeError(f"No JPEG decoder works on {device!r} ({'; '.join(failures)}). Hint: install "
                            "torchcodec (pip install torchcodec) or a torchvision built with image support, or set "
                            "extract.decode: cpu.")


def gpu_decode_status(device: str = "cuda") -> tuple[bool, str]:
    """Whether batched device JPEG decoding works on ``device``, and what runs or why not (for ``doctor``)."""
    try:
        decoder = select_decoder(device)
    except DeviceDecodeError as error:
        return False, str(error)
    text = f"{decoder.name}.decode_jpeg, batched on {decoder.device}"
    if decoder.name != "torchcodec":
        text += " (torchcodec not importable; `pip install torchcodec` gives the faster batched decoder)"
    return True, text


def orient(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """Apply an EXIF orientation to a (C, H, W) image, like :func:`PIL.ImageOps.exif_transpose`.

    Orientations 5-8 swap height and width; 1 and unknown values leave the image as stored.
    """
    if orientation == 2:
        return image.flip(-1)
    if orientation == 3:
        return image.flip(-2, -1)
    if orientation == 4:
        return image.flip(-2)
    if orientation == 5:
        return image.transpose(-2, -1)
    if orientation == 6:
        return torch.rot90(image, -1, (-2, -1))
    if orientation == 7:
        return image.transpose(-2, -1).flip(-2, -1)
    if orientation == 8:
        return torch.rot90(image, 1, (-2, -1))
    return image


def resize_crop(images: torch.Tensor, preprocess: Preprocessor) -> torch.Tensor:
    """Resize and center-crop same-size images like :class:`Preprocessor`, antialiased, on their device.

    Parameters
    ----------
    images : torch.Tensor
        uint8 (N, 3, H, W).
    preprocess : Preprocessor
        Geometry (``input_size``, ``resize_size``, ``resize_mode``) and ``interpolation``.

    Returns
    -------
    torch.Tensor
        uint8 (N, 3, S, S) on the same device.
    """
    height, width = images.shape[-2:]
    (new_h, new_w), (top, left) = resize_geometry(width, height, preprocess)
    size = preprocess.input_size
    if (new_h, new_w) == (height, width):  # torchvision returns the image unchanged
        return images[..., top:top + size, left:left + size].contiguous()
    mode = _MODES[preprocess.interpolation]
    out = []
    chunk = max(1, _MAX_RESIZE_PIXELS // (height * width))
    for start in range(0, images.shape[0], chunk):
        block = images[start:start + chunk].to(torch.float32)
        block = torch.nn.functional.interpolate(block, size=(new_h, new_w), mode=mode,
                                                antialias=mode != "nearest-exact")
        block = block[..., top:top + size, left:left + size]
        out.append(block.round_().clamp_(0, 255).to(torch.uint8))
    return torch.cat(out) if len(out) > 1 else out[0]


class _Item(NamedTuple):
    """One row from a worker: JPEG bytes for the device, or the CPU path's uint8 crop or reason."""

    row: int
    data: bytes | torch.Tensor | None  # the file's bytes (device path); a 1-D uint8 view once packed
    size: tuple[int, int]  # stored (height, width) from the header (device path)
    orientation: int
    crop: torch.Tensor | None  # uint8 (3, S, S) (CPU path, good file)
    reason: str  # CPU path, bad file


def _as_uint8(tensor: torch.Tensor, preprocess: Preprocessor) -> torch.Tensor:
    """The CPU path's (3, S, S) output as uint8 (undoes its normalisation when it returns float)."""
    if tensor.dtype == torch.uint8:
        return tensor
    mean = torch.tensor(preprocess.mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(preprocess.std, dtype=torch.float32).view(3, 1, 1)
    return (tensor * std + mean).mul_(255.0).round_().clamp_(0, 255).to(torch.uint8)


class DeviceDecodeDataset(ImageDataset):
    """Rows as :class:`_Item`: device-decodable JPEG bytes, or the CPU path's result for anything else.

    Parameters
    ----------
    source : Manifest or sequence of paths
        Images; the index is the manifest row (or list position).
    preprocess : Preprocessor
        Pixel limit and geometry (used to route) and the CPU path's preprocessing.
    """

    def cpu_item(self, row: int) -> _Item:
        """Decode ``row`` on the CPU path (PIL), as :class:`ImageDataset` does."""
        _, tensor, reason = super().__getitem__(row)
        return _Item(row, None, (0, 0), 1, None if reason else _as_uint8(tensor, self.preprocess), reason)

    def __getitem__(self, row: int) -> _Item:  # type: ignore[override]
        try:
            with open(self.paths[row], "rb") as handle:
                data = handle.read()
        except OSError:
            return self.cpu_item(row)  # reports missing / unreadable files by the usual reason
        header = probe_header(data)
        route = device_route(header, self.preprocess)
        if route:
            logger.debug("row %d goes to the CPU path: %s", row, route)
            return self.cpu_item(row)
        assert header is not None
        return _Item(row, data, (header.height, header.width), header.orientation, None, "")


def pack_items(items: Sequence[_Item]) -> list[_Item]:
    """Put a batch's file bytes in one uint8 tensor and its CPU crops in another, as views.

    Runs as the DataLoader's collate function in the workers: a batch then
    crosses to the main process as two shared-memory segments instead of one
    per image. Idempotent.
    """
    items = list(items)
    raw = [i for i, item in enumerate(items) if isinstance(item.data, bytes)]
    if raw:
        chunks: list[bytes] = [items[i].data for i in raw]  # type: ignore[misc]
        flat = torch.frombuffer(bytearray(b"").join(chunks), dtype=torch.uint8)
        for i, view in zip(raw, torch.split(flat, [len(chunk) for chunk in chunks])):
            items[i] = items[i]._replace(data=view)
    crops = [i for i, item in enumerate(items) if item.crop is not None]
    if len(crops) > 1:
        for i, view in zip(crops, torch.stack([items[i].crop for i in crops]).unbind()):  # type: ignore[misc]
            items[i] = items[i]._replace(crop=view)
    return items


def _decode_each(decoder: DeviceDecoder, datas: list[torch.Tensor]) -> list[torch.Tensor | None]:
    """Decode a batch in one call; if the device rejects any file, decode one by one (None for rejects)."""
    if not datas:
        return []
    try:
        return list(decoder.decode(datas))
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as error:  # noqa: BLE001 - a rejected file fails the whole call: find it alone
        logger.debug("batched device decode failed (%s: %s); decoding one by one", type(error).__name__, error)
    decoded: list[torch.Tensor | None] = []
    for data in datas:
        try:
            decoded.append(decoder.decode([data])[0])
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as error:  # noqa: BLE001 - retried on the CPU path, which reports it if bad there too
            logger.debug("device decoder rejected a file (%s: %s)", type(error).__name__, error)
            decoded.append(None)
    return decoded


def _reduce(image: torch.Tensor, scale: int) -> torch.Tensor:
    """uint8 (3, H, W) -> uint8 (3, ceil(H / scale), ceil(W / scale)), each pixel the mean of its block."""
    pooled = torch.nn.functional.avg_pool2d(image[None].to(torch.float32), scale, ceil_mode=True)
    return pooled[0].round_().clamp_(0, 255).to(torch.uint8)


def _chunks(indices: list[int], items: Sequence[_Item]) -> Iterator[list[int]]:
    """Split the device rows of a batch so that each decode call holds at most ``_MAX_DECODE_PIXELS`` pixels."""
    chunk: list[int] = []
    pixels = 0
    for i in indices:
        size = items[i].size[0] * items[i].size[1]
        if chunk and pixels + size > _MAX_DECODE_PIXELS:
            yield chunk
            chunk, pixels = [], 0
        chunk.append(i)
        pixels += size
    if chunk:
        yield chunk


def _expected_shape(item: _Item, applies_exif: bool) -> tuple[int, int, int]:
    height, width = item.size
    return (3, width, height) if applies_exif and item.orientation >= 5 else (3, height, width)


def decode_items(items: Sequence[_Item], dataset: DeviceDecodeDataset, decoder: DeviceDecoder) -> Batch:
    """Turn one batch of worker items into ``(rows, images, reasons)`` on the decoder's device.

    Device items are decoded in batched calls (one per ``_MAX_DECODE_PIXELS``),
    oriented, then resized and cropped per size group; a file the device
    rejects (or decodes to an unexpected shape) is redone on the CPU path alone.

    Returns
    -------
    rows : torch.Tensor
        int64 (B,), in the order of ``items``.
    images : torch.Tensor
        uint8 (B, 3, S, S) on the device; zeros for bad rows.
    reasons : list of str
        ``""`` for good rows, the CPU path's reason for bad ones.
    """
    preprocess, device = dataset.preprocess, decoder.device
    items = pack_items(items)
    size = preprocess.input_size
    images = torch.zeros((len(items), 3, size, size), dtype=torch.uint8, device=device)
    for chunk in _chunks([i for i, item in enumerate(items) if item.data is not None], items):
        groups: dict[tuple[int, int], list[tuple[int, torch.Tensor]]] = {}
        for i, image in zip(chunk, _decode_each(decoder, [items[i].data for i in chunk])):  # type: ignore[misc]
            item = items[i]
            if image is None or tuple(image.shape) != _expected_shape(item, decoder.applies_exif):
                items[i] = dataset.cpu_item(item.row)
                continue
            if not decoder.applies_exif:
                image = orient(image, item.orientation)
            scale = draft_scale(item.size[1], item.size[0], preprocess)
            if scale > 1:  # the CPU path decodes large JPEGs at a reduced DCT scale: average scale x scale blocks
                image = _reduce(image, scale)
            groups.setdefault(tuple(image.shape[-2:]), []).append((i, image))
        for members in groups.values():
            index = torch.tensor([i for i, _ in members], device=device)
            images[index] = resize_crop(torch.stack([image for _, image in members]), preprocess)
    cpu_good = [i for i, item in enumerate(items) if item.crop is not None]
    if cpu_good:
        crops = torch.stack([items[i].crop for i in cpu_good]).to(device)  # type: ignore[misc]
        images[torch.tensor(cpu_good, device=device)] = crops
    rows = torch.tensor([item.row for item in items], dtype=torch.int64)
    return rows, images, [item.reason for item in items]


def iter_device_batches(paths: Manifest | Sequence[str | os.PathLike], rows: Sequence[int], *,
                        preprocess: Preprocessor, device: str = "cpu", batch_size: int = 256,
                        num_workers: int | None = None, prefetch_factor: int = 4) -> Iterator[Batch]:
    """Batches of device-decoded, resized, cropped uint8 images for the given rows.

    Parameters
    ----------
    paths : Manifest or sequence of paths
        All images; a row indexes the manifest (or the list).
    rows : sequence of int
        The rows to yield, in this order.
    preprocess : Preprocessor
        Geometry, interpolation, pixel limit (normalisation is left to the caller).
    device : str
        Where to decode and where the images are returned (``cuda``, ``cuda:1``, ``cpu``).
    batch_size : int
        Rows per batch.
    num_workers : int, optional
        Processes that read bytes and probe headers (and run the CPU path for
        the files routed there); default :func:`~featcache.extract.data.default_num_workers`.

    Yields
    ------
    rows : torch.Tensor
        int64 (B,).
    images : torch.Tensor
        uint8 (B, 3, S, S) on ``device``; zeros for bad rows.
    reasons : list of str
        ``""`` for good rows, why a bad row could not be decoded otherwise.

    Raises
    ------
    DeviceDecodeError
        When no JPEG decoder works on ``device`` (see :func:`gpu_decode_status`).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}.")
    decoder = select_decoder(str(torch.device(device)))
    dataset = DeviceDecodeDataset(paths, preprocess)
    rows = [int(row) for row in rows]
    batches = [rows[start:start + batch_size] for start in range(0, len(rows), batch_size)]
    workers = default_num_workers() if num_workers is None else int(num_workers)
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=workers, collate_fn=pack_items,
                        prefetch_factor=prefetch_factor if workers > 0 else None)
    for items in loader:
        yield decode_items(items, dataset, decoder)
