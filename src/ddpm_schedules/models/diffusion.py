"""The forward process and the pair formulas of Watson et al. (2021): pure float64 tensor math.

Notation (docs/design.md §1): t = 0..T, ``ab[t]`` = alpha_bar_t with ``ab[0] = 1``. Every function of a
pair (s, t) with 0 <= s < t <= T takes ``ab_s`` and ``ab_t`` and broadcasts, so one call serves a
whole column of the cost matrix.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from ddpm_schedules.models.chebyshev import chebyshev_exp_sums

VarType = Literal["fixed_small", "fixed_large", "learned_range", "analytic"]
VAR_TYPES = ("fixed_small", "fixed_large", "learned_range", "analytic")
BETA_SCHEDULES = ("linear", "cosine")


def linear_betas(T: int) -> Tensor:
    """Ho et al.'s linear betas, stretched to T steps as improved-diffusion does."""
    scale = 1000 / T
    return torch.from_numpy(np.linspace(scale * 0.0001, scale * 0.02, T, dtype=np.float64))


def cosine_betas(T: int, max_beta: float = 0.999) -> Tensor:
    """Nichol & Dhariwal eq. 17: alpha_bar(u) = cos((u + 0.008) / 1.008 * pi / 2)^2, betas clipped."""

    def alpha_bar(u: float) -> float:
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta) for i in range(T)]
    return torch.tensor(betas, dtype=torch.float64)


