"""``prepare`` of a CSV in bounded memory: the same files and messages as the in-memory reader wrote.

``csv_prepare_golden.json`` holds what ``prepare`` wrote (manifest.csv, manifest.classes.json, summary.json) or
raised for each crafted CSV below, recorded with the reader that held the whole CSV in memory (commit df38aa5):
``PYTHONPATH=<old checkout>/src:tests/extract/inputs python -c "import test_csvsource as t; t.record()"``.
The streaming reader must match it byte for byte, also with spool files of two rows (the merge) and with
forced 64-bit hash collisions (every repeated hash is compared as strings before a row is called a duplicate).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

GOLDEN = Path(__file__).with_name("csv_prepare_golden.json")


def _rows(n: int = 12, classes: tuple[str, ...] = ("cat", "dog"), fmt: str = "img/{k:03d}.png,{c}") -> list[str]:
    return [fmt.format(k=k, c=classes[k % len(classes)]) for k in range(n)]


def _text(header: str, rows: list[str]) -> str:
    return "\n".join([header, *rows]) + "\n"


#: name -> (CSV text, data params, files to create beside the CSV)
CASES: dict[str, tuple[str | bytes, dict, list[str]]] = {
    "plain_blank_lines": ("path,label\n\n" + "\n\n".join(_rows(14)[::-1]) + "\n\n", {}, []),
    "short_rows_id_column": (_text("path,label,id", [r + (f",id{k % 5}x{k}" if k % 3 else "")
                                                     for k, r in enumerate(_rows(13))]), {}, []),
    "repeated_column_extra": (_text("path,notes,label,id,label", [f"p{k}.png,n{k},wrong,,{'ab'[k % 2]}"
                                                                  for k in range(12)]), {}, []),
    "bom_padded_headers": ("\ufeff path , label ,extra\n" + "\n".join(f" s{k}.png , {'xy'[k % 2]} ,e"
                                                                      for k in range(12)) + "\n", {}, []),
    "split_column": (_text("path,label,split", [f"{r},{['train', 'val', 'test', 'train'][k % 4]}"
                                                for k, r in enumerate(_rows(12))]), {}, []),
    "split_column_empty": (_text("path,split,label", [f"q{k}.png, ,{'ab'[k % 2]}" for k in range(12)]), {}, []),
    "regression": (_text("path,target", [f"r{k}.png,{v}" for k, v in enumerate(
        ["1e-3", " 2.5 ", "-0", "3", "4.25", "1E2", "0.1", "7", "-8", "9.0", "10", "11"])]),
        {"task": "regression"}, []),
    "classes_order": (_text("path,label", _rows(12, ("zeta", "alpha", "mid"))), {"classes": ["zeta", "mid", "alpha"]},
                      []),
    "same_stems_tie": (_text("path,label", [f"t/{k % 10}.{'png' if k < 10 else 'jpg'},{'ab'[k % 2]}"
                                            for k in range(20)]),  # CSV order: .png first; id order: .jpg
                       {"split": {"train": 0.7, "val": 0.15, "test": 0.15}}, []),  # a boundary inside a pair
    "windows_and_urls": (_text("path,label", ["img\\w\\a.png,w", "img\\w\\b.png,v",
                                                   "https://h.example/x.png,v", "s3://b/k/y.png,w",
                                                   *_rows(8, ("v", "w"), "./d//u{k}.png,{c}")]),
                              {}, ["img/w/a.png"]),
    "quoted_newlines_commas": ('path,label\n"a\nb.png",x\n"c,d.png",y\n"e\r\nf.png","x"\n"g""h.png",y\n'
                               + "\n".join(_rows(8, ("x", "y"))) + "\n", {}, []),
    "case_twins": (_text("path,label", _rows(12, ("Cat", "cat", "dog"))), {}, []),
    "err_semicolon": (_text("path;label", ["a.png;x"]), {}, []),
    "err_no_rows": (_text("path,label", ["", ""]), {}, []),
    "err_blank_paths": (_text("path,label", [*_rows(4), " ,cat", *_rows(3, fmt="b{k}.png,{c}"), ",dog"]), {}, []),
    "err_dotdot": (_text("path,label", [*_rows(3), "img/../../x.png,cat", "../y.png,dog"]), {}, []),
    "err_dup_ids": (_text("path,id,label", [f"u{k}.png,{'big' if k % 4 == 0 else 'g' + str(k % 7) if k < 30 else ''},"
                                            f"{'ab'[k % 2]}" for k in range(50)]), {}, []),
    "err_dup_paths": (_text("path,id,label", ["img/a.png,1,x", "img/./a.png,2,y", "img//a.png,3,x",
                                              "https://h/z.png,4,y", "https://h/z.png,5,x", "img/b.png,6,y"]), {}, []),
    "err_split": (_text("path,label,split", ["a.png,x,train", "b.png,y,training", "c.png,x,", "d.png,y,Test"]),
                  {}, []),
    "err_blank_label": (_text("path,label", ["a.png,x", "b.png,", "c.png, ", "d.png"]), {}, []),
    "err_not_listed": (_text("path,label", _rows(12, ("a", "b", "c", "d"))), {"classes": ["a", "b"]}, []),
    "err_target": (_text("path,target", ["a.png,1", "b.png,tall", "c.png,nan"]), {"task": "regression"}, []),
    "err_nan_target": (_text("path,target", ["a.png,1", "b.png,NaN"]), {"task": "regression"}, []),
    "err_not_utf8": (b"path,label\na.png,x\n" + "b\xe9.png,y\n".encode("latin-1"), {}, []),
    "err_one_class": (_text("path,label", _rows(12, ("solo",))), {}, []),
}


def outcome(name: str, tmp: Path) -> dict:
    """Run ``prepare`` on case ``name`` in ``tmp``: the files it wrote, or its error (``tmp`` as ``<tmp>``)."""
    from featcache.pipeline.config import parse_params
    from featcache.pipeline.prepare import prepare

    text, data, files = CASES[name]
    folder = tmp / name / "data"
    folder.mkdir(parents=True)
    (folder / "labels.csv").write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    for file in files:
        (folder / file).parent.mkdir(parents=True, exist_ok=True)
        (folder / file).write_bytes(b"")
    params = parse_params({"data": {"name": "t", "source": "csv", "path": str(folder), "csv": "labels.csv", **data}})
    out = tmp / name / "prepared"
    try:
        prepare(params, out)
    except Exception as error:  # noqa: BLE001 - the error is the outcome
        return {"error": f"{type(error).__name__}: {error}".replace(str(tmp), "<tmp>")}
    found = {}
    for file in ("manifest.csv", "manifest.classes.json", "summary.json"):
        found[file] = (out / file).read_bytes().decode("utf-8") if (out / file).exists() else None  # (\r kept)
    return found


def record() -> None:
    """Write :data:`GOLDEN` from the featcache on ``PYTHONPATH`` (see the module docstring)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        results = {name: outcome(name, Path(tmp)) for name in CASES}
    GOLDEN.write_text(json.dumps(results, indent=1, ensure_ascii=False, sort_keys=True) + "\n", encoding="utf-8")


