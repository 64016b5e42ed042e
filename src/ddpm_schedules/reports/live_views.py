"""Each stage's numbers, tables and figures as the live run logs them when the stage ends (live.py)."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from ddpm_schedules.costs.matrix import CostMatrix
from ddpm_schedules.reports.plots import plot_cost_matrix, sample_grid
from ddpm_schedules.reports.report import quality_metrics
from ddpm_schedules.schedules.schedule import Schedule

SCHEDULE_COLUMNS = ("strategy", "K", "schedule", "predicted_nats")


def matrices(costs: Mapping[str, Any]) -> tuple[dict[str, float], dict[str, Any]]:
    """Per objective: examples, grid size, whether cached; the ELBO matrix's figure."""
    values, figures = {}, {}
    for objective, stage in costs.items():
        values[f"cost_matrix/{objective}/count"] = stage.matrix.count
        values[f"cost_matrix/{objective}/grid_size"] = stage.matrix.grid.numel() - 1
        values[f"cost_matrix/{objective}/cached"] = float(stage.cached)
        if isinstance(stage.matrix, CostMatrix) and objective == "elbo":
            figures["cost_matrix"] = plot_cost_matrix(stage.matrix)
    return values, figures


def schedules(found: Sequence[Schedule]) -> dict[str, tuple[Sequence[str], list[list]]]:
    """The schedules found, one row each (the timesteps as a list)."""
    rows = [
        [s.strategy, s.K, list(s.timesteps), s.predicted_nats] for s in sorted(found, key=lambda s: (s.K, s.strategy))
    ]
    return {"schedules": (SCHEDULE_COLUMNS, rows)}


def bpd(results: Sequence[Any], full: Any = None) -> dict[str, float]:
    """bpd/<strategy>/K<K> and its standard error (and the full chain's)."""
    out = {}
    for r in results:
        out[f"bpd/{r.schedule.strategy}/K{r.schedule.K}"] = r.bpd
        out[f"bpd_sem/{r.schedule.strategy}/K{r.schedule.K}"] = r.bpd_sem
    if full is not None:
        out["bpd/full_chain"] = full.bpd
    return out


def quality(
    entries: Sequence[Mapping[str, Any]], scale: float, grids: Mapping[str, Any]
) -> tuple[dict[str, float], None, None, dict[str, np.ndarray]]:
    """fid/, fid_sem/ and teacher_distance/<strategy>/<sampler>/K<K> of one guidance scale, and its sample grids."""
    values = quality_metrics([{**q, "guidance": scale} for q in entries])
    return values, None, None, {f"samples/{name}": sample_grid(x) for name, x in grids.items()}
