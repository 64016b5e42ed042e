"""Analytic-DPM (Bao, Li, Zhu, Zhang, ICLR 2022) on top of the pair framework: Gamma files and the
closed-form "optimal trajectory" (objective ``analytic_ot``).

The analytic reverse variance itself is `NoiseSchedule.analytic_log_variance`; Gamma_t = E||eps||^2 / D
is estimated by the cost matrix from its own forward passes (`cost_matrix.analytic_moments`).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor

from ddpm_schedules.models.diffusion import NoiseSchedule, check_gamma
from ddpm_schedules.schedules.dp import optimal_paths
from ddpm_schedules.schedules.schedule import Schedule
from ddpm_schedules.storage.errors import ParameterError
from ddpm_schedules.storage.files import load_checked, save_checked, weights_fingerprint


def save_gamma(path: str | Path, gamma: Tensor, model) -> None:
    """Gamma_t at the timesteps where it is known, with the model's T and weights (checked on load)."""
    gamma = check_gamma(gamma, model.T)
    known = torch.nonzero(~torch.isnan(gamma[1:])).reshape(-1) + 1
    save_checked({"T": model.T, "weights": weights_fingerprint(model), "timesteps": known, "gamma": gamma[known]}, path)


def load_gamma(gamma_file: str | Path, model) -> Tensor:
    """Gamma [T+1] (NaN where the file has none) from `save_gamma`'s file, for this model only; the errors are
    `ParameterError`s naming ``gamma_file``."""
    path = str(gamma_file)
    try:
        blob = load_checked(gamma_file)
        T, weights, timesteps, values = blob["T"], blob["weights"], blob["timesteps"], blob["gamma"]
    except (ValueError, KeyError, TypeError):
        raise ParameterError(
            "{gamma_file} {path!r} is not a Gamma file written by evaluate.py (gamma.pt); estimate Gamma again",
            path=path,
        ) from None
    if T != model.T:
        raise ParameterError(
            "{gamma_file} {path!r} is for T = {T}; this model has T = {model_T}", path=path, T=T, model_T=model.T
        )
    if weights != weights_fingerprint(model):
        raise ParameterError(
            "{gamma_file} {path!r} was estimated for other weights; use this model's gamma.pt or drop {gamma_file}",
            path=path,
        )
    gamma = torch.full((model.T + 1,), math.nan, dtype=torch.float64)
    values = torch.as_tensor(values, dtype=torch.float64)
    if not torch.isfinite(values).all():
        raise ParameterError(
            "{gamma_file} {path!r} holds Gamma_t = {bad}; values must be finite",
            path=path,
            bad=values[~torch.isfinite(values)][0].item(),
        )
    gamma[torch.as_tensor(timesteps).long()] = values
    return check_gamma(gamma, model.T)


def bad_region_split(gamma: Tensor, K: int) -> tuple[int, int, int]:
    """Analytic-DPM's split for Gamma_t > 1 (where the closed form breaks): (K1, N1, K2).

    From the first t with Gamma_t > 1, the last 2 (T - t + 1) steps are "bad": K1 points go to the DP on
    1..N1, K2 = K - K1 evenly spaced points to (N1, T], with K1 = ceil((1 - 0.8 bad / T) K). Their rule
    assumes the bad points are the last ones; Gamma_t > 1 in the first half (small t, where a model may
    overshoot) is not a bad region here: `analytic_ot_gamma` caps it just below 1 instead.
    """
    T = gamma.numel() - 1
    over = torch.nonzero(gamma[T // 2 + 1 :] > 1).reshape(-1)
    bad = min(2 * (T - (int(over[0]) + T // 2 + 1) + 1), T) if over.numel() else 0
    n1 = T - bad
    k1 = math.ceil((1 - 0.8 * bad / T) * K)
    k1 = min(k1, n1)
    k2 = min(K - k1, bad)
    k1 = K - k2
    if bad and k2 == 0:
        k1, k2 = K - 1, 1
    return k1, n1, k2


def analytic_ot_gamma(gamma: Tensor, n1: int) -> Tensor:
    """Gamma for the closed-form cost on 1..n1: values above 1 there (first half only) capped just below 1."""
    out = gamma.clone()
    out[1 : n1 + 1] = out[1 : n1 + 1].clamp(max=1 - 1e-9)
    return out


def analytic_ot_schedule(schedule: NoiseSchedule, gamma: Tensor, K: int, dims: int) -> Schedule:
    """Analytic-DPM's optimal trajectory for K steps, from Gamma alone (their DP, ``dp_seg``).

    The path starts at t = 1 (the decoder pair (0, 1) is the same for every path) and minimises the sum of
    `NoiseSchedule.analytic_ot_costs` on 1..N1; the K2 points past N1 are evenly spaced (`bad_region_split`).
    """
    T = schedule.T
    gamma = check_gamma(gamma, T)
    if torch.isnan(gamma[1:]).any():
        raise ParameterError(
            "the analytic_ot strategy needs Gamma_t at every t = 1..T: use {grid}=null (or a full {gamma_file})"
        )
    if not 2 <= K <= T:
        raise ValueError(f"analytic_ot needs a budget K in 2..{T}, got {K}")
    k1, n1, k2 = bad_region_split(gamma, K)
    costs = schedule.analytic_ot_costs(analytic_ot_gamma(gamma, n1), dims)[: n1 + 1, : n1 + 1].clone()
    costs[0, :] = math.inf
    costs[0, 1] = 0.0  # every trajectory starts with the decoder pair (0, 1)
    path, _ = optimal_paths(costs, [k1])[k1]
    head = [int(i) for i in path[1:]]
    stride = (T - n1) / k2 if k2 else 0.0
    tail = [round(T - stride * k) for k in range(k2)][::-1]
    return Schedule(tuple(head + tail), T, strategy="analytic_ot")
