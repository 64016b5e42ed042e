"""Samplers: a model and a schedule in, samples out (one function per sampler, as k-diffusion's).

Every sampler walks x_T ~ N(0, I) -> x_{tau_{K-1}} -> ... -> x0_hat along the schedule's timesteps
(one network evaluation per timestep) and returns the final x0_hat quantized to the model's ``levels``:

- `sample_ancestral`: p(x_s | x_t) of every pair, the model's own reverse process;
- `sample_ddim`: DDIM (Song et al. 2021) with eta (0 = the deterministic probability-flow sampler);
- `sample_dpmpp`: DPM-Solver++(2M) (Lu et al. 2022), as diffusers' DPMSolverMultistepScheduler steps it (tests check);
- `diffusers_sample`: a diffusers UNet stepped by diffusers' own scheduler along an exported schedule.

The three samplers share one signature (as k-diffusion's samplers do)::

    sample_<name>(model, schedule, x_T, *, generator=None, noise=None, batch_size=None, trajectory=None, y=None,
                  **options)

- ``schedule``: a `Schedule` ending at the model's T, or its timesteps (tau_1, ..., tau_K);
- ``x_T``: the start, a tensor [n, C, H, W], or a number of samples n (x_T then drawn from ``generator`` first);
  the same x_T gives every sampler the same start;
- ``noise``: the later draws (ancestral steps, DDIM with eta > 0), one standard normal [n, C, H, W] per noisy
  step (K - 1 of them, from t = T down), instead of ``generator``'s; a sequence is checked up front, an iterator
  as it is drawn from; samplers that draw nothing ignore it;
- ``batch_size``: samples per network call (None: all n in one); the draws do not depend on it, so the samples
  are the same for any batch size up to the network's rounding;
- ``trajectory``: a list that receives x at every schedule point (x_T first, x_{tau_1} last) and then the final
  unquantized x0_hat;
- ``y``: the samples' class labels [n] for a class-conditional model (guided by ``model.guidance``);
- ``options``: the sampler's own keywords (`sample_ddim`'s ``eta``); another keyword is a TypeError.

They return [n, C, H, W] float32 on the model's ``levels``. ``registry.SAMPLERS`` maps the names ``eval.samplers``
takes to these functions and to solvers.py's iPNDM and UniPC: one call form for all.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from ddpm_schedules.models import diffusion as dm
from ddpm_schedules.models.conditioning import check_labels
from ddpm_schedules.models.model import DiffusionModel, Prediction
from ddpm_schedules.models.pairs import pair_tables
from ddpm_schedules.sampling.steps import check_eta, ddim_step, dpmpp_2m_coefficients
from ddpm_schedules.schedules.schedule import Schedule
from ddpm_schedules.storage.errors import check_count

Draw = Callable[[], Tensor]  # the next step's standard normal tensor [n, C, H, W]


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


def _start(
    model: DiffusionModel,
    schedule: Schedule | Sequence[int],
    x_T: Tensor | int,
    generator: torch.Generator | None,
    noise: Iterable[Tensor] | None,
    batch_size: int | None,
    y: Tensor | None,
) -> tuple[Schedule, Tensor, Draw, Tensor | None]:
    """The checked schedule, x_T in float64 on the model's device (drawn from ``generator`` for an int n), the draw
    of each later step's noise (the next tensor of ``noise``, or else ``generator``'s next draw) and the labels."""
    schedule = as_schedule(model, schedule)
    check_count(batch_size, "batch_size", "all samples in one call")
    device = generator.device if generator is not None else torch.device("cpu")
    if not torch.is_tensor(x_T):
        try:
            n = operator.index(x_T) if not isinstance(x_T, bool) else None
        except TypeError:
            n = None
        if n is None:
            raise TypeError(f"x_T must be a tensor [n, C, H, W] or a number of samples n, got {type(x_T).__name__}")
        n = check_count(n, "n")
        x_T = torch.randn(n, *model.image_shape, generator=generator, device=device, dtype=torch.float64)
    elif x_T.ndim != 1 + len(model.image_shape) or tuple(x_T.shape[1:]) != tuple(model.image_shape) or not len(x_T):
        want = ", ".join(map(str, model.image_shape))
        raise ValueError(f"x_T must have shape [n, {want}] with n >= 1, got {tuple(x_T.shape)}")
    shape = tuple(x_T.shape)
    y = check_labels(y, shape[0], model.num_classes)
    y = None if y is None else y.to(model.device)
    if noise is None:

        def drawn() -> Tensor:
            return torch.randn(shape, generator=generator, device=device, dtype=torch.float64).to(model.device)

        return schedule, x_T.to(model.device, torch.float64), drawn, y
    rule = f"tensors of shape {shape}, one per noisy step after x_T"
    if isinstance(noise, Sequence) and (len(noise) != schedule.K - 1 or any(tuple(z.shape) != shape for z in noise)):
        got = ", ".join(str(tuple(z.shape)) for z in noise) or "none"
        raise ValueError(f"noise must be {schedule.K - 1} {rule} (x_T is passed as x_T), got {got}")
    draws = iter(noise)

    def draw() -> Tensor:  # an iterator is checked as it is drawn from
        z = next(draws, None)
        if z is None or tuple(z.shape) != shape:
            raise ValueError(f"noise must give {rule}")
        return z.to(model.device, torch.float64)

    return schedule, x_T.to(model.device, torch.float64), draw, y


def _predict(model: DiffusionModel, x: Tensor, t: int, batch_size: int | None, y: Tensor | None) -> Prediction:
    """`DiffusionModel.predict` (with labels ``y``) in network calls of at most ``batch_size`` samples."""
    if not batch_size or len(x) <= batch_size:
        return model.predict(x, t, y)
    ys = [None] * len(x.split(batch_size)) if y is None else y.split(batch_size)
    parts = [model.predict(chunk, t, yc) for chunk, yc in zip(x.split(batch_size), ys)]
    fields = zip(*((p.x0_hat, p.frac, p.eps) for p in parts))
    return Prediction(*(None if v[0] is None else torch.cat(v) for v in fields))


def _finish(model: DiffusionModel, x0_hat: Tensor, trajectory: list[Tensor] | None) -> Tensor:
    if trajectory is not None:
        trajectory.append(x0_hat)
    return quantize(x0_hat, model.levels).float()


def _steps(schedule: Schedule) -> list[tuple[int, int]]:
    """The schedule's pairs (s, t) in sampling order: (tau_{K-1}, T) first, (0, tau_1) last."""
    return list(reversed(schedule.pairs()))


