"""Samplers: a model and a schedule in, samples out (one function per sampler, as k-diffusion's).

Every sampler walks x_T ~ N(0, I) -> x_{tau_{K-1}} -> ... -> x0_hat along the schedule's timesteps
(one network evaluation per timestep) and returns the final x0_hat quantized to the model's ``levels``:

- `sample_ancestral`: p(x_s | x_t) of every pair, the model's own reverse process;
- `sample_ddim`: DDIM (Song et al. 2021) with eta (0 = the deterministic probability-flow sampler);
- `sample_dpmpp`: DPM-Solver++(2M) (Lu et al. 2022), as diffusers' DPMSolverMultistepScheduler steps it (tests check);
- `diffusers_sample`: a diffusers UNet stepped by diffusers' own scheduler along an exported schedule.

``SAMPLERS`` maps the names ``eval.samplers`` takes to these functions.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from ddpm_schedules.models import diffusion as dm
from ddpm_schedules.models.model import DiffusionModel
from ddpm_schedules.models.pairs import pair_tables
from ddpm_schedules.schedules.schedule import Schedule

Draw = Callable[[], Tensor]  # the next standard normal tensor of the batch's shape (x_T first)


def quantize(x: Tensor, levels: int) -> Tensor:
    """Round values in [-1, 1] to the nearest of ``levels`` evenly spaced values."""
    idx = torch.round((x.clamp(-1, 1) + 1) / 2 * (levels - 1))
    return idx / (levels - 1) * 2 - 1


def as_schedule(model: DiffusionModel, schedule: Schedule | Sequence[int]) -> Schedule:
    """A Schedule ending at the model's T (a plain sequence of timesteps is accepted)."""
    if model.image_shape is None:
        raise ValueError("this DiffusionModel has no image_shape; pass image_shape=(C, H, W) to sample from it")
    schedule = schedule if isinstance(schedule, Schedule) else Schedule(tuple(schedule), model.T)
    if schedule.T != model.T:
        raise ValueError(f"the schedule ends at T = {schedule.T} but the model has T = {model.T}")
    return schedule


def ddim_step(model: DiffusionModel, x_t: Tensor, x0_hat: Tensor, t: int, s: int, eta: float = 0.0, noise: Tensor | None = None) -> Tensor:
    """DDIM's update from t to s (Song et al. 2021, eq. 12): sqrt(ab_s) x0_hat + sqrt(1 - ab_s - sigma^2) eps_hat + sigma z.

    eps_hat is recomputed from the (clipped) x0_hat, as improved-diffusion's ddim_sample; sigma^2 = eta^2 btil(s|t).
    """
    ab = model.schedule.ab
    ab_s, ab_t = float(ab[s]), float(ab[t])
    eps = (x_t - ab_t**0.5 * x0_hat) / (1 - ab_t) ** 0.5
    sigma2 = eta**2 * float(dm.btil(ab[s], ab[t])) if s > 0 else 0.0
    out = ab_s**0.5 * x0_hat + max(1 - ab_s - sigma2, 0.0) ** 0.5 * eps
    return out + sigma2**0.5 * noise if sigma2 > 0 and noise is not None else out


