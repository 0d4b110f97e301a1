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
