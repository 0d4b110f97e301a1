"""End-to-end fine-tuning: the baseline that cached-feature heads must beat or approach.

Modules by purpose:

* :mod:`~featcache.finetune.config` - :class:`FinetuneConfig`, the one settings
  schema (also validates ``params.yaml``), and the modes;
* :mod:`~featcache.finetune.model` - new output layer, weight copy with a report;
* :mod:`~featcache.finetune.data` - manifest rows through the extraction
  preprocessor and dataset, augmentation, bad-image report;
* :mod:`~featcache.finetune.optim` - parameter groups, schedule, phases;
* :mod:`~featcache.finetune.trainer` - the epoch loop and scoring;
* :mod:`~featcache.finetune.run` - :func:`finetune` and :class:`FinetuneResult`;
* :mod:`~featcache.finetune.saved` - :class:`SavedRun`, a run read back from its folder (for the exports);
* :mod:`~featcache.finetune.export` - backbone state dict and ONNX export;
* :mod:`~featcache.finetune.cam` - class activation maps.

Names are imported on first use, so ``import featcache.finetune.config`` (the
params check) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

#: Public name -> submodule that defines it.
_WHERE = {
    "MODES": "config", "FinetuneConfig": "config",
    "WeightCopyReport": "model", "build_model": "model", "load_checkpoint": "model",
    "load_weights_with_report": "model", "replace_head": "model",
    "make_optimizer": "optim",
    "predict": "trainer",
    "FinetuneResult": "run", "finetune": "run", "SavedRun": "saved",
    "export_backbone": "export", "export_finetuned_onnx": "export",
    "cam_layer": "cam", "class_activation_maps": "cam", "save_cam_overlays": "cam", "tensor_to_pil": "cam",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'featcache.finetune' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"featcache.finetune.{_WHERE[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])
