"""The per-pair ELBO terms of Watson et al. (2021): one forward pass at t gives the terms of every s < t.

- s >= 1: KL(q(x_s | x_t, x_0) || p(x_s | x_t)), summed over dimensions (docs/design.md §1);
- s = 0: the decoder, -log p(x_0 | x_t), a discretized Gaussian over ``levels`` values;
- the prior KL(q(x_T | x_0) || N(0, I)), the same for every schedule.
All in nats per example, in float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from ddpm_schedules.models import diffusion as dm
from ddpm_schedules.models.chebyshev import chebyshev_moments, chebyshev_plan, chebyshev_sums, direct_exp_sums
from ddpm_schedules.models.model import DiffusionModel, Prediction
from ddpm_schedules.models.pairs import PairTables, check_pairs, pair_tables, reverse_log_variance


def pair_terms(
    model: DiffusionModel,
    x0: Tensor,
    x_t: Tensor,
    t: int,
    s: Tensor | Sequence[int],
    pred: Prediction,
    fast: bool = True,
    tables: PairTables | None = None,
) -> Tensor:
    """[B, S] nats of the pairs (s, t) from one prediction at t.

    ``fast`` uses the closed forms of diffusion.py (O(1) per pair for fixed variances); the
    elementwise path forms both Gaussians per dimension and is the reference for the fast one.
    """
    if tables is None:
        tables = pair_tables(model, t, s, x0.device)
    elif tables.t != int(t) or not torch.equal(tables.s, check_pairs(model, s, t)):
        raise ValueError(
            f"pair tables were made for t = {tables.t} and other s; call pair_tables(model, t, s) for this column"
        )
    x0 = x0.double().flatten(1)
    x0_hat = pred.x0_hat.flatten(1)
    frac = pred.frac.flatten(1) if pred.frac is not None else None
    out = torch.empty(x0.shape[0], tables.s.numel(), dtype=torch.float64, device=x0.device)
    if tables.decoder.any():
        out[:, tables.decoder] = decoder_nll(x0, x0_hat, frac, tables.decoder_log_var, model.levels)[:, None]
    if not tables.decoder.all():
        kl = _kl_fast if fast else _kl_elementwise
        out[:, ~tables.decoder] = kl(x0, x_t.double().flatten(1), x0_hat, frac, tables.kl)
    return out


@dataclass
class ColumnStats:
    """What the pairs (s, t) of one column need of a batch's prediction at t, for rows s chosen later
    (refinement adds rows to columns already passed): a few numbers per example instead of [B, D] values.

    Fixed variances need ||x_0 - x0_hat||^2 only (`fixed_variance_kl`); learned ones the Chebyshev moments
    of sum_d e^(-f_d Delta) and sum_d e_d^2 e^(-f_d Delta) on each example's range of f, with K set by the
    largest Delta of any s < t (`learned_range_kl`); an example whose range of f would need more than
    ``max_order`` terms keeps its [D] values instead.
    """

    t: int
    decoder: Tensor  # [B] nats of the pair (0, t)
    sq_err: Tensor  # [B] ||x_0 - x0_hat||^2
    dims: int
    frac_sum: Tensor | None = None  # [B] sum_d f_d (learned_range)
    moments: Tensor | None = None  # [2, B', K] of the examples not in ``direct``
    lo: Tensor | None = None  # [B'] each example's smallest f
    hi: Tensor | None = None
    direct: Tensor | None = None  # [B] bool: examples kept whole
    kept: tuple[Tensor, Tensor] | None = None  # (f, e^2), [B'', D] each, of the ``direct`` examples

    @property
    def nbytes(self) -> int:
        parts = [self.decoder, self.sq_err, self.frac_sum, self.moments, self.lo, self.hi, *(self.kept or ())]
        return sum(v.numel() * v.element_size() for v in parts if v is not None)


def column_stats(
    model: DiffusionModel, x0: Tensor, pred: Prediction, t: int, max_order: int = 64, tables: PairTables | None = None
) -> ColumnStats:
    """The `ColumnStats` of one batch's prediction at t (see `stats_terms`); ``tables``: `stats_tables` of t, reused."""
    tables = stats_tables(model, t, x0.device) if tables is None else tables
    x0 = x0.double().flatten(1)
    x0_hat = pred.x0_hat.flatten(1)
    frac = pred.frac.flatten(1) if pred.frac is not None else None
    err2 = (x0 - x0_hat) ** 2
    stats = ColumnStats(
        int(t), decoder_nll(x0, x0_hat, frac, tables.decoder_log_var, model.levels), err2.sum(1), x0.shape[1]
    )
    if frac is None:
        return stats
    delta = tables.kl["max_log"] - torch.log(tables.kl["btil"])
    lo, hi, direct, K = chebyshev_plan(frac, float(delta.abs().max()) if delta.numel() else 0.0, max_order=max_order)
    keep = ~direct
    stats.frac_sum, stats.direct, stats.lo, stats.hi = frac.sum(1), direct, lo[keep], hi[keep]
    stats.moments = chebyshev_moments(
        frac[keep], torch.stack([torch.ones_like(err2[keep]), err2[keep]]), lo[keep], hi[keep], max(K, 1)
    )
    if direct.any():
        stats.kept = (frac[direct].clone(), err2[direct].clone())
    return stats


