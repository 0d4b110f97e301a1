"""The layering rules of the design guide (docs/ARCHITECTURE.md), read from every module's imports (ast).

* ``store/`` imports none of ``extract/``, ``heads/``, ``finetune/``, ``pipeline/``;
* ``heads/`` imports neither ``extract/`` nor ``finetune/``; ``extract/`` neither ``heads/`` nor ``finetune/``;
* inside ``extract/``, a module imports only its own layer or lower ones: ``zoo/`` < ``inputs/`` < ``decode/``
  < ``runners/`` < ``onnx/`` < the top-level extract modules (``extract/__init__``'s facade included);
* ``util/`` imports nothing of featcache outside ``util/`` but the leaf ``featcache.errors`` (its check helpers
  raise ``ParamError``), and ``lazy.py`` nothing of featcache at all (their docstrings say so; ``errors.py``'s
  leaf claim is checked by ``tests/test_errors.py``);
* no library module (anything outside ``pipeline/``) imports ``pipeline/``;
* no module imports another module's underscore name (``from x import _y``, a private
  module ``x._y``, or ``x._y`` on an imported featcache module, imported absolutely or
  relatively: ``from . import x`` then ``x._y``), and no ``# noqa: SLF001``;
* no source file over 500 lines.

Imports inside functions count. There is no allowlist: every rule holds for the whole tree.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "featcache"
TESTS = Path(__file__).resolve().parent
MAX_LINES = 500

#: subpackage -> subpackages it must not import.
FORBIDDEN: dict[str, frozenset[str]] = {
    "store": frozenset({"extract", "heads", "finetune", "pipeline"}),
    "heads": frozenset({"extract", "finetune"}),
    "extract": frozenset({"heads", "finetune"}),
}
#: extract/'s own layers, lowest first. Inside extract/, a module imports only from its own layer or a lower
#: one. Every other extract module (engine, blockloop, distributed, runner_spec, backends/plan/doctor, malloc,
#: and extract/__init__ with its lazy facade) is the top layer, whatever its name.
EXTRACT_LAYERS: tuple[str, ...] = ("zoo", "inputs", "decode", "runners", "onnx")
#: Leaf modules (their docstrings say so): file or folder -> the featcache modules they may import.
#: (errors.py is a leaf too; tests/test_errors.py checks it.)
LEAVES: dict[str, tuple[str, ...]] = {
    "featcache/util/": ("featcache.util", "featcache.errors"),
    "featcache/lazy.py": (),
}
RULES = ("layers", "extract-layers", "leaves", "pipeline", "private", "noqa", "size")



@dataclass(frozen=True)
class Import:
    """One imported featcache module or name: ``target`` is dotted (``featcache.heads.metrics.TASKS``)."""

    path: str
    line: int
    target: str


def _module_name(path: Path, root: Path = SRC) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _is_module(dotted: str, root: Path = SRC) -> bool:
    base = root.joinpath(*dotted.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def _package_of(path: Path, root: Path = SRC) -> str:
    """The package a file's relative imports start from (itself for an ``__init__``)."""
    here = _module_name(path, root)
    return here if _is_package(path) else here.rpartition(".")[0]


def _from_module(node: ast.ImportFrom, package: str) -> str:
    """The absolute module of ``from <module> import ...``; ``from ..x`` resolved against ``package``."""
    if not node.level:
        return node.module or ""
    base = package.split(".")
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _is_featcache(dotted: str) -> bool:
    return dotted == "featcache" or dotted.startswith("featcache.")


