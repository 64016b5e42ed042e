"""The step schedules people pick for deterministic samplers, as diffusers' DPMSolverMultistepScheduler defines them.

Each is a sequence of K noise levels sigma = sqrt((1 - ab) / ab) from the model's largest (t = T) to its
smallest (t = 1), mapped back to the model's discrete timesteps by diffusers' `_sigma_to_t`: linear
interpolation of log sigma over the 0-based index. diffusers rounds that index for Karras and log-SNR
(linear and scaled-linear betas) and truncates it for exponential and beta sigmas; so do we, then add 1
(our t is 1-based). Two deliberate differences, both for the rule that a `Schedule` is strictly
increasing and ends at T: where a small model maps two levels to one timestep, diffusers keeps the repeat
(the step is taken twice), while here each repeat moves up to the next free timestep, from t = 1 upwards
(as DDIM's quadratic rule does), keeping K network evaluations; and the largest level is always T, where
diffusers' float32 sigmas can truncate it to T - 1 (exponential and beta sigmas).
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
from scipy.special import betaincinv

from ddpm_schedules.models.diffusion import NoiseSchedule
from ddpm_schedules.schedules.schedule import Schedule

# Align Your Steps (Sabour et al. 2024): Stable Diffusion's published 10-step timesteps (diffusers' AysSchedules)
AYS_SD_TIMESTEPS = (999, 850, 736, 645, 545, 455, 343, 233, 124, 24)


def sigmas_of(ns: NoiseSchedule) -> np.ndarray:
    """[T] sigma of every t = 1..T (index t - 1, diffusers' alphas_cumprod order)."""
    ab = ns.ab[1:].numpy()
    return np.sqrt((1 - ab) / ab)


def sigma_to_index(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """diffusers' `_sigma_to_t`: the fractional 0-based index whose log sigma is ``log(sigma)``, linear between
    neighbours."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, None]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
    return (1 - w) * low + w * (low + 1)


def karras_sigmas(sigma_min: float, sigma_max: float, K: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022), eq. 5: uniform in sigma^(1/rho), from sigma_max down to sigma_min."""
    ramp = np.linspace(0, 1, K)
    return (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def geometric_sigmas(sigma_min: float, sigma_max: float, K: int) -> np.ndarray:
    """Uniform in log sigma, i.e. in log-SNR (DPM-Solver's 'logSNR' steps, diffusers' Lu lambdas and exponential
    sigmas)."""
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), K))


def beta_sigmas(sigma_min: float, sigma_max: float, K: int, alpha: float = 0.6, beta: float = 0.6) -> np.ndarray:
    """Lee et al. (2024), 'Beta sampling': sigma_min + (sigma_max - sigma_min) times the Beta(alpha, beta)
    quantiles of 1 - linspace(0, 1, K)."""
    return sigma_min + betaincinv(alpha, beta, 1 - np.linspace(0, 1, K)) * (sigma_max - sigma_min)


def strictly_increasing(t: list[int], T: int) -> list[int]:
    """Ascending timesteps (at most T of them) with each repeat moved up to the next free timestep, ending at T; where
    that would pass T, the top ones move down instead."""
    out: list[int] = []
    for v in t:
        out.append(max(v, out[-1] + 1 if out else 1))
    out[-1] = T
    for i in range(len(out) - 2, -1, -1):
        out[i] = min(out[i], out[i + 1] - 1)
    return out


def _from_sigmas(
    ns: NoiseSchedule, K: int, name: str, make: Callable[[float, float, int], np.ndarray], rounded: bool
) -> Schedule:
    T = ns.T
    if not 1 <= K <= T:
        raise ValueError(
            f"{name} at K = {K}: a model with T = {T} gives at most {T} distinct timesteps; lower the budget"
        )
    sig = sigmas_of(ns)
    index = sigma_to_index(make(float(sig[0]), float(sig[-1]), K), np.log(sig))
    index = np.round(index) if rounded else np.trunc(index)
    return Schedule(tuple(strictly_increasing(sorted(int(i) + 1 for i in index), T)), T, name)


def karras_schedule(ns: NoiseSchedule, K: int) -> Schedule:
    """diffusers' ``use_karras_sigmas`` (rho = 7)."""
    return _from_sigmas(ns, K, "karras", karras_sigmas, rounded=True)


def logsnr_schedule(ns: NoiseSchedule, K: int) -> Schedule:
    """diffusers' ``use_lu_lambdas``: uniform log-SNR, rounded to the nearest timestep."""
    return _from_sigmas(ns, K, "logsnr", geometric_sigmas, rounded=True)


def exponential_schedule(ns: NoiseSchedule, K: int) -> Schedule:
    """diffusers' ``use_exponential_sigmas``: the same levels as log-SNR, the index truncated as diffusers does."""
    return _from_sigmas(ns, K, "exponential", geometric_sigmas, rounded=False)


def beta_schedule(ns: NoiseSchedule, K: int) -> Schedule:
    """diffusers' ``use_beta_sigmas`` (alpha = beta = 0.6)."""
    return _from_sigmas(ns, K, "beta", beta_sigmas, rounded=False)


def ays_schedule(ns: NoiseSchedule, K: int) -> Schedule:
    """Align Your Steps' Stable Diffusion timesteps, log-linearly interpolated in Stable Diffusion's sigma to K
    levels (the AYS paper's rule for other budgets), as fractions of its 1,000 steps on this model's T. Tuned for
    another model."""
    T = ns.T
    if not 1 <= K <= T:
        raise ValueError(f"ays at K = {K}: a model with T = {T} gives at most {T} distinct timesteps; lower the budget")
    sd = sigmas_of(stable_diffusion_schedule())
    log_published = np.log(sd[list(AYS_SD_TIMESTEPS)])
    levels = np.exp(np.interp(np.linspace(0, 1, K), np.linspace(0, 1, len(log_published)), log_published))
    index = sigma_to_index(levels, np.log(sd))  # on Stable Diffusion's 0..999
    t = np.round(index * (T - 1) / 999).astype(int) + 1
    return Schedule(tuple(strictly_increasing(sorted(t.tolist()), T)), T, "ays")


def stable_diffusion_schedule() -> NoiseSchedule:
    """Stable Diffusion's ``scaled_linear`` betas (0.00085 to 0.012 in sqrt, T = 1,000), which AYS was tuned on."""
    return NoiseSchedule(np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2)


SOLVER_BASELINES = {
    "karras": karras_schedule,
    "logsnr": logsnr_schedule,
    "exponential": exponential_schedule,
    "beta": beta_schedule,
    "ays": ays_schedule,
}
