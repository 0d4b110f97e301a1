"""The ONNX runtime path: the exported file's format, the export, its cache, the onnxruntime runner, parity, and
the served model (backbone and a trained head in one file)."""

from __future__ import annotations

from featcache.lazy import lazy_exports

#: Public name -> the submodule that defines it.
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(["export_onnx"], "export"),
    **dict.fromkeys(["cached_export"], "cache"),
    **dict.fromkeys(["OnnxFeatureRunner"], "runner"),
    **dict.fromkeys(["ParityError", "format_parity", "parity_check"], "parity"),
    **dict.fromkeys(["feature_graph", "serving_description", "serving_model", "write_serving_model"], "serve"),
}

__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
