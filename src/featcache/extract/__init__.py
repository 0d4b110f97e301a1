"""Feature extraction: backbone registry, weights, preprocessing, data loading, runners."""

from featcache.extract.engine import ExtractionError, ExtractionReport, extract_to_store, resolve_device
from featcache.extract.manifest import Manifest, ManifestError, assign_splits
from featcache.extract.preprocess import Preprocessor, load_rgb, to_rgb
from featcache.extract.registry import (
    BACKBONES, BackboneSpec, LayerAlias, UnknownNameError, get_backbone, list_backbones, list_layers, resolve_layer,
)
from featcache.extract.sources import build_manifest, from_csv, from_folder, write_digits
from featcache.extract.torch_runner import TorchFeatureExtractor, graph_node_names, pool_features
from featcache.extract.weights import LoadedBackbone, WeightsNotFoundError, load_backbone

__all__ = [
    "BACKBONES", "BackboneSpec", "ExtractionError", "ExtractionReport", "LayerAlias", "LoadedBackbone", "Manifest",
    "ManifestError", "Preprocessor", "TorchFeatureExtractor", "UnknownNameError", "WeightsNotFoundError",
    "assign_splits", "build_manifest", "extract_to_store", "from_csv", "from_folder", "get_backbone",
    "graph_node_names", "list_backbones", "list_layers", "load_backbone", "load_rgb", "pool_features",
    "resolve_device", "resolve_layer", "to_rgb", "write_digits",
]
