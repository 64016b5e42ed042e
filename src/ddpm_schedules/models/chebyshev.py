"""Sums over dimensions of exp(-f_d delta) for many delta at once, by Chebyshev expansion in f.

What the learned-range KL (`diffusion.learned_range_kl`) needs for every s of a column without B x S x D
exponentials: per example, exp(-f delta) is interpolated at K Chebyshev nodes of its own range of f
(error below ``tol`` times its largest exponential); examples whose range is too wide are summed directly.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor


def chebyshev_order(a: float, tol: float = 1e-17) -> int:
    """Terms K that keep the Chebyshev truncation error of exp(-f delta) on a range of half-width h below ``tol``
    times its largest value, a = h max|delta|: the bound 2 I_K(a) <= 2 (a/2)^K e^(a^2 / 4(K+1)) / K!."""
    K = 1
    while K < 4096 and math.log(2) + K * math.log(max(a, 1e-300) / 2) + a * a / (4 * (K + 1)) - math.lgamma(
        K + 1
    ) > math.log(tol):
        K += 1
    return K


@functools.lru_cache(maxsize=None)
def _largest_a(max_order: int, tol: float) -> float:
    """The largest a = h max|delta| whose expansion needs at most ``max_order`` terms (bisection)."""
    lo, hi = 0.0, 1.0
    while chebyshev_order(hi, tol) <= max_order:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if chebyshev_order(mid, tol) <= max_order else (lo, mid)
    return lo


def chebyshev_exp_sums(
    frac: Tensor, weights: Tensor, delta: Tensor, tol: float = 1e-17, max_order: int = 64, max_elements: int = 1 << 24
) -> Tensor:
    """sum_d weights[w, b, d] exp(-frac[b, d] delta[s]) for every (w, b, s): [W, B, S].

    Per example b, on [lo_b, hi_b] = the range of its frac, exp(-f delta) = sum_k c_k(b, delta) T_k(z),
    z = (f - mid_b) / half_b, with c_k from K Chebyshev nodes; so the sum is (sum_d weights T_k(z_d)) @ c_k.
    Fitting each example on its own range keeps every example's value exact to ``tol`` times its own
    largest exponential, whatever the other examples' f. K follows `chebyshev_order` for the widest
    example; an example that would need more than ``max_order`` terms (a very wide range of f) is
    summed directly instead, in chunks of at most ``max_elements``, which also bounds the expansion's memory.
    """
    B, S = frac.shape[0], delta.numel()
    out = torch.empty(weights.shape[0], B, S, dtype=frac.dtype, device=frac.device)
    if S == 0 or B == 0:
        return out
    lo, hi, direct, K = chebyshev_plan(frac, float(delta.abs().max()), tol, max_order)
    if direct.any():
        out[:, direct] = direct_exp_sums(frac[direct], weights[:, direct], delta, max_elements)
    if not direct.all():
        keep = ~direct
        out[:, keep] = _chebyshev_exp_sums(frac[keep], weights[:, keep], delta, lo[keep], hi[keep], K)
    return out


def chebyshev_plan(
    frac: Tensor, delta_max: float, tol: float = 1e-17, max_order: int = 64
) -> tuple[Tensor, Tensor, Tensor, int]:
    """(lo [B], hi [B], direct [B] bool, K): each example's range of f, which examples need more than ``max_order``
    terms for |delta| <= ``delta_max`` (to be summed directly), and the terms K of the others."""
    lo, hi = frac.min(1).values.detach(), frac.max(1).values.detach()
    reach = (hi - lo) / 2 * delta_max  # a of every example
    direct = reach > _largest_a(max_order, tol)
    K = chebyshev_order(float(reach[~direct].max()), tol) if not direct.all() else 0
    return lo, hi, direct, K


def direct_exp_sums(frac: Tensor, weights: Tensor, delta: Tensor, max_elements: int = 1 << 24) -> Tensor:
    """[W, B, S]: sum_d weights exp(-frac delta_s) by exponentials, in chunks of at most ``max_elements``."""
    B, D = frac.shape
    out = torch.empty(weights.shape[0], B, delta.numel(), dtype=frac.dtype, device=frac.device)
    chunk = max(1, max_elements // max(1, B * D))
    for i in range(0, delta.numel(), chunk):
        e = torch.exp(-frac[:, None, :] * delta[i : i + chunk, None])  # [B, S', D]
        out[:, :, i : i + chunk] = torch.einsum("wbd,bsd->wbs", weights, e)
    return out


def _chebyshev_exp_sums(frac: Tensor, weights: Tensor, delta: Tensor, lo: Tensor, hi: Tensor, K: int) -> Tensor:
    return chebyshev_sums(chebyshev_moments(frac, weights, lo, hi, K), lo, hi, delta)


def chebyshev_moments(frac: Tensor, weights: Tensor, lo: Tensor, hi: Tensor, K: int) -> Tensor:
    """[W, B, K]: sum_d weights[w, b, d] T_k(z_bd), z = f mapped from [lo_b, hi_b] onto [-1, 1]: what
    `chebyshev_sums` needs of the [B, D] values to give sum_d weights exp(-f delta) for any delta later."""
    mid, half = ((hi + lo) / 2)[:, None], ((hi - lo) / 2)[:, None]
    z = torch.where(half > 0, (frac - mid) / torch.where(half > 0, half, torch.ones_like(half)), torch.zeros_like(frac))
    if z.requires_grad:  # differentiable (a training loss)
        rows = [torch.ones_like(z), z]
        for _ in range(2, K):
            rows.append(2 * z * rows[-1] - rows[-2])
        basis = torch.stack(rows[:K])
    else:  # in place: half the time of the above on a cost-matrix column
        basis = torch.empty(K, *z.shape, dtype=z.dtype, device=z.device)
        basis[0] = 1
        if K > 1:
            basis[1] = z
        for k in range(2, K):
            torch.mul(2 * z, basis[k - 1], out=basis[k]).sub_(basis[k - 2])
    return torch.einsum("wbd,kbd->wbk", weights, basis)


def chebyshev_sums(moments: Tensor, lo: Tensor, hi: Tensor, delta: Tensor) -> Tensor:
    """[W, B, S]: sum_d weights exp(-f delta_s) from `chebyshev_moments`, the K-node Chebyshev interpolant of
    exp(-f delta_s) on each example's own [lo_b, hi_b]."""
    K = moments.shape[-1]
    mid, half = ((hi + lo) / 2)[:, None], ((hi - lo) / 2)[:, None]
    j = torch.arange(K, dtype=moments.dtype, device=moments.device) + 0.5
    k = torch.arange(K, dtype=moments.dtype, device=moments.device)
    nodes = torch.cos(math.pi * j / K)
    dct = torch.cos(math.pi * k[None, :] * j[:, None] / K) * (2.0 / K)  # [node, k]
    dct[:, 0] /= 2
    points = mid + half * nodes[None, :]  # [B, node]: each example's own Chebyshev nodes
    coef = torch.exp(-delta[None, :, None] * points[:, None, :]) @ dct  # [B, S, K]
    return torch.einsum("wbk,bsk->wbs", moments, coef)
