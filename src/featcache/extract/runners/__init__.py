"""The torch feature runner (graph truncated after the deepest requested node) and its batch-memory check."""

from __future__ import annotations

from featcache.lazy import lazy_exports

#: Public name -> the submodule that defines it.
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(["TorchFeatureExtractor", "graph_node_names", "pool_features"], "torch_runner"),
    **dict.fromkeys(["check_batch_memory", "estimate_batch_memory"], "memory"),
}

__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
