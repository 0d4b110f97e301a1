"""The decode thread's stream handoff, the readers, and the decode counts (extract/decode/streams.py, packing.py).

On the CPU device the stream calls are no-ops, so what is checked here is the
order of the steps: the decode thread's work runs inside ``producing()``,
each batch is published in that thread after it was decoded, and received in
the consumer's thread before the consumer sees it. The CUDA behaviour itself
(the overlapped loop byte for byte equal to the synchronous one) is a ``gpu``
test in tests/extract/test_engine.py.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import pytest
import torch
from PIL import Image

from featcache.extract.decode import decoders
from featcache.extract.decode import device as device_decode
from featcache.extract.decode.decoders import DeviceDecoder, decode_each, select_decoder
from featcache.extract.decode.device import DecodeStats, decode_items, iter_device_batches
from featcache.extract.decode.packing import DeviceDecodeDataset, iter_packed_batches
from featcache.extract.decode.preprocess import Preprocessor
from featcache.extract.decode.streams import Handed, StreamHandoff
from featcache.extract.zoo.registry import get_backbone


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory) -> list[str]:
    """Nine small JPEGs, two orientations, one PNG (CPU path) and one file that is not an image."""
    root = tmp_path_factory.mktemp("stream_jpegs")
    paths = []
    for index in range(9):
        exif = Image.Exif()
        exif[0x0112] = 1 if index % 3 else 6
        pixels = Image.linear_gradient("L").resize((60 + 7 * index, 40 + 5 * index)).convert("RGB")
        path = root / f"{index}.jpg"
        pixels.save(path, exif=exif)
        paths.append(str(path))
    Image.new("RGB", (30, 20), (10, 200, 40)).save(root / "png.png")
    (root / "text.jpg").write_text("not an image")
    return paths + [str(root / "png.png"), str(root / "text.jpg")]


def _preprocess() -> Preprocessor:
    return Preprocessor.from_spec(get_backbone("resnet18"), input_size=32)


class RecordingHandoff(StreamHandoff):
    """A StreamHandoff on the CPU that records which thread ran each step, in order."""

    log: list[tuple[str, str, int]] = []

    def __init__(self, device) -> None:
        super().__init__(device)
        self.inside = threading.local()

    def producing(self):
        handoff = self

        class Scope:
            def __enter__(self):
                handoff.inside.active = True
                RecordingHandoff.log.append(("enter", threading.current_thread().name, -1))

            def __exit__(self, *exc):
                handoff.inside.active = False

        return Scope()

    def publish(self, batch):
        RecordingHandoff.log.append(("publish", threading.current_thread().name, int(batch[0][0])))
        return Handed(batch, event=("event", int(batch[0][0])))

    def receive(self, handed):
        RecordingHandoff.log.append(("receive", threading.current_thread().name, int(handed.batch[0][0])))
        return handed.batch


def test_decode_thread_publishes_and_the_consumer_receives_each_batch_in_order(jpegs, monkeypatch):
    RecordingHandoff.log = []
    monkeypatch.setattr(device_decode, "StreamHandoff", RecordingHandoff)
    real = device_decode.decode_items

    def decode(items, dataset, decoder, stats=None):
        RecordingHandoff.log.append(("decode", threading.current_thread().name, items.rows[0]))
        return real(items, dataset, decoder, stats)

    monkeypatch.setattr(device_decode, "decode_items", decode)
    seen = []
    for rows, _, _ in iter_device_batches(jpegs, range(9), preprocess=_preprocess(), batch_size=3, num_workers=0,
                                          background=True):
        seen.append(int(rows[0]))
        RecordingHandoff.log.append(("consume", threading.current_thread().name, int(rows[0])))
    assert seen == [0, 3, 6]
    log = RecordingHandoff.log
    main = threading.current_thread().name
    assert log[0][0] == "enter" and log[0][1] == "featcache-gpu-decode"  # the decode stream is current first
    for first in seen:
        steps = [(step, thread) for step, thread, row in log if row == first]
        # decode and publish in the decode thread, then receive before the consumer uses the batch, in its thread
        assert steps == [("decode", "featcache-gpu-decode"), ("publish", "featcache-gpu-decode"),
                         ("receive", main), ("consume", main)], steps


def test_stream_handoff_on_the_cpu_passes_batches_through():
    handoff = StreamHandoff("cpu")
    batch = (torch.arange(2), torch.zeros(2, 3, 4, 4, dtype=torch.uint8), ["", ""])
    with handoff.producing():
        handed = handoff.publish(batch)
    assert handoff.stream is None and handed.event is None and handoff.receive(handed) is batch


def test_decode_settles_the_stream_before_every_device_call(jpegs, monkeypatch):
    """Each decode call (the batched one and each retry alone) waits for the stream's queued work first."""
    real = select_decoder("cpu")
    order = []
    monkeypatch.setattr(decoders, "settle_stream", lambda device: order.append("settle"))

    def picky(datas):
        order.append(f"decode{len(datas)}")
        if len(datas) > 1:
            raise RuntimeError("device decoder: unsupported JPEG")
        return real.decode(datas)

    datas = [torch.frombuffer(bytearray(Path(path).read_bytes()), dtype=torch.uint8) for path in jpegs[:2]]
    assert all(image is not None for image in decode_each(DeviceDecoder("picky", "cpu", picky, False), datas))
    assert order == ["settle", "decode2", "settle", "decode1", "settle", "decode1"]


