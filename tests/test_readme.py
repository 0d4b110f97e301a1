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
