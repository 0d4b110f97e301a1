"""Feature extraction: backbone registry, weights, preprocessing, data loading, runners.

The public names below are imported on first use (PEP 562), so ``import
featcache.extract.zoo.registry`` (params checks, listings) does not import torch.
"""

from __future__ import annotations

from featcache.lazy import lazy_exports

#: Public name -> the submodule that defines it.
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(["ExtractionReport", "extract_to_store"], "engine"),
    **dict.fromkeys(["ExtractionPlan", "build_runner", "plan_extraction"], "plan"),
    **dict.fromkeys(["Manifest", "ManifestError", "assign_splits"], "inputs.manifest"),
    "Preprocessor": "decode.preprocess",
    **dict.fromkeys(["load_rgb", "to_rgb"], "decode.images"),
    **dict.fromkeys(["BACKBONES", "BackboneSpec", "LayerAlias", "UnknownNameError", "get_backbone", "list_backbones",
                     "list_layers", "resolve_layer"], "zoo.registry"),
    **dict.fromkeys(["build_manifest", "from_csv", "from_folder", "write_digits"], "inputs.sources"),
    **dict.fromkeys(["TorchFeatureExtractor", "graph_node_names", "pool_features"], "runners.torch_runner"),
    **dict.fromkeys(["LoadedBackbone", "WeightsNotFoundError", "load_backbone"], "zoo.weights"),
}

__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
