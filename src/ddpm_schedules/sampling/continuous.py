"""Differentiable samplers at continuous timesteps: DDIM (eta = 0), DPM-Solver++(2M), iPNDM and UniPC-bh2 as in
samplers.py and solvers.py, but with the timesteps a float64 tensor that gradients flow into (models/continuous.py's alpha_bar and
fractional network timesteps). At integer timesteps they give the discrete samplers' x0 before quantization."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ddpm_schedules.models.continuous import predict_continuous
from ddpm_schedules.models.model import DiffusionModel
from ddpm_schedules.sampling.solvers import IPNDM, unipc_update

ContinuousSampler = Callable[[DiffusionModel, Tensor, Tensor, "Tensor | None"], Tensor]


def _alpha_sigma(model: DiffusionModel, t: Tensor) -> tuple[Tensor, Tensor]:
    ab = model.schedule.alpha_bar_at(t)
    return ab.sqrt(), (1 - ab).sqrt()


def _points(timesteps: Tensor) -> list[Tensor]:
    """tau_K = T, ..., tau_1 as 0-d tensors (gradients kept), sampling order."""
    return list(timesteps.flip(0).unbind())


def ddim_continuous(model: DiffusionModel, timesteps: Tensor, x_T: Tensor, y: Tensor | None = None) -> Tensor:
    """DDIM (eta = 0) along ascending continuous ``timesteps`` (tau_1 .. tau_K = T): the final x0_hat, unquantized."""
    x, points = x_T.double(), _points(timesteps)
    for i, t in enumerate(points):
        x0 = predict_continuous(model, x, t, y).x0_hat
        if i == len(points) - 1:
            return x0
        alpha_t, sigma_t = _alpha_sigma(model, t)
        alpha_s, sigma_s = _alpha_sigma(model, points[i + 1])
        x = alpha_s * x0 + sigma_s * (x - alpha_t * x0) / sigma_t
    raise AssertionError("unreachable")


def dpmpp_continuous(model: DiffusionModel, timesteps: Tensor, x_T: Tensor, y: Tensor | None = None) -> Tensor:
    """DPM-Solver++(2M) along continuous ``timesteps`` (steps.dpmpp_2m_coefficients' update; first order first and
    last): the final x, which the last step makes the last x0_hat."""
    x, points, prev = x_T.double(), _points(timesteps), None
    for i, t in enumerate(points):
        x0 = predict_continuous(model, x, t, y).x0_hat
        if i == len(points) - 1:
            return x0  # the first-order step to t = 0 lands on x0_hat
        alpha_c, sigma_c = _alpha_sigma(model, t)
        alpha_n, sigma_n = _alpha_sigma(model, points[i + 1])
        lam_c, lam_n = torch.log(alpha_c / sigma_c), torch.log(alpha_n / sigma_n)
        h = lam_n - lam_c
        phi = -alpha_n * torch.expm1(-h)
        if prev is None:
            x = sigma_n / sigma_c * x + phi * x0
        else:
            half_over_r = 0.5 * h / (lam_c - prev[0])
            x = sigma_n / sigma_c * x + phi * (1 + half_over_r) * x0 - phi * half_over_r * prev[1]
        prev = (lam_c, x0)
    raise AssertionError("unreachable")


def ipndm_continuous(model: DiffusionModel, timesteps: Tensor, x_T: Tensor, y: Tensor | None = None) -> Tensor:
    """iPNDM (solvers.sample_ipndm) along continuous ``timesteps``: the final x0' clamped to [-1, 1] as the sampler's
    quantization clamps it (x0' comes from the combined eps, not the clipped x0_hat), unquantized."""
    x, points, history = x_T.double(), _points(timesteps), []
    for i, t in enumerate(points):
        alpha_t, sigma_t = _alpha_sigma(model, t)
        x0_hat = predict_continuous(model, x, t, y).x0_hat
        history = [(x - alpha_t * x0_hat) / sigma_t] + history[:3]
        eps = sum(c * e for c, e in zip(IPNDM[len(history) - 1], history))
        x0 = (x - sigma_t * eps) / alpha_t
        if i == len(points) - 1:
            return x0.clamp(-1, 1)  # what the user sees; unclamped, the loss chased pixels quantization removes
        alpha_s, sigma_s = _alpha_sigma(model, points[i + 1])
        x = alpha_s * x0 + sigma_s * eps
    raise AssertionError("unreachable")


def unipc_continuous(
    model: DiffusionModel, timesteps: Tensor, x_T: Tensor, y: Tensor | None = None, order: int = 2
) -> Tensor:
    """UniPC-bh2 (solvers.sample_unipc, its order and warm-up) along continuous ``timesteps``: the last x0_hat
    (the final order-1 step to t = 0 lands on it), unquantized."""
    x, points, K = x_T.double(), _points(timesteps), len(timesteps)
    noise = model.schedule
    abs_, lams = [noise.alpha_bar_at(t) for t in points], [0.5 * noise.log_snr_at(t) for t in points]
    models: list[Tensor] = []
    last_x, last_order = x, 0
    for i, t in enumerate(points):
        m = predict_continuous(model, x, t, y).x0_hat
        if i == K - 1:
            return m
        if models:  # UniC: the step just taken, corrected with the new x0_hat
            x = unipc_update(last_x, models, lams[max(0, i - order) : i], lams[i], abs_[i - 1], abs_[i], last_order, m)
        models = (models + [m])[-order:]
        last_x, last_order = x, min(order, i + 1, K - i)
        x = unipc_update(x, models, lams[max(0, i + 1 - order) : i + 1], lams[i + 1], abs_[i], abs_[i + 1], last_order)
    raise AssertionError("unreachable")


CONTINUOUS_SAMPLERS: dict[str, ContinuousSampler] = {
    "ddim": ddim_continuous,
    "dpmpp": dpmpp_continuous,
    "ipndm": ipndm_continuous,
    "unipc": unipc_continuous,
}
