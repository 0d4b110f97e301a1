"""Batched JPEG decoding, resizing and cropping on the runner's device.

On a GPU the input pipeline is the product: PIL decoding in a few workers
feeds 1,000-1,500 img/s while the forward pass takes 10,000-20,000. Here the
workers only read file bytes and probe headers (:mod:`featcache.extract.decode.probe`);
JPEGs are decoded in batches on the device (TorchCodec's ``decode_jpeg`` when
it is installed, else torchvision's), turned upright (EXIF orientation), then
resized and center-cropped in batches grouped by decoded size, with the
geometry of :class:`~featcache.extract.decode.preprocess.Preprocessor` and
antialiasing (PIL's filters: ``interpolate(..., antialias=True)``).

Everything else takes the CPU path (PIL, exactly as
:class:`~featcache.extract.decode.loaders.ImageDataset` decodes today) for that file
alone: non-JPEGs, CMYK/YCCK, truncated files, files over the
decompression-bomb limit, extreme aspect ratios, and any file the device
decoder rejects. One bad file never fails or drops the rest of its batch; a
file bad on both paths is reported with the CPU path's reason
(:func:`~featcache.extract.decode.loaders.describe_error`).

The same code runs on the CPU device (torchvision decodes CPU tensors), which
is how the tests exercise it. Output batches follow the engine's contract:
``(rows int64 (B,), images uint8 (B, 3, S, S) on the device, reasons list[str])``,
bad rows zero-filled with a non-empty reason, rows in the order given.
Normalisation is the engine's job.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from typing import Iterator, NamedTuple, Sequence

import torch
from torch.utils.data import DataLoader

from featcache.extract.decode.decoders import DeviceDecoder, decode_each, select_decoder
from featcache.extract.decode.loaders import Batch, ImageDataset
from featcache.extract.decode.preprocess import Preprocessor
from featcache.extract.decode.probe import device_route, draft_scale, probe_header, resize_geometry
from featcache.extract.inputs.manifest import Manifest
from featcache.util.compute import default_num_workers

__all__ = ["orient", "resize_crop", "DeviceDecodeDataset", "PackedBatch", "pack_items",
           "decode_items", "iter_device_batches"]

logger = logging.getLogger(__name__)

#: Float pixels resized at once per size group (about 0.8 GB of float32): large photos go in smaller chunks.
_MAX_RESIZE_PIXELS = 64 * 2**20

#: Decoded pixels per device decode call (384 MB of uint8 RGB): a batch of large photos is decoded in parts,
#: each resized before the next is decoded. A batch of 256 JPEGs of 500x375 is one call.
_MAX_DECODE_PIXELS = 128 * 2**20

_MODES = {"bilinear": "bilinear", "bicubic": "bicubic", "nearest": "nearest-exact"}


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
    """One row as a worker reads it: JPEG bytes for the device, or the CPU path's uint8 crop or reason."""

    row: int
    data: bytes | None  # the file's bytes (device path)
    size: tuple[int, int]  # stored (height, width) from the header (device path)
    orientation: int
    crop: torch.Tensor | None  # uint8 (3, S, S) (CPU path, good file)
    reason: str  # CPU path, bad file


class PackedBatch(NamedTuple):
    """A batch as it crosses from a worker to the main process: two tensors and plain lists.

    Attributes
    ----------
    rows : list of int
        B manifest rows, in the order given.
    data : torch.Tensor
        uint8 (total bytes,): the device rows' files back to back.
    lengths : list of int
        Bytes of each row's file in ``data``; 0 for rows on the CPU path.
    sizes : list of (int, int)
        Stored (height, width) of each device row (from its header).
    orientations : list of int
        EXIF orientation of each device row.
    crops : torch.Tensor
        uint8 (K, 3, S, S): the CPU path's good rows (length 0, no reason), in row order.
    reasons : list of str
        ``""``, or why the CPU path could not decode the row.
    """

    rows: list[int]
    data: torch.Tensor
    lengths: list[int]
    sizes: list[tuple[int, int]]
    orientations: list[int]
    crops: torch.Tensor
    reasons: list[str]


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
            data = self.read_bytes(row)  # a file, a shard member or a URL
        except OSError:
            return self.cpu_item(row)  # reports missing / unreadable files by the usual reason
        header = probe_header(data)
        route = device_route(header, self.preprocess)
        if route:
            logger.debug("row %d goes to the CPU path: %s", row, route)
            return self.cpu_item(row)
        assert header is not None
        return _Item(row, data, (header.height, header.width), header.orientation, None, "")


