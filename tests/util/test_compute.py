"""The torch-free helpers of featcache.util.compute."""

from __future__ import annotations

import importlib.metadata
import sys
import types

from featcache.util.compute import torch_version


def test_torch_version_drops_the_local_tag_of_an_imported_torch(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(__version__="2.4.1+cu121"))
    assert torch_version() == "2.4.1"


def test_torch_version_reads_the_package_metadata_without_importing_torch(monkeypatch):
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "2.5.0+cpu" if name == "torch" else "0")
    assert torch_version() == "2.5.0"
    assert "torch" not in sys.modules
