"""featcache: transfer learning on cached CNN features.

Data flow::

    images -> manifest (extract/inputs/) -> features (extract/) -> HDF5 (store/) -> heads/ -> compare

``finetune/`` is the optional end-to-end baseline, ranked beside the heads.

``pipeline/`` holds the stages and the CLI on top of the library; ``util/``, ``lazy.py``
and ``errors.py`` are leaves. See ``docs/ARCHITECTURE.md`` for the layout and its rules,
``README.md`` for the quick start and ``dvc.yaml`` for the stages.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
