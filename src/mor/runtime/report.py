"""The one table formatter: a header and rows of cells in, aligned text out.

``markdown_table`` for results people paste (README, PRs, ``mor eval``); ``text_table`` for
terminal reports (numbers right-aligned, an optional title line). Callers build the rows; cells
may be any value (``str()`` is applied), so a caller decides the number format, not this module.
"""

from __future__ import annotations

from typing import Sequence

__all__ = ["markdown_table", "text_table"]


def _cells(headers: Sequence, rows: Sequence[Sequence]) -> tuple[list[list[str]], list[int]]:
    """The header and the rows as strings, and each column's width."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    for i, row in enumerate(cells[1:], 1):
        if len(row) != len(headers):
            raise ValueError(f"row {i} has {len(row)} cells but the header has {len(headers)}: {row}")
    return cells, [max(len(row[k]) for row in cells) for k in range(len(headers))]


def markdown_table(headers: list[str], rows: list[list]) -> str:
    """A Markdown table with padded columns (left-aligned)."""
    cells, widths = _cells(headers, rows)

    def line(row):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"

    return "\n".join([line(cells[0]), "| " + " | ".join("-" * w for w in widths) + " |", *map(line, cells[1:])])


def text_table(headers: list[str], rows: list[list], title: str = "") -> str:
    """A plain aligned text table: numbers right-aligned, text left-aligned, ``title`` on top."""
    cells, widths = _cells(headers, rows)

    def line(row):
        return "  ".join(c.rjust(w) if _numeric(c) else c.ljust(w) for c, w in zip(row, widths)).rstrip()

    lines = ([title] if title else []) + [line(cells[0]), "  ".join("-" * w for w in widths)]
    return "\n".join(lines + [line(r) for r in cells[1:]])


def _numeric(cell: str) -> bool:
    """A number as tables print it: '1,234', '0.5', '1.02x', '12.5%', '3e-05'."""
    try:
        float(cell.replace(",", "").replace("x", "").replace("%", "").strip())
        return True
    except ValueError:
        return False
