"""The ``prepare`` stage refuses data the heads cannot be fit or scored on, before writing anything."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from featcache.extract.inputs.manifest import ManifestError
from featcache.pipeline import parse_params, prepare


def _csv_data(root: Path, rows: list[tuple[str, ...]], header: str = "path,target,split") -> Path:
    """``root/t.csv`` with ``header`` and ``rows``; every path gets a tiny image."""
    root.mkdir(parents=True, exist_ok=True)
    for row in rows:
        Image.fromarray(np.full((8, 8, 3), 100, dtype=np.uint8)).save(root / row[0])
    (root / "t.csv").write_text("\n".join([header, *(",".join(row) for row in rows)]) + "\n")
    return root


def _params(params_factory, root: Path, **data):
    raw = params_factory(str(root))
    raw["data"].update(source="csv", csv="t.csv", task="regression", **data)
    raw["heads"] = {}
    return parse_params(raw)


def test_a_csv_split_column_without_test_rows_is_refused_by_name(tmp_path, params_factory):
    rows = [(f"i{k}.png", str(k), "train" if k < 6 else "val") for k in range(8)]
    params = _params(params_factory, _csv_data(tmp_path / "data", rows))
    with pytest.raises(ManifestError, match=r"has no test rows \(rows per split: \{'train': 6, 'val': 2, 'test': 0\}\)"
                       r".*at least one train and one test row.*give some rows the split 'test'"):
        prepare(params, tmp_path / "prepared")
    assert not (tmp_path / "prepared" / "manifest.csv").exists()  # refused before anything is written


def test_a_tiny_dataset_whose_ratios_leave_test_empty_is_refused(tmp_path, params_factory):
    # 3 rows x test 0.1 = 0.3 rows: the largest remainder goes to train, test gets none
    rows = [(f"i{k}.png", str(k)) for k in range(3)]
    params = _params(params_factory, _csv_data(tmp_path / "data", rows, "path,target"),
                     split={"train": 0.8, "val": 0.1, "test": 0.1})
    with pytest.raises(ManifestError, match=r"no test rows.*'train': 3.*raise data\.split\.test "
                                            r"\(data\.split \{train: 0\.8, val: 0\.1, test: 0\.1\} of 3 rows"):
        prepare(params, tmp_path / "prepared")


def test_a_constant_regression_target_in_train_is_refused(tmp_path, params_factory):
    rows = [(f"i{k}.png", "2.5" if k < 6 else str(k), "train" if k < 6 else "test") for k in range(8)]
    params = _params(params_factory, _csv_data(tmp_path / "data", rows))
    with pytest.raises(ManifestError, match=r"all 6 train rows have the same regression target 2\.5.*"
                                            r"R² is undefined.*at least two distinct values.*Hint: check the target"):
        prepare(params, tmp_path / "prepared")


def test_an_empty_val_split_is_fine(tmp_path, params_factory):
    rows = [(f"i{k}.png", str(k), "train" if k < 6 else "test") for k in range(8)]
    manifest = prepare(_params(params_factory, _csv_data(tmp_path / "data", rows)), tmp_path / "prepared")
    assert manifest.split_counts() == {"train": 6, "val": 0, "test": 2}
