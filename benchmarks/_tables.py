"""Tables: results as Markdown, numbers to about three significant digits."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["MiB", "format_number", "markdown_table"]

MiB = 2**20


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table with right-aligned numbers, readable as plain text too."""
    cells = [[str(h) for h in headers]] + [[format_number(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    numeric = [all(_is_number(row[i]) for row in rows) and bool(rows) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        padded = (c.rjust(w) if num else c.ljust(w) for c, w, num in zip(row, widths, numeric, strict=True))
        return "| " + " | ".join(padded) + " |"

    dashes = (("-" * (w + 1) + ":") if num else ("-" * (w + 2)) for w, num in zip(widths, numeric, strict=True))
    rule = "|" + "|".join(dashes) + "|"
    return "\n".join([line(cells[0]), rule, *(line(row) for row in cells[1:])])


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) or value is None


def format_number(value: Any) -> str:
    """A table cell: floats to about three significant digits, None as ``-``, anything else as ``str``."""
    if value is None:
        return "-"
    if isinstance(value, float):
        if value == 0 or abs(value) >= 1000:
            return f"{value:.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        if abs(value) >= 0.1:
            return f"{value:.2f}"
        return f"{value:.3f}"
    return str(value)
