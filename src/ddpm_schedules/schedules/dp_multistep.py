"""The exact DP for a two-step solver (DPM-Solver++(2M)): the cost of a step depends on the step before it.

Grid indices 0 = i_0 < i_1 < ... < i_K = N; sampling goes from N down. A step c -> n taken after the
point p (p > c) costs C2[p, c, n]; the first step (from N, no earlier point) and the last (to 0) are the
solver's first-order steps and cost C1[n, c] (the pair matrix's convention: row = the later point in
sampling order). With the state (last point, point before it),

    V_1[N, n] = C1[n, N];    V_k[c, n] = min_{p > c} V_{k-1}[p, c] + (C2[p, c, n] if n > 0 else C1[0, c])

and the best K-step path ends in min_c V_K[c, 0]: O(K N^3) for every budget up to K at once. With C2[p, c, n]
independent of p this is the pair DP on C1 (and C2) exactly.
"""

from __future__ import annotations

import math
from typing import Iterable, Protocol

import numba
import numpy as np
import torch

from ddpm_schedules.schedules.dp import PairCosts, Paths, check_budgets_on_grid, check_costs
from ddpm_schedules.schedules.schedule import Schedule


class MultistepCosts(PairCosts, Protocol):
    """The ODE matrix (first-order steps) with DPM-Solver++(2M)'s two-step costs on the same grid."""

    two_step: torch.Tensor | None  # [N+1, N+1, N+1]


@numba.njit(cache=True, fastmath={"nnan", "nsz"})
def _tables(C1: np.ndarray, C2: np.ndarray, k_max: int) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover - compiled
    """V[k, c, n] and its back-pointers ptr[k, c, n] = the best p (ties: the smallest p)."""
    n_pts = C1.shape[0] - 1
    V = np.full((k_max + 1, n_pts + 1, n_pts + 1), np.inf)
    ptr = np.full((k_max + 1, n_pts + 1, n_pts + 1), -1, dtype=np.int32)
    for n in range(n_pts):
        V[1, n_pts, n] = C1[n, n_pts]
    for k in range(2, k_max + 1):
        for c in range(1, n_pts):  # c = N only starts a path; c = 0 ends one
            for n in range(c):
                best, arg = np.inf, -1
                for p in range(c + 1, n_pts + 1):
                    prev = V[k - 1, p, c]
                    if prev == np.inf:
                        continue
                    v = prev + (C2[p, c, n] if n > 0 else C1[0, c])
                    if v < best:
                        best, arg = v, p
                V[k, c, n] = best
                ptr[k, c, n] = arg
    return V, ptr


def _check(C1: torch.Tensor | np.ndarray, C2: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """C1 as the pair DP checks it (`dp.check_costs`), C2 of the matching [N+1]^3 shape; entries off p > c > n > 0
    set to inf."""
    a = check_costs(C1)
    n = a.shape[0]
    b = np.array(C2.detach().cpu().numpy() if torch.is_tensor(C2) else C2, dtype=np.float64)
    if b.shape != (n, n, n):
        raise ValueError(f"the two-step costs must be [N+1, N+1, N+1] = {(n, n, n)}, got shape {b.shape}")
    i = np.arange(n)
    valid = (i[:, None, None] > i[None, :, None]) & (i[None, :, None] > i[None, None, :]) & (i[None, None, :] > 0)
    if np.isnan(b[valid]).any():
        raise ValueError(
            "a two-step cost C2[p, c, n], p > c > n > 0, is NaN; every triple needs a cost (inf forbids it)"
        )
    b[~valid] = np.inf
    return a, b


def optimal_multistep_paths(
    C1: torch.Tensor | np.ndarray, C2: torch.Tensor | np.ndarray, budgets: int | Iterable[int]
) -> Paths:
    """{K: ([0 = i_0 < ... < i_K = N], total)} minimising the first-order costs of the first and last steps plus
    C2[p, c, n] for every step c -> n in between (p the point before c)."""
    a, b = _check(C1, C2)
    n = a.shape[0] - 1
    budgets = check_budgets_on_grid(budgets, n)
    V, ptr = _tables(a, b, max(budgets))
    out: Paths = {}
    for K in budgets:
        if K == 1:
            total, path = V[1, n, 0], [0, n]
        else:
            c = int(np.argmin(V[K, :, 0]))  # the first minimum: the smallest last point
            total, path, state = V[K, c, 0], [0, c], (c, 0)
            for k in range(K, 1, -1):  # back from (c, 0): each predecessor is the next point up
                p = int(ptr[k, state[0], state[1]])
                path.append(p)
                state = (p, state[0])
        if not math.isfinite(total):
            raise ValueError(f"no path of {K} steps has a finite cost; check for inf entries")
        out[K] = (path, float(total))
    return out


def optimal_multistep_schedules(
    costs: MultistepCosts, budgets: int | Iterable[int], name: str = "dp_dpmpp"
) -> dict[int, Schedule]:
    """The schedules whose DPM-Solver++(2M) steps stay closest to the teacher, for every budget (exact on the grid)."""
    if costs.two_step is None:
        raise ValueError(f"{name} needs DPM-Solver++(2M)'s step costs: estimate the ode matrix with multistep=True")
    g = costs.grid.tolist()
    return {
        K: Schedule(tuple(g[i] for i in path[1:]), costs.T, name)
        for K, (path, _) in optimal_multistep_paths(costs.mean, costs.two_step, budgets).items()
    }


def multistep_path_cost(costs: MultistepCosts, timesteps: Iterable[int]) -> float:
    """What `optimal_multistep_paths` minimises, for any schedule on the grid: first-order first and last steps, 2M
    between."""
    if costs.two_step is None:
        raise ValueError(
            "pricing a DPM-Solver++(2M) path needs the step costs: estimate the ode matrix with multistep=True"
        )
    down = costs.grid_indices(timesteps).tolist()[::-1]  # N first, 0 last
    total = float(costs.mean[down[1], down[0]]) + (float(costs.mean[0, down[-2]]) if len(down) > 2 else 0.0)
    return total + sum(float(costs.two_step[p, c, m]) for p, c, m in zip(down, down[1:], down[2:]) if m > 0)
