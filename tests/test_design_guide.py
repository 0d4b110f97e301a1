"""docs/ARCHITECTURE.md tells the truth about the tree: every module is named, the imports line and the list of
user errors match the code (test_architecture.py enforces the rules; this checks the page's facts)."""

from __future__ import annotations

import re
from pathlib import Path

from tests.test_architecture import PACKAGE, imports_of

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "ARCHITECTURE.md"


def _text() -> str:
    return GUIDE.read_text(encoding="utf-8")


def test_every_module_is_named_in_the_design_guide():
    """Each ``src/featcache/**/x.py`` appears as `` `x.py` `` or `` `x` `` (the extract layer table's style)."""
    named = {name.rpartition("/")[2] for name in re.findall(r"`([\w/]+?)(?:\.py)?`", _text())}
    missing = [str(path.relative_to(PACKAGE)) for path in sorted(PACKAGE.rglob("*.py"))
               if path.name != "__init__.py" and path.stem not in named]
    assert not missing, f"docs/ARCHITECTURE.md does not name: {missing}"


def test_the_imports_line_is_what_the_packages_import():
    """"What the packages actually import today: `a` -> `b, c`; ..." against every module's imports."""
    line = _text().split("What the packages actually import today:", 1)[1].split("\n\n", 1)[0]
    claimed = {name: set(deps.split(", ")) for name, deps in re.findall(r"`(\w+)` -> `([\w, ]+)`", line)}
    assert {"store", "heads", "extract", "finetune", "runs", "util"} <= set(claimed)
    actual: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        part = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        for item in imports_of(path):
            other = item.target.split(".")[1] if "." in item.target else ""
            if other and other != part and ((PACKAGE / other).is_dir() or (PACKAGE / f"{other}.py").is_file()):
                actual.setdefault(part, set()).add(other)
    wrong = {name: (sorted(deps), sorted(actual.get(name, set()))) for name, deps in claimed.items()
             if deps != actual.get(name, set())}
    assert not wrong, f"docs/ARCHITECTURE.md's imports line (claimed, actual): {wrong}"


def test_every_user_error_is_listed():
    """The Errors section's "Current subclasses" names every class that subclasses ``UserError`` directly."""
    listed = _text().split("Current subclasses:", 1)[1].split("\n*", 1)[0]
    defined = sorted({name for path in PACKAGE.rglob("*.py")
                      for name in re.findall(r"^class (\w+)\(UserError\b", path.read_text(encoding="utf-8"), re.M)})
    missing = [name for name in defined if f"`{name}`" not in listed]
    assert len(defined) >= 10 and not missing, f"docs/ARCHITECTURE.md's Errors section does not list: {missing}"
