"""The best value per K and the values that tie with it within one standard error (results.md and sweep.md)."""

from __future__ import annotations

import math
from typing import Sequence

TIE_RULE = (
    "**bold**: the lowest mean at that K; ≈: a tie with it, the cell's mean minus its SE at most the best's mean "
    "plus the best's SE (the one-SE intervals overlap; a missing SE counts as 0)."
)


def best_and_ties(cells: Sequence[tuple[float, float | None]]) -> list[tuple[bool, bool]]:
    """(best, tie) per (mean, SE) of one column: best on the lowest mean, tie where the one-SE intervals overlap."""
    finite = [(m, s or 0.0) for m, s in cells if m is not None and math.isfinite(m)]
    if not finite:
        return [(False, False)] * len(cells)
    top, top_sem = min(finite)
    out = []
    for m, s in cells:
        if m is None or not math.isfinite(m):
            out.append((False, False))
            continue
        best = m == top
        out.append((best, not best and m - (s or 0.0) <= top + top_sem))
    return out


def marked(text: str, best: bool, tie: bool) -> str:
    return f"**{text}**" if best else text + " ≈" if tie else text
