"""Watson et al. (2021), Algorithm 1: the exact dynamic program over a cost matrix.

E[0][0] = 0; E[k][j] = min_{i < j} E[k-1][i] + C[i, j]; one pass gives every budget k <= K_max and
back-pointers recover each path. Ties go to the smaller predecessor i, so among equally good paths
the one chosen is the smallest compared from its last point backwards.
"""

from __future__ import annotations

import math
from typing import Iterable, Protocol, Sequence

import numba
import numpy as np
import torch

from ddpm_schedules.schedules.schedule import Schedule, check_budgets


class PairCosts(Protocol):
    """What the DP reads of a cost matrix: `costs.matrix.CostMatrix` is one, any additive pair cost can be."""

    mean: torch.Tensor  # [N+1, N+1]: entry [i, j] the cost of the step grid[j] -> grid[i]
    grid: torch.Tensor  # [N+1]: 0, then the candidate timesteps, ending at T
    T: int
    objective: str  # "elbo" (costs in nats: schedules get a predicted ELBO) or another objective's name
    prior: float  # nats added to every ELBO path

    def grid_indices(self, timesteps: Sequence[int]) -> torch.Tensor: ...


Paths = dict[int, tuple[list[int], float]]


_TILE = 16  # columns that share one pass over the earlier rows; 8..32 all run within 5% here