@pytest.mark.parametrize("name", sorted(CASES))
def test_prepare_of_a_csv_writes_what_the_in_memory_reader_wrote(name, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        assert outcome(name, tmp_path) == json.loads(GOLDEN.read_text(encoding="utf-8"))[name]


@pytest.mark.parametrize("setting", ["spool_of_two_rows", "every_hash_equal", "three_hashes"])
def test_spool_merge_and_hash_collisions_change_nothing(setting, tmp_path, monkeypatch):
    """Spool files of two rows (a many-way merge), and 64-bit hashes forced to collide (every row, or a third
    of all rows alike): the same files, and duplicates named on the same rows, as without."""
    from featcache.extract.inputs import csvsource

    if setting == "spool_of_two_rows":
        monkeypatch.setattr(csvsource, "SPOOL_ROWS", 2)
    else:
        monkeypatch.setattr(csvsource, "key_hash", (lambda value: 7) if setting == "every_hash_equal"
                            else (lambda value: len(value) % 3))
    golden = json.loads(GOLDEN.read_text(encoding="utf-8"))
    for name in sorted(CASES):
        assert outcome(name, tmp_path) == golden[name], name


def test_from_csv_gives_the_manifest_prepare_writes(tmp_path, monkeypatch):
    """``from_csv`` (in memory) and ``prepare`` (streamed) share the reader: the same manifest file."""
    from featcache.extract.inputs import csvsource
    from featcache.extract.inputs.sources import from_csv

    monkeypatch.setattr(csvsource, "SPOOL_ROWS", 3)
    golden = json.loads(GOLDEN.read_text(encoding="utf-8"))
    for name in ("plain_blank_lines", "same_stems_tie", "regression", "windows_and_urls"):
        outcome(name, tmp_path)
        data = CASES[name][1]
        ratios = data.get("split", {"train": 0.6, "val": 0.2, "test": 0.2})
        manifest = from_csv(tmp_path / name / "data" / "labels.csv", ratios, 0, data.get("task", "classification"),
                            data.get("classes"))
        manifest.write(tmp_path / name / "again" / "manifest.csv")
        text = (tmp_path / name / "again" / "manifest.csv").read_bytes().decode("utf-8")
        assert text == golden[name]["manifest.csv"], name


def test_no_spool_files_are_left_behind(tmp_path, monkeypatch):
    """The spool folder (in the output folder, or the nearest one that exists) is gone after a prepare, and
    after an error found once the rows were spooled."""
    from featcache.extract.inputs import csvsource

    monkeypatch.setattr(csvsource, "SPOOL_ROWS", 2)
    for name in ("plain_blank_lines", "err_dup_ids", "err_target"):
        outcome(name, tmp_path)
        assert not list(tmp_path.rglob("featcache-csv-*")), name