def stats_tables(model: DiffusionModel, t: int, device: torch.device | str | None = None) -> PairTables:
    """The pair tables `column_stats` needs at t: the decoder's and, for learned variances,
    every s < t (the largest Delta)."""
    return pair_tables(model, t, torch.arange(t) if model.var_type == "learned_range" else [0], device)


def stats_terms(model: DiffusionModel, stats: ColumnStats, tables: PairTables) -> Tensor:
    """[B, S] nats of the pairs (s, t) of ``tables`` from a batch's `ColumnStats` at t:
    `pair_terms` without the prediction."""
    if tables.t != stats.t:
        raise ValueError(f"pair tables were made for t = {tables.t}, the statistics for t = {stats.t}")
    B = stats.decoder.shape[0]
    out = torch.empty(B, tables.s.numel(), dtype=torch.float64, device=stats.decoder.device)
    out[:, tables.decoder] = stats.decoder[:, None]
    if tables.decoder.all():
        return out
    p = tables.kl
    if stats.frac_sum is None:
        out[:, ~tables.decoder] = dm.fixed_variance_kl(
            stats.sq_err, p["c0"], p["btil"], torch.exp(p["log_var"]), stats.dims
        )
        return out
    log_btil = torch.log(p["btil"])
    delta = p["max_log"] - log_btil
    sums = torch.empty(2, B, delta.numel(), dtype=torch.float64, device=out.device)
    keep = ~stats.direct
    if keep.any():
        sums[:, keep] = chebyshev_sums(stats.moments, stats.lo, stats.hi, delta)
    if stats.kept is not None:
        f, e2 = stats.kept
        sums[:, stats.direct] = direct_exp_sums(f, torch.stack([torch.ones_like(e2), e2]), delta)
    w = p["c0"] ** 2 / p["btil"]
    out[:, ~tables.decoder] = 0.5 * (
        sums[0] - stats.dims + delta[None, :] * stats.frac_sum[:, None] + w[None, :] * sums[1]
    )
    return out


def terms(
    model: DiffusionModel,
    x0: Tensor,
    t: int,
    s: Tensor | Sequence[int],
    noise: Tensor | None = None,
    y: Tensor | None = None,
) -> Tensor:
    """[B, S] nats: KL(q(x_s|x_t,x_0) || p(x_s|x_t)) for s >= 1, -log p(x_0|x_t) for s = 0; one pass at t
    (with the examples' labels ``y`` for a class-conditional model)."""
    s = check_pairs(model, s, t)
    if noise is None:
        noise = torch.randn_like(x0)
    elif noise.shape != x0.shape:
        raise ValueError(f"noise has shape {tuple(noise.shape)} but x0 has {tuple(x0.shape)}; they must match")
    x_t = model.q_sample(x0, t, noise)
    return pair_terms(model, x0, x_t, t, s, model.predict(x_t, t, y))


def prior_nats(model: DiffusionModel, x0: Tensor) -> Tensor:
    """[B] nats: KL(q(x_T | x_0) || N(0, I)), the same for every schedule."""
    return dm.prior_kl(x0, model.schedule.ab[-1].to(x0.device))


def step_terms(model: DiffusionModel, x0: Tensor, x_t: Tensor, t: Tensor, pred: Prediction) -> Tensor:
    """[B] nats of the full chain's term at each example's own t: the pair (t - 1, t), differentiable.

    Elementwise per dimension (the training losses need gradients through the variance).
    """
    t = t.to(x0.device).long()
    s = t - 1
    shape = (-1,) + (1,) * (x0.ndim - 1)
    ns = model.schedule
    ab_s, ab_t = ns.ab[s.cpu()].to(x0.device).reshape(shape), ns.ab[t.cpu()].to(x0.device).reshape(shape)
    min_log, max_log = (v.to(x0.device).reshape(shape) for v in ns.log_variance_range(s.cpu(), t.cpu()))
    if pred.frac is None:
        log_var = reverse_log_variance(model, s.cpu(), t.cpu()).to(x0.device).reshape(shape).expand_as(x0)
    else:
        log_var = dm.learned_log_variance(pred.frac, min_log, max_log)
    x0, x_t = x0.double(), x_t.double()
    c0, c1 = dm.c0(ab_s, ab_t), dm.c1(ab_s, ab_t)
    kl = dm.normal_kl(c0 * x0 + c1 * x_t, min_log.expand_as(x0), c0 * pred.x0_hat + c1 * x_t, log_var)
    decoder = -dm.discretized_gaussian_log_likelihood(x0, pred.x0_hat, 0.5 * log_var, model.levels)
    return torch.where((s == 0).reshape(shape), decoder, kl).flatten(1).sum(1)