# costs are checked for NaN first, so 'nnan' is safe; infinities stay exact ('ninf' is not set)
@numba.njit(parallel=True, cache=True, fastmath={"nnan", "nsz"})
def _dp_tables(C: np.ndarray, k_max: int, bounds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover
    """E[j, k] (best cost of reaching j in k steps) and its back-pointers, stored point-major.

    Columns are done a tile at a time: predecessors before the tile first, in parallel over chunks
    of k (each row E[i, :] is read once per tile instead of once per column), then those inside the
    tile in order. Within a column i ascends and only a strict improvement moves the pointer.
    """
    n = C.shape[0] - 1
    E = np.full((n + 1, k_max + 1), np.inf)
    ptr = np.full((n + 1, k_max + 1), -1, dtype=np.int32)
    E[0, 0] = 0.0
    for j0 in range(1, n + 1, _TILE):
        j1 = min(j0 + _TILE, n + 1)
        best = np.full((j1 - j0, k_max + 1), np.inf)
        arg = np.full((j1 - j0, k_max + 1), -1, dtype=np.int32)
        for c in numba.prange(len(bounds) - 1):
            k_lo = bounds[c]
            k_hi = bounds[c + 1] - 1
            for i in range(0, j0):
                top = min(k_hi, i + 1)  # i is reachable in at most i steps
                if top < k_lo:
                    continue
                row = E[i]
                for jj in range(j1 - j0):
                    cost = C[i, j0 + jj]
                    for k in range(k_lo, min(top, j0 + jj) + 1):
                        v = row[k - 1] + cost
                        if v < best[jj, k]:
                            best[jj, k] = v
                            arg[jj, k] = i
        for jj in range(1, j1 - j0):
            for ii in range(jj):
                i = j0 + ii
                cost = C[i, j0 + jj]
                for k in range(1, min(k_max, i + 1, j0 + jj) + 1):
                    v = best[ii, k - 1] + cost
                    if v < best[jj, k]:
                        best[jj, k] = v
                        arg[jj, k] = i
        E[j0:j1] = best
        ptr[j0:j1] = arg
    return E, ptr


def _k_chunks(n: int, k_max: int, threads: int) -> np.ndarray:
    """Boundaries of ranges of k with equal work: level k costs about (n - k)^2 / 2 updates."""
    work = np.cumsum((n - np.arange(1, k_max + 1) + 1.0) ** 2)
    cuts = np.searchsorted(work, work[-1] * np.arange(1, threads) / threads) + 1
    return np.unique(np.concatenate([[1], cuts, [k_max + 1]])).astype(np.int64)


def check_costs(costs: torch.Tensor | np.ndarray) -> np.ndarray:
    """A float64 copy of a square [N+1, N+1] cost matrix, inf on and below the diagonal (a NaN above: ValueError)."""
    C = costs.detach().cpu().numpy() if torch.is_tensor(costs) else np.asarray(costs)
    if C.ndim != 2 or C.shape[0] != C.shape[1] or C.shape[0] < 2:
        raise ValueError(f"costs must be a square [N+1, N+1] matrix with N >= 1, got shape {C.shape}")
    C = np.array(C, dtype=np.float64)  # a copy: the lower triangle is overwritten below
    upper = np.triu(np.ones(C.shape, dtype=bool), 1)
    if np.isnan(C[upper]).any():
        i, j = np.argwhere(np.isnan(C) & upper)[0]
        raise ValueError(f"costs[{i}, {j}] is NaN; every pair s < t needs a cost (use inf to forbid a transition)")
    C[~upper] = np.inf
    return C


def check_budgets_on_grid(budgets: int | Iterable[int], n: int) -> list[int]:
    return check_budgets(budgets, n, "budgets", "the number of grid points after 0")


@numba.njit(cache=True)
def _backtrack(ptr: np.ndarray, k: int, n: int) -> np.ndarray:  # pragma: no cover - compiled
    path = np.empty(k + 1, dtype=np.int64)
    path[k] = n
    for kk in range(k, 0, -1):
        path[kk - 1] = ptr[path[kk], kk]
    return path


def optimal_paths(costs: torch.Tensor | np.ndarray, budgets: int | Iterable[int], at_most: bool = False) -> Paths:
    """Exact DP on any [N+1, N+1] cost matrix (entries with i >= j ignored).

    Returns {K: (path, total)} with path = [0 = i_0 < i_1 < ... < i_K = N] minimising
    sum_k costs[i_{k-1}, i_k]. With ``at_most`` the best path of at most K steps is returned.
    A budget that no path of finite cost meets is a ValueError.
    """
    C = check_costs(costs)
    n = C.shape[0] - 1
    budgets = check_budgets_on_grid(budgets, n)
    E, ptr = _dp_tables(C, max(budgets), _k_chunks(n, max(budgets), numba.get_num_threads()))
    out: Paths = {}
    wanted = set(budgets)
    best_k, best = 0, math.inf
    for k in range(1, max(budgets) + 1):
        if E[n, k] < best:
            best_k, best = k, float(E[n, k])
        if k in wanted:
            use = best_k if at_most else k
            if not np.isfinite(E[n, use]):
                raise ValueError(
                    f"no path of {'at most ' if at_most else ''}{k} steps has a finite cost; check for inf entries"
                )
            out[k] = (_backtrack(ptr, use, n).tolist(), float(E[n, use]))
    return out


def optimal_schedules(
    cost_matrix: PairCosts,
    budgets: int | Iterable[int],
    grid: Iterable[int] | None = None,
    at_most: bool = False,
) -> dict[int, Schedule]:
    """Optimal schedules for every budget from an estimated cost matrix (ELBO-optimal on the ELBO matrix).

    ``grid`` restricts the DP to candidate timesteps (a subset of the matrix's grid containing T);
    the result is exact on that grid. On the ELBO matrix each schedule carries its predicted negative
    ELBO in nats and is named ``dp``; on another objective's matrix it is named ``dp_<objective>``.
    """
    idx = cost_matrix.grid_indices(grid) if grid is not None else torch.arange(cost_matrix.grid.numel())
    sub = cost_matrix.mean[idx][:, idx]
    g = cost_matrix.grid[idx].tolist()
    T = g[-1]
    elbo = cost_matrix.objective == "elbo"
    return {
        K: Schedule(
            tuple(g[i] for i in path[1:]),
            T,
            "dp" if elbo else f"dp_{cost_matrix.objective}",
            predicted_nats=total + cost_matrix.prior if elbo else None,
        )
        for K, (path, total) in optimal_paths(sub, budgets, at_most).items()
    }
