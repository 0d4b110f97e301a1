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
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

from featcache.extract.decode.decoders import DeviceDecoder
from featcache.extract.decode.device import DecodeStats, decode_items
from featcache.extract.decode.packing import DeviceDecodeDataset, PackedBatch
from featcache.extract.decode.preprocess import Preprocessor

KINDS = ("uniform", "mixed")
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


def host_rate(kind: str, batch_size: int = 256, batches: int = 20) -> float:
    """Images per second through ``decode_items`` (median over ``batches`` batches, after one warm-up)."""
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
