"""Fixtures of the extract tests: random-weight backbones built once per session."""

from __future__ import annotations

import functools

import pytest
import torch

from featcache.extract.zoo.weights import LoadedBackbone, load_backbone


@functools.lru_cache(maxsize=None)
def _cached_random_backbone(name: str) -> LoadedBackbone:
    return load_backbone(name, "random")


@pytest.fixture(scope="session")
def random_backbone():
    """``random_backbone(name)`` -> a cached :class:`LoadedBackbone` with seed-0 random weights.

    Shared between tests: never modify the returned model (build a fresh one
    with ``load_backbone`` for tests that change train/eval state or weights).
    """
    return _cached_random_backbone


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch reports two CUDA devices (nothing runs on them)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "NVIDIA H200")


@pytest.fixture(autouse=True, scope="session")
def _few_threads():
    """The test machine has 2 cores; keep torch from oversubscribing them."""
    previous = torch.get_num_threads()
    torch.set_num_threads(min(previous, 2))
    yield
    torch.set_num_threads(previous)
