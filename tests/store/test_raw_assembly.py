"""Assembly copies the compressed chunks of the block files instead of compressing every feature again.

A block file stores its features chunked and filtered like the final store,
so each final chunk that is one whole chunk of a block file is copied as its
stored bytes; chunks behind a skipped row (the grid shifts) are regrouped and
compressed again. Either way the final file is byte-identical to one whose
every chunk was compressed at assembly (the previous behaviour), and its
features read back exactly.
"""

from __future__ import annotations

import logging

import h5py
import numpy as np
import pytest

from _support import synth_store as synth
from featcache.store import assemble


def _raw_counts(caplog) -> dict[str, tuple[int, int]]:
    counts = {}
    for record in caplog.records:
        if record.name == assemble.__name__ and "copied raw" in record.getMessage():
            layer, raw, total = record.args
            counts[layer] = (raw, total)
    return counts


@pytest.mark.parametrize(("skip", "expected"), [
    (frozenset(), {"pool": (5, 5), "fc": (5, 5)}),  # 37 rows in 8-row chunks: all 5 copied, the short last one too
    (frozenset({20}), {"pool": (2, 5), "fc": (2, 5)}),  # blocks 0-1 aligned; behind row 20 the grid shifts
    (synth.SKIP, {"pool": (0, 5), "fc": (0, 5)}),  # row 3 is skipped: no chunk aligned
])
def test_raw_chunks_give_the_bytes_of_a_full_recompression(tmp_path, caplog, file_md5, skip, expected):
    def write(path, raw_chunks):
        with synth.StoreWriter(path, **synth.make_kwargs()) as writer:
            synth.commit(writer, writer.pending_blocks(), skip=skip)
            return writer.finalize(raw_chunks=raw_chunks)

    with caplog.at_level(logging.DEBUG, logger=assemble.__name__):
        raw = write(tmp_path / "raw" / "x.h5", True)
    assert _raw_counts(caplog) == expected
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger=assemble.__name__):
        recompressed = write(tmp_path / "recompressed" / "x.h5", False)
    assert _raw_counts(caplog) == {"pool": (0, 5), "fc": (0, 5)}
    assert file_md5(raw) == file_md5(recompressed)

    kept = [row for row in range(synth.N) if row not in skip]
    with h5py.File(raw, "r") as handle:
        for spec in synth.LAYERS:
            expected_rows = synth.features_for(spec.alias, kept).astype(np.float16)
            np.testing.assert_array_equal(handle["features"][spec.alias][()], expected_rows)
            assert handle["features"][spec.alias].chunks == (synth.BLOCK_ROWS, spec.dim)


def test_layout_does_not_depend_on_the_chunk_cache(tmp_path, file_md5):
    """The digits' geometry: 192-wide chunks fit h5py's chunk cache, 1280-wide ones do not.

    Written through a cache, the small chunks would land after the dataset's
    attributes and the large ones before: raw copies (never cached) would then
    give another file. The store is written without a chunk cache.
    """
    n, block_rows = 1100, 512
    layers = (synth.LayerSpec("pool", "pool", 1280, "avg", (1280, 7, 7), True),
              synth.LayerSpec("block6", "blocks.5", 192, "avg", (192, 7, 7), False))
    rng = np.random.default_rng(0)
    features = {spec.alias: rng.random((n, spec.dim), dtype=np.float32) for spec in layers}

    def write(path, raw_chunks):
        kwargs = synth.make_kwargs(n, layers=layers, block_rows=block_rows)
        with synth.StoreWriter(path, **kwargs) as writer:
            for block in writer.pending_blocks():
                span = writer.block_range(block)
                rows = np.arange(span.start, span.stop)
                writer.commit_block(block, rows, {alias: value[rows] for alias, value in features.items()})
            return writer.finalize(raw_chunks=raw_chunks)

    raw = write(tmp_path / "raw" / "x.h5", True)
    assert file_md5(write(tmp_path / "recompressed" / "x.h5", False)) == file_md5(raw)
