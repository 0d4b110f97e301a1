"""README's Python API names only what the packages export."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def api_names() -> list[tuple[str, str]]:
    """``(module, name)`` of every `` `featcache.x` (`name`, ...) `` group in README's "Lower-level pieces"."""
    text = README.read_text(encoding="utf-8")
    paragraph = text[text.index("Lower-level pieces:"):].split("\n\n", 1)[0]
    return [(module, name)
            for module, names in re.findall(r"`(featcache(?:\.\w+)*)` \(([^)]*)\)", paragraph)
            for name in re.findall(r"`(\w+)`", names)]


def test_readme_names_only_existing_exports():
    pairs = api_names()
    assert {module for module, _ in pairs} >= {"featcache.extract", "featcache.store", "featcache.heads"}
    missing = []
    for module, name in pairs:
        exported = importlib.import_module(module)
        if name not in getattr(exported, "__all__", ()) or not hasattr(exported, name):
            missing.append(f"{module}.{name}")
    assert not missing, f"README.md names exports that do not exist: {missing}"


def python_api_block() -> str:
    """The first ```python block of README's "Python API" section."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Python API"):]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_readme_python_api_imports_and_calls_match_the_signatures():
    """Every name the snippet imports exists, and every call of one binds to its signature (no data is touched)."""
    import ast
    import inspect

    tree = ast.parse(python_api_block())
    imported = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name), f"README: `from {node.module} import {alias.name}` fails"
                imported[alias.asname or alias.name] = getattr(module, alias.name)
    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
             and node.func.id in imported]
    assert {call.func.id for call in calls} >= {"load_params", "prepare", "extract", "train", "FeatureStore"}
    for call in calls:
        args = [ast.literal_eval(arg) if isinstance(arg, ast.Constant) else None for arg in call.args]
        kwargs = {kw.arg: None for kw in call.keywords}
        signature = inspect.signature(imported[call.func.id])
        try:
            signature.bind(*args, **kwargs)
        except TypeError as error:
            message = f"README: {ast.unparse(call)} does not match {call.func.id}{signature}: {error}"
            raise AssertionError(message) from None


def test_readme_dvc_exp_run_sets_only_keys_params_yaml_lists_or_adds_them_with_a_plus():
    """DVC's ``-S key=value`` overrides a key of params.yaml only; a key it does not list yet needs ``-S +key=value``
    (else: "Could not override 'heads.mlp.min_epoch_steps'"), so each example must say which it is."""
    import yaml

    params = yaml.safe_load((README.parent / "params.yaml").read_text(encoding="utf-8"))
    found = re.findall(r"dvc exp run -S (\+?)([\w.]+)=", README.read_text(encoding="utf-8"))
    assert found, "README.md has no `dvc exp run -S` example"
    for plus, key in found:
        node: object = params
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        assert (node is not None) != bool(plus), (key, "listed in params.yaml: no `+`" if plus else
                                                 "not in params.yaml: write `-S +key=value`")


def _help(*argv: str) -> str:
    """What ``featcache *argv --help`` prints (argparse exits 0 after it)."""
    import contextlib
    import io

    import pytest

    from featcache.pipeline.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        main([*argv, "--help"])
    return out.getvalue()


def test_readme_names_every_command_and_option_featcache_help_lists():
    """A user reading README finds each ``featcache`` command and each of its options (``featcache --help``,
    ``featcache COMMAND --help``): a new flag or command is documented where people look, not only in --help."""
    text = README.read_text(encoding="utf-8")
    top = _help()
    commands = re.findall(r"^ {4}([a-z][\w-]*)", top, re.M)  # the COMMAND list: one indented line each
    assert {"extract", "train", "finetune-export"} <= set(commands)
    missing = [f"featcache {command}" for command in commands if not re.search(rf"featcache {command}(?![\w-])", text)]
    for argv in [(), *((command,) for command in commands)]:
        usage = _help(*argv).split("\n\n", 1)[0]  # the usage lines: every option, no help text
        missing += [f"featcache {' '.join(argv)} {flag}".replace("  ", " ")
                    for flag in sorted(set(re.findall(r"(?<![\w-])(--?[a-z][\w-]*)", usage)) - {"-h", "--help"})
                    if not re.search(rf"(?<![\w-]){flag}(?![\w-])", text)]
    assert not missing, f"README.md does not mention: {missing}"


def test_readme_featcache_examples_parse():
    """Every ``featcache ...`` line of README's ```bash blocks is a command line the CLI accepts."""
    import contextlib
    import io
    import shlex

    from featcache.pipeline.cli import build_parser

    lines = [line.split(" #", 1)[0].strip()
             for block in re.findall(r"```bash\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
             for line in block.replace("\\\n", " ").splitlines()]
    examples = [line for line in lines if line.startswith("featcache ")]
    assert len(examples) >= 5
    for line in examples:
        errors = io.StringIO()
        try:
            with contextlib.redirect_stderr(errors):
                build_parser().parse_args(shlex.split(line)[1:])
        except SystemExit:
            raise AssertionError(f"README: `{line}`: {errors.getvalue().strip()}") from None
