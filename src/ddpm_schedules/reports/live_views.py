"""Each stage's numbers, tables and figures as the live run logs them when the stage ends (live.py)."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from ddpm_schedules.costs.matrix import CostMatrix
from ddpm_schedules.reports.plots import plot_cost_matrix, plot_opt_history, sample_grid
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


OPT_COLUMNS = ("strategy", "K", "start_strategy", "start", "schedule", "continuous", "distance", "start_distance")
OPT_COLUMNS += ("best_distance", "rounded_distance", "seconds", "network_calls", "cached")


def opt(found: Mapping[str, Mapping[str, Any]]) -> tuple[dict[str, float], dict[str, Any], dict[str, Any]]:
    """opt/<strategy>/K<K>/{start,best,rounded} (held-out distances) and seconds; the history figure; a table."""
    values, rows = {}, []
    for name, rec in found.items():
        d = rec["distances"]
        for key in ("start", "best", "rounded"):
            values[f"opt/{name}/{key}"] = d.get(key)
        values[f"opt/{name}/seconds"] = rec["seconds"]
        strategy, k = name.rsplit("/K", 1)
        rows.append([
            strategy, int(k), rec["start_strategy"], rec["start"], rec["timesteps"], rec["continuous"],
            rec.get("distance", "l2"), d.get("start"), d.get("best"), d.get("rounded"), rec["seconds"],
            rec["network_calls"], bool(rec["cached"]),
        ])  # fmt: skip
    return values, {"history": plot_opt_history(found)}, {"opt": (OPT_COLUMNS, rows)}


def quality(
    entries: Sequence[Mapping[str, Any]], scale: float, grids: Mapping[str, Any]
) -> tuple[dict[str, float], None, None, dict[str, np.ndarray]]:
    """fid/, fid_sem/ and teacher_distance/<strategy>/<sampler>/K<K> of one guidance scale, and its sample grids."""
    values = quality_metrics([{**q, "guidance": scale} for q in entries])
    return values, None, None, {f"samples/{name}": sample_grid(x) for name, x in grids.items()}
