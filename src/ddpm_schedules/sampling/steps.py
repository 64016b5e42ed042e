"""One step of each deterministic solver, in float64: DDIM's update and DPM-Solver++(2M)'s coefficients (the samplers
in samplers.py and the ODE objectives in costs/ use the same ones)."""

from __future__ import annotations

import torch
from torch import Tensor

from ddpm_schedules.models import diffusion as dm
from ddpm_schedules.models.model import DiffusionModel
from ddpm_schedules.storage.errors import ParameterError


def ddim_step(
    model: DiffusionModel, x_t: Tensor, x0_hat: Tensor, t: int, s: int, eta: float = 0.0, noise: Tensor | None = None
) -> Tensor:
    """DDIM's update from t to s (Song et al. 2021, eq. 12):
    sqrt(ab_s) x0_hat + sqrt(1 - ab_s - sigma^2) eps_hat + sigma z.

    eps_hat is recomputed from the (clipped) x0_hat, as improved-diffusion's ddim_sample; sigma^2 = eta^2 btil(s|t).
    """
    ab = model.schedule.ab
    ab_s, ab_t = float(ab[s]), float(ab[t])
    eps = (x_t - ab_t**0.5 * x0_hat) / (1 - ab_t) ** 0.5
    sigma2 = eta**2 * float(dm.btil(ab[s], ab[t])) if s > 0 else 0.0
    out = ab_s**0.5 * x0_hat + max(1 - ab_s - sigma2, 0.0) ** 0.5 * eps
    return out + sigma2**0.5 * noise if sigma2 > 0 and noise is not None else out


def dpmpp_2m_coefficients(
    ab: Tensor, p: Tensor | int | None, c: Tensor | int, n: Tensor | int
) -> tuple[Tensor, Tensor, Tensor]:
    """(a, b, d) of DPM-Solver++(2M)'s update x_n = a x_c + b x0_hat(c) + d x0_hat(p) (Lu et al. 2022, Alg. 2, in
    diffusers' midpoint form), float64: with lambda = log(alpha / sigma), h = lambda_n - lambda_c, r = (lambda_c -
    lambda_p) / h and phi = alpha_n (1 - e^-h): a = sigma_n / sigma_c, b = phi (1 + 1 / 2r), d = -phi / 2r. Without p
    (the first step) or to n = 0 (the last) it is the first-order update, DDIM's: b = phi, d = 0."""
    ab = ab.double()
    c, n = torch.as_tensor(c), torch.as_tensor(n)
    alpha, sigma = ab.sqrt(), (1 - ab).sqrt()
    lam = torch.log(alpha) - torch.log(sigma)  # +inf at t = 0
    h = lam[n] - lam[c]
    a = sigma[n] / sigma[c]
    phi = -alpha[n] * torch.expm1(-h)
    if p is None:
        return a, phi, torch.zeros_like(phi)
    half_over_r = 0.5 * h / (lam[c] - lam[torch.as_tensor(p)])
    last = n == 0
    return (
        a,
        torch.where(last, phi, phi * (1 + half_over_r)),
        torch.where(last, torch.zeros_like(phi), -phi * half_over_r),
    )


def check_eta(eta: float) -> None:
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not eta >= 0:
        raise ParameterError(
            "{eta} = {value!r}; DDIM's eta must be a number >= 0 (0 = deterministic, 1 = DDPM-like noise)", value=eta
        )
