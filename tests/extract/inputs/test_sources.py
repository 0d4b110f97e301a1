"""Input sources: ImageFolder trees, user CSVs, the embedded digits, and the dispatcher."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from _support.files import write_image_folder
from featcache.extract.decode.images import load_rgb
from featcache.extract.inputs.manifest import ManifestError
from featcache.extract.inputs.sources import IMAGE_EXTENSIONS, build_manifest, from_csv, from_folder, write_digits
from featcache.store.schema import SPLIT_CODES

RATIOS = {"train": 0.6, "val": 0.2, "test": 0.2}


def _write_csv(path: Path, header: str, rows: list[str]) -> Path:
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return path


# ------------------------------------------------------------------- folder
def test_from_folder_ids_labels_and_splits(tmp_path):
    ids = write_image_folder(tmp_path, classes=("cat", "ant", "bee"), per_class=10, size=8)
    (tmp_path / "ant" / "readme.txt").write_text("not an image")
    (tmp_path / ".hidden").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / ".hidden" / "x.png")
    Image.new("RGB", (4, 4)).save(tmp_path / "top_level.png")  # not in a class folder
    (tmp_path / "bee" / "nested").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "bee" / "nested" / "deep.JPG")
    manifest = from_folder(tmp_path, RATIOS, seed=0)
    expected = sorted(ids + ["bee/nested/deep.JPG"])
    assert manifest.ids == expected and manifest.paths == expected
    assert manifest.classes == ["ant", "bee", "cat"]
    np.testing.assert_array_equal(manifest.labels, [manifest.classes.index(i.split("/")[0]) for i in expected])
    assert manifest.root == tmp_path and manifest.task == "classification"
    assert all(manifest.absolute_path(r).is_file() for r in range(len(manifest)))
    for k in range(3):  # stratified: 10 or 11 per class -> 6 or 7 train, 2 val, 2 test
        counts = np.bincount(manifest.splits[manifest.labels == k], minlength=3)
        assert counts[SPLIT_CODES["val"]] == 2 and counts[SPLIT_CODES["test"]] == 2
    again = from_folder(tmp_path, RATIOS, seed=0)
    np.testing.assert_array_equal(again.splits, manifest.splits)
    assert not np.array_equal(from_folder(tmp_path, RATIOS, seed=1).splits, manifest.splits)


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_from_folder_counts_the_files_it_skips_and_reads_jfif(tmp_path, caplog):
    write_image_folder(tmp_path, classes=("a", "b"), per_class=4, size=8)
    Image.new("RGB", (4, 4)).save(tmp_path / "a" / "phone.jfif", format="JPEG")
    for name in ("x.heic", "y.heic", "notes.txt"):
        (tmp_path / "b" / name).write_bytes(b"x")
    Image.new("RGB", (4, 4)).save(tmp_path / "stray.png")
    with caplog.at_level(logging.WARNING, logger="featcache.extract.inputs.sources"):
        manifest = from_folder(tmp_path, RATIOS, seed=0)
    assert "a/phone.jfif" in manifest.ids and len(manifest) == 9
    warnings = _warnings(caplog)
    assert any("Skipped 3 files" in w and ".heic: 2" in w and ".txt: 1" in w for w in warnings), warnings
    assert any("Skipped 1 files directly under" in w and "stray.png" in w for w in warnings), warnings


def test_a_class_without_test_images_is_warned_about(tmp_path, caplog):
    write_image_folder(tmp_path, classes=("a", "b"), per_class=10, size=8)
    write_image_folder(tmp_path, classes=("tiny",), per_class=2, size=8)  # 2 x 0.2: no val or test image
    with caplog.at_level(logging.WARNING, logger="featcache.extract.inputs.sources"):
        from_folder(tmp_path, RATIOS, seed=0)
    warnings = _warnings(caplog)
    assert any("without any test image" in w and "'tiny'" in w and "'a'" not in w for w in warnings), warnings


def test_from_folder_warns_about_empty_classes(tmp_path, caplog):
    write_image_folder(tmp_path, classes=("a", "b"), per_class=3, size=8)
    (tmp_path / "empty").mkdir()
    (tmp_path / "only_text").mkdir()
    (tmp_path / "only_text" / "notes.txt").write_text("x")
    with caplog.at_level(logging.WARNING, logger="featcache.extract.inputs.sources"):
        manifest = from_folder(tmp_path, RATIOS, seed=0)
    assert manifest.classes == ["a", "b"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("empty" in w and "only_text" in w for w in warnings), warnings


def test_from_folder_errors(tmp_path):
    with pytest.raises(ManifestError, match="does not exist"):
        from_folder(tmp_path / "nope", RATIOS, 0)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "scan.heic").write_bytes(b"not read")
    with pytest.raises(ManifestError, match=r"No images found under .*\.jpg, .*\.png.*Hint: check data\.path, and the "
                                            "warnings above"):
        from_folder(tmp_path, RATIOS, 0)


def test_class_without_training_examples_is_named(tmp_path):
    write_image_folder(tmp_path, classes=("common",), per_class=10, size=8)
    write_image_folder(tmp_path, classes=("rare",), per_class=1, size=8)
    # One image in "rare": 0.3 train / 0.7 val sends it to val.
    with pytest.raises(ManifestError, match="rare") as info:
        from_folder(tmp_path, {"train": 0.3, "val": 0.7, "test": 0.0}, seed=0)
    assert "common" not in str(info.value)


# ---------------------------------------------------------------------- csv
def test_from_csv_classification(tmp_path):
    write_image_folder(tmp_path / "img", classes=("x", "y"), per_class=4, size=8)
    rows = [f"img/{c}/{i:03d}.png, {c} " for i in range(4) for c in ("y", "x")]
    manifest = from_csv(_write_csv(tmp_path / "list.csv", "path,label", rows), RATIOS, seed=0)
    assert manifest.ids == sorted(r.split(",")[0] for r in rows) == manifest.paths
    assert manifest.classes == ["x", "y"]
    np.testing.assert_array_equal(manifest.labels, [0] * 4 + [1] * 4)  # label whitespace stripped
    assert manifest.root == tmp_path
    assert all(manifest.absolute_path(r).is_file() for r in range(len(manifest)))


def test_from_csv_with_id_and_split_columns(tmp_path):
    rows = ["c.png,id3,b,test", "a.png,id1,a,train", "b.png,id2,b,train", "d.png,id0,a,val"]
    manifest = from_csv(_write_csv(tmp_path / "m.csv", "path,id,label,split", rows), RATIOS, seed=0)
    assert manifest.ids == ["id0", "id1", "id2", "id3"]
    assert manifest.paths == ["d.png", "a.png", "b.png", "c.png"]
    np.testing.assert_array_equal(manifest.splits, [1, 0, 0, 2])
    np.testing.assert_array_equal(manifest.labels, [0, 0, 1, 1])


def test_from_csv_reads_rows_as_the_csv_module_does(tmp_path):
    """Blank lines are skipped, an empty or missing id falls back to the path, other columns are ignored and a
    repeated column's last occurrence wins (csv.DictReader's reading, kept by the column reader)."""
    (tmp_path / "m.csv").write_text("path,notes,label,id,label\n"
                                    "a.png,x,dog,ida,cat\n"
                                    "\n"
                                    "b.png,y,,,cat\n"
                                    "c.png,,cat,idc,dog\n"
                                    "d.png,z,dog,idd,dog\n", encoding="utf-8")
    manifest = from_csv(tmp_path / "m.csv", RATIOS, seed=0)
    assert manifest.ids == ["b.png", "ida", "idc", "idd"]
    assert manifest.classes == ["cat", "dog"]
    np.testing.assert_array_equal(manifest.labels, [0, 0, 1, 1])
    (tmp_path / "short.csv").write_text("path,label,id\na.png,cat\nb.png,dog,idb\n", encoding="utf-8")
    assert from_csv(tmp_path / "short.csv", RATIOS, seed=0).ids == ["a.png", "idb"]


def test_from_csv_with_bom_and_absolute_paths(tmp_path):
    image = tmp_path / "abs.png"
    rows = [f"{image},a", "rel.png,a"]
    path = tmp_path / "sub" / "m.csv"
    path.parent.mkdir()
    path.write_text("\ufeffpath,label\n" + "\n".join(rows) + "\n", encoding="utf-8")
    manifest = from_csv(path, {"train": 1.0}, seed=0)
    assert manifest.absolute_path(manifest.ids.index(str(image))) == image.resolve()
    assert manifest.absolute_path(manifest.ids.index("rel.png")) == (tmp_path / "sub" / "rel.png").resolve()


def test_from_csv_regression(tmp_path):
    rows = [f"{name}.png,{value}" for name, value in [("c", "2.5"), ("a", "-1"), ("b", "1e3"), ("d", "0")]]
    manifest = from_csv(_write_csv(tmp_path / "r.csv", "path,target", rows), {"train": 0.5, "test": 0.5},
                        seed=0, task="regression")
    assert manifest.task == "regression" and manifest.labels is None
    assert manifest.ids == ["a.png", "b.png", "c.png", "d.png"]
    np.testing.assert_array_equal(manifest.targets, [-1.0, 1000.0, 2.5, 0.0])
    np.testing.assert_array_equal(np.bincount(manifest.splits, minlength=3), [2, 0, 2])
    with pytest.raises(ManifestError, match="Non-numeric"):
        from_csv(_write_csv(tmp_path / "bad.csv", "path,target", ["a.png,tall"]), RATIOS, 0, task="regression")


def test_from_csv_rejects_parent_paths(tmp_path):
    path = _write_csv(tmp_path / "m.csv", "path,label", ["ok.png,a", "../secret.png,a"])
    with pytest.raises(ManifestError, match=r"\.\."):
        from_csv(path, RATIOS, 0)
    nested = _write_csv(tmp_path / "n.csv", "path,label", ["img/../../x.png,a"])
    with pytest.raises(ManifestError, match=r"\.\."):
        from_csv(nested, RATIOS, 0)


def test_from_csv_rejects_duplicate_ids(tmp_path):
    path = _write_csv(tmp_path / "m.csv", "path,label", ["a.png,x", "b.png,x", "a.png,y"])
    with pytest.raises(ManifestError, match=r"Duplicate ids.*'a.png'"):
        from_csv(path, {"train": 1.0}, 0)
    with_ids = _write_csv(tmp_path / "i.csv", "path,id,label", ["a.png,same,x", "b.png,same,x"])
    with pytest.raises(ManifestError, match="same"):
        from_csv(with_ids, {"train": 1.0}, 0)


def test_from_csv_column_and_value_errors(tmp_path):
    with pytest.raises(ManifestError, match="does not exist"):
        from_csv(tmp_path / "none.csv", RATIOS, 0)
    with pytest.raises(ManifestError, match="'label'"):
        from_csv(_write_csv(tmp_path / "a.csv", "path,class", ["a.png,x"]), RATIOS, 0)
    with pytest.raises(ManifestError, match="'target'"):
        from_csv(_write_csv(tmp_path / "b.csv", "path,label", ["a.png,x"]), RATIOS, 0, task="regression")
    with pytest.raises(ManifestError, match="no rows"):
        from_csv(_write_csv(tmp_path / "c.csv", "path,label", []), RATIOS, 0)
    with pytest.raises(ManifestError, match=r"Unknown split values \['training'\] in .*d\.csv \(row 2; row 1 is the "
                                            r"header\); allowed: \['train', 'val', 'test'\].*Hint: fix those rows, or "
                                            r"empty the whole split column"):
        from_csv(_write_csv(tmp_path / "d.csv", "path,label,split", ["a.png,x,training"]), RATIOS, 0)
    with pytest.raises(ManifestError, match=r"needs 'target' \(allowed columns: path, target, id, split\)\. Hint: "
                                            r"name the column 'target'.* It has 'label': for that set data\.task: "
                                            r"classification"):
        from_csv(_write_csv(tmp_path / "e.csv", "path,label", ["a.png,x"]), RATIOS, 0, task="regression")


def test_a_missing_or_semicolon_csv_names_what_is_there_and_the_params(tmp_path):
    # A CSV name mistyped in data.csv: the CSVs that are there and the param to set (not only data.path).
    _write_csv(tmp_path / "labels.csv", "path,label", ["a.png,x"])
    with pytest.raises(ManifestError, match=r"'.*label\.csv' does not exist \(CSV files in .*: \['labels\.csv'\]\)\. "
                                            r"Hint: set data\.path to the CSV's folder and data\.csv to its file name"):
        from_csv(tmp_path / "label.csv", RATIOS, 0)
    with pytest.raises(ManifestError, match=r"nowhere does not exist\)"):
        from_csv(tmp_path / "nowhere" / "labels.csv", RATIOS, 0)
    # A spreadsheet's semicolon export reads as one column named 'path;label': say so.
    with pytest.raises(ManifestError, match=r"has columns \['path;label'\].*Its header looks semicolon-separated: save "
                                            r"it comma-separated\."):
        from_csv(_write_csv(tmp_path / "s.csv", "path;label", ["a.png;x"]), RATIOS, 0)


@pytest.mark.parametrize(("value", "what"), [("abc", "Non-numeric"), ("", "Empty"), ("1,5", "Non-numeric"),
                                             ("inf", "Non-finite"), ("nan", "Non-finite")])
def test_a_bad_target_names_its_row_what_is_allowed_and_a_hint(tmp_path, value, what):
    rows = ["a.png,1.0", f'b.png,"{value}"']
    with pytest.raises(ManifestError, match=rf"^{what} target '{value}' in .*t\.csv on row 3 \(row 1 is the header\); "
                                            r"allowed: a finite number such as 3\.5.*Hint: fix or remove that row"):
        from_csv(_write_csv(tmp_path / "t.csv", "path,target", rows), RATIOS, 0, task="regression")


def test_windows_backslash_paths_resolve_to_the_forward_slash_file(tmp_path):
    """A CSV written on Windows: ``images\\cat\\001.png`` names images/cat/001.png where only that exists."""
    for name in ("cat", "dog"):
        (tmp_path / "images" / name).mkdir(parents=True)
        for k in range(3):
            Image.new("RGB", (4, 4)).save(tmp_path / "images" / name / f"{k:03d}.png")
    Image.new("RGB", (4, 4)).save(tmp_path / "odd\\name.png")  # a file really named with a backslash wins
    rows = [f"images\\{name}\\{k:03d}.png,{name}" for name in ("cat", "dog") for k in range(3)]
    rows += ["odd\\name.png,cat", "missing\\x.png,dog"]
    manifest = from_csv(_write_csv(tmp_path / "labels.csv", "path,label", rows), RATIOS, 0)
    by_id = dict(zip(manifest.ids, manifest.paths))
    assert by_id["images\\cat\\000.png"] == "images/cat/000.png"
    assert all((tmp_path / by_id[f"images\\{n}\\{k:03d}.png"]).is_file() for n in ("cat", "dog") for k in range(3))
    assert by_id["odd\\name.png"] == "odd\\name.png"
    assert by_id["missing\\x.png"] == "missing\\x.png"  # in neither form: left for extraction to report
    dupes = _write_csv(tmp_path / "dupes.csv", "path,label", ["images/cat/000.png,cat", "images\\cat\\000.png,cat"])
    with pytest.raises(ManifestError, match="Duplicate paths"):  # the same file twice, however it is written
        from_csv(dupes, RATIOS, 0)


def test_from_csv_class_only_in_test_is_named(tmp_path):
    rows = ["a.png,dog,train", "b.png,dog,test", "c.png,eel,test"]
    with pytest.raises(ManifestError, match="eel"):
        from_csv(_write_csv(tmp_path / "m.csv", "path,label,split", rows), RATIOS, 0)


# ------------------------------------------------------------------- digits
@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    return write_digits(tmp_path_factory.mktemp("digits") / "images")


def test_write_digits(digits_dir):
    from sklearn.datasets import load_digits

    files = sorted(digits_dir.rglob("*.png"))
    assert len(files) == 1797
    assert sorted(p.name for p in digits_dir.iterdir()) == [str(d) for d in range(10)]
    digits = load_digits()
    for index in (0, 1000, 1796):
        path = digits_dir / str(int(digits.target[index])) / f"{index:04d}.png"
        with Image.open(path) as image:
            assert image.mode == "L" and image.size == (8, 8)
            pixels = np.asarray(image).astype(int)
        np.testing.assert_array_equal(pixels, np.clip(digits.images[index] * 255 / 16 + 0.5, 0, 255).astype(int))
    assert 0 < pixels.max() <= 255


def test_digits_manifest(digits_dir):
    manifest = from_folder(digits_dir, RATIOS, seed=0)
    assert len(manifest) == 1797 and manifest.classes == [str(d) for d in range(10)]
    counts = manifest.split_counts()
    assert sum(counts.values()) == 1797 and all(counts.values())
    assert abs(counts["train"] - 0.6 * 1797) <= 10


def test_write_digits_is_deterministic(digits_dir, tmp_path):
    """build_manifest("digits") writes the same bytes again, under work_dir/images."""
    manifest = build_manifest("digits", None, RATIOS, seed=0, work_dir=tmp_path / "prepared")
    again = tmp_path / "prepared" / "images"
    assert manifest.root == again and len(manifest) == 1797
    files = sorted(p.relative_to(digits_dir) for p in digits_dir.rglob("*.png"))
    assert files == sorted(p.relative_to(again) for p in again.rglob("*.png"))
    for relative in files:
        assert (digits_dir / relative).read_bytes() == (again / relative).read_bytes(), relative


# ----------------------------------------------------------------- dispatch
def test_build_manifest_dispatch(tmp_path):
    write_image_folder(tmp_path / "tree", classes=("a", "b"), per_class=5, size=8)
    folder = build_manifest("folder", tmp_path / "tree", RATIOS, seed=0)
    assert folder.ids == from_folder(tmp_path / "tree", RATIOS, 0).ids
    csv_path = _write_csv(tmp_path / "tree" / "m.csv", "path,label", [f"a/{i:03d}.png,a" for i in range(5)])
    assert build_manifest("csv", csv_path, {"train": 1.0}, seed=0).ids == [f"a/{i:03d}.png" for i in range(5)]
    with pytest.raises(ManifestError, match="data.path"):
        build_manifest("folder", None, RATIOS, 0)
    with pytest.raises(ManifestError, match="Unknown data.source"):
        build_manifest("s3", tmp_path, RATIOS, 0)


def test_image_extensions_cover_common_formats():
    assert {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".avif", ".pbm", ".pnm", ".jp2"} <= set(IMAGE_EXTENSIONS)


@pytest.mark.parametrize("extension", IMAGE_EXTENSIONS)
def test_every_listed_extension_is_read_from_a_folder_and_decodes(tmp_path, extension):
    """A listed extension that Pillow could not decode would turn every such file into a bad image."""
    write_image_folder(tmp_path, classes=("a", "b"), per_class=4, size=8)
    Image.new("RGB", (12, 8), (200, 30, 30)).save(tmp_path / "a" / f"extra{extension}")
    manifest = from_folder(tmp_path, RATIOS, seed=0)
    assert f"a/extra{extension}" in manifest.ids and len(manifest) == 9
    image = load_rgb(tmp_path / "a" / f"extra{extension}")
    assert image.mode == "RGB" and image.size == (12, 8)
    assert abs(image.getpixel((6, 4))[0] - 200) <= 3


def test_labels_that_differ_only_in_case_are_warned_about(tmp_path, caplog):
    # 'Cat' and 'cat' (a spreadsheet's autocapitalised cells) silently made two classes.
    for name in ("a.png", "b.png", "c.png", "d.png", "e.png", "f.png"):
        Image.new("RGB", (4, 4)).save(tmp_path / name)
    rows = ["a.png,cat", "b.png,cat", "c.png,Cat", "d.png,dog", "e.png,dog", "f.png,Cat"]
    halves = {"train": 0.5, "val": 0, "test": 0.5}
    with caplog.at_level(logging.WARNING):
        manifest = from_csv(_write_csv(tmp_path / "l.csv", "path,label", rows), halves, 0)
    assert manifest.classes == ["Cat", "cat", "dog"]
    warned = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    assert any("differ only in letter case are separate classes: 'Cat' and 'cat'. Hint:" in text for text in warned)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        from_csv(tmp_path / "l.csv", halves, 0, classes=["cat", "Cat", "dog"])
    assert not [record for record in caplog.records if "letter case" in record.getMessage()]
