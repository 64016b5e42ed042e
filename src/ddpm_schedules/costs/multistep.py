"""DPM-Solver++(2M)'s step costs from the teacher trajectories the ODE matrix already runs: no extra network pass.

The 2M step from c to n after p is linear in three stored vectors of a trajectory,
x_n_hat = a x_c + b x0_hat(c) + d x0_hat(p) (`sampling.samplers.dpmpp_2m_coefficients`), so

    || x_n_hat - x_n ||^2 = w^T G w,   w = (a, b, d, -1) on the rows (x_c, x0_hat(c), x0_hat(p), x_n),

with G the Gram matrix of the trajectory's 2N + 1 stored vectors (x at grid[0..N], x0_hat at grid[1..N]).
One G per trajectory costs O(N^2 D); every triple then costs O(1), and no [N, N, N, D] tensor is formed.
C2[p, c, n] is the mean over trajectories of the distance (the L2 norm, as the ODE matrix's C1).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ddpm_schedules.sampling.steps import dpmpp_2m_coefficients
from ddpm_schedules.storage.errors import ParameterError


def check_multistep_size(points: int, memory_gb: float) -> None:
    """The [N+1]^3 float64 step costs (and the DP's tables) of a grid of ``points`` must fit ``memory_gb``: refused
    before any pass, with a `ParameterError` naming ``grid`` and ``memory_gb``."""
    need = (points + 1) ** 3 * 8 / 2**30
    if need > memory_gb:
        raise ParameterError(
            "{grid} has {points} points: DPM-Solver++(2M)'s step costs need {need:.1f} GB, more than "
            "{memory_gb} = {limit}; use a coarser {grid} (5 at T = 1000: 200 points, 0.06 GB)",
            points=points,
            need=need,
            limit=memory_gb,
        )


def trajectory_gram(xs: Tensor, x0s: Tensor) -> Tensor:
    """[B, 2N+1, 2N+1] float64: inner products of x at grid[0..N] (rows 0..N) and x0_hat at grid[1..N]
    (rows N+1..2N)."""
    V = torch.cat([xs, x0s[1:]]).flatten(2).transpose(0, 1).double()  # [B, 2N+1, D]
    return V @ V.transpose(1, 2)


def step_sq_distances(ab: Tensor, grid: Tensor, G: Tensor, c: int) -> Tensor:
    """[B, P, M]: || step_2M(p, c -> n) - x_n ||^2 of each trajectory for p = c+1..N, n = 1..c-1, as w^T G w.

    Its rounding is about 1e-16 |w|^2 max(G): a distance far below sqrt of that (a step that lands exactly on the
    teacher) comes out as about 1e-7 |x| instead of 0.
    """
    N = grid.numel() - 1
    p = torch.arange(c + 1, N + 1, device=G.device)[:, None]  # [P, 1]
    n = torch.arange(1, c, device=G.device)[None, :]  # [1, M]
    a, b, d = (v.to(G.device) for v in dpmpp_2m_coefficients(ab, grid[p], grid[c], grid[n]))  # [1, M], [P, M], [P, M]
    # rows of G: x at grid index i is row i, x0_hat at grid index i is row N + i; slices broadcast over (p, n)
    xc, dc, dp, xn = c, N + c, slice(N + c + 1, 2 * N + 1), slice(1, c)
    diag = G.diagonal(dim1=1, dim2=2)
    cc, dd, xx = G[:, xc, xc, None, None], G[:, dc, dc, None, None], G[:, xc, dc, None, None]  # [B, 1, 1]
    pp, xp, dcp = diag[:, dp, None], G[:, xc, dp, None], G[:, dc, dp, None]  # [B, P, 1]
    nn, xn_c, dn = diag[:, None, xn], G[:, None, xc, xn], G[:, None, dc, xn]  # [B, 1, M]
    pn = G[:, dp, xn]  # [B, P, M]
    return (
        a**2 * cc
        + b**2 * dd
        + d**2 * pp
        + nn
        + 2 * a * b * xx
        + 2 * a * d * xp
        + 2 * b * d * dcp
        - 2 * a * xn_c
        - 2 * b * dn
        - 2 * d * pn
    )


def multistep_distance_sums(ab: Tensor, grid: Tensor, G: Tensor) -> Tensor:
    """[N+1, N+1, N+1]: the sum over trajectories of || step_2M(p, c -> n) - x_n || for p > c > n >= 1 (0 elsewhere)."""
    N = grid.numel() - 1
    out = torch.zeros(N + 1, N + 1, N + 1, dtype=torch.float64, device=G.device)
    for c in range(2, N):
        out[c + 1 :, c, 1:c] = step_sq_distances(ab, grid, G, c).clamp_min(0).sqrt().sum(0)  # rounding can dip below 0
    return out
