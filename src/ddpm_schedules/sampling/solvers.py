"""The multistep samplers the few-step literature uses at 4 to 10 steps, in float64 like the others (samplers.py's
signature and conventions):

- `sample_ipndm`: iPNDM (Zhang & Chen 2023, DEIS's improved PNDM; GITS's and DMN's sampler): Adams-Bashforth of
  order up to 4 on eps with the fixed coefficients, each step DDIM's update with the combined eps;
- `sample_unipc`: UniPC (Zhao et al. 2023) with the data prediction, B(h) = e^h - 1 ("bh2"), the UniC corrector
  after every step but the first (no extra network call) and order ``order`` (2: diffusers' default), warmed up from
  order 1 and lowered to 1 for the last step, as diffusers' UniPCMultistepScheduler steps it (tests check).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from ddpm_schedules.models.model import DiffusionModel
from ddpm_schedules.sampling.samplers import _finish, _predict, _start
from ddpm_schedules.schedules.schedule import Schedule
from ddpm_schedules.storage.errors import ParameterError

IPNDM = ((1.0,), (1.5, -0.5), (23 / 12, -16 / 12, 5 / 12), (55 / 24, -59 / 24, 37 / 24, -9 / 24))  # AB 1..4


def _points(schedule: Schedule) -> list[int]:
    """The timesteps where the network is called, T first, then 0 (where the last step lands)."""
    return list(reversed(schedule.timesteps)) + [0]


@torch.no_grad()
def sample_ipndm(
    model: DiffusionModel,
    schedule: Schedule | Sequence[int],
    x_T: Tensor | int,
    *,
    generator: torch.Generator | None = None,
    noise: Iterable[Tensor] | None = None,
    batch_size: int | None = None,
    trajectory: list[Tensor] | None = None,
    y: Tensor | None = None,
) -> Tensor:
    """iPNDM: eps' = sum_j c_j eps_{i-j} (Adams-Bashforth of order min(i + 1, 4), eps from the clipped x0_hat as
    `ddim_step`), then x_s = sqrt(ab_s) x0' + sqrt(1 - ab_s) eps' with x0' = (x_t - sqrt(1 - ab_t) eps') /
    sqrt(ab_t); the last step returns x0'. Deterministic. The arguments: samplers.py's docstring."""
    schedule, x, _, y = _start(model, schedule, x_T, generator, noise, batch_size, y)
    ab = model.schedule.ab
    points, history = _points(schedule), []
    for t, s in zip(points, points[1:]):
        if trajectory is not None:
            trajectory.append(x)
        ab_t, ab_s = float(ab[t]), float(ab[s])
        x0_hat = _predict(model, x, t, batch_size, y).x0_hat
        history.insert(0, (x - ab_t**0.5 * x0_hat) / (1 - ab_t) ** 0.5)
        del history[4:]
        eps = sum(c * e for c, e in zip(IPNDM[len(history) - 1], history))
        x0 = (x - (1 - ab_t) ** 0.5 * eps) / ab_t**0.5
        if s == 0:
            return _finish(model, x0, trajectory)
        x = ab_s**0.5 * x0 + (1 - ab_s) ** 0.5 * eps
    raise AssertionError("unreachable: every schedule ends at t = 0")


def unipc_rhos(h: Tensor, rks: Sequence[Tensor], order: int, corrector: bool) -> tuple[Tensor, Tensor, list[Tensor]]:
    """UniPC's h phi_1(h) = e^-h - 1, B(h) = e^-h - 1 (bh2, data prediction) and the weights rho of the differences
    D_k = (m_k - m_0) / r_k (Zhao et al. 2023, Alg. 2 / 3): the predictor of order p solves the first p - 1 rows of
    R rho = b (order 2: rho = 1/2), the corrector all p rows with r_p = 1 (order 1: rho = 1/2). Float64 0-d tensors
    in and out, differentiable in h and the r_k (the continuous sampler's gradients flow through them)."""
    hh = -h
    h_phi_1 = torch.expm1(hh)
    b_h = h_phi_1
    one = torch.ones_like(h)
    h_phi_k, factorial, rows, b = h_phi_1 / hh - 1, 1, [], []
    for i in range(1, order + 1):
        rows.append(torch.stack([rk ** (i - 1) for rk in (*rks, one)]))
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    R, b = torch.stack(rows), torch.stack(b)
    if corrector:
        rhos = [0.5 * one] if order == 1 else list(torch.linalg.solve(R, b).unbind())
    elif order == 1:
        rhos = []
    else:
        rhos = [0.5 * one] if order == 2 else list(torch.linalg.solve(R[:-1, :-1], b[:-1]).unbind())
    return h_phi_1, b_h, rhos


def unipc_update(
    x: Tensor, models: list[Tensor], lams: list[Tensor], lam_to: Tensor, ab_from: Tensor, ab_to: Tensor, order: int,
    model_to: Tensor | None = None,
) -> Tensor:  # fmt: skip
    """One UniP step (``model_to`` None) or UniC correction from the point of ``models[-1]`` / ``lams[-1]`` to
    lambda = ``lam_to``: x_to = sigma_to / sigma_0 x - alpha_to h phi_1 m_0 - alpha_to B(h) sum rho_k D_k
    (lambda = log(alpha / sigma); 0-d float64 tensors, so the continuous sampler differentiates it)."""
    h = lam_to - lams[-1]
    m0 = models[-1]
    rks = [(lams[-(k + 1)] - lams[-1]) / h for k in range(1, order)]
    diffs = [(models[-(k + 1)] - m0) / rk for k, rk in zip(range(1, order), rks)]
    h_phi_1, b_h, rhos = unipc_rhos(h, rks, order, corrector=model_to is not None)
    alpha_to, sigma_to, sigma_0 = ab_to.sqrt(), (1 - ab_to).sqrt(), (1 - ab_from).sqrt()
    out = (sigma_to / sigma_0) * x - alpha_to * h_phi_1 * m0
    res = sum(r * d for r, d in zip(rhos, diffs))
    if model_to is not None:
        res = res + rhos[-1] * (model_to - m0)
    return out - alpha_to * b_h * res if (diffs or model_to is not None) else out


def check_unipc_order(order: int) -> None:
    if isinstance(order, bool) or order not in (1, 2, 3):
        raise ParameterError(
            "{order} = {value!r}; UniPC's order must be 1, 2 or 3 (2: diffusers' default)", value=order
        )


@torch.no_grad()
def sample_unipc(
    model: DiffusionModel,
    schedule: Schedule | Sequence[int],
    x_T: Tensor | int,
    *,
    generator: torch.Generator | None = None,
    noise: Iterable[Tensor] | None = None,
    batch_size: int | None = None,
    trajectory: list[Tensor] | None = None,
    y: Tensor | None = None,
    order: int = 2,
) -> Tensor:
    """UniPC-bh2 on the model's (clipped) x0_hat: at point i the corrector (order of the step before) first
    refines x with the new x0_hat, then the predictor of order min(order, i + 1, K - i) steps on; the last step (to
    t = 0) returns the last x0_hat. Deterministic. The arguments: samplers.py's docstring."""
    check_unipc_order(order)
    schedule, x, _, y = _start(model, schedule, x_T, generator, noise, batch_size, y)
    ab = model.schedule.ab
    lam = 0.5 * model.schedule.log_snr  # log(alpha / sigma); +inf at t = 0
    points, K = _points(schedule), schedule.K
    models: list[Tensor] = []
    lams: list[Tensor] = []
    last_x, last_order = None, 0
    for i, (t, s) in enumerate(zip(points, points[1:])):
        if trajectory is not None:
            trajectory.append(x)
        m = _predict(model, x, t, batch_size, y).x0_hat
        if models:  # UniC: the step just taken, corrected with the new x0_hat (no extra network call)
            x = unipc_update(last_x, models, lams, lam[t], ab[points[i - 1]], ab[t], last_order, m)
        models, lams = (models + [m])[-order:], (lams + [lam[t]])[-order:]
        last_x, last_order = x, min(order, i + 1, K - i)
        x = unipc_update(x, models, lams, lam[s], ab[t], ab[s], last_order)
    return _finish(model, x, trajectory)
