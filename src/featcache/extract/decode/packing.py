"""Reading the device decode path's input: file bytes and header facts per row, packed per batch.

The device path (:mod:`featcache.extract.decode.device`) decodes JPEGs in
batches on the GPU; what comes before it is host work: read each file's bytes
(a file, a shard member or a URL), probe its header (size, EXIF orientation,
whether the device can take it) and, for the files routed to the CPU path,
decode them with PIL. :class:`DeviceDecodeDataset` does that for one row;
:func:`pack_items` packs a batch into two tensors and plain lists;
:func:`iter_packed_batches` runs it over many batches with one of two readers:

* ``processes``: torch ``DataLoader`` worker processes (``pack_items`` is
  their collate function, so a batch crosses to the main process as two
  shared-memory segments and a few lists);
* ``threads``: a thread pool in this process, no process hop (file reads and
  PIL decoding release the GIL; the header probe holds it).
"""

from __future__ import annotations

import logging
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Iterator, NamedTuple, Sequence

import torch
from torch.utils.data import DataLoader

from featcache.extract.decode.loaders import ImageDataset
from featcache.extract.decode.preprocess import Preprocessor
from featcache.extract.decode.probe import device_route, probe_header

__all__ = ["READERS", "DeviceItem", "PackedBatch", "DeviceDecodeDataset", "pack_items", "iter_packed_batches"]

logger = logging.getLogger(__name__)

#: How the device path reads its input: worker processes (DataLoader) or threads in this process.
READERS = ("processes", "threads")


class DeviceItem(NamedTuple):
    """One row as a reader reads it: JPEG bytes for the device, or the CPU path's uint8 crop or reason."""

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
    """Rows as :class:`DeviceItem`: device-decodable JPEG bytes, or the CPU path's result for anything else.

    Parameters
    ----------
    source : Manifest or sequence of paths
        Images; the index is the manifest row (or list position).
    preprocess : Preprocessor
        Pixel limit and geometry (used to route) and the CPU path's preprocessing.
    """

    def cpu_item(self, row: int) -> DeviceItem:
        """Decode ``row`` on the CPU path (PIL), as :class:`ImageDataset` does."""
        _, tensor, reason = super().__getitem__(row)
        return DeviceItem(row, None, (0, 0), 1, None if reason else _as_uint8(tensor, self.preprocess), reason)

    def __getitem__(self, row: int) -> DeviceItem:  # type: ignore[override]
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
        return DeviceItem(row, data, (header.height, header.width), header.orientation, None, "")


def pack_items(items: Sequence[DeviceItem] | PackedBatch) -> PackedBatch:
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
    data = torch.frombuffer(bytearray().join(chunks), dtype=torch.uint8) if chunks \
        else torch.empty(0, dtype=torch.uint8)  # one copy of the bytes: join straight into a bytearray
    crops = [item.crop for item in items if item.crop is not None]
    return PackedBatch(rows=[item.row for item in items],
                       data=data,
                       lengths=[0 if item.data is None else len(item.data) for item in items],
                       sizes=[item.size for item in items],
                       orientations=[item.orientation for item in items],
                       crops=torch.stack(crops) if crops else torch.empty(0, dtype=torch.uint8),
                       reasons=[item.reason for item in items])


def _read_batch(dataset: DeviceDecodeDataset, rows: Sequence[int]) -> PackedBatch:
    return pack_items([dataset[row] for row in rows])


def _threaded(dataset: DeviceDecodeDataset, batches: Sequence[Sequence[int]], workers: int,
              depth: int) -> Iterator[PackedBatch]:
    """Read batches in a thread pool, ``depth`` batches ahead, in order."""
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="featcache-read")
    pending: deque[Future[PackedBatch]] = deque()
    todo = iter(batches)
    try:
        for rows in todo:
            pending.append(pool.submit(_read_batch, dataset, rows))
            if len(pending) >= depth:
                break
        while pending:
            batch = pending.popleft().result()
            rows = next(todo, None)
            if rows is not None:
                pending.append(pool.submit(_read_batch, dataset, rows))
            yield batch
    finally:
        for future in pending:
            future.cancel()
        pool.shutdown(wait=True)


def iter_packed_batches(dataset: DeviceDecodeDataset, batches: Sequence[Sequence[int]], *,
                        reader: str = "processes", num_workers: int = 0,
                        prefetch_factor: int = 4) -> Iterator[PackedBatch]:
    """Read the given batches of rows into :class:`PackedBatch` es, in order.

    Parameters
    ----------
    dataset : DeviceDecodeDataset
        The rows' source and preprocessing.
    batches : sequence of sequences of int
        Manifest rows per batch.
    reader : {"processes", "threads"}
        DataLoader worker processes, or a thread pool in this process.
    num_workers : int
        Processes or threads; 0 reads in the calling thread.
    prefetch_factor : int
        Batches read ahead per worker.
    """
    if reader not in READERS:
        raise ValueError(f"reader {reader!r} is not one of {', '.join(map(repr, READERS))}.")
    if num_workers > 0 and reader == "threads":
        return _threaded(dataset, batches, num_workers, depth=num_workers * prefetch_factor)
    if num_workers == 0:
        return (_read_batch(dataset, rows) for rows in batches)
    return iter(DataLoader(dataset, batch_sampler=batches, num_workers=num_workers, collate_fn=pack_items,
                           prefetch_factor=prefetch_factor))
