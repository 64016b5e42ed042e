"""Samplers: a model and a schedule in, samples out (one function per sampler, as k-diffusion's).

Every sampler walks x_T ~ N(0, I) -> x_{tau_{K-1}} -> ... -> x0_hat along the schedule's timesteps
and returns the final x0_hat quantized to the model's ``levels``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence

import torch
from torch import Tensor

from . import diffusion as dm
from .schedules import Schedule
from .terms import pair_tables

if TYPE_CHECKING:
    from .model import DiffusionModel


def quantize(x: Tensor, levels: int) -> Tensor:
    """Round values in [-1, 1] to the nearest of ``levels`` evenly spaced values."""
    idx = torch.round((x.clamp(-1, 1) + 1) / 2 * (levels - 1))
    return idx / (levels - 1) * 2 - 1


def as_schedule(model: "DiffusionModel", schedule: Schedule | Sequence[int]) -> Schedule:
    """A Schedule ending at the model's T (a plain sequence of timesteps is accepted)."""
    if model.image_shape is None:
        raise ValueError("this DiffusionModel has no image_shape; pass image_shape=(C, H, W) to sample from it")
    schedule = schedule if isinstance(schedule, Schedule) else Schedule(tuple(schedule), model.T)
    if schedule.T != model.T:
        raise ValueError(f"the schedule ends at T = {schedule.T} but the model has T = {model.T}")
    return schedule


@torch.no_grad()
def sample_ancestral(
    model: "DiffusionModel",
    schedule: Schedule | Sequence[int],
    n: int,
    generator: torch.Generator | None = None,
    batch_size: int | None = None,
    noise: Sequence[Tensor] | None = None,
    trajectory: list[Tensor] | None = None,
) -> Tensor:
    """Ancestral sampling through p(x_s | x_t) of every schedule pair (docs/design.md §1): [n, C, H, W] on ``levels``.

    ``noise`` replaces the generator's draws: x_T first, then one tensor per noisy step (K - 1 of
    them, from t = T down). ``trajectory``, if given, receives x at every schedule point
    (x_T first, x_{tau_1} last) and then the final unquantized x0_hat.
    """
    schedule = as_schedule(model, schedule)
    if noise is not None:
        if len(noise) != schedule.K or any(tuple(z.shape) != (n, *model.image_shape) for z in noise):
            raise ValueError(f"noise must be {schedule.K} tensors of shape {(n, *model.image_shape)}: x_T and one per noisy step")
        draws = iter(noise)
        return _ancestral_batch(model, schedule, lambda: next(draws).to(model.device, torch.float64), trajectory)
    gen_device = generator.device if generator is not None else torch.device("cpu")
    batch_size = batch_size or n
    out = []
    for lo in range(0, n, batch_size):
        m = min(batch_size, n - lo)

        def randn(m: int = m) -> Tensor:
            return torch.randn(m, *model.image_shape, generator=generator, device=gen_device, dtype=torch.float64).to(model.device)

        out.append(_ancestral_batch(model, schedule, randn, trajectory))
    return torch.cat(out)


def _ancestral_batch(model: "DiffusionModel", schedule: Schedule, randn: Callable[[], Tensor], trajectory: list[Tensor] | None) -> Tensor:
    x = randn()
    points = (0,) + schedule.timesteps
    for s, t in zip(reversed(points[:-1]), reversed(points[1:])):
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
        x = mean + torch.exp(0.5 * log_var) * randn()
    raise AssertionError("unreachable: every schedule starts from s = 0")
