"""User errors share one base class, and ``featcache/errors.py`` stays a leaf module."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import featcache.errors
from featcache.errors import ExtractionError, ParamError, SavedHeadError, SavedHeadNotFoundError, UserError
from featcache.extract.inputs.manifest import ManifestError
from featcache.extract.inputs.shards import ShardReadError
from featcache.extract.onnx.export import OnnxExportError
from featcache.extract.onnx.parity import ParityError
from featcache.extract.zoo.registry import UnknownNameError
from featcache.extract.zoo.weights import WeightsNotFoundError
from featcache.heads.registry import UnknownHeadError
from featcache.pipeline.cli import main
from featcache.pipeline.params.base import ConfigError
from featcache.runs import RunNotFoundError
from featcache.store.errors import StaleStoreError, StoreError, StoreLockedError, StoreNotFoundError

USER_ERRORS = [ConfigError, ManifestError, UnknownNameError, WeightsNotFoundError, ExtractionError, StoreError,
               StaleStoreError, StoreLockedError, StoreNotFoundError, OnnxExportError, ParityError, UnknownHeadError,
               ParamError, RunNotFoundError, ShardReadError, SavedHeadError, SavedHeadNotFoundError]


@pytest.mark.parametrize("cls", USER_ERRORS, ids=lambda cls: cls.__name__)
def test_user_errors_subclass_user_error(cls):
    assert issubclass(cls, UserError)


def test_user_errors_keep_their_builtin_bases():
    """Callers that catch ValueError / FileNotFoundError / RuntimeError keep working."""
    assert issubclass(ConfigError, ValueError) and issubclass(ManifestError, ValueError)
    assert issubclass(UnknownNameError, ValueError) and issubclass(ParityError, ValueError)
    assert issubclass(ParamError, ValueError) and issubclass(UnknownHeadError, ValueError)
    assert issubclass(WeightsNotFoundError, FileNotFoundError) and issubclass(StoreNotFoundError, FileNotFoundError)
    assert issubclass(RunNotFoundError, FileNotFoundError) and issubclass(SavedHeadNotFoundError, FileNotFoundError)
    assert issubclass(SavedHeadError, ValueError)  # load_head raised ValueError for another format or class
    assert issubclass(ExtractionError, RuntimeError) and issubclass(OnnxExportError, RuntimeError)


def test_errors_module_imports_nothing_from_featcache():
    tree = ast.parse(Path(featcache.errors.__file__).read_text(encoding="utf-8"))
    imported = [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    imported += [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    assert [name for name in imported if name != "__future__"] == []


def test_cli_reports_a_user_error_without_traceback(tmp_path, capsys):
    bad = tmp_path / "params.yaml"
    bad.write_text("nonsense_key: 1\n", encoding="utf-8")
    assert main(["check", "--params", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("featcache check: error:") and "Traceback" not in err


def test_cli_lets_a_bug_keep_its_traceback(monkeypatch):
    import featcache.pipeline.config as config

    def boom(raw):
        raise KeyError("a bug")

    monkeypatch.setattr(config, "parse_params", boom)
    with pytest.raises(KeyError, match="a bug"):
        main(["check", "--params", "params.yaml"])
