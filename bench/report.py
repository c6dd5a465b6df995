"""The one table every benchmark prints: figure | value | spread | target | verdict.

Used by ``bench/run.py`` for the whole run and by each script's own ``main`` so a script run
alone reads the same as its rows in ``make bench``.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

from bench.rounds import Figure

HEADER = ("figure", "value", "spread", "target", "verdict")


def number(value: float, unit: str) -> str:
    """A figure's value as the table shows it: ratios to 3 decimals, the rest to 1."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if unit == "x":
        return f"{value:.3f}x"
    return f"{value:,.1f} {unit}".rstrip()


def row(figure: Figure) -> tuple[str, str, str, str, str]:
    """The five cells of one figure."""
    spread = ("" if figure.spread is None
              else f"{number(figure.spread[0], figure.unit)}–{number(figure.spread[1], figure.unit)}")
    target = f"{figure.target_op} {number(figure.target, figure.unit)}"
    return figure.name, number(figure.value, figure.unit), spread, target, figure.verdict


def status_row(name: str, status: str) -> tuple[str, str, str, str, str]:
    """A row for a module that gave no figures: "not available" or "CRASH" (why goes below)."""
    return name, "—", "", "—", status


def table(rows: Iterable[Sequence[str]], details: Sequence[str] = (),
          header: Sequence[str] = HEADER) -> str:
    """Align the rows under the header; ``details`` follow the table, one per line."""
    rows = [tuple(r) for r in rows]
    widths = [max(len(str(cells[i])) for cells in [header, *rows]) for i in range(len(header))]
    lines = [" | ".join(str(cell).ljust(width) for cell, width in zip(cells, widths)).rstrip()
             for cells in [header, *rows]]
    lines.insert(1, "-+-".join("-" * width for width in widths))
    return "\n".join([*lines, *details])


def figures_table(figures: Sequence[Figure]) -> str:
    """The table of a list of figures with their details below: what a script prints alone."""
    details = [f"  {f.name}: {f.detail}" for f in figures if f.detail]
    return table([row(f) for f in figures], details)
