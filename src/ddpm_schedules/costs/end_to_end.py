"""End-to-end schedule optimisation (LD3-style, Tong et al. 2024): the K timesteps of a sampler as parameters,
Adam on the distance between the K-step sampler's output and the teacher's from the same x_T, through the sampler.
The distance is L2 in pixels or in a feature network's features (the FD network: the digits classifier's
penultimate layer, or the FID Inception's pool3 on RGB without the uint8 rounding; LPIPS needs torchvision).

Parameterisation: tau_K = T fixed; the K gaps in log-SNR lambda between T, tau_{K-1}, ..., tau_1 and t = 1 are
softmax(u) times lambda(1) - lambda(T), so every u is a strictly increasing schedule in [1, T]; t from lambda by
inverting `NoiseSchedule.alpha_bar_at`'s piecewise-linear log-SNR. Soft teacher forcing: each training x_T may move
by delta, ||delta|| <= ``radius`` sqrt(D), so the student is asked for a teacher sample it can reach. The start is a
schedule (the exact DP's, dp_ode / dp_dpmpp); the result is the iterate with the lowest held-out distance among
those no worse than the start on the training draws (the start among them), then rounded to integer timesteps.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor

from ddpm_schedules.models.conditioning import balanced_labels
from ddpm_schedules.models.diffusion import NoiseSchedule
from ddpm_schedules.models.model import DiffusionModel
from ddpm_schedules.models.noise import mix
from ddpm_schedules.sampling.continuous import CONTINUOUS_SAMPLERS
from ddpm_schedules.sampling.samplers import sample_ddim
from ddpm_schedules.schedules.schedule import Schedule
from ddpm_schedules.storage.errors import ParameterError
from ddpm_schedules.storage.progress import tqdm

DISTANCES = ("l2", "features")
Features = Callable[[Tensor], Tensor]  # x in [-1, 1] -> [n, F], differentiable (frechet.differentiable_features)


@dataclass(frozen=True)
class OptSettings:
    """Adam steps and rate, training and held-out x_T draws, the teacher-forcing radius, how often to check, the
    distance (``l2`` in pixels or ``features``), the draws per forward-backward pass (None: all at once) and the
    learning rate's decay (cosine to 0 at the last step, or constant)."""

    steps: int = 100
    lr: float = 0.03
    train_samples: int = 64
    heldout_samples: int = 64
    radius: float = 0.0
    check_every: int = 10
    seed: int = 0
    distance: str = "l2"
    batch_size: int | None = None
    lr_decay: str = "cosine"

    def __post_init__(self) -> None:
        for key in ("steps", "train_samples", "heldout_samples", "check_every", "batch_size"):
            value = getattr(self, key)
            if value is None and key == "batch_size":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ParameterError("{%s} = {value!r}; it must be an integer >= 1" % key, value=value)
        if self.lr_decay not in ("cosine", "constant"):
            raise ParameterError(
                "{lr_decay} = {value!r}; use cosine (to 0 at the last step) or constant", value=self.lr_decay
            )
        if self.distance not in DISTANCES:
            raise ParameterError(
                "{distance} = {value!r}; use l2 (pixels) or features (the FD network's)", value=self.distance
            )
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ParameterError("{lr} = {value!r}; Adam's learning rate must be > 0", value=self.lr)
        if not (isinstance(self.radius, (int, float)) and self.radius >= 0):
            raise ParameterError(
                "{radius} = {value!r}; the teacher-forcing radius must be >= 0 (0: none)", value=self.radius
            )


@dataclass
class OptResult:
    """The rounded schedule, its continuous timesteps, the start, and the distances along the way."""

    schedule: Schedule
    continuous: list[float]
    start: Schedule
    distances: dict[str, float]  # start / best (continuous) / rounded, on the held-out draws; train_start, train_best
    history: list[dict[str, float]] = field(default_factory=list)  # per check: step, train, heldout
    seconds: float = 0.0
    network_calls: int = 0
    candidates: dict[str, float] = field(default_factory=dict)  # start strategy -> its training-draw distance


def t_from_log_snr(noise: NoiseSchedule, lam: Tensor) -> Tensor:
    """The continuous t in [1, T] whose interpolated log-SNR is ``lam`` (differentiable; the inverse of
    `NoiseSchedule.alpha_bar_at`'s linear pieces)."""
    table = noise.log_snr[1:]  # t = 1..T, decreasing
    rising = -table
    i = torch.searchsorted(rising, -lam.detach()).clamp(1, noise.T - 1)  # the piece [i, i + 1] (0-based) holds lam
    lo, hi = table[i - 1], table[i]
    return i.double() + (lam - lo) / (hi - lo)  # t = (i - 1) + 1 + frac


