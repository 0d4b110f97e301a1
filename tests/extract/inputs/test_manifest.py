"""Manifest: validation, CSV round trip, content hash, deterministic stratified splits."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest

from featcache.extract.inputs.manifest import Manifest, ManifestError, assign_splits, split_rank_key
from featcache.store.schema import SPLIT_CODES

TRAIN, VAL, TEST = (SPLIT_CODES[s] for s in ("train", "val", "test"))
RATIOS = {"train": 0.7, "val": 0.15, "test": 0.15}


def _classification(root: Path, ids=("a/1.png", "a/2.png", "b/1.png"), splits=(0, 1, 2), labels=(0, 0, 1)):
    return Manifest(list(ids), list(ids), np.array(splits, dtype=np.uint8), "classification",
                    labels=np.array(labels, dtype=np.int64), classes=["a", "b"], root=root)


# --------------------------------------------------------------- validation
def test_duplicate_ids_are_rejected_by_name(tmp_path):
    with pytest.raises(ManifestError, match=r"Duplicate ids.*'a/1.png'"):
        _classification(tmp_path, ids=("a/1.png", "a/1.png", "b/1.png"))


def test_unsorted_ids_are_rejected(tmp_path):
    with pytest.raises(ManifestError, match=r"sorted .*id 'a/1.png' \(row 1\) comes after 'b/1.png'\. "
                                            r"Hint: sort manifest.csv by its id column"):
        _classification(tmp_path, ids=("b/1.png", "a/1.png", "a/2.png"))


def test_lengths_and_annotations_are_checked(tmp_path):
    with pytest.raises(ManifestError, match="same length"):
        Manifest(["a", "b"], ["a"], np.zeros(2, np.uint8), labels=np.zeros(2, np.int64))
    with pytest.raises(ManifestError, match="label"):
        Manifest(["a", "b"], ["a", "b"], np.zeros(2, np.uint8))
    with pytest.raises(ManifestError, match="target"):
        Manifest(["a", "b"], ["a", "b"], np.zeros(2, np.uint8), task="regression")
    with pytest.raises(ManifestError, match="task"):
        Manifest(["a"], ["a"], np.zeros(1, np.uint8), task="ranking", labels=np.zeros(1, np.int64))


def test_sorted_reorders_every_column(tmp_path):
    manifest = Manifest.sorted(["c", "a", "b"], ["pc", "pa", "pb"], np.array([2, 0, 1]), task="regression",
                               targets=np.array([3.0, 1.0, 2.0]), root=tmp_path)
    assert manifest.ids == ["a", "b", "c"] and manifest.paths == ["pa", "pb", "pc"]
    np.testing.assert_array_equal(manifest.splits, [0, 1, 2])
    np.testing.assert_array_equal(manifest.targets, [1.0, 2.0, 3.0])
    assert manifest.splits.dtype == np.uint8
    assert manifest.split_counts() == {"train": 1, "val": 1, "test": 1}
    assert manifest.absolute_path(0) == (tmp_path / "pa").resolve()


# -------------------------------------------------------------------- CSV I/O
def test_csv_text():
    manifest = _classification(Path("."))
    assert manifest.to_csv_text() == (
        "id,path,split,label,target\n"
        "a/1.png,a/1.png,train,a,\n"
        "a/2.png,a/2.png,val,a,\n"
        "b/1.png,b/1.png,test,b,\n"
    )


def test_write_read_round_trip_relative_to_the_manifest(tmp_path):
    images = tmp_path / "data" / "images"
    manifest = _classification(images)
    out = manifest.write(tmp_path / "prepared" / "manifest.csv")
    assert out == tmp_path / "prepared" / "manifest.csv"
    assert not out.with_name("manifest.csv.partial").exists()
    with open(out, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["path"] for r in rows] == ["../data/images/a/1.png", "../data/images/a/2.png", "../data/images/b/1.png"]
    again = Manifest.read(out)
    assert again.ids == manifest.ids and again.classes == manifest.classes
    np.testing.assert_array_equal(again.labels, manifest.labels)
    np.testing.assert_array_equal(again.splits, manifest.splits)
    assert again.task == "classification" and again.targets is None
    assert [again.absolute_path(i) for i in range(3)] == [manifest.absolute_path(i) for i in range(3)]
    # Written next to the images, the paths stay plain relative paths.
    local = manifest.write(images / "manifest.csv")
    assert Manifest.read(local).paths == manifest.paths


def test_read_with_explicit_classes_keeps_their_order(tmp_path):
    path = _classification(tmp_path).write(tmp_path / "m.csv")
    again = Manifest.read(path, classes=["b", "a", "c"])
    assert again.classes == ["b", "a", "c"]
    np.testing.assert_array_equal(again.labels, [1, 1, 0])


def test_regression_round_trip(tmp_path):
    targets = np.array([0.1, -2.5, 1e-17, 3.0])
    manifest = Manifest(["w", "x", "y", "z"], ["w.png", "x.png", "y.png", "z.png"],
                        np.array([0, 0, 1, 2], np.uint8), "regression", targets=targets, root=tmp_path)
    again = Manifest.read(manifest.write(tmp_path / "sub" / "m.csv"))
    assert again.task == "regression" and again.labels is None and again.classes == []
    np.testing.assert_array_equal(again.targets, targets)  # repr() round-trips floats exactly
    assert again.absolute_path(1) == (tmp_path / "x.png").resolve()


def test_read_empty_manifest(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("id,path,split,label,target\n")
    with pytest.raises(ManifestError, match="no rows"):
        Manifest.read(path)


def test_sha256_tracks_content(tmp_path):
    base = _classification(tmp_path)
    assert base.sha256() == _classification(tmp_path / "elsewhere").sha256()  # the root is not content
    assert base.sha256() != _classification(tmp_path, splits=(0, 0, 2)).sha256()
    assert base.sha256() != _classification(tmp_path, labels=(0, 1, 1)).sha256()
    assert len(base.sha256()) == 64


# -------------------------------------------------------------- assign_splits
def _check_counts(splits: np.ndarray, n: int, ratios: dict) -> None:
    for name, code in SPLIT_CODES.items():
        exact = ratios.get(name, 0.0) * n
        count = int((splits == code).sum())
        assert math.floor(exact) <= count <= math.ceil(exact), (name, count, exact)


def _ids(n: int) -> list[str]:
    return [f"c/{i:04d}.png" for i in range(n)]


def test_assign_splits_is_deterministic_and_seeded():
    first = assign_splits(_ids(100), RATIOS, seed=0)
    assert first.dtype == np.uint8 and first.shape == (100,)
    np.testing.assert_array_equal(first, assign_splits(_ids(100), RATIOS, seed=0))
    assert not np.array_equal(first, assign_splits(_ids(100), RATIOS, seed=1))
    assert set(np.unique(first)) == {TRAIN, VAL, TEST}


@pytest.mark.parametrize("n", [1, 2, 3, 7, 10, 33, 101])
def test_assign_splits_largest_remainder(n):
    splits = assign_splits(_ids(n), RATIOS, seed=3)
    _check_counts(splits, n, RATIOS)
    assert np.bincount(splits, minlength=3).sum() == n


def test_largest_remainder_example():
    # 10 x (0.7, 0.15, 0.15) = (7, 1.5, 1.5): floors (7, 1, 1), the one left over goes to the first tie (val).
    np.testing.assert_array_equal(np.bincount(assign_splits(_ids(10), RATIOS, 0), minlength=3), [7, 2, 1])
    np.testing.assert_array_equal(np.bincount(assign_splits(_ids(10), {"train": 0.8, "val": 0.0, "test": 0.2}, 0),
                                              minlength=3), [8, 0, 2])


def test_assign_splits_is_stratified():
    strata = np.repeat(np.arange(4), [10, 20, 7, 3])
    np.random.default_rng(0).shuffle(strata)
    splits = assign_splits(_ids(len(strata)), RATIOS, seed=5, strata=strata)
    for group in range(4):
        members = splits[strata == group]
        _check_counts(members, len(members), RATIOS)
    # Without strata the classes are not balanced per split in general; with them they always are.
    assert np.array_equal(splits, assign_splits(_ids(len(strata)), RATIOS, seed=5, strata=strata))
    assert not np.array_equal(splits, assign_splits(_ids(len(strata)), RATIOS, seed=6, strata=strata))


@pytest.mark.parametrize("change", ["add", "remove"])
def test_adding_or_removing_images_moves_only_rows_at_the_split_boundaries(change):
    """The README's loop (add images, rerun, compare) keeps every other image in its split."""
    rng = np.random.default_rng(0)
    ids = [f"{c}/{i:04d}.jpg" for c in "abc" for i in range(rng.integers(20, 60))]
    strata = np.array([ord(i[0]) for i in ids])
    before = dict(zip(ids, assign_splits(ids, RATIOS, 7, strata=strata)))
    k = 5  # images added to (or removed from) class b
    if change == "add":
        changed = ids + [f"b/new{i}.jpg" for i in range(k)]
    else:
        changed = [i for i in ids if i not in set(rng.choice([i for i in ids if i[0] == "b"], k, replace=False))]
    after = dict(zip(sorted(changed), assign_splits(sorted(changed), RATIOS, 7,
                                                    strata=np.array([ord(i[0]) for i in sorted(changed)]))))
    moved = [i for i in after if i in before and after[i] != before[i]]
    assert all(i.startswith("b/") for i in moved)  # the classes that did not change keep every split
    assert len(moved) <= 2 * k  # at most one row per boundary (test|val, val|train) per image added or removed
    _check_counts(np.array([after[i] for i in after if i[0] == "b"]), sum(i[0] == "b" for i in after), RATIOS)


