"""Where a refinement (refine.py) stands, saved so that a rerun after SIGKILL or SIGTERM continues it.

The state is the grid so far, the kept per-column statistics (`terms.ColumnStats`, as plain tensors so that
the file loads with ``weights_only=True``), the rounds' records and, within a round, the columns that round
estimates: a rerun estimates only the columns not yet kept, and since every matrix is made from the kept
statistics alone, it gives the uninterrupted run's results bit for bit (the batch size is part of the configuration).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from ddpm_schedules.costs.terms import ColumnStats
from ddpm_schedules.storage.resume import PartialSums, agreed

log = logging.getLogger(__name__)


@dataclass
class RefineState:
    """A refinement between two columns: ``round`` is under way on ``grid``; ``new`` (None before its first column)
    are the columns it estimates, ``passes`` those made before it."""

    grid: set[int]
    kept: dict[int, list[ColumnStats]] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    round: int = 0
    new: list[int] | None = None
    passes: int = 0

    def save(self, saver: PartialSums) -> None:
        """Write the state atomically (tensors moved to the CPU), with the number of kept columns as its progress."""
        if saver.path is None:
            return  # no file: skip copying the statistics to the CPU
        saver.save_state(
            {
                "grid": sorted(self.grid),
                "history": self.history,
                "round": self.round,
                "new": self.new,
                "passes": self.passes,
                "kept": {t: [_stats_dict(st) for st in stats] for t, stats in self.kept.items()},
            },
            len(self.kept),
        )

    @classmethod
    def load(cls, saver: PartialSums, device: torch.device | str) -> RefineState | None:
        """The saved state of this configuration with its statistics on ``device``; None (reported) for none, a damaged
        file, one of another configuration, or processes that do not all stand at the same round."""
        saved = saver.load_state()
        try:
            state = (
                None
                if saved is None
                else cls(
                    grid=set(saved["grid"]),
                    history=list(saved["history"]),
                    round=int(saved["round"]),
                    new=saved["new"],
                    passes=int(saved["passes"]),
                    kept={
                        int(t): [ColumnStats(**{k: _to(v, device) for k, v in st.items()}) for st in stats]
                        for t, stats in saved["kept"].items()
                    },
                )
            )
        except Exception as e:  # a readable file of the right configuration but not a refinement's state
            log.warning(
                "partial sums %s are not a refinement's state (%s); starting afresh", saver.path, type(e).__name__
            )
            state = None
        where = None if state is None else (state.round, sorted(state.grid), state.new, len(state.history))
        if not agreed(where):
            log.warning("the processes' partial refinements stand at different rounds; starting afresh")
            return None
        if state is not None:
            log.info(
                "resuming the refinement from %s: round %d, %d columns kept", saver.path, state.round, len(state.kept)
            )
        return state


def _stats_dict(stats: ColumnStats) -> dict[str, Any]:
    return {f.name: _to(getattr(stats, f.name), "cpu") for f in fields(stats)}


def _to(value: Any, device: torch.device | str) -> Any:
    """Tensors (alone or in a tuple) on ``device``; other values as they are."""
    if isinstance(value, torch.Tensor):
        return value.detach().to(device)
    if isinstance(value, (tuple, list)):
        return tuple(_to(v, device) for v in value)
    return value
