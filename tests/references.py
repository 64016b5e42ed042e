"""Plain references the DPs are tested (and benchmarked) against: enumeration and the classic numpy loop.

`brute_force_paths` and `classic_paths` for `schedules.dp.optimal_paths`, `brute_force_multistep_paths` for
`schedules.dp_multistep.optimal_multistep_paths`; each keeps the tie rule of the DP it checks.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import numpy as np
import torch

from ddpm_schedules.schedules.dp import Paths, check_budgets_on_grid, check_costs


def brute_force_paths(costs: torch.Tensor | np.ndarray, budgets: int | Iterable[int], at_most: bool = False) -> Paths:
    """Every path enumerated, with the DP's tie rule (the smallest compared from the end)."""
    C = check_costs(costs)
    n = C.shape[0] - 1
    out: Paths = {}
    exact: Paths = {}
    for K in range(1, max(check_budgets_on_grid(budgets, n)) + 1):
        best: tuple[list[int], float] | None = None
        for inner in itertools.combinations(range(1, n), K - 1):
            path = [0, *inner, n]
            total = 0.0
            for a, b in itertools.pairwise(path):
                total += C[a, b]
            if best is None or total < best[1] or (total == best[1] and path[::-1] < best[0][::-1]):
                best = (path, total)
        exact[K] = best
    for K in check_budgets_on_grid(budgets, n):
        if not at_most:
            out[K] = exact[K]
            continue
        # 'at most K': fewest steps wins a tie, as the DP's strict improvement does
        out[K] = min((exact[k] for k in range(1, K + 1)), key=lambda pt: pt[1])
    return out


def classic_paths(costs: torch.Tensor | np.ndarray, k_max: int) -> Paths:
    """The plain numpy loop (for k: M = E[:, None] + C; E = M.min(0)), every K <= k_max."""
    C = check_costs(costs)
    n = C.shape[0] - 1
    E = np.full(n + 1, np.inf)
    E[0] = 0.0
    ptrs, out = [], {}
    for k in range(1, k_max + 1):
        M = E[:, None] + C
        ptr = M.argmin(0)  # the first minimum: the same tie rule
        E = M[ptr, np.arange(n + 1)]
        ptrs.append(ptr)
        path = [n]
        for p in reversed(ptrs):
            path.append(int(p[path[-1]]))
        out[k] = (path[::-1], float(E[n]))
    return out


def brute_force_multistep_paths(
    C1: torch.Tensor | np.ndarray, C2: torch.Tensor | np.ndarray, budgets: int | Iterable[int]
) -> Paths:
    """Every path's cost summed step by step (the smallest total; ties to the first enumerated): the first-order
    costs C1 of the first and last steps, C2[p, c, n] for every step c -> n in between (p the point before c)."""
    a = check_costs(C1)
    n = a.shape[0] - 1
    b = np.asarray(C2.detach().cpu().numpy() if torch.is_tensor(C2) else C2, dtype=np.float64)
    assert b.shape == (n + 1,) * 3, b.shape
    out: Paths = {}
    for K in check_budgets_on_grid(budgets, n):
        best: tuple[list[int], float] | None = None
        for inner in itertools.combinations(range(1, n), K - 1):
            path = [0, *inner, n]
            down = path[::-1]  # sampling order: N first
            total = a[down[1], down[0]] + (a[0, down[-2]] if K > 1 else 0.0)
            for p, c, m in zip(down, down[1:], down[2:]):
                if m > 0:
                    total += b[p, c, m]
            if best is None or total < best[1]:
                best = (path, total)
        out[K] = best
    return out