def pack_items(items: Sequence[_Item] | PackedBatch) -> PackedBatch:
    """Put a batch's file bytes in one uint8 tensor, its CPU crops in another, the rest in plain lists.

    Runs as the DataLoader's collate function in the workers: a batch then
    crosses to the main process as two shared-memory segments and a few
    lists, not as one tensor per image (whose unpickling in the main process
    competes with the decode and the forward for the GIL). Idempotent.
    """
    if isinstance(items, PackedBatch):
        return items
    items = list(items)
    chunks = [item.data for item in items if item.data is not None]
    data = torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8) if chunks \
        else torch.empty(0, dtype=torch.uint8)
    crops = [item.crop for item in items if item.crop is not None]
    return PackedBatch(rows=[item.row for item in items],
                       data=data,
                       lengths=[0 if item.data is None else len(item.data) for item in items],
                       sizes=[item.size for item in items],
                       orientations=[item.orientation for item in items],
                       crops=torch.stack(crops) if crops else torch.empty(0, dtype=torch.uint8),
                       reasons=[item.reason for item in items])


def _reduce(image: torch.Tensor, scale: int) -> torch.Tensor:
    """uint8 (3, H, W) -> uint8 (3, ceil(H / scale), ceil(W / scale)), each pixel the mean of its block."""
    pooled = torch.nn.functional.avg_pool2d(image[None].to(torch.float32), scale, ceil_mode=True)
    return pooled[0].round_().clamp_(0, 255).to(torch.uint8)


def _chunks(indices: list[int], sizes: Sequence[tuple[int, int]]) -> Iterator[list[int]]:
    """Split the device rows of a batch so that each decode call holds at most ``_MAX_DECODE_PIXELS`` pixels."""
    chunk: list[int] = []
    pixels = 0
    for i in indices:
        size = sizes[i][0] * sizes[i][1]
        if chunk and pixels + size > _MAX_DECODE_PIXELS:
            yield chunk
            chunk, pixels = [], 0
        chunk.append(i)
        pixels += size
    if chunk:
        yield chunk


def _expected_shape(size: tuple[int, int], orientation: int, applies_exif: bool) -> tuple[int, int, int]:
    height, width = size
    return (3, width, height) if applies_exif and orientation >= 5 else (3, height, width)


