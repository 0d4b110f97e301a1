"""Reading the compare stage's Markdown report in tests."""

from __future__ import annotations

from pathlib import Path


def report_table(out: Path) -> dict[str, dict[str, str]]:
    """The table of ``out/compare.md``: head name -> {column header: cell text}."""
    lines = [line for line in (out / "compare.md").read_text().splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    return {row["head"]: row for row in
            (dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")))) for line in lines[2:])}