def params_from_schedule(noise: NoiseSchedule, schedule: Schedule, floor: float = 1e-3) -> Tensor:
    """u whose softmax gives the schedule's log-SNR gaps (a gap of 0, tau_1 = 1, is raised to ``floor`` of the
    range)."""
    lam = noise.log_snr
    points = [lam[t] for t in reversed(schedule.timesteps)] + [lam[1]]  # lambda(T), ..., lambda(tau_1), lambda(1)
    gaps = torch.stack([b - a for a, b in zip(points, points[1:])]) / (lam[1] - lam[noise.T])
    return torch.log(gaps.clamp_min(floor))


def schedule_from_params(noise: NoiseSchedule, u: Tensor) -> Tensor:
    """Ascending continuous timesteps tau_1 < ... < tau_K = T from u [K]."""
    lam = noise.log_snr
    fractions = torch.cumsum(torch.softmax(u, 0), 0)[:-1]  # of the way from lambda(T) to lambda(1), K - 1 points
    inner = t_from_log_snr(noise, lam[noise.T] + fractions * (lam[1] - lam[noise.T]))
    return torch.cat([inner.flip(0), torch.tensor([float(noise.T)], dtype=torch.float64)])


def round_schedule(timesteps: Tensor, T: int, strategy: str) -> Schedule:
    """The nearest integer schedule that is strictly increasing and ends at T."""
    out: list[int] = []
    K = len(timesteps)
    for i, t in enumerate(timesteps.tolist()[:-1]):
        lowest = out[-1] + 1 if out else 1
        out.append(min(max(round(t), lowest), T - (K - 1 - i)))
    return Schedule(tuple(out) + (T,), T, strategy)


def distance(x: Tensor, teacher: Tensor) -> Tensor:
    """Mean over samples of the L2 distance in pixels (the teacher distance evaluate.py reports)."""
    return (x - teacher).flatten(1).norm(dim=1).mean()


def _embedding(settings: OptSettings, features: Features | None) -> Callable[[Tensor], Tensor]:
    if settings.distance == "l2":
        return lambda x: x.flatten(1)
    if features is None:
        raise ParameterError("{distance} = 'features' needs a feature network (the FD network); none was given")
    return lambda x: features(x).double()


def _chunks(n: int, size: int | None) -> list[slice]:
    size = size or n
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def _draws(model: DiffusionModel, seed: int, n: int) -> tuple[Tensor, Tensor | None]:
    gen = torch.Generator().manual_seed(seed)
    x_T = torch.randn(n, *model.image_shape, generator=gen, dtype=torch.float64).to(model.device)
    y = None if model.num_classes is None else balanced_labels(torch.arange(n), model.num_classes).to(model.device)
    return x_T, y


@torch.no_grad()
def teacher_samples(model: DiffusionModel, teacher: Schedule, x_T: Tensor, y: Tensor | None) -> Tensor:
    """The teacher's unquantized x0 from each x_T: DDIM (eta = 0) along ``teacher``."""
    trajectory: list[Tensor] = []
    sample_ddim(model, teacher, x_T, trajectory=trajectory, y=y)
    return trajectory[-1]


def check_sampler(sampler: str) -> None:
    if sampler not in CONTINUOUS_SAMPLERS:
        raise ParameterError(
            "opt_{name} needs a differentiable {sampler}; {name!r} has none: use one of {known}",
            name=sampler,
            known=", ".join(CONTINUOUS_SAMPLERS),
        )