@torch.no_grad()
def sample_ancestral(
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
    """Ancestral sampling through p(x_s | x_t) of every schedule pair (docs/design.md §1): [n, C, H, W] on ``levels``.

    One noise draw per step to s >= 1 (K - 1); the last step returns x0_hat. The arguments: the module's docstring.
    """
    schedule, x, draw, y = _start(model, schedule, x_T, generator, noise, batch_size, y)
    for s, t in _steps(schedule):
        if trajectory is not None:
            trajectory.append(x)
        pred = _predict(model, x, t, batch_size, y)
        if s == 0:
            return _finish(model, pred.x0_hat, trajectory)
        p = pair_tables(model, t, [s], model.device).kl
        mean = p["c0"] * pred.x0_hat + p["c1"] * x
        log_var = p["log_var"] if pred.frac is None else dm.learned_log_variance(pred.frac, p["min_log"], p["max_log"])
        x = mean + torch.exp(0.5 * log_var) * draw()
    raise AssertionError("unreachable: every schedule starts from s = 0")


@torch.no_grad()
def sample_ddim(
    model: DiffusionModel,
    schedule: Schedule | Sequence[int],
    x_T: Tensor | int,
    *,
    generator: torch.Generator | None = None,
    noise: Iterable[Tensor] | None = None,
    batch_size: int | None = None,
    trajectory: list[Tensor] | None = None,
    y: Tensor | None = None,
    eta: float = 0.0,
) -> Tensor:
    """DDIM along the schedule (`ddim_step` for every pair; the last step returns x0_hat): [n, C, H, W] on ``levels``.

    ``eta``: 0 (the default) is deterministic and draws nothing; eta > 0 draws once per step to s >= 1 (K - 1).
    The other arguments: the module's docstring.
    """
    check_eta(eta)
    schedule, x, draw, y = _start(model, schedule, x_T, generator, noise, batch_size, y)
    for s, t in _steps(schedule):
        if trajectory is not None:
            trajectory.append(x)
        x0_hat = _predict(model, x, t, batch_size, y).x0_hat
        if s == 0:
            return _finish(model, x0_hat, trajectory)
        x = ddim_step(model, x, x0_hat, t, s, eta, draw() if eta > 0 else None)
    raise AssertionError("unreachable: every schedule starts from s = 0")


@torch.no_grad()
def sample_dpmpp(
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
    """DPM-Solver++(2M) (Lu et al. 2022) on the model's (clipped) x0_hat as its data prediction, at the schedule's
    timesteps: `dpmpp_2m_coefficients` for every step, first order for the first and the last (to t = 0, as
    diffusers' DPMSolverMultistepScheduler with final_sigmas_type="zero"): [n, C, H, W] on ``levels``.

    Deterministic: it draws nothing after x_T. The arguments: the module's docstring.
    """
    schedule, x, _, y = _start(model, schedule, x_T, generator, noise, batch_size, y)
    prev = None
    for s, t in _steps(schedule):
        if trajectory is not None:
            trajectory.append(x)
        x0_hat = _predict(model, x, t, batch_size, y).x0_hat
        a, b, d = (float(v) for v in dpmpp_2m_coefficients(model.schedule.ab, None if prev is None else prev[0], t, s))
        x = a * x + b * x0_hat + (d * prev[1] if prev is not None else 0.0)
        prev = (t, x0_hat)
    return _finish(model, x, trajectory)


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