def imports_of(path: Path, root: Path = SRC) -> list[Import]:
    """Every featcache import of one file (top level and inside functions), as dotted targets."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = _package_of(path, root)
    rel = str(path.relative_to(root))
    found: list[Import] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [Import(rel, node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = _from_module(node, package)
            for alias in node.names:
                full = f"{module}.{alias.name}"
                found.append(Import(rel, node.lineno, full if alias.name != "*" else module))
    return [item for item in found if _is_featcache(item.target)]


def _private_attributes(path: Path, root: Path = SRC) -> list[str]:
    """``alias._name`` where ``alias`` is bound to an imported featcache module (absolute or relative import)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = _package_of(path, root)
    modules: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if _is_featcache(alias.name):
                    modules[alias.asname or alias.name.split(".")[0]] = alias.asname and alias.name or "featcache"
        elif isinstance(node, ast.ImportFrom) and _is_featcache(module := _from_module(node, package)):
            for alias in node.names:
                if _is_module(f"{module}.{alias.name}", root):
                    modules[alias.asname or alias.name] = f"{module}.{alias.name}"
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            chain, value = [node.attr], node.value
            while isinstance(value, ast.Attribute):
                chain.append(value.attr)
                value = value.value
            if isinstance(value, ast.Name) and value.id in modules:
                found.append(f"{path.relative_to(root)}: uses {modules[value.id]}.{'.'.join(reversed(chain))}")
    return found


def _private(target: str) -> bool:
    parts = target.split(".")
    return any(part.startswith("_") and not (part.startswith("__") and part.endswith("__")) for part in parts)


def _extract_layer(dotted: str) -> int | None:
    """The layer of a module or name under ``featcache.extract`` (index in EXTRACT_LAYERS, else the top); None
    outside extract/."""
    parts = dotted.split(".")
    if parts[:2] != ["featcache", "extract"]:
        return None
    return EXTRACT_LAYERS.index(parts[2]) if len(parts) > 2 and parts[2] in EXTRACT_LAYERS else len(EXTRACT_LAYERS)


def _layer_name(layer: int) -> str:
    return EXTRACT_LAYERS[layer] if layer < len(EXTRACT_LAYERS) else "top"


def _leaf_allows(rel: str) -> tuple[str, ...] | None:
    """The featcache modules a leaf file may import (None: not a leaf)."""
    for where, allowed in LEAVES.items():
        if rel == where or (where.endswith("/") and rel.startswith(where)):
            return allowed
    return None


def source_files(root: Path = SRC) -> list[Path]:
    return sorted((root / "featcache").rglob("*.py"))


def violations(rule: str, root: Path = SRC) -> set[str]:
    """Every violation of ``rule`` under ``root/featcache`` as ``"path: detail"`` strings."""
    found: set[str] = set()
    for path in source_files(root):
        rel = str(path.relative_to(root))
        sub = rel.split("/")[1] if rel.count("/") > 1 else ""
        if rule == "size":
            n = len(path.read_text(encoding="utf-8").splitlines())
            if n > MAX_LINES:
                found.add(f"{rel}: {n} lines")
            continue
        if rule == "noqa":
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
                if "noqa: SLF001" in line:
                    found.add(f"{rel}: line {number}")
            continue
        if rule == "private":
            found.update(_private_attributes(path, root))
        here_layer = _extract_layer(_module_name(path, root))
        leaf = _leaf_allows(rel)
        for item in imports_of(path, root):
            target_sub = item.target.split(".")[1] if item.target.count(".") else ""
            target_layer = _extract_layer(item.target)
            if rule == "layers" and target_sub in FORBIDDEN.get(sub, ()):
                found.add(f"{rel}: imports {item.target}")
            elif rule == "extract-layers" and None not in (here_layer, target_layer) and target_layer > here_layer:
                found.add(f"{rel}: imports {item.target} ({_layer_name(here_layer)} below "
                          f"{_layer_name(target_layer)})")
            elif rule == "leaves" and leaf is not None and not any(
                    item.target == ok or item.target.startswith(f"{ok}.") for ok in leaf):
                found.add(f"{rel}: imports {item.target}")
            elif rule == "pipeline" and sub != "pipeline" and target_sub == "pipeline":
                found.add(f"{rel}: imports {item.target}")
            elif rule == "private" and _private(item.target):
                owner = item.target.rsplit(".", 1)[0]
                if owner != _module_name(path, root):  # a module's own private names are its business
                    found.add(f"{rel}: imports {item.target}")
    return found


@pytest.mark.parametrize("rule", RULES)
def test_no_new_violations(rule: str):
    found = violations(rule)
    assert not found, f"{rule}: " + "; ".join(sorted(found))


