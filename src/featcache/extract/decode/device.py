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
from dataclasses import astuple, dataclass
from typing import Iterator, Sequence

import torch
from torch.profiler import record_function

from featcache.extract.decode.decoders import DeviceDecoder, decode_each, select_decoder
from featcache.extract.decode.loaders import Batch
from featcache.extract.decode.packing import (
    DeviceDecodeDataset,
    DeviceItem,
    PackedBatch,
    iter_packed_batches,
    pack_items,
)
from featcache.extract.decode.preprocess import Preprocessor
from featcache.extract.decode.probe import draft_scale, resize_geometry
from featcache.extract.decode.streams import StreamHandoff
from featcache.extract.inputs.manifest import Manifest
from featcache.util.compute import default_num_workers

__all__ = ["orient", "DecodeStats", "DeviceDecodeDataset", "decode_items", "iter_device_batches"]

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


def _resized_blocks(images: torch.Tensor, preprocess: Preprocessor) -> Iterator[tuple[int, torch.Tensor]]:
    """``(start, block)``: the resized, cropped images ``start:start + len(block)``, not yet rounded.

    A block is float32 (n, 3, S, S) (a view of the resized images), or a uint8
    view of ``images`` when no resize is needed (torchvision returns the image
    unchanged); large images come in chunks of at most ``_MAX_RESIZE_PIXELS``.
    """
    height, width = images.shape[-2:]
    (new_h, new_w), (top, left) = resize_geometry(width, height, preprocess)
    size = preprocess.input_size
    if (new_h, new_w) == (height, width):
        yield 0, images[..., top:top + size, left:left + size]
        return
    mode = _MODES[preprocess.interpolation]
    chunk = max(1, _MAX_RESIZE_PIXELS // (height * width))
    for start in range(0, images.shape[0], chunk):
        block = torch.nn.functional.interpolate(images[start:start + chunk].to(torch.float32), size=(new_h, new_w),
                                                mode=mode, antialias=mode != "nearest-exact")
        yield start, block[..., top:top + size, left:left + size]


def _to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """Resized float pixels (rounded in place) or uint8 pixels -> a contiguous uint8 tensor."""
    if pixels.dtype == torch.uint8:
        return pixels.contiguous()
    return pixels.round_().clamp_(0, 255).to(torch.uint8)


def _reduce(images: torch.Tensor, scale: int) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> uint8 (N, 3, ceil(H / scale), ceil(W / scale)), each pixel the mean of its block."""
    pooled = torch.nn.functional.avg_pool2d(images.to(torch.float32), scale, ceil_mode=True)
    return pooled.round_().clamp_(0, 255).to(torch.uint8)


@dataclass
class DecodeStats:
    """Where the rows of a device decode run were decoded (summed over its batches).

    Attributes
    ----------
    device : int
        Rows decoded on the device.
    cpu : int
        Rows their header (or a failed read) sent to the CPU path: non-JPEGs, CMYK, extreme shapes, ...
    rejected : int
        Rows the device decoder refused, redone on the CPU path.
    bad : int
        Rows bad on every path (reported with the CPU path's reason).
    """

    device: int = 0
    cpu: int = 0
    rejected: int = 0
    bad: int = 0

    def summary(self, decoder: str) -> str:
        """One log line: ``device decode (torchcodec on cuda): 4,096 rows on the device, ...``."""
        return (f"device decode ({decoder}): {self.device:,} rows on the device, {self.cpu + self.rejected:,} on "
                f"the CPU path ({self.rejected:,} rejected by the device decoder), {self.bad:,} bad")

    def __add__(self, other: DecodeStats) -> DecodeStats:
        """The counts of two runs together (the dask driver sums its workers' tasks)."""
        return DecodeStats(*(mine + theirs for mine, theirs in zip(astuple(self), astuple(other), strict=True)))


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


def _device_index(indices: list[int], device: str) -> torch.Tensor:
    """int64 (K,) batch positions on ``device``.

    On CUDA they go from pinned memory without blocking: a blocking copy from
    pageable memory would first wait for all the work queued on the decode
    stream (the previous group's resize), once per size group.
    """
    index = torch.tensor(indices, dtype=torch.int64)
    return index.pin_memory().to(device, non_blocking=True) if device.startswith("cuda") else index


def _expected_shape(size: tuple[int, int], orientation: int, applies_exif: bool) -> tuple[int, int, int]:
    height, width = size
    return (3, width, height) if applies_exif and orientation >= 5 else (3, height, width)


def decode_items(items: Sequence[DeviceItem] | PackedBatch, dataset: DeviceDecodeDataset, decoder: DeviceDecoder,
                 stats: DecodeStats | None = None) -> Batch:
    """Turn one batch from the workers into ``(rows, images, reasons)`` on the decoder's device.

    Device rows are decoded in batched calls (one per ``_MAX_DECODE_PIXELS``),
    then oriented, reduced, resized and cropped in one batched call per
    group of the same stored size and orientation, written unrounded into a
    float32 batch that is rounded to uint8 once (so a group of one image, the
    common case for photos of many sizes, costs three kernels: the float
    conversion, the resize and the copy into its row); a file the device
    rejects (or decodes to an unexpected shape) is redone on the CPU path alone.

    Parameters
    ----------
    items : PackedBatch or sequence of DeviceItem
        A reader's batch (:func:`~featcache.extract.decode.packing.pack_items` packs a sequence).
    dataset : DeviceDecodeDataset
        Preprocessing, and the CPU path for rejected files.
    decoder : DeviceDecoder
        The batched decoder (and device).
    stats : DecodeStats, optional
        Counts of where the rows were decoded, added to.

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
    on_device = [i for i, length in enumerate(batch.lengths) if length]
    views = dict(zip(on_device, torch.split(batch.data, [batch.lengths[i] for i in on_device])))
    staged = torch.empty((len(batch.rows), 3, size, size), dtype=torch.float32, device=device) if on_device else None
    written = [False] * len(batch.rows)
    rejected: list[int] = []
    for chunk in _chunks(on_device, batch.sizes):
        groups: dict[tuple[tuple[int, int], int], list[tuple[int, torch.Tensor]]] = {}
        for i, image in zip(chunk, decode_each(decoder, [views[i] for i in chunk])):
            stored, orientation = batch.sizes[i], batch.orientations[i]
            if image is None or tuple(image.shape) != _expected_shape(stored, orientation, decoder.applies_exif):
                rejected.append(i)
                continue
            groups.setdefault((stored, orientation), []).append((i, image))
        for (stored, orientation), members in groups.items():
            positions = [i for i, _ in members]
            group = members[0][1][None] if len(members) == 1 else torch.stack([image for _, image in members])
            if not decoder.applies_exif:
                group = orient(group, orientation)
            scale = draft_scale(stored[1], stored[0], preprocess)
            if scale > 1:  # the CPU path decodes large JPEGs at a reduced DCT scale: average scale x scale blocks
                group = _reduce(group, scale)
            for start, block in _resized_blocks(group, preprocess):
                part = positions[start:start + block.shape[0]]
                if len(part) == 1:
                    staged[part[0]] = block[0]  # a copy into the row, converting uint8 where not resized
                else:
                    staged[_device_index(part, device)] = block.to(torch.float32)
                for i in part:
                    written[i] = True
    if staged is None:
        images = torch.zeros((len(batch.rows), 3, size, size), dtype=torch.uint8, device=device)
    else:
        unwritten = [i for i, done in enumerate(written) if not done]
        if unwritten:  # CPU-path, rejected and bad rows: zeros until the CPU path's crop is put there
            staged[_device_index(unwritten, device)] = 0.0
        images = _to_uint8(staged)
    cpu_good = [i for i, (length, reason) in enumerate(zip(batch.lengths, reasons)) if not length and not reason]
    if cpu_good:
        images[_device_index(cpu_good, device)] = batch.crops.to(device)
    for i in rejected:  # the device decoder refused it: the CPU path decodes it, or says why it is bad
        item = dataset.cpu_item(batch.rows[i])
        reasons[i] = item.reason
        if item.crop is not None:
            images[i] = item.crop.to(device)
    if stats is not None:
        stats.device += len(on_device) - len(rejected)
        stats.cpu += len(batch.rows) - len(on_device)
        stats.rejected += len(rejected)
        stats.bad += sum(1 for reason in reasons if reason)
    return torch.tensor(batch.rows, dtype=torch.int64), images, reasons


def iter_device_batches(paths: Manifest | Sequence[str | os.PathLike], rows: Sequence[int], *,
                        preprocess: Preprocessor, device: str = "cpu", batch_size: int = 256,
                        num_workers: int | None = None, prefetch_factor: int = 4,
                        background: bool | None = None, reader: str = "processes",
                        stats: DecodeStats | None = None) -> Iterator[Batch]:
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
        Processes (or threads) that read bytes and probe headers (and run the
        CPU path for the files routed there); default
        :func:`~featcache.util.compute.default_num_workers`.
    prefetch_factor : int
        Batches of file bytes each reader reads ahead (the DataLoader's
        ``prefetch_factor``; with threads, ``num_workers * prefetch_factor``
        batches in flight). Unused when ``num_workers`` is 0.
    background : bool, optional
        Decode and resize in a thread, up to two batches ahead of the caller
        (default: on CUDA devices), so the next batch is prepared while the
        caller runs the forward pass of this one. On CUDA that thread decodes
        on its own stream and each batch reaches the caller's current stream
        through an event (:class:`~featcache.extract.decode.streams.StreamHandoff`).
    reader : {"processes", "threads"}
        Who reads the files (:func:`~featcache.extract.decode.packing.iter_packed_batches`):
        DataLoader worker processes, or a thread pool in this process (no process hop).
    stats : DecodeStats, optional
        Filled with where the rows were decoded; the run logs it when it ends.

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
    packed = iter_packed_batches(dataset, batches, reader=reader, num_workers=workers,
                                 prefetch_factor=prefetch_factor)
    decoded = _decode_all(packed, dataset, decoder, DecodeStats() if stats is None else stats)
    if background is None:
        background = decoder.device.startswith("cuda")
    return _ahead(decoded, StreamHandoff(decoder.device)) if background else decoded


def _decode_all(packed: Iterator[PackedBatch], dataset: DeviceDecodeDataset, decoder: DeviceDecoder,
                stats: DecodeStats) -> Iterator[Batch]:
    """Decode each packed batch; log where the rows were decoded when the last one is done.

    The wait for the readers and the decode are labelled for ``torch.profiler``
    (``featcache.read_files``, ``featcache.device_decode``; ``benchmarks/profile_gpu.py``).
    """
    while True:
        with record_function("featcache.read_files"):
            items = next(packed, None)
        if items is None:
            break
        with record_function("featcache.device_decode"):
            batch = decode_items(items, dataset, decoder, stats)
        yield batch
    logger.info(stats.summary(f"{decoder.name} on {decoder.device}"))


_DONE = object()


def _ahead(batches: Iterator[Batch], handoff: StreamHandoff, depth: int = 2) -> Iterator[Batch]:
    """Run ``batches`` in a thread, up to ``depth`` batches ahead of the consumer.

    On CUDA the next batch is decoded and resized on ``handoff``'s stream
    while the caller runs the forward of the current one on its own; each
    batch is published on the decode stream in the thread and received on
    the consumer's current stream here. An exception in the thread is raised
    here; closing this generator early stops the thread.
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
            with handoff.producing():
                for batch in batches:
                    if not put(handoff.publish(batch)):
                        return
            put(_DONE)
        except BaseException as error:  # noqa: BLE001 - handed to the consumer, raised there
            put(error)

    thread = threading.Thread(target=produce, name="featcache-gpu-decode", daemon=True)
    thread.start()
    try:
        while True:
            with record_function("featcache.wait_for_input"):
                value = ready.get()
            if value is _DONE:
                return
            if isinstance(value, BaseException):
                raise value
            yield handoff.receive(value)
    finally:
        stop.set()
        thread.join()
