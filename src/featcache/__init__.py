"""featcache: transfer learning on cached CNN features.

Data flow, one subpackage per arrow::

    extract/  -> store/  -> heads/  -> pipeline/

See ``README.md`` for the quick start and ``dvc.yaml`` for the stages.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
