"""The benchmark scripts' end-to-end helpers still run against the library's current API (tiny inputs)."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def bench_extract(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module("bench_extract")


def test_bench_extract_end_to_end_runs(bench_extract, tmp_path):
    """The ``ratio`` case's ``extract_to_store`` call (it broke silently once when the engine's arguments moved)."""
    manifest = bench_extract.make_images(tmp_path / "images", 6, "digits")
    assert bench_extract.end_to_end(manifest, batch_size=4, workers=0) > 0
