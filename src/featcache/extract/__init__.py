"""Feature extraction: backbone registry, weights, preprocessing, data loading, runners.

The public names below are imported on first use (PEP 562), so ``import
featcache.extract.registry`` (params checks, listings) does not import torch.
"""

from __future__ import annotations

from featcache.lazy import lazy_exports

#: Public name -> the submodule that defines it.
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(["ExtractionError", "ExtractionReport", "extract_to_store", "resolve_device"], "engine"),
    **dict.fromkeys(["Manifest", "ManifestError", "assign_splits"], "manifest"),
    **dict.fromkeys(["Preprocessor", "load_rgb", "to_rgb"], "preprocess"),
    **dict.fromkeys(["BACKBONES", "BackboneSpec", "LayerAlias", "UnknownNameError", "get_backbone", "list_backbones",
                     "list_layers", "resolve_layer"], "registry"),
    **dict.fromkeys(["build_manifest", "from_csv", "from_folder", "write_digits"], "sources"),
    **dict.fromkeys(["TorchFeatureExtractor", "graph_node_names", "pool_features"], "torch_runner"),
    **dict.fromkeys(["LoadedBackbone", "WeightsNotFoundError", "load_backbone"], "weights"),
}

__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