def optimize_schedule(
    model: DiffusionModel,
    sampler: str,
    start: Schedule | Sequence[Schedule],
    teacher: Schedule,
    settings: OptSettings = OptSettings(),
    progress: bool = False,
    features: Features | None = None,
) -> OptResult:
    """``start`` (K steps) optimised end to end for ``sampler`` against ``teacher``'s samples (module docstring);
    several starts of one K: the one closest to the teacher on the training draws. ``features`` embeds samples for
    ``settings.distance = "features"``."""
    check_sampler(sampler)
    run = CONTINUOUS_SAMPLERS[sampler]
    embed = _embedding(settings, features)
    starts = [start] if isinstance(start, Schedule) else list(start)
    if not starts or len({s.K for s in starts}) != 1:
        raise ValueError(f"the starts must be one or more schedules of one K; got K = {[s.K for s in starts]}")
    began, noise, K = time.perf_counter(), model.schedule, starts[0].K
    x_train, y_train = _draws(model, mix(settings.seed, 1), settings.train_samples)
    x_held, y_held = _draws(model, mix(settings.seed, 2), settings.heldout_samples)
    parts_train = _chunks(len(x_train), settings.batch_size)
    parts_held = _chunks(len(x_held), settings.batch_size)

    @torch.no_grad()
    def targets(x: Tensor, y: Tensor | None, parts: list[slice]) -> Tensor:
        return torch.cat([embed(teacher_samples(model, teacher, x[p], _at(y, p))) for p in parts])

    @torch.no_grad()
    def mean_distance(ts: Tensor, x: Tensor, y: Tensor | None, target: Tensor, parts: list[slice]) -> float:
        norms = [(embed(run(model, ts, x[p], _at(y, p))) - target[p]).norm(dim=1) for p in parts]
        return float(torch.cat(norms).mean())

    target_train, target_held = targets(x_train, y_train, parts_train), targets(x_held, y_held, parts_held)
    calls = teacher.K * 2
    candidates = {}
    if len(starts) > 1:  # on the training draws only: the held-out ones stay for selection and the report
        for s in starts:
            ts = torch.tensor(s.timesteps, dtype=torch.float64)
            candidates[s.strategy] = mean_distance(ts, x_train, y_train, target_train, parts_train)
            calls += K
        start = starts[min(range(len(starts)), key=lambda i: candidates[starts[i].strategy])]
    else:
        start = starts[0]
    if K == 1:  # nothing to optimise: tau_1 = T
        d = mean_distance(torch.tensor([float(model.T)], dtype=torch.float64), x_held, y_held, target_held, parts_held)
        return OptResult(
            replace_strategy(start, sampler), [float(model.T)], start, {"start": d, "best": d, "rounded": d}
        )
    u = params_from_schedule(noise, start).requires_grad_(True)
    delta = torch.zeros_like(x_train, requires_grad=settings.radius > 0)
    optimizer = torch.optim.Adam([u, delta] if settings.radius > 0 else [u], lr=settings.lr)
    # a constant rate oscillates about the optimum (measured: digits, DDIM, K = 8); cosine decay settles into it
    decay = (
        torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, settings.steps) if settings.lr_decay == "cosine" else None
    )
    bound = settings.radius * math.sqrt(x_train[0].numel())

    def check(step: int) -> dict[str, float]:
        ts = schedule_from_params(noise, u.detach())
        return {
            "step": step,
            "train": mean_distance(ts, x_train, y_train, target_train, parts_train),
            "heldout": mean_distance(ts, x_held, y_held, target_held, parts_held),
        }

    history = [check(0)]
    best, best_u = history[0], u.detach().clone()
    calls += 2 * K
    for step in tqdm(range(1, settings.steps + 1), desc=f"opt_{sampler} K={K}", unit="step", disable=not progress):
        optimizer.zero_grad()
        for p in parts_train:  # the mean over all draws, its gradient summed over chunks (memory: one chunk's graph)
            x = run(model, schedule_from_params(noise, u), x_train[p] + delta[p], _at(y_train, p))
            ((embed(x) - target_train[p]).norm(dim=1).sum() / len(x_train)).backward()
        optimizer.step()
        if decay is not None:
            decay.step()
        calls += 2 * K  # forward and backward through K network calls
        if settings.radius > 0:
            with torch.no_grad():  # back into the ball around each teacher x_T
                norms = delta.flatten(1).norm(dim=1).clamp_min(1e-30)
                delta.mul_((bound / norms).clamp(max=1).reshape(-1, *[1] * (delta.ndim - 1)))
        if step % settings.check_every == 0 or step == settings.steps:
            history.append(check(step))
            calls += 2 * K
            now = history[-1]
            if now["train"] <= history[0]["train"] and now["heldout"] < best["heldout"]:
                best, best_u = now, u.detach().clone()
    continuous = schedule_from_params(noise, best_u).detach()
    rounded = round_schedule(continuous, model.T, f"opt_{sampler}")
    integer = torch.tensor(rounded.timesteps, dtype=torch.float64)
    d_round = mean_distance(integer, x_held, y_held, target_held, parts_held)
    calls += K
    return OptResult(
        rounded,
        continuous.tolist(),
        start,
        {
            "start": history[0]["heldout"],
            "best": best["heldout"],
            "rounded": d_round,
            "train_start": history[0]["train"],
            "train_best": best["train"],
        },
        history,
        time.perf_counter() - began,
        calls,
        candidates,
    )


def _at(y: Tensor | None, part: slice) -> Tensor | None:
    return None if y is None else y[part]


def replace_strategy(schedule: Schedule, sampler: str) -> Schedule:
    return Schedule(schedule.timesteps, schedule.T, f"opt_{sampler}")