def full_chain_estimate(
    model: DiffusionModel,
    x0: Tensor,
    generator: torch.Generator,
    exact_below: int = 10,
    strata: int = 8,
    y: Tensor | None = None,
) -> Tensor:
    """[B] nats: an unbiased, low-variance estimate of each example's full-chain negative ELBO.

    The terms of t = 1..exact_below (where 8-bit data keeps most of its bits) are computed exactly; the
    remaining t are split into ``strata`` geometrically growing ranges (the terms fall roughly like 1/t, so
    equal ranges would leave most of the spread in the first one), each estimated by its width times the
    term at one uniform t in it (stratified sampling); plus the prior. At most exact_below + strata forward
    passes per example.
    """
    T, B = model.T, x0.shape[0]
    exact_below = min(exact_below, T)
    total = prior_nats(model, x0)
    for t in range(1, exact_below + 1):
        t_vec = torch.full((B,), t, dtype=torch.long, device=x0.device)
        total = total + _step_at(model, x0, t_vec, generator, y)
    edges = stratum_edges(exact_below, T, strata)
    for lo, hi in zip(edges, edges[1:]):
        if hi > lo:
            t_vec = torch.randint(lo + 1, hi + 1, (B,), generator=generator).to(x0.device)
            total = total + (hi - lo) * _step_at(model, x0, t_vec, generator, y)
    return total


def stratum_edges(start: int, T: int, strata: int) -> list[int]:
    """start = e_0 < e_1 < ... = T, at most ``strata`` ranges (e_i, e_i+1], spaced geometrically."""
    if T <= start:
        return []
    points = (
        torch.logspace(math.log10(max(start, 1)), math.log10(T), strata + 1, dtype=torch.float64)
        .round()
        .long()
        .tolist()
    )
    return sorted({start, T} | {p for p in points[1:-1] if start < p < T})


def _step_at(model: DiffusionModel, x0: Tensor, t: Tensor, generator: torch.Generator, y: Tensor | None) -> Tensor:
    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float64).to(x0.device)
    x_t = model.q_sample(x0, t, noise).to(x0.dtype)
    return step_terms(model, x0, x_t, t, model.predict(x_t, t, y))


def decoder_nll(
    x0: Tensor, x0_hat: Tensor, frac: Tensor | None, log_var_range: tuple[Tensor, Tensor], levels: int
) -> Tensor:
    """[B] nats of -log p(x_0 | x_t) summed over dimensions (inputs flattened to [B, D])."""
    lo, hi = log_var_range
    log_var = (lo if frac is None else dm.learned_log_variance(frac, lo, hi)).expand_as(x0)
    return -dm.discretized_gaussian_log_likelihood(x0, x0_hat, 0.5 * log_var, levels).sum(1)


def _kl_fast(x0: Tensor, x_t: Tensor, x0_hat: Tensor, frac: Tensor | None, p: dict[str, Tensor]) -> Tensor:
    if frac is None:
        sq_err = ((x0 - x0_hat) ** 2).sum(1)
        return dm.fixed_variance_kl(sq_err, p["c0"], p["btil"], torch.exp(p["log_var"]), x0.shape[1])
    return dm.learned_range_kl((x0 - x0_hat) ** 2, frac, p["c0"], torch.log(p["btil"]), p["max_log"])


def _kl_elementwise(
    x0: Tensor, x_t: Tensor, x0_hat: Tensor, frac: Tensor | None, p: dict[str, Tensor], max_elements: int = 1 << 22
) -> Tensor:
    B, D = x0.shape
    S = p["c0"].numel()
    out = torch.empty(B, S, dtype=torch.float64, device=x0.device)
    chunk = max(1, max_elements // (B * D))
    for lo in range(0, S, chunk):
        q = {k: v[lo : lo + chunk, None, None] for k, v in p.items()}  # [S', 1, 1]
        mean_q = q["c0"] * x0 + q["c1"] * x_t
        mean_p = q["c0"] * x0_hat + q["c1"] * x_t
        log_var_p = (
            q["log_var"].expand_as(mean_p)
            if frac is None
            else dm.learned_log_variance(frac, q["min_log"], q["max_log"])
        )
        kl = dm.normal_kl(mean_q, torch.log(q["btil"]).expand_as(mean_q), mean_p, log_var_p)
        out[:, lo : lo + chunk] = kl.sum(-1).T
    return out
