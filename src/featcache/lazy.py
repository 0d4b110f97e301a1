"""Lazy package exports (PEP 562): a package's public names, imported on first use.

A package ``__init__`` lists which submodule defines each public name and
gets ``__getattr__``/``__dir__``/``__all__`` from :func:`lazy_exports`::

    __getattr__, __dir__, __all__ = lazy_exports(__name__, {"FeatureStore": "reader", ...})

so ``import featcache.extract.zoo.registry`` or ``featcache --help`` do not import
torch, h5py or scikit-learn through a package ``__init__``. This module
imports nothing from featcache: any module may use it.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any, Callable, Mapping

__all__ = ["lazy_exports"]


def lazy_exports(package: str, exports: Mapping[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]],
                                                                     list[str]]:
    """Module ``__getattr__``, ``__dir__`` and ``__all__`` for lazily imported public names.

    Parameters
    ----------
    package : str
        The package's ``__name__``.
    exports : mapping of str to str
        Public name -> name of the submodule (relative to ``package``) that defines it.

    Returns
    -------
    tuple
        ``(__getattr__, __dir__, __all__)``; the first import of a name stores
        it in the package's namespace, so later accesses are plain attributes.
    """
    names = sorted(exports)

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{exports[name]}"), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[package]), *names})

    return __getattr__, __dir__, names