def test_a_reencoded_image_keeps_its_rank():
    assert split_rank_key("cat/a.png", 3) == split_rank_key("cat/a.jpg", 3) == split_rank_key("cat/a", 3)
    assert split_rank_key("cat/a.png", 3) != split_rank_key("cat/a.png", 4) != split_rank_key("cat/b.png", 4)


def test_assign_splits_val_zero():
    splits = assign_splits(_ids(20), {"train": 0.75, "test": 0.25}, seed=0)
    np.testing.assert_array_equal(np.bincount(splits, minlength=3), [15, 0, 5])


@pytest.mark.parametrize("ratios", [
    {"train": 0.8, "val": 0.2, "test": 0.2},    # sums to 1.2: train was silently shrunk
    {"train": 0.5, "val": 0.2, "test": 0.2},    # sums to 0.9: train silently took the rest
    {"train": 0.6, "valid": 0.2, "test": 0.2},  # a misspelt split was ignored (val got 0)
    {"train": 1.2, "val": -0.4, "test": 0.2},   # a negative ratio gave val most of the rows
    {"train": float("nan"), "val": 0.5, "test": 0.5},
])
def test_assign_splits_rejects_ratios_that_are_not_fractions_summing_to_one(ratios):
    with pytest.raises(ManifestError, match="ratios"):
        assign_splits(_ids(50), ratios, seed=0)


@pytest.mark.parametrize("n_strata", [25, 60])
def test_assign_splits_rejects_strata_of_another_length(n_strata):
    # 25: the rows past the strata were left as np.empty's uninitialised bytes (any split code, or none);
    # 60: an IndexError from inside numpy.
    with pytest.raises(ManifestError, match=r"strata has shape \(%d,\); it must be \(50,\)" % n_strata):
        assign_splits(_ids(50), RATIOS, seed=0, strata=np.arange(n_strata) % 3)


def test_from_folder_rejects_ratios_that_do_not_sum_to_one(tmp_path):
    """The public ``from_folder`` (``featcache.extract``) gets no ``params.yaml`` check in front of it."""
    from featcache.extract.inputs.sources import from_folder

    for label in ("a", "b"):
        (tmp_path / label).mkdir()
        for i in range(5):
            (tmp_path / label / f"{i}.png").write_bytes(b"")
    with pytest.raises(ManifestError, match="ratios"):
        from_folder(tmp_path, {"train": 0.8, "val": 0.2, "test": 0.2}, seed=0)
