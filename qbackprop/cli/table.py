"""Plain-text tables for the commands' output: left-aligned columns under a dashed rule."""

from __future__ import annotations

from typing import Any


def format_table(rows: list[list[Any]], headers: list[str]) -> str:
    """``rows`` under ``headers``, each column as wide as its widest cell.

    Args:
        rows: one list of cells per row, as many as ``headers``; cells are shown with ``str``.
        headers: the column names.
    """
    cells = [headers] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
