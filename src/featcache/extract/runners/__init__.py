"""The torch feature runner (graph truncated after the deepest requested node), its batch-memory check, and
its forward replayed from a CUDA graph."""

from __future__ import annotations

from featcache.lazy import lazy_exports

#: Public name -> the submodule that defines it.
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(["TorchFeatureExtractor", "graph_node_names", "pool_features"], "torch_runner"),
    **dict.fromkeys(["check_batch_memory", "estimate_batch_memory"], "memory"),
    "GraphedRunner": "graphs",
}

__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
