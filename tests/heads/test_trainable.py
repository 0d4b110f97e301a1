"""``check_trainable_rows``: the one check that rows can fit and score a head (prepare, train, finetune)."""

from __future__ import annotations

import numpy as np
import pytest

from featcache.heads.trainable import REQUIRED_SPLITS, check_trainable_rows


class _Refused(ValueError):
    pass


def _check(counts, targets=None):
    check_trainable_rows(counts, targets, "Data d", "fill '{split}'", "vary it", _Refused)


def test_train_and_test_need_rows_val_may_be_empty():
    assert REQUIRED_SPLITS == ("train", "test")
    _check({"train": 3, "val": 0, "test": 1})
    with pytest.raises(_Refused, match=r"^Data d has no test rows \(rows per split: \{'train': 3, 'val': 2, "
                                       r"'test': 0\}\); allowed: at least one train and one test row \(val may be "
                                       r"empty\)\. Hint: fill 'test'$"):
        _check({"train": 3, "val": 2, "test": 0})
    with pytest.raises(_Refused, match=r"has no train and no test rows .* Hint: fill 'train'$"):
        _check({"val": 2})


def test_a_constant_regression_train_target_is_refused():
    _check({"train": 2, "test": 1}, np.array([1.0, 2.0]))
    with pytest.raises(_Refused, match=r"^Data d: all 3 train rows have the same regression target -0\.5; .*R² is "
                                       r"undefined\)\. Allowed: train targets with at least two distinct values\. "
                                       r"Hint: vary it$"):
        _check({"train": 3, "test": 1}, np.full(3, -0.5))
