"""Pipeline stages (thin: parse params, call the library, write outputs) and the CLI.

Python API, one function per ``dvc.yaml`` stage::

    from featcache.pipeline import load_params, prepare, extract, train, compare
    params = load_params("params.yaml")
    prepare(params, "data/prepared")
    extract(params, "efficientnet_lite0", "data/prepared/manifest.csv", "features/digits/efficientnet_lite0.h5")

:func:`extract_features` gives a backbone's layers for some images as numpy arrays (the extract stage in a
temporary folder), and :func:`export_serving_model` writes a trained run folder as one ONNX file for serving
(:func:`export_selected`: the run ``compare`` selected, as the ``export`` stage does).

The names are imported on first use (PEP 562): ``featcache --help`` and the
commands that run no model import neither torch nor the heads.
"""

from __future__ import annotations

import sys
from types import ModuleType
from typing import Any

from featcache.lazy import lazy_exports

#: Public name -> the submodule that defines it.
_EXPORTS: dict[str, str] = {
    "compare": "compare",
    **dict.fromkeys(["Params", "load_params", "parse_params"], "config"),
    "ConfigError": "params.base",
    "extract": "extract",
    **dict.fromkeys(["ImageFeatures", "extract_features"], "arrays"),
    "export_selected": "serve",
    "export_serving_model": "serve",
    "prepare": "prepare",
    "train": "train",
}

__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)


class _Package(ModuleType):
    """This package, where a stage function keeps its name when its same-named submodule is imported.

    ``import featcache.pipeline.extract`` makes the import system set the
    package attribute ``extract`` to the submodule; as when this package
    imported its stages eagerly, ``featcache.pipeline.extract`` stays the stage
    function.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, ModuleType) and _EXPORTS.get(name) == name and hasattr(value, name):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
