"""Error paths of the ``featcache`` command line found by an audit: each is one line, exit status 2, no traceback,
naming the value, what is allowed and a hint, and nothing is written before it."""

from __future__ import annotations

import os

import pytest

from featcache.pipeline import cli
from featcache.pipeline.cli import main

#: A command of each kind of output (a file, a folder), with the option that takes it; none reaches its work.
OUTPUTS = [
    (["prepare"], "--out", "folder"),
    (["extract", "--backbone", "efficientnet_lite0", "--manifest", "m.csv"], "--out", "file"),
    (["train", "--store", "f.h5", "--backbone", "efficientnet_lite0", "--layer", "pool", "--head", "logreg",
      "--metrics", "m.json"], "--model-dir", "folder"),
    (["train", "--store", "f.h5", "--backbone", "efficientnet_lite0", "--layer", "pool", "--head", "logreg"],
     "--metrics", "file"),
    (["predict", "--model", "models/x", "--store", "f.h5"], "--out", "file"),
    (["compare", "--metrics-dir", "metrics"], "--out", "folder"),
    (["compare", "--metrics-dir", "metrics", "--out", "reports"], "--plot", "file"),
    (["finetune", "--mode", "frozen", "--manifest", "m.csv", "--metrics", "m.json"], "--out", "folder"),
]


def _error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    assert err.startswith(f"featcache {command}: error: "), err
    return err


@pytest.mark.parametrize(("args", "option", "kind"), OUTPUTS, ids=lambda v: v if isinstance(v, str) else v[0])
def test_an_output_under_a_file_is_refused_before_any_work(args, option, kind, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("kept\n")
    assert main([*args, option, "afile/sub/out"]) == 2
    err = _error_line(capsys, args[0])
    assert f"{option} 'afile/sub/out' cannot be created: 'afile' is a file, not a folder. Hint: " in err
    assert (tmp_path / "afile").read_text() == "kept\n" and sorted(os.listdir(tmp_path)) == ["afile"]


@pytest.mark.parametrize(("args", "option", "kind"), OUTPUTS, ids=lambda v: v if isinstance(v, str) else v[0])
def test_a_folder_for_a_file_or_a_file_for_a_folder_is_refused(args, option, kind, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "taken").mkdir() if kind == "file" else (tmp_path / "taken").write_text("kept\n")
    assert main([*args, option, "taken"]) == 2
    other = "folder" if kind == "file" else "file"
    assert f"{option} 'taken' is a {other}; allowed: a {'file path' if kind == 'file' else 'folder'}. Hint: " in (
        _error_line(capsys, args[0]))


@pytest.mark.parametrize(("args", "option", "kind"), OUTPUTS[:3], ids=lambda v: v if isinstance(v, str) else v[0])
def test_an_output_in_a_read_only_folder_is_refused(args, option, kind, tmp_path, monkeypatch, capsys):
    """A read-only folder (as root, where chmod does not stop writes, ``os.access`` says so as on a read-only
    file system)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ro").mkdir()
    os.chmod(tmp_path / "ro", 0o555)
    access = os.access
    monkeypatch.setattr(cli.os, "access", lambda path, mode: os.path.basename(path) != "ro" and access(path, mode))
    try:
        assert main([*args, option, "ro/new/out"]) == 2
    finally:
        os.chmod(tmp_path / "ro", 0o755)
    assert (f"{option} 'ro/new/out' cannot be written: the folder 'ro' is read-only (a read-only file system, or "
            f"no write permission). Hint: give {option} a path in a folder you can write to") in (
        _error_line(capsys, args[0]))
    assert os.listdir(tmp_path / "ro") == []


def test_outputs_with_spaces_and_unicode_in_new_folders_are_accepted(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for option, kind in {"--out": "file", "--model-dir": "folder"}.items():
        cli._check_output(option, "new dir/ünï/out x", kind)  # no error, nothing created
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(("name", "text", "message"), [
    ("x.json", "{\n", "x.json is not a readable run file (JSONDecodeError: "),
    ("x.json", "\udcff", "x.json is not a readable run file (UnicodeDecodeError: "),
    ("x.run.json", "[1]\n", "x.run.json names no run (allowed: a sidecar with backbone, layer and head). Hint: "),
    ("x.run.json", '{"backbone": "b"}\n', "x.run.json names no run (allowed: "),
])
def test_compare_names_a_metrics_file_it_cannot_read(name, text, message, tmp_path, capsys):
    """A truncated or foreign file in --metrics-dir: one line naming it, not json's traceback."""
    metrics = tmp_path / "metrics"
    metrics.mkdir()
    (metrics / "x.json").write_text('{"b": {"pool": {"logreg": {"accuracy": 0.5}}}}\n')
    (metrics / name).write_bytes(text.encode("utf-8", "surrogateescape"))
    assert main(["compare", "--metrics-dir", str(metrics), "--out", str(tmp_path / "reports")]) == 2
    err = _error_line(capsys, "compare")
    assert f"{metrics}{os.sep}{message}" in err and "Hint: " in err
    assert not (tmp_path / "reports").exists()


def test_predict_with_a_file_as_model_names_the_folder_to_pass(tmp_path, capsys):
    run = tmp_path / "models" / "logreg"
    run.mkdir(parents=True)
    (run / "head.json").write_text("{}\n")
    assert main(["predict", "--model", str(run / "head.json"), "--store", "f.h5", "--out",
                 str(tmp_path / "p.csv")]) == 2
    assert (f"{run / 'head.json'} is a file; allowed: a featcache run directory (it holds featcache-run.json and the "
            f"saved head). Hint: pass its folder, {run.as_posix()}, ") in _error_line(capsys, "predict")


def test_a_folder_given_as_params_file_is_named_as_a_folder(tmp_path, capsys):
    assert main(["check", "--params", str(tmp_path)]) == 2
    assert (f"Params file {str(tmp_path)!r} is a folder; allowed: a YAML file. Hint: pass the file, e.g. "
            f"'{tmp_path.as_posix()}/params.yaml'.") in _error_line(capsys, "check")


def test_predict_split_with_images_is_refused_not_ignored(tmp_path, capsys):
    assert main(["predict", "--model", str(tmp_path), "--images", str(tmp_path), "--split", "test", "--out",
                 str(tmp_path / "p.csv")]) == 2
    assert ("--split 'test' selects rows of a --store; --images scores every image given. Hint: drop --split"
            in _error_line(capsys, "predict"))