def _batched(model: DiffusionModel, schedule: Schedule | Sequence[int], n: int, run: Callable[[Schedule, Draw], Tensor],
             generator: torch.Generator | None = None, batch_size: int | None = None, noise: Iterable[Tensor] | None = None,
             x_T: Tensor | None = None) -> Tensor:
    """Run ``run(schedule, draw)`` over batches of n samples; ``noise`` (x_T first, then per-step draws) replaces the
    generator, ``x_T`` only its first draw (then one batch of n: samplers given the same x_T start from the same points)."""
    schedule = as_schedule(model, schedule)
    if x_T is not None:
        if tuple(x_T.shape) != (n, *model.image_shape):
            raise ValueError(f"x_T must have shape {(n, *model.image_shape)}, got {tuple(x_T.shape)}")
        gen_device = generator.device if generator is not None else torch.device("cpu")
        first = iter([x_T.to(model.device, torch.float64)])
        return run(schedule, lambda: _next_or_draw(first, n, model, generator, gen_device))
    if noise is not None:
        shape = (n, *model.image_shape)
        if isinstance(noise, Sequence) and (not noise or any(tuple(z.shape) != shape for z in noise)):
            raise ValueError(f"noise must be tensors of shape {shape}: x_T first, then one per noisy step")
        draws = iter(noise)

        def next_draw() -> Tensor:  # an iterator is checked as it is drawn from
            z = next(draws, None)
            if z is None or tuple(z.shape) != shape:
                raise ValueError(f"noise must give tensors of shape {shape}: x_T first, then one per noisy step")
            return z.to(model.device, torch.float64)

        return run(schedule, next_draw)
    gen_device = generator.device if generator is not None else torch.device("cpu")
    out = []
    for lo in range(0, n, batch_size or n):
        m = min(batch_size or n, n - lo)

        def draw(m: int = m) -> Tensor:
            return torch.randn(m, *model.image_shape, generator=generator, device=gen_device, dtype=torch.float64).to(model.device)

        out.append(run(schedule, draw))
    return torch.cat(out)


def _next_or_draw(first, n: int, model: DiffusionModel, generator: torch.Generator | None, device: torch.device) -> Tensor:
    x = next(first, None)
    return x if x is not None else torch.randn(n, *model.image_shape, generator=generator, device=device, dtype=torch.float64).to(model.device)


def _steps(schedule: Schedule) -> list[tuple[int, int]]:
    """The schedule's pairs (s, t) in sampling order: (tau_{K-1}, T) first, (0, tau_1) last."""
    return list(reversed(schedule.pairs()))


@torch.no_grad()
def sample_ancestral(
    model: DiffusionModel,
    schedule: Schedule | Sequence[int],
    n: int,
    generator: torch.Generator | None = None,
    batch_size: int | None = None,
    noise: Iterable[Tensor] | None = None,
    trajectory: list[Tensor] | None = None,
    x_T: Tensor | None = None,
) -> Tensor:
    """Ancestral sampling through p(x_s | x_t) of every schedule pair (docs/design.md §1): [n, C, H, W] on ``levels``.

    ``noise`` replaces the generator's draws: x_T first, then one tensor per noisy step (K - 1 of
    them, from t = T down); a sequence is checked up front, an iterator as it is drawn from. ``trajectory``, if given, receives x at every schedule point
    (x_T first, x_{tau_1} last) and then the final unquantized x0_hat.
    """
    if isinstance(noise, Sequence) and len(noise) != as_schedule(model, schedule).K:
        raise ValueError(f"noise must be {as_schedule(model, schedule).K} tensors: x_T and one per noisy step")

    def run(schedule: Schedule, draw: Draw) -> Tensor:
        x = draw()
        for s, t in _steps(schedule):
            if trajectory is not None:
                trajectory.append(x)
            pred = model.predict(x, t)
            if s == 0:
                if trajectory is not None:
                    trajectory.append(pred.x0_hat)
                return quantize(pred.x0_hat, model.levels).float()
            p = pair_tables(model, t, [s], model.device).kl
            mean = p["c0"] * pred.x0_hat + p["c1"] * x
            log_var = p["log_var"] if pred.frac is None else dm.learned_log_variance(pred.frac, p["min_log"], p["max_log"])
            x = mean + torch.exp(0.5 * log_var) * draw()
        raise AssertionError("unreachable: every schedule starts from s = 0")

    return _batched(model, schedule, n, run, generator=generator, batch_size=batch_size, noise=noise, x_T=x_T)