@pytest.mark.parametrize("reader,workers", [("threads", 2), ("threads", 1), ("processes", 2)])
def test_readers_give_the_same_batches(jpegs, reader, workers):
    preprocess = _preprocess()
    rows = list(range(len(jpegs)))[::-1]

    def run(reader, workers):
        return list(iter_device_batches(jpegs, rows, preprocess=preprocess, batch_size=4, num_workers=workers,
                                        reader=reader))

    want, got = run("processes", 0), run(reader, workers)
    assert [b[0].tolist() for b in got] == [b[0].tolist() for b in want] == [rows[:4], rows[4:8], rows[8:]]
    for a, b in zip(want, got):
        assert torch.equal(a[1], b[1]) and a[2] == b[2]


def test_thread_reader_closes_early_and_names_a_bad_reader(jpegs):
    dataset = DeviceDecodeDataset(jpegs, _preprocess())
    batches = iter_packed_batches(dataset, [[0, 1], [2, 3], [4, 5], [6, 7]], reader="threads", num_workers=2,
                                  prefetch_factor=1)
    assert next(batches).rows == [0, 1]
    batches.close()  # cancels what is queued and joins the pool
    assert not [t for t in threading.enumerate() if t.name.startswith("featcache-read")]
    with pytest.raises(ValueError, match="reader 'thread' is not one of 'processes', 'threads'"):
        iter_packed_batches(dataset, [[0]], reader="thread")


def test_decode_stats_count_device_cpu_rejected_and_bad_rows(jpegs, caplog):
    real = select_decoder("cpu")
    reject = len(Path(jpegs[4]).read_bytes())

    def picky(datas):
        if any(len(data) == reject for data in datas):
            raise RuntimeError("device decoder: unsupported JPEG")
        return real.decode(datas)

    dataset = DeviceDecodeDataset(jpegs, _preprocess())
    stats = DecodeStats()
    _, _, reasons = decode_items([dataset[i] for i in range(len(jpegs))], dataset,
                                 DeviceDecoder("picky", "cpu", picky, real.applies_exif), stats)
    assert reasons[:10] == [""] * 10 and reasons[10]
    assert stats == DecodeStats(device=8, cpu=2, rejected=1, bad=1)
    stats = DecodeStats()
    with caplog.at_level(logging.INFO, logger="featcache.extract.decode.device"):
        list(iter_device_batches(jpegs, range(len(jpegs)), preprocess=_preprocess(), batch_size=5, num_workers=0,
                                 stats=stats))
    assert stats == DecodeStats(device=9, cpu=2, rejected=0, bad=1)
    assert "9 rows on the device, 2 on the CPU path (0 rejected by the device decoder), 1 bad" in caplog.text
