"""The model zoo: the backbone registry (layer aliases, nodes, input size, preprocessing facts) and the weights.

Both extraction and fine-tuning build backbones from here. ``registry`` imports no torch.
"""

from __future__ import annotations

from featcache.lazy import lazy_exports

#: Public name -> the submodule that defines it.
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(["BACKBONES", "BackboneSpec", "LayerAlias", "UnknownNameError", "get_backbone", "list_backbones",
                     "list_layers", "resolve_layer"], "registry"),
    **dict.fromkeys(["LoadedBackbone", "WeightsNotFoundError", "WeightsSource", "load_backbone", "resolve_weights"],
                    "weights"),
}

__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
