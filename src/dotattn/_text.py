"""Plain-text tables for the reports that dotattn prints (engines, checks, diagnostics)."""

from __future__ import annotations


def table(header: list[str], rows: list[list[str]]) -> str:
    """Left-aligned columns under a header and a rule of dashes."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