@torch.no_grad()
def sample_ddim(model: DiffusionModel, schedule: Schedule | Sequence[int], n: int, eta: float = 0.0, **draws: Any) -> Tensor:
    """DDIM along the schedule (`ddim_step` for every pair; the last step returns x0_hat): [n, C, H, W] on ``levels``.

    ``draws``: ``generator``, ``batch_size``, ``noise``, ``x_T`` as for `sample_ancestral`.
    """
    check_eta(eta)

    def run(schedule: Schedule, draw: Draw) -> Tensor:
        x = draw()
        for s, t in _steps(schedule):
            x0_hat = model.predict(x, t).x0_hat
            if s == 0:
                return quantize(x0_hat, model.levels).float()
            x = ddim_step(model, x, x0_hat, t, s, eta, draw() if eta > 0 else None)
        raise AssertionError("unreachable: every schedule starts from s = 0")

    return _batched(model, schedule, n, run, **draws)


def dpmpp_2m_coefficients(ab: Tensor, p: Tensor | int | None, c: Tensor | int, n: Tensor | int) -> tuple[Tensor, Tensor, Tensor]:
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
    return a, torch.where(last, phi, phi * (1 + half_over_r)), torch.where(last, torch.zeros_like(phi), -phi * half_over_r)


@torch.no_grad()
def sample_dpmpp(model: DiffusionModel, schedule: Schedule | Sequence[int], n: int, **draws: Any) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022) on the model's (clipped) x0_hat as its data prediction, at the schedule's
    timesteps: `dpmpp_2m_coefficients` for every step, first order for the first and the last (to t = 0, as
    diffusers' DPMSolverMultistepScheduler with final_sigmas_type="zero"): [n, C, H, W] on ``levels``.

    ``draws``: ``generator``, ``batch_size``, ``noise``, ``x_T`` as for `sample_ancestral`.
    """

    def run(schedule: Schedule, draw: Draw) -> Tensor:
        x, prev = draw(), None
        for s, t in _steps(schedule):
            x0_hat = model.predict(x, t).x0_hat
            a, b, d = (float(v) for v in dpmpp_2m_coefficients(model.schedule.ab, None if prev is None else prev[0], t, s))
            x = a * x + b * x0_hat + (d * prev[1] if prev is not None else 0.0)
            prev = (t, x0_hat)
        return quantize(x, model.levels).float()

    return _batched(model, schedule, n, run, **draws)


def check_eta(eta: float, key: str = "eta") -> None:
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not eta >= 0:
        raise ValueError(f"{key} = {eta!r}; DDIM's eta must be a number >= 0 (0 = deterministic, 1 = DDPM-like noise)")


SAMPLERS = {"ancestral": sample_ancestral, "ddim": sample_ddim, "dpmpp": sample_dpmpp}


def check_samplers(names: Sequence[str], key: str = "eval.samplers") -> list[str]:
    """Sampler names checked before any work."""
    names = list(names)
    if not names:
        raise ValueError(f"{key} is empty; use e.g. [ancestral, ddim]")
    for name in names:
        if name not in SAMPLERS:
            raise ValueError(f"unknown sampler {name!r} in {key}; use {', '.join(SAMPLERS)}")
    return names


@torch.no_grad()
def diffusers_sample(
    unet: nn.Module, scheduler, schedule: Schedule, x_T: Tensor, generator: torch.Generator | None = None
) -> tuple[Tensor, list[Tensor]]:
    """Sample with diffusers' own scheduler along an exported schedule: returns (x0_hat, the x at every point).

    The recipe: ``scheduler.set_timesteps(timesteps=schedule.to_diffusers_timesteps())``, then one
    ``scheduler.step`` per timestep. diffusers' last step (to t = 0) adds noise when tau_1 > 1, and
    with ``fixed_large`` that noise has variance 1 - alpha_bar; its ``pred_original_sample`` there is
    the x0_hat our sampler returns.
    """
    scheduler.set_timesteps(timesteps=schedule.to_diffusers_timesteps())
    x, points, out = x_T, [], None
    for t in scheduler.timesteps:
        points.append(x)
        out = scheduler.step(unet(x, t).sample, t, x, generator=generator)
        x = out.prev_sample
    return out.pred_original_sample, points
