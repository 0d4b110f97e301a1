"""Host cost of the device decode path's batch assembly (``decode_items``), without the decoder, on the CPU.

On a GPU every torch call of ``decode_items`` (stack, orient, resize, crop,
round, write into the batch) is a kernel launch plus Python, paid on the
decode thread for every size group of a batch: one group per batch for a
corpus of equal-sized JPEGs, about one group per image for real photos of
many sizes. This measures that per-image host cost where it can be measured
without a GPU: a stand-in decoder hands back ready uint8 images (no decode
time), and the images are tiny (9-17 x 9-120 pixels, crop 8: the kernels
themselves cost next to nothing), so what is timed is the Python and the
per-call dispatch of the torch operations::

    python benchmarks/bench_decode_host.py                  # img/s, uniform and mixed sizes
    python benchmarks/ab_revisions.py --bench decode-host --before REV   # same-run A/B of two revisions

``uniform``: every image 12 x 16 (one size group per batch); ``mixed``: heights
9-17 and widths 9-120 drawn at random (about one group per image).

``reader``: the per-file work of a reader before the decode, in this process
(what the ``threads`` reader runs under the GIL, and each worker process of
the ``processes`` reader): read a 500x375 JPEG (page cache), probe its header
(every fourth with an EXIF orientation), pack the batch; ``probe``: the header
probe alone on those files' bytes (held by the GIL: with the ``threads``
reader it is the part of the per-file work that does not run in parallel).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from featcache.extract.decode.decoders import DeviceDecoder
from featcache.extract.decode.device import DecodeStats, decode_items
from featcache.extract.decode.packing import DeviceDecodeDataset, PackedBatch, pack_items
from featcache.extract.decode.preprocess import Preprocessor

KINDS = ("uniform", "mixed", "reader", "probe")
PREPROCESS = Preprocessor(input_size=8, resize_size=9, interpolation="bilinear", mean=(0.485, 0.456, 0.406),
                          std=(0.229, 0.224, 0.225))


def make_batch(kind: str, batch_size: int, seed: int = 0) -> tuple[PackedBatch, DeviceDecoder]:
    """A packed batch of ``batch_size`` device rows and a decoder that returns their ready images."""
    rng = np.random.default_rng(seed)
    if kind == "uniform":
        sizes = [(12, 16)] * batch_size
    elif kind == "mixed":
        sizes = [(int(h), int(w)) for h, w in zip(rng.integers(9, 18, batch_size), rng.integers(9, 121, batch_size))]
    else:
        raise ValueError(f"kind {kind!r} is not one of {KINDS}.")
    images = [torch.from_numpy(rng.integers(0, 256, (3, h, w), dtype=np.uint8)) for h, w in sizes]
    keys = [index.to_bytes(2, "little") for index in range(batch_size)]  # each "file" names its image

    def decode(datas: list[torch.Tensor]) -> list[torch.Tensor]:
        return [images[int(data[0]) + 256 * int(data[1])] for data in datas]

    data = torch.frombuffer(bytearray(b"".join(keys)), dtype=torch.uint8)
    batch = PackedBatch(rows=list(range(batch_size)), data=data, lengths=[2] * batch_size, sizes=sizes,
                        orientations=[1] * batch_size, crops=torch.empty(0, dtype=torch.uint8),
                        reasons=[""] * batch_size)
    return batch, DeviceDecoder("stand-in", "cpu", decode, applies_exif=False)


def write_photos(root: Path, n: int) -> list[str]:
    """``n`` 500x375 JPEGs (smooth gradients and noise, quality 90; every fourth with EXIF orientation 6)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:375, 0:500]
    paths = []
    for index in range(n):
        base = np.stack([(x * (1 + index % 3)) % 256, (y * 2) % 256, (x + y + 17 * index) % 256], axis=-1)
        exif = Image.Exif()
        if index % 4 == 0:
            exif[0x0112] = 6
        path = root / f"{index:04d}.jpg"
        Image.fromarray(np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)).save(
            path, quality=90, exif=exif)
        paths.append(str(path))
    return paths


def reader_rate(batch_size: int = 256, batches: int = 5, probe_only: bool = False) -> float:
    """Images per second of a reader's per-file work for one batch: read, probe, pack (median of ``batches``);
    ``probe_only``: the header probe of the files' bytes alone."""
    from featcache.extract.decode.probe import probe_header

    with tempfile.TemporaryDirectory(prefix="bench_decode_host_") as folder:
        paths = write_photos(Path(folder), batch_size)
        dataset = DeviceDecodeDataset(paths, PREPROCESS)
        datas = [Path(path).read_bytes() for path in paths]
        times = []
        for _ in range(batches + 1):  # the first pass warms the page cache
            started = time.perf_counter()
            if probe_only:
                headers = [probe_header(data) for data in datas]
            else:
                batch = pack_items([dataset[row] for row in range(batch_size)])
            times.append(time.perf_counter() - started)
        if probe_only:
            assert sum(header.orientation == 6 for header in headers) == (batch_size + 3) // 4
        else:
            assert all(batch.lengths) and sum(o == 6 for o in batch.orientations) == (batch_size + 3) // 4
    return batch_size / statistics.median(times[1:])


def host_rate(kind: str, batch_size: int = 256, batches: int = 20) -> float:
    """Images per second through ``decode_items`` (median over ``batches`` batches, after one warm-up);
    ``reader``: :func:`reader_rate`."""
    if kind in ("reader", "probe"):
        return reader_rate(batch_size, max(1, batches // 4), probe_only=kind == "probe")
    batch, decoder = make_batch(kind, batch_size)
    dataset = DeviceDecodeDataset([f"{row}.jpg" for row in range(batch_size)], PREPROCESS)
    stats = DecodeStats()
    decode_items(batch, dataset, decoder, stats)
    times = []
    for _ in range(batches):
        started = time.perf_counter()
        decode_items(batch, dataset, decoder, stats)
        times.append(time.perf_counter() - started)
    assert stats.device == batch_size * (batches + 1) and stats.rejected == 0
    return batch_size / statistics.median(times)


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Print and return img/s per kind (one torch thread: the decode thread's share of the host)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--batches", type=int, default=20)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rates = {kind: host_rate(kind, args.batch_size, args.batches) for kind in KINDS}
    print(json.dumps(rates))
    return rates


if __name__ == "__main__":
    main()