def test_no_noqa_slf001_in_tests():
    hits = [f"{path.relative_to(TESTS)}:{n}" for path in sorted(TESTS.rglob("*.py")) if path.name != Path(__file__).name
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1) if "noqa: SLF001" in line]
    assert not hits, hits


# --------------------------------------------------------------------------- the checker can fail
def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = tmp_path / "featcache" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        for parent in path.relative_to(tmp_path).parents:
            init = tmp_path / parent / "__init__.py"
            if parent != Path(".") and not init.exists():
                init.write_text("")
        path.write_text(text)
    return tmp_path


@pytest.mark.parametrize("rule, files, expected", [
    ("layers", {"store/x.py": "def f():\n    from featcache.extract.zoo import registry\n"},
     "featcache/store/x.py: imports featcache.extract.zoo.registry"),
    ("layers", {"store/x.py": "from ..heads.metrics import TASKS\n", "heads/metrics.py": ""},
     "featcache/store/x.py: imports featcache.heads.metrics.TASKS"),
    ("layers", {"heads/x.py": "import featcache.extract.decode.preprocess\n"},
     "featcache/heads/x.py: imports featcache.extract.decode.preprocess"),
    ("layers", {"heads/x.py": "from featcache.finetune import run\n"},
     "featcache/heads/x.py: imports featcache.finetune.run"),
    ("layers", {"extract/x.py": "from featcache.heads.metrics import f\n"},
     "featcache/extract/x.py: imports featcache.heads.metrics.f"),
    ("layers", {"extract/x.py": "from featcache import finetune\n"},
     "featcache/extract/x.py: imports featcache.finetune"),
    ("extract-layers", {"extract/zoo/x.py": "from featcache.extract.decode.preprocess import Preprocessor\n"},
     "featcache/extract/zoo/x.py: imports featcache.extract.decode.preprocess.Preprocessor (zoo below decode)"),
    ("extract-layers", {"extract/decode/x.py": "def f():\n    from featcache.extract.engine import extract_to_store\n"},
     "featcache/extract/decode/x.py: imports featcache.extract.engine.extract_to_store (decode below top)"),
    ("extract-layers", {"extract/decode/x.py": "from ..runners import torch_runner\n"},
     "featcache/extract/decode/x.py: imports featcache.extract.runners.torch_runner (decode below runners)"),
    ("extract-layers", {"extract/runners/x.py": "import featcache.extract.onnx.export\n"},
     "featcache/extract/runners/x.py: imports featcache.extract.onnx.export (runners below onnx)"),
    ("extract-layers", {"extract/onnx/x.py": "from .. import plan\n"},
     "featcache/extract/onnx/x.py: imports featcache.extract.plan (onnx below top)"),
    ("extract-layers", {"extract/inputs/x.py": "from featcache.extract import Preprocessor\n"},
     "featcache/extract/inputs/x.py: imports featcache.extract.Preprocessor (inputs below top)"),
    ("extract-layers", {"extract/zoo/__init__.py": "from featcache.extract.inputs import manifest\n"},
     "featcache/extract/zoo/__init__.py: imports featcache.extract.inputs.manifest (zoo below inputs)"),
    ("leaves", {"util/x.py": "from featcache.store.errors import StoreError\n"},
     "featcache/util/x.py: imports featcache.store.errors.StoreError"),
    ("leaves", {"util/__init__.py": "def f():\n    from ..extract.zoo import registry\n"},
     "featcache/util/__init__.py: imports featcache.extract.zoo.registry"),
    ("leaves", {"lazy.py": "from featcache.util.names import closest\n"},
     "featcache/lazy.py: imports featcache.util.names.closest"),
    ("leaves", {"lazy.py": "import featcache\n"}, "featcache/lazy.py: imports featcache"),
    ("pipeline", {"errors.py": "def f():\n    import featcache.pipeline.config\n"},
     "featcache/errors.py: imports featcache.pipeline.config"),
    ("private", {"a/x.py": "from featcache.a.y import _hidden\n", "a/y.py": ""},
     "featcache/a/x.py: imports featcache.a.y._hidden"),
    ("private", {"a/x.py": "from ._y import z\n", "a/_y.py": ""},
     "featcache/a/x.py: imports featcache.a._y.z"),
    ("private", {"a/x.py": "from featcache.a import y\ny._hidden()\n", "a/y.py": ""},
     "featcache/a/x.py: uses featcache.a.y._hidden"),
    ("private", {"a/x.py": "import featcache.a.y as y\ny._hidden()\n", "a/y.py": ""},
     "featcache/a/x.py: uses featcache.a.y._hidden"),
    ("private", {"a/x.py": "from . import _y\n", "a/_y.py": ""},
     "featcache/a/x.py: imports featcache.a._y"),
    ("private", {"a/x.py": "from .y import _hidden\n", "a/y.py": ""},
     "featcache/a/x.py: imports featcache.a.y._hidden"),
    ("private", {"a/x.py": "from . import y\ny._hidden()\n", "a/y.py": ""},
     "featcache/a/x.py: uses featcache.a.y._hidden"),
    ("private", {"a/x.py": "def f():\n    from . import y as w\n    return w._hidden\n", "a/y.py": ""},
     "featcache/a/x.py: uses featcache.a.y._hidden"),
    ("private", {"a/b/x.py": "from .. import y\ny._hidden()\n", "a/y.py": ""},
     "featcache/a/b/x.py: uses featcache.a.y._hidden"),
    ("private", {"a/b/x.py": "from .. import c\nc.y._hidden()\n", "a/c/y.py": ""},
     "featcache/a/b/x.py: uses featcache.a.c.y._hidden"),
    ("private", {"a/x.py": "from .y import z\nz._hidden\n", "a/y/z.py": ""},
     "featcache/a/x.py: uses featcache.a.y.z._hidden"),
    ("noqa", {"a/x.py": "w._lock = 1  # noqa: SLF001\n"}, "featcache/a/x.py: line 1"),
    ("size", {"a/x.py": "x = 1\n" * (MAX_LINES + 1)}, f"featcache/a/x.py: {MAX_LINES + 1} lines"),
])
def test_each_rule_catches_its_violation(tmp_path: Path, rule: str, files: dict[str, str], expected: str):
    assert violations(rule, _tree(tmp_path, files)) == {expected}


