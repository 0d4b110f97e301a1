"""A ``dvc.yaml`` stage's code deps are exactly the files it runs; stage modules do not import each other.

Every file a stage runs is one of its deps (else editing it would not rerun the stage), and every
source dep is run by the stage: a file it runs, or a folder all of whose modules it runs (else
editing code the stage never runs, a head for the extract stage, would rerun it for nothing).

The files a stage runs are found statically: its ``featcache <command>`` handler
in ``pipeline/cli.py``, the CLI's own module-level and ``main`` imports, and from
there every featcache module imported (at module level or inside a function, but
not under ``if TYPE_CHECKING:``), with the ``__init__.py`` of each package on the way.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
SRC = REPO / "src"
CLI = SRC / "featcache" / "pipeline" / "cli.py"

#: The pipeline modules that implement a stage (``pipeline/config.py`` and ``cli.py`` are shared by all).
STAGE_MODULES = ("prepare", "extract", "train", "compare", "predict", "serve", "finetune", "onnx")


def _module_file(name: str) -> Path | None:
    base = SRC.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _lazy_exports(package: str) -> dict[str, str]:
    """A package's lazy exports (``_EXPORTS`` in its ``__init__``: public name -> submodule), read statically."""
    init = _module_file(package)
    if init is None or init.name != "__init__.py":
        return {}
    for node in ast.parse(init.read_text(encoding="utf-8")).body:
        target = node.target if isinstance(node, ast.AnnAssign) else (node.targets[0] if isinstance(node, ast.Assign)
                                                                        else None)
        if isinstance(target, ast.Name) and target.id == "_EXPORTS" and node.value is not None:
            return eval(compile(ast.Expression(node.value), str(init), "eval"), {"__builtins__": {}, "dict": dict})
    return {}


#: The registry's names that import a head's module by its ``REGISTRY`` path (any head: ``--head`` picks it).
HEAD_BUILDERS = {"HEADS", "head_class", "make_head"}


def _head_modules() -> set[str]:
    """The modules named by the ``".module:Class"`` paths of ``featcache.heads.registry.REGISTRY`` (read statically)."""
    tree = ast.parse(_module_file("featcache.heads.registry").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id == "REGISTRY":
            paths = {const.value for const in ast.walk(node.value)
                     if isinstance(const, ast.Constant) and isinstance(const.value, str) and ":" in const.value}
            assert paths, "featcache.heads.registry: REGISTRY names no module:Class path"
            return {f"featcache.heads{path.partition(':')[0]}" for path in paths}
    raise AssertionError("featcache.heads.registry: no REGISTRY")


def _imports(tree: ast.AST, package: str) -> set[str]:
    """featcache modules imported anywhere in ``tree`` (``package``: for relative imports).

    ``from package import Name`` of a lazily exported name counts as importing the submodule that defines it.
    """
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base]) if base else ".".join(parts)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # submodules imported by name
            lazy = _lazy_exports(base) if base.split(".")[0] == "featcache" else {}
            found.update(f"{base}.{lazy[alias.name]}" for alias in node.names if alias.name in lazy)
            if base in ("featcache.heads", "featcache.heads.registry") and {a.name for a in node.names} & HEAD_BUILDERS:
                found.update(_head_modules())
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return {name for name in found if name.split(".")[0] == "featcache" and _module_file(name)}


def _package_of(name: str, path: Path) -> str:
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def _closure(roots: set[str]) -> set[Path]:
    """Every file run when ``roots`` are imported (with their packages' ``__init__.py``)."""
    files: set[Path] = set()
    todo = list(roots)
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        parts = name.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))  # parent packages run first
        path = _module_file(name)
        if path is None:
            continue
        files.add(path)
        todo.extend(_imports(ast.parse(path.read_text(encoding="utf-8")), _package_of(name, path)))
    return files


def _cli_roots(command: str) -> set[str]:
    tree = ast.parse(CLI.read_text(encoding="utf-8"))
    handler = f"_cmd_{command.replace('-', '_')}"
    functions = {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}
    assert handler in functions, f"featcache {command}: no {handler} in {CLI}"
    module_level = ast.Module(body=[node for node in tree.body if not isinstance(node, ast.FunctionDef)],
                              type_ignores=[])
    roots = {"featcache.pipeline"}  # the CLI module itself runs only these parts, not every handler
    for node in (module_level, functions[handler], functions["main"]):
        roots |= _imports(node, "featcache.pipeline")
    return roots


#: The pipelines: the main one and the optional fine-tuning subrepo (deps relative to its folder).
DVC_FILES = ("dvc.yaml", "finetune/dvc.yaml")


def _stages() -> dict[str, dict]:
    """``file:stage`` -> the stage (``foreach``/``matrix`` body), deps made relative to the repo root."""
    found = {}
    for dvc_file in DVC_FILES:
        folder = (REPO / dvc_file).parent
        for name, stage in yaml.safe_load((REPO / dvc_file).read_text(encoding="utf-8"))["stages"].items():
            body = dict(stage.get("do", stage))
            wdir = folder / body.get("wdir", ".")
            body["deps"] = [Path(os.path.normpath(wdir / dep)).relative_to(REPO).as_posix()
                            for dep in body.get("deps", [])]
            found[f"{dvc_file}:{name}"] = body
    return found


