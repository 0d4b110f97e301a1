"""A fine-tuned model read back from its run folder: :class:`SavedRun`, what the exports are made from.

:func:`~featcache.finetune.run.finetune` writes ``model.pt`` (the best state
dict), ``model.json`` (:meth:`~featcache.finetune.run.FinetuneResult.metadata`)
and ``bad_images.json`` into its ``out_dir``; :meth:`SavedRun.load` rebuilds the
model and the settings from them, so the ONNX export and the CAM overlays
(``featcache finetune-export``, the ``export@<mode>`` stage of
``finetune/dvc.yaml``) run without training again, and give what they gave from
the run's result in memory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from featcache.errors import UserError
from featcache.extract.inputs.manifest import Manifest
from featcache.extract.zoo.registry import BackboneSpec, get_backbone
from featcache.finetune.config import FinetuneConfig
from featcache.finetune.model import load_checkpoint
from featcache.finetune.run import BAD_IMAGES_NAME, CHECKPOINT_NAME, META_FORMAT, META_NAME
from featcache.store.schema import SPLIT_CODES

__all__ = ["SavedRun", "SavedRunError"]


class SavedRunError(UserError, ValueError):
    """A run folder that cannot be read back (missing files, another format, another manifest)."""


@dataclass
class SavedRun:
    """A fine-tuned model and the settings it was trained with, read from its run folder.

    The attributes the exports read have the names and meanings of
    :class:`~featcache.finetune.run.FinetuneResult`'s.

    Attributes
    ----------
    model : nn.Module
        The best checkpoint's model, in eval mode, on the CPU.
    spec : BackboneSpec
        The backbone's registry entry.
    config : FinetuneConfig
        The settings of the run.
    task : str
        ``classification`` or ``regression``.
    classes : list of str
        Class names in output order (empty for regression).
    weights_id : str
        Id of the source weights.
    input_size : int
        Side of the square network input.
    target_mean, target_std : float
        Regression's target scaling (0 and 1 for classification).
    bad_ids : list of str
        Ids of the images the run could not decode (left out of its test rows).
    folder : Path
        The run folder.
    """

    model: nn.Module
    spec: BackboneSpec
    config: FinetuneConfig
    task: str
    classes: list[str]
    weights_id: str
    input_size: int
    target_mean: float
    target_std: float
    bad_ids: list[str] = field(default_factory=list)
    folder: Path = Path(".")

    @classmethod
    def load(cls, folder: str | Path) -> SavedRun:
        """Read ``model.json``, ``model.pt`` and ``bad_images.json`` of a run folder.

        Raises
        ------
        SavedRunError
            If a file is missing or ``model.json`` is not a fine-tuning run's.
        """
        folder = Path(folder)
        meta = _read_json(folder / META_NAME)
        if not isinstance(meta, dict) or meta.get("format") != META_FORMAT:
            found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
            raise SavedRunError(f"{folder / META_NAME} has format {found!r}; allowed: {META_FORMAT!r} (written by "
                                "`featcache finetune`). Hint: pass the --out folder of `featcache finetune`.")
        if not (folder / CHECKPOINT_NAME).is_file():
            raise SavedRunError(f"{folder} has no {CHECKPOINT_NAME}. Hint: rerun `featcache finetune` into it.")
        model = load_checkpoint(folder / CHECKPOINT_NAME, meta["backbone"], int(meta["n_outputs"]))
        if "transform_input" in meta:  # GoogLeNet: the input transform the run trained with
            model.transform_input = bool(meta["transform_input"])
        bad = _read_json(folder / BAD_IMAGES_NAME) if (folder / BAD_IMAGES_NAME).is_file() else {}
        return cls(model=model, spec=get_backbone(meta["backbone"]), config=FinetuneConfig.from_dict(meta["config"]),
                   task=meta["task"], classes=list(meta["classes"]), weights_id=meta["weights"],
                   input_size=int(meta["input_size"]), target_mean=float(meta["target_mean"]),
                   target_std=float(meta["target_std"]),
                   bad_ids=[str(item["id"]) for item in bad.get("bad_images", [])], folder=folder)

    def test_rows(self, manifest: Manifest) -> np.ndarray:
        """The manifest rows the run scored on test, in its order: the test split less the unreadable images.

        Raises
        ------
        SavedRunError
            If ``manifest`` is not the run's (another task or other classes).
        """
        classes = list(manifest.classes) if manifest.task == "classification" else []
        if manifest.task != self.task or classes != self.classes:
            raise SavedRunError(f"{self.folder} was trained on a {self.task} manifest with classes {self.classes}; "
                                f"the manifest given is a {manifest.task} one with classes {classes}. Hint: pass "
                                "the manifest the run was trained on (its --manifest).")
        bad = set(self.bad_ids)
        rows = np.flatnonzero(manifest.splits == SPLIT_CODES["test"])
        return np.asarray([row for row in rows if str(manifest.ids[row]) not in bad], dtype=np.int64)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SavedRunError(f"{path} not found. Hint: pass the --out folder of `featcache finetune`.") from None
    except (OSError, ValueError) as error:
        raise SavedRunError(f"{path} cannot be read ({error}). Hint: rerun `featcache finetune` into "
                            f"{path.parent}.") from None
