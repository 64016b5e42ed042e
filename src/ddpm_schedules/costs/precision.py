"""Sample size by precision (``cost.target_sem``): add examples in rounds until every requested DP path is precise.

A fixed ``cost.examples`` is either wasteful or too few. Here the ELBO matrix is estimated on a first
round of examples, the DP runs, and the standard error of each DP path's predicted bits/dim is
measured: the per-example totals of the path's pairs, on the same examples and noise as the matrix,
so their mean is exactly the prediction. While any is above the target, another round (as many
examples again) is estimated and merged; the noise rule makes the rounds one estimate.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

from torch import Tensor

from ddpm_schedules.costs.cost_matrix import CostMatrix, estimate_cost_matrix
from ddpm_schedules.costs.evaluation import evaluate_schedules
from ddpm_schedules.models.model import DiffusionModel
from ddpm_schedules.models.noise import Processes
from ddpm_schedules.schedules.dp import optimal_schedules

log = logging.getLogger(__name__)


def check_target_sem(target_sem: Any, key: str = "cost.target_sem") -> float:
    if isinstance(target_sem, bool) or not isinstance(target_sem, (int, float)) or not target_sem > 0:
        raise ValueError(f"{key} = {target_sem!r}; it must be a positive number of bits/dim (e.g. 0.01), or null for cost.examples")
    return float(target_sem)


def estimate_to_precision(
    model: DiffusionModel,
    data: Tensor,
    budgets: Sequence[int],
    target_sem: float,
    grid: Sequence[int] | None = None,
    seed: int = 0,
    batch_size: int = 64,
    first: int = 64,
    progress: bool = True,
    procs: Processes = Processes(),
    start: CostMatrix | None = None,
) -> tuple[CostMatrix, list[dict[str, Any]]]:
    """The ELBO matrix on the fewest rounds of ``data`` (``first`` examples, then doubling) for which the standard
    error of every budget's DP path is at most ``target_sem`` bits/dim; all of ``data`` if none is enough.

    ``start``: a matrix of the first ``start.count`` examples of ``data`` (e.g. refinement's, on its grid), taken
    as the first round; later rounds are estimated on its grid.

    Returns the matrix and one record per round: examples used, each budget's predicted bits/dim and its error,
    and whether the target was met (a warning says so when all of ``data`` was not enough).
    """
    target_sem = check_target_sem(target_sem)
    cm: CostMatrix | None = start
    rounds: list[dict[str, Any]] = []
    used, size = (0, min(max(1, first), len(data))) if start is None else (start.count, 0)
    if start is not None:
        grid = start.grid[1:].tolist()
    while True:
        if size:
            lo, hi = procs.shard(size)
            part = estimate_cost_matrix(model, data[used + lo : used + hi], grid, seed, batch_size=batch_size, progress=progress,
                                        start_index=used + lo)  # fmt: skip
            cm = part if cm is None else cm.merged(part)
            used += size
        paths = optimal_schedules(cm, budgets)
        lo, hi = procs.shard(used)
        results = evaluate_schedules(model, data[lo:hi], list(paths.values()), seed=seed, batch_size=batch_size, progress=False, start_index=lo)
        sems = {K: r.bpd_sem for K, r in zip(paths, results)}
        met = max(sems.values()) <= target_sem
        rounds.append({"examples": used, "predicted_bpd": {K: r.bpd for K, r in zip(paths, results)}, "sem_bpd": sems, "met": met})
        if met or used >= len(data):
            if not met and procs.rank == 0:
                worst = max(sems, key=sems.get)
                log.warning("cost.target_sem = %g bits/dim is not reached with all %d examples (K = %d: %.4f); raise cost.examples",
                            target_sem, used, worst, sems[worst])  # fmt: skip
            return cm, rounds
        size = min(used, len(data) - used)
