"""The one fixed-width text table of the command line: a header row, a rule, then the rows."""

from __future__ import annotations

from collections.abc import Sequence


def render(rows: Sequence[Sequence[object]]) -> str:
    """Columns padded to their widest cell, two spaces apart; the first row is the header."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
