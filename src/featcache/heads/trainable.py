"""Whether a dataset's rows can train and score a head: train and test rows, and a varied regression target.

One check for every entry point that meets rows not made by ``prepare`` (a hand-made manifest, a store whose
images were skipped): the prepare, train and finetune stages and :func:`featcache.finetune.finetune`. It
imports nothing (cheap for ``prepare``); the caller passes its own ``UserError`` class and the hint that fits
where the rows came from.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["REQUIRED_SPLITS", "check_trainable_rows"]

#: The splits that must hold rows: a head is fit on train and scored on test. An empty val is allowed (each
#: head then holds out part of train to select on).
REQUIRED_SPLITS = ("train", "test")


def check_trainable_rows(counts: Mapping[str, int], train_targets: Any, where: str, empty_hint: str,
                         constant_hint: str, error: type[Exception]) -> None:
    """Refuse rows a head cannot be fit and scored on, naming what is wrong, what is allowed and the fix.

    Refused: a :data:`REQUIRED_SPLITS` split without rows (else a head fails deep in scikit-learn, or a
    metric is NaN), and a regression train split whose targets are all equal (a head fit on it predicts
    that constant whatever the image, and R² = 1 - SS_res / SS_tot is undefined).

    Parameters
    ----------
    counts : mapping of str to int
        Rows per split (``train``, ``val``, ``test``).
    train_targets : numpy.ndarray or None
        (n_train,) regression targets of the train split; None for classification.
    where : str
        What holds the rows, for the message (``"The csv data at data/x"``, ``"Feature store f.h5"``).
    empty_hint : str
        How to fill an empty split; ``{split}`` in it is replaced by the (first) empty split's name.
    constant_hint : str
        How to fix a constant train target.
    error : type of Exception
        The class raised (a :class:`~featcache.errors.UserError`).

    Raises
    ------
    error
        Naming the empty splits with the rows per split, or the constant target and the number of train rows.
    """
    empty = [split for split in REQUIRED_SPLITS if not counts.get(split, 0)]
    if empty:
        shown = {split: int(counts.get(split, 0)) for split in ("train", "val", "test")}
        raise error(f"{where} has no {' and no '.join(empty)} rows (rows per split: {shown}); allowed: at least "
                    f"one train and one test row (val may be empty). Hint: {empty_hint.format(split=empty[0])}")
    if train_targets is not None and float(train_targets.min()) == float(train_targets.max()):
        raise error(f"{where}: all {train_targets.size} train rows have the same regression target "
                    f"{float(train_targets.min()):g}; a head cannot learn from a constant target (R² is undefined). "
                    f"Allowed: train targets with at least two distinct values. Hint: {constant_hint}")