def _command(stage: dict) -> str | None:
    words = str(stage["cmd"]).split()
    return words[1] if words[0] == "featcache" else None


def _covered(path: Path, deps: list[str]) -> bool:
    relative = path.relative_to(REPO).as_posix()
    return any(relative == dep.rstrip("/") or relative.startswith(dep.rstrip("/") + "/") for dep in deps)


@pytest.mark.parametrize("stage", sorted(_stages()))
def test_every_file_a_stage_runs_is_one_of_its_deps(stage):
    definition = _stages()[stage]
    command = _command(definition)
    assert command, f"stage {stage!r} does not run `featcache <command>`: {definition['cmd']!r}"
    runs = _closure(_cli_roots(command)) | {CLI}
    missing = sorted(path.relative_to(REPO).as_posix() for path in runs if not _covered(path, definition["deps"]))
    assert not missing, (f"stage {stage!r} (featcache {command}) runs files that are not in its deps, so "
                         f"editing them would not rerun it: {missing}")


def _unused_source_deps(deps: list[str], runs: set[Path]) -> list[str]:
    """Source deps that hold code the stage does not run (a file not run, a folder not wholly run)."""
    ran = {path.relative_to(REPO).as_posix() for path in runs}
    unused = []
    for dep in deps:
        if not dep.startswith("src/"):
            continue
        folder = REPO / dep
        if folder.is_dir():
            modules = {p.relative_to(REPO).as_posix() for p in folder.rglob("*.py")}
            if not modules <= ran:
                unused.append(f"{dep} ({', '.join(sorted(modules - ran)[:3])} ... not run)")
        elif dep not in ran:
            unused.append(dep)
    return unused


@pytest.mark.parametrize("stage", sorted(_stages()))
def test_every_source_dep_of_a_stage_is_code_it_runs(stage):
    definition = _stages()[stage]
    runs = _closure(_cli_roots(_command(definition))) | {CLI}
    unused = _unused_source_deps(definition["deps"], runs)
    assert not unused, (f"stage {stage!r} depends on code it never runs, so editing that code reruns it for "
                        f"nothing: {unused}. Hint: list the files it runs (this test's error says which).")


def test_the_reverse_check_flags_a_folder_the_stage_only_partly_runs():
    runs = {SRC / "featcache" / "heads" / "metrics.py"}
    assert _unused_source_deps(["src/featcache/heads", "data/prepared"], runs)[0].startswith("src/featcache/heads (")
    assert _unused_source_deps(["src/featcache/heads/metrics.py"], runs) == []
    assert _unused_source_deps(["src/featcache/heads/mlp.py"], runs) == ["src/featcache/heads/mlp.py"]


def test_lazy_exports_count_as_imports_of_their_modules():
    """``from featcache.heads import make_head`` runs heads/registry.py (the package's lazy export)."""
    tree = ast.parse("from featcache.heads import make_head\nfrom featcache.store import FeatureStore\n")
    found = _imports(tree, "featcache")
    assert {"featcache.heads.registry", "featcache.store.reader"} <= found


def test_the_check_sees_function_level_imports_and_skips_type_checking():
    tree = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import featcache.runs\n"
                     "def f():\n    from featcache.pipeline.compare import compare\n")
    assert _imports(tree, "featcache") == {"featcache.pipeline.compare"}
    runs = _closure({"featcache.pipeline.compare"})
    assert SRC / "featcache" / "runs.py" in runs and SRC / "featcache" / "pipeline" / "__init__.py" in runs
    assert not _covered(SRC / "featcache" / "runs.py", ["src/featcache/pipeline", "src/featcache/run"])


@pytest.mark.parametrize("module", STAGE_MODULES)
def test_stage_modules_do_not_import_each_other(module):
    path = SRC / "featcache" / "pipeline" / f"{module}.py"
    if not path.is_file():
        pytest.skip(f"{path.name} does not exist")
    imported = _imports(ast.parse(path.read_text(encoding="utf-8")), "featcache.pipeline")
    others = {f"featcache.pipeline.{other}" for other in STAGE_MODULES if other != module}
    assert not imported & others, (f"pipeline/{module}.py imports the stage module(s) {sorted(imported & others)}; "
                                   "move what they share into the library (or pipeline/config.py for params)")


def test_a_stage_validates_the_whole_params_file_whenever_it_changes():
    """Each stage tracks only the params it reads, so a mistyped key no stage reads (``train.nboot``) would
    leave every stage up to date: the ``check`` stage tracks the whole file and runs ``featcache check`` on it."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    checking = [name for name, stage in stages.items()
                if str(stage.get("cmd", "")).split() == ["featcache", "check", "--params", "params.yaml"]]
    assert checking, "no dvc.yaml stage runs `featcache check --params params.yaml`"
    tracked = stages[checking[0]].get("params", [])
    assert {"params.yaml": None} in tracked, (f"stage {checking[0]!r} must track the whole file (`- params.yaml:`), "
                                              f"not only some keys: {tracked}")
