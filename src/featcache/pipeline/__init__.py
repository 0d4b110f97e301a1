"""Pipeline stages (thin: parse params, call the library, write outputs) and the CLI.

Python API, one function per ``dvc.yaml`` stage::

    from featcache.pipeline import load_params, prepare, extract, train, compare
    params = load_params("params.yaml")
    prepare(params, "data/prepared")
    extract(params, "efficientnet_lite0", "data/prepared/manifest.csv", "features/digits/efficientnet_lite0.h5")

The names are imported on first use, so ``featcache <stage>`` runs only the
modules of its own stage (each stage lists exactly those files as its DVC deps).
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

__all__ = ["ConfigError", "Params", "compare", "extract", "load_params", "make_digits", "parse_params",
           "prepare", "train"]

#: Public name -> the stage (or config) module that defines it.
_HOMES = {"ConfigError": "config", "Params": "config", "load_params": "config", "parse_params": "config",
          "compare": "compare", "extract": "extract", "make_digits": "prepare", "prepare": "prepare",
          "train": "train"}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'featcache.pipeline' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"featcache.pipeline.{_HOMES[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])


class _Package(types.ModuleType):
    """Keeps ``featcache.pipeline.train`` (etc.) the *function* once its module is imported.

    Importing a submodule binds it on the package under the same name; the eager
    ``from .train import train`` this package used to run rebound the function.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _HOMES and isinstance(value, types.ModuleType):
            return  # the module stays reachable through sys.modules
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
