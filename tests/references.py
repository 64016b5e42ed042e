"""Plain references the DPs are tested (and benchmarked) against: enumeration and the classic numpy loop.

`brute_force_paths` and `classic_paths` for `schedules.dp.optimal_paths`, `brute_force_multistep_paths` for
`schedules.dp_multistep.optimal_multistep_paths`; each keeps the tie rule of the DP it checks.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable

import numpy as np
import torch

from ddpm_schedules.models import diffusion as dm
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


def tanh_normal_cdf(x):
    """improved-diffusion's and guided-diffusion's approximation of the standard normal CDF (Page 1977)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def tanh_cdf_decoder_bits(model, x0, x_t, y=None):
    """[B] bits/dim of the decoder at t = 1 as improved-diffusion's and guided-diffusion's code computes it (their
    tanh CDF), from our x0_hat and decoder variance: a learned-range model's reference for their vb_bits at t = 1."""
    pred = model.predict(x_t, 1, y)
    ns = model.schedule
    log_var = dm.learned_log_variance(pred.frac, ns.decoder_log_variance_floor(), torch.log(1 - ns.ab[1]))
    inv_std, half_bin = torch.exp(-0.5 * log_var), 1.0 / 255
    cdf_plus = tanh_normal_cdf(inv_std * (x0 - pred.x0_hat + half_bin))
    cdf_min = tanh_normal_cdf(inv_std * (x0 - pred.x0_hat - half_bin))
    log_p = torch.where(
        x0 < -0.999,
        cdf_plus.clamp(min=1e-12).log(),
        torch.where(x0 > 0.999, (1 - cdf_min).clamp(min=1e-12).log(), (cdf_plus - cdf_min).clamp(min=1e-12).log()),
    )
    return -log_p.flatten(1).mean(1) / math.log(2)