@pytest.mark.parametrize("files", [
    {"heads/x.py": "from featcache.store.schema import TASKS\nfrom . import y\nfrom .y import public\n",
     "heads/y.py": ""},
    {"pipeline/x.py": "from featcache.pipeline.config import load_params\nfrom featcache.heads import metrics\n"},
    {"a/x.py": "from featcache import __version__\nclass A:\n    def _own(self):\n        return self._own\n"},
    {"extract/decode/x.py": "from featcache.extract.zoo.registry import BackboneSpec\nfrom ..inputs import manifest\n"
                            "from . import y\nfrom featcache.util.compute import resolve_device\n"
                            "from featcache.errors import ExtractionError\nfrom featcache.extract.decode import z\n",
     "extract/decode/y.py": "", "extract/decode/z.py": ""},
    {"extract/engine.py": "from .onnx import runner\nfrom featcache.extract.blockloop import Progress\n"
                          "from featcache.extract.decode.loaders import make_loader\n",
     "extract/plan.py": "from featcache.extract import engine\nfrom featcache.extract.zoo import registry\n",
     "extract/__init__.py": "from featcache.lazy import lazy_exports\n"},
    {"util/x.py": "from . import y\nfrom featcache.util.names import closest\n"
                  "from featcache.errors import ParamError\n",
     "util/y.py": "",
     "util/__init__.py": "from featcache.util.x import f\n", "lazy.py": "import importlib\n"},
    {"a/x.py": "x = 1\n" * MAX_LINES},
])
def test_allowed_imports_pass(tmp_path: Path, files: dict[str, str]):
    root = _tree(tmp_path, files)
    assert all(not violations(rule, root) for rule in RULES)