def decode_items(items: Sequence[_Item] | PackedBatch, dataset: DeviceDecodeDataset, decoder: DeviceDecoder) -> Batch:
    """Turn one batch from the workers into ``(rows, images, reasons)`` on the decoder's device.

    Device rows are decoded in batched calls (one per ``_MAX_DECODE_PIXELS``),
    oriented, then resized and cropped per size group; a file the device
    rejects (or decodes to an unexpected shape) is redone on the CPU path alone.

    Parameters
    ----------
    items : PackedBatch or sequence of _Item
        A worker's batch (:func:`pack_items` packs a sequence).
    dataset : DeviceDecodeDataset
        Preprocessing, and the CPU path for rejected files.
    decoder : DeviceDecoder
        The batched decoder (and device).

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
    batch = pack_items(items)
    size = preprocess.input_size
    reasons = list(batch.reasons)
    images = torch.zeros((len(batch.rows), 3, size, size), dtype=torch.uint8, device=device)
    on_device = [i for i, length in enumerate(batch.lengths) if length]
    views = dict(zip(on_device, torch.split(batch.data, [batch.lengths[i] for i in on_device])))
    cpu_good = [i for i, (length, reason) in enumerate(zip(batch.lengths, reasons)) if not length and not reason]
    if cpu_good:
        images[torch.tensor(cpu_good, device=device)] = batch.crops.to(device)
    scales: dict[tuple[int, int], int] = {}  # stored size -> the CPU path's draft scale
    rejected: list[int] = []
    for chunk in _chunks(on_device, batch.sizes):
        groups: dict[tuple[int, int], list[tuple[int, torch.Tensor]]] = {}
        for i, image in zip(chunk, decode_each(decoder, [views[i] for i in chunk])):
            stored, orientation = batch.sizes[i], batch.orientations[i]
            if image is None or tuple(image.shape) != _expected_shape(stored, orientation, decoder.applies_exif):
                rejected.append(i)
                continue
            if not decoder.applies_exif:
                image = orient(image, orientation)
            scale = scales.get(stored)
            if scale is None:
                scale = scales[stored] = draft_scale(stored[1], stored[0], preprocess)
            if scale > 1:  # the CPU path decodes large JPEGs at a reduced DCT scale: average scale x scale blocks
                image = _reduce(image, scale)
            groups.setdefault(tuple(image.shape[-2:]), []).append((i, image))
        for members in groups.values():
            index = torch.tensor([i for i, _ in members], device=device)
            images[index] = resize_crop(torch.stack([image for _, image in members]), preprocess)
    for i in rejected:  # the device decoder refused it: the CPU path decodes it, or says why it is bad
        item = dataset.cpu_item(batch.rows[i])
        reasons[i] = item.reason
        if item.crop is not None:
            images[i] = item.crop.to(device)
    return torch.tensor(batch.rows, dtype=torch.int64), images, reasons


def iter_device_batches(paths: Manifest | Sequence[str | os.PathLike], rows: Sequence[int], *,
                        preprocess: Preprocessor, device: str = "cpu", batch_size: int = 256,
                        num_workers: int | None = None, prefetch_factor: int = 4,
                        background: bool | None = None) -> Iterator[Batch]:
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
        the files routed there); default :func:`~featcache.util.compute.default_num_workers`.
    background : bool, optional
        Decode and resize in a thread, up to two batches ahead of the caller
        (default: on CUDA devices), so the next batch is prepared while the
        caller runs the forward pass of this one.

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
    featcache.extract.decode.decoders.DeviceDecodeError
        When no JPEG decoder works on ``device`` (see
        :func:`~featcache.extract.decode.decoders.gpu_decode_status`).
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
    decoded = (decode_items(items, dataset, decoder) for items in loader)
    if background is None:
        background = decoder.device.startswith("cuda")
    return _ahead(decoded) if background else decoded


_DONE = object()


def _ahead(batches: Iterator[Batch], depth: int = 2) -> Iterator[Batch]:
    """Run ``batches`` in a thread, up to ``depth`` batches ahead of the consumer.

    On CUDA the next batch is decoded and resized while the caller runs the
    forward of the current one. An exception in the thread is raised here;
    closing this generator early stops the thread.
    """
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(value: object) -> bool:
        while not stop.is_set():
            try:
                ready.put(value, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for batch in batches:
                if not put(batch):
                    return
            put(_DONE)
        except BaseException as error:  # noqa: BLE001 - handed to the consumer, raised there
            put(error)

    thread = threading.Thread(target=produce, name="featcache-gpu-decode", daemon=True)
    thread.start()
    try:
        while True:
            value = ready.get()
            if value is _DONE:
                return
            if isinstance(value, BaseException):
                raise value
            yield value  # type: ignore[misc]
    finally:
        stop.set()
        thread.join()
