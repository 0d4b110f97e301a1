"""Pipeline stages (thin: parse params, call the library, write outputs) and the CLI.

Python API, one function per ``dvc.yaml`` stage::

    from featcache.pipeline import load_params, prepare, extract, train, compare
    params = load_params("params.yaml")
    prepare(params, "data/prepared")
    extract(params, "efficientnet_lite0", "data/prepared/manifest.csv", "features/digits/efficientnet_lite0.h5")
"""

from featcache.pipeline.compare import compare
from featcache.pipeline.config import ConfigError, Params, load_params, parse_params
from featcache.pipeline.extract import extract
from featcache.pipeline.prepare import make_digits, prepare
from featcache.pipeline.train import train

__all__ = ["ConfigError", "Params", "compare", "extract", "load_params", "make_digits", "parse_params",
           "prepare", "train"]