class NoiseSchedule:
    """The forward process q(x_t | x_0) = N(sqrt(ab_t) x_0, (1 - ab_t) I), t = 1..T, in float64."""

    def __init__(self, betas: Tensor | np.ndarray | list[float]):
        betas = torch.as_tensor(betas, dtype=torch.float64).detach().cpu()
        if betas.ndim != 1 or betas.numel() < 2:
            raise ValueError(f"betas must be a 1-D sequence of at least 2 values, got shape {tuple(betas.shape)}")
        if not bool(((betas > 0) & (betas <= 1)).all()):
            bad = betas[~((betas > 0) & (betas <= 1))][0].item()
            raise ValueError(f"every beta must lie in (0, 1], got {bad}; check the beta schedule")
        self.betas = betas
        self.ab = torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(1 - betas, 0)])
        self.log_snr = torch.log(self.ab) - torch.log1p(-self.ab)  # lambda = log(ab / (1 - ab)); +inf at t = 0

    @classmethod
    def named(cls, name: str, T: int) -> "NoiseSchedule":
        """improved-diffusion's `get_named_beta_schedule` ("linear" or "cosine")."""
        if not isinstance(T, int) or T < 2:
            raise ValueError(f"diffusion_steps must be an integer >= 2, got {T!r}")
        if name == "linear":
            return cls(linear_betas(T))
        if name == "cosine":
            return cls(cosine_betas(T))
        raise ValueError(f"unknown noise_schedule {name!r}; use one of {BETA_SCHEDULES} or pass betas")

    @property
    def T(self) -> int:
        return self.betas.numel()

    def log_snr_at(self, t: Tensor) -> Tensor:
        """log(ab / (1 - ab)) at continuous t in [1, T] (float64, differentiable in t): linear between the integer
        steps; at an integer t the table's value exactly."""
        return self._log_snr_at(t)[0]

    def alpha_bar_at(self, t: Tensor) -> Tensor:
        """alpha_bar at continuous t in [1, T] (float64, differentiable in t): the log-SNR log(ab / (1 - ab)) linear
        between the integer steps, ab = sigmoid of it. At an integer t it is the table's value exactly (written as
        table + (sigmoid(lambda(t)) - sigmoid(lambda(floor t))), whose second term is then exactly 0)."""
        lam_t, lo, frac = self._log_snr_at(t)
        return self.ab[lo] + (torch.sigmoid(lam_t) - torch.sigmoid(self.log_snr[lo] + 0 * frac))

    def _log_snr_at(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        t = torch.as_tensor(t, dtype=torch.float64)
        if not bool(((t >= 1) & (t <= self.T)).all()):
            bad = t[~((t >= 1) & (t <= self.T))].reshape(-1)[0].item()
            raise ValueError(f"continuous t = {bad} is outside [1, T = {self.T}]; the last step to t = 0 is exact")
        lam = self.log_snr
        lo = t.detach().floor().long()  # t = T: lo = hi = T, frac = 0
        hi = (lo + 1).clamp(max=self.T)
        frac = t - lo
        return lam[lo] + frac * (lam[hi] - lam[lo]), lo, frac

    def __repr__(self) -> str:
        return f"NoiseSchedule(T={self.T}, ab_T={self.ab[-1].item():.3e})"

    def check_pairs(self, s: Tensor, t: int) -> None:
        """Raise a ValueError unless t is in 1..T and every s satisfies 0 <= s < t."""
        if not 1 <= int(t) <= self.T:
            raise ValueError(f"t = {int(t)} is outside 1..{self.T}; timesteps use the paper's 1-based convention")
        if s.numel() and (int(s.min()) < 0 or int(s.max()) >= int(t)):
            bad = s[(s < 0) | (s >= t)][0].item()
            raise ValueError(f"s = {bad} is not in 0..{int(t) - 1}; every pair needs 0 <= s < t = {int(t)}")

    def decoder_log_variance_floor(self) -> Tensor:
        """log btil(1|2): improved-diffusion's clipped `posterior_log_variance[0]`, the s = 0 lower end."""
        return torch.log(btil(self.ab[1], self.ab[2]))

    def log_variance_range(self, s: Tensor, t: int) -> tuple[Tensor, Tensor]:
        """(min_log, max_log) of the reverse variance for the pairs (s, t) (docs/design.md §1 table)."""
        ab_s, ab_t = self.ab[s], self.ab[t]
        max_log = torch.log(beta_ts(ab_s, ab_t))
        # btil(0|t) is 0: the decoder borrows btil(1|2) as improved-diffusion does
        min_log = torch.where(s == 0, self.decoder_log_variance_floor(), torch.log(btil(ab_s, ab_t)))
        return min_log, max_log

    def fixed_log_variance(self, var_type: VarType, s: Tensor, t: int) -> Tensor:
        """log sigma2(s, t) of the fixed variance types: btil (small) or the respaced beta (large)."""
        min_log, max_log = self.log_variance_range(s, t)
        if var_type == "fixed_small":
            return min_log
        if var_type == "fixed_large":
            return torch.where((s == 0) & (torch.as_tensor(t) == 1), min_log, max_log)
        raise ValueError(f"{var_type!r} is not a fixed variance type; use 'fixed_small' or 'fixed_large'")

    def analytic_log_variance(self, s: Tensor, t: int | Tensor, gamma_t: Tensor) -> Tensor:
        """log sigma*^2(s, t) of Analytic-DPM (Bao et al. 2022, Thm. 1 with their clipped Cov[x_0 | x_t]):
        btil(s|t) + c0(s,t)^2 clip((1 - ab_t) / ab_t (1 - Gamma_t), 0, 1), Gamma_t = E||eps_theta(x_t, t)||^2 / D;
        the decoder (s = 0) takes btil(1|2), as the fixed_small rule."""
        ab_s, ab_t = self.ab[s], self.ab[t]
        cov_x0 = ((1 - ab_t) / ab_t * (1 - gamma_t)).clamp(0, 1)
        sigma2 = btil(ab_s, ab_t) + c0(ab_s, ab_t) ** 2 * cov_x0
        return torch.where(s == 0, self.decoder_log_variance_floor(), torch.log(sigma2))

    def analytic_ot_costs(self, gamma: Tensor, dims: int) -> Tensor:
        """[T+1, T+1] nats: Analytic-DPM's optimal-trajectory cost of each pair s >= 1, from Gamma alone.

        With sigma*^2 unclipped, KL(s, t) = D/2 log(sigma*^2 / btil) and sigma*^2 = (ab_s / ab_t) beta(t|s)
        (1 - beta(t|s) Gamma_t / (1 - ab_t)); so the pair costs D/2 [log(ab_s/(1-ab_s)) - log(ab_t/(1-ab_t))
        + log(1 - beta(t|s) Gamma_t / (1 - ab_t))] (docs/design.md). inf where s = 0, s >= t or the log's
        argument is not positive (Gamma_t > 1 breaks the closed form).
        """
        T = self.T
        s, t = torch.arange(T + 1)[:, None], torch.arange(T + 1)[None, :]
        ab_s, ab_t = self.ab[:, None], self.ab[None, :]
        g = torch.nan_to_num(gamma.to(torch.float64), nan=math.inf)[None, :]
        arg = 1 - beta_ts(ab_s, ab_t) * g / (1 - ab_t)
        cost = dims / 2 * (torch.log(ab_s / (1 - ab_s)) - torch.log(ab_t / (1 - ab_t)) + torch.log(arg))
        ok = (s >= 1) & (s < t) & (arg > 0) & torch.isfinite(cost)
        return torch.where(ok, cost, torch.full_like(cost, math.inf))


def check_gamma(gamma: Tensor, T: int) -> Tensor:
    """Gamma [T+1] as float64 on the CPU (NaN = not estimated at that t); an error for a wrong length or a
    negative or infinite value."""
    gamma = torch.as_tensor(gamma, dtype=torch.float64).detach().cpu().reshape(-1)
    if gamma.numel() != T + 1:
        raise ValueError(
            f"Gamma has {gamma.numel()} entries; the model has T = {T}, so it needs T + 1 = {T + 1} (index 0 unused)"
        )
    known = gamma[1:][~torch.isnan(gamma[1:])]
    bad = known[~torch.isfinite(known) | (known < 0)]
    if bad.numel():
        raise ValueError(
            f"Gamma_t = {bad[0].item()} is negative or not finite; Gamma_t = E||eps_theta||^2 / D must be a finite "
            "value >= 0"
        )
    return gamma


def nats_to_bpd(nats, dims: int):
    """Nats per example -> bits per dimension: nats / (D ln 2)."""
    return nats / (dims * math.log(2))


def learned_log_variance(frac: Tensor, min_log: Tensor, max_log: Tensor) -> Tensor:
    """Nichol & Dhariwal eq. 15: log sigma2 = f max_log + (1 - f) min_log, f = (v + 1) / 2 per dimension."""
    return frac * max_log + (1 - frac) * min_log


def beta_ts(ab_s: Tensor, ab_t: Tensor) -> Tensor:
    """Respaced beta: beta(t|s) = 1 - ab_t / ab_s."""
    return 1 - ab_t / ab_s


def btil(ab_s: Tensor, ab_t: Tensor) -> Tensor:
    """Respaced posterior variance: btil(s|t) = beta(t|s) (1 - ab_s) / (1 - ab_t)."""
    return beta_ts(ab_s, ab_t) * (1 - ab_s) / (1 - ab_t)


def c0(ab_s: Tensor, ab_t: Tensor) -> Tensor:
    """Coefficient of x_0 in the mean of q(x_s | x_t, x_0)."""
    return ab_s.sqrt() * beta_ts(ab_s, ab_t) / (1 - ab_t)


def c1(ab_s: Tensor, ab_t: Tensor) -> Tensor:
    """Coefficient of x_t in the mean of q(x_s | x_t, x_0)."""
    return (ab_t / ab_s).sqrt() * (1 - ab_s) / (1 - ab_t)


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def fixed_variance_kl(sq_err: Tensor, c0_st: Tensor, btil_st: Tensor, sigma2: Tensor, dims: int) -> Tensor:
    """Summed KL for an isotropic sigma2: D/2 (r - 1 - log r) + c0^2 ||x_0 - x0_hat||^2 / (2 sigma2), r = btil/sigma2.

    ``sq_err`` is [B], the pair tensors are [S]; returns [B, S].
    """
    r = btil_st / sigma2
    return (dims / 2 * (r - 1 - torch.log(r)))[None, :] + sq_err[:, None] * (c0_st**2 / (2 * sigma2))[None, :]


def learned_range_kl(sq_err: Tensor, frac: Tensor, c0_st: Tensor, log_btil: Tensor, max_log: Tensor) -> Tensor:
    """Summed KL for sigma2 = exp(f max_log + (1 - f) log btil) per dimension, s >= 1: [B, S].

    With Delta = max_log - log btil and w = c0^2 / btil the sum is
    0.5 [sum_d (e^(-f_d Delta) - 1 + f_d Delta) + w sum_d e_d^2 e^(-f_d Delta)].
    The sums over d of e^(-f_d Delta_s) are done without B*S*D exponentials: e^(-f Delta_s) is
    expanded in Chebyshev polynomials of f over each example's range of f (`chebyshev_exp_sums`).
    ``sq_err`` = (x_0 - x0_hat)^2 and ``frac`` = f are [B, D]; the pair tensors are [S].
    """
    D = frac.shape[1]
    delta = max_log - log_btil
    sums = chebyshev_exp_sums(frac, torch.stack([torch.ones_like(sq_err), sq_err]), delta)  # [2, B, S]
    w = c0_st**2 / torch.exp(log_btil)
    return 0.5 * (sums[0] - D + delta[None, :] * frac.sum(1, keepdim=True) + w[None, :] * sums[1])


def _log_sub_exp(log_a: Tensor, log_b: Tensor) -> Tensor:
    """log(e^log_a - e^log_b) for log_a >= log_b, accurate when the two are close or tiny."""
    return log_a + torch.log(-torch.expm1(log_b - log_a))


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, log_scale: Tensor, levels: int) -> Tensor:
    """log P(x) under N(mean, e^(2 log_scale)) binned onto ``levels`` values in [-1, 1] (Ho et al. eq. 13).

    Bins have half-width 1/(levels - 1); the edge bins extend to -inf and +inf. Computed in float64
    with log-CDFs, taken on the side of the mean where they do not cancel, so the far tails keep
    their precision (improved-diffusion's float32 CDF difference does not).
    """
    if levels < 2:
        raise ValueError(f"levels must be >= 2, got {levels}")
    x, mean, log_scale = (v.to(torch.float64) for v in (x, mean, log_scale))
    half = 1.0 / (levels - 1)
    inv_std = torch.exp(-log_scale)
    upper = (x - mean + half) * inv_std
    lower = (x - mean - half) * inv_std
    # P = Phi(a) - Phi(b), taken below 0 where it does not cancel: interior bins left of the mean use
    # (upper, lower), right of it (-lower, -upper); an open edge bin has b = -inf
    left = lower + upper < 0
    bottom = x < -1 + half
    top = x > 1 - half
    a = torch.where(bottom | (left & ~top), upper, -lower)
    b = torch.where(bottom | top, torch.full_like(x, -math.inf), torch.where(left, lower, -upper))
    log_a, log_b = torch.special.log_ndtr(torch.stack([a, b]))
    return _log_sub_exp(log_a, log_b)


def prior_kl(x0: Tensor, ab_T: Tensor) -> Tensor:
    """KL(q(x_T | x_0) || N(0, I)) summed over the dimensions of each example: [B]."""
    x0 = x0.to(torch.float64).flatten(1)
    mean = ab_T.sqrt() * x0
    var = 1 - ab_T
    return (0.5 * (-1.0 - torch.log(var) + var + mean**2)).sum(1)
