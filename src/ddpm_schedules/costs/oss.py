"""Schedules priced on the sampler's own states: Optimal Stepsize Distillation's DP (Pei, Hu, Gu 2025).

dp_ode prices every jump from the teacher's point (GITS). After its first step a sampler is no longer
there, and its errors compound. OSS keeps, for every step count k and grid point i, the best k-step
path from T to i and the sampler's own state there (one per trajectory), and prices the next step
from that state:

    V_k[i] = min_{j > i} E || step(x_j^(k-1); t_j -> t_i) - x_i^teacher ||,   x_i^(k) = step(x_j*^(k-1); t_j* -> t_i),

with the teacher of ode.py (DDIM through every grid point from the same x_T) and E the mean over
trajectories, so one schedule serves them all. The K-step schedule is the path of V_K[0]: its value is
the sampler's own final distance to the teacher's x_0. A step from (k-1, j) needs the network at the
sampler's state there: one pass per (k, j) and trajectory, about K N against dp_ode's N.

It is the paper's DP, not an exact optimum: keeping one state per (k, i) drops paths that are worse at
i but would continue better. ``propagate`` names the sampler whose steps are taken: ``ddim`` (eta = 0)
or ``dpmpp``, DPM-Solver++(2M), whose state also carries the previous step's x0_hat and t (first order
at the first and the last step, as `sample_dpmpp`).
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch import Tensor
from torchmetrics import Metric

from ddpm_schedules.costs.grids import full_grid
from ddpm_schedules.costs.ode import teacher_trajectory, trajectory_labels, trajectory_noise
from ddpm_schedules.costs.options import EstimateOptions, estimate_options
from ddpm_schedules.costs.oss_state import OssLevels, OssPaths, resume_levels
from ddpm_schedules.models.model import DiffusionModel, call_groups
from ddpm_schedules.sampling.steps import dpmpp_2m_coefficients
from ddpm_schedules.storage.errors import ParameterError
from ddpm_schedules.storage.files import model_fingerprint
from ddpm_schedules.storage.progress import tqdm
from ddpm_schedules.storage.resume import PartialSums, sigterm_requests

PROPAGATE = ("ddim", "dpmpp")  # deterministic samplers whose own states can be carried


def check_propagate(propagate: object) -> str:
    if propagate not in PROPAGATE:
        raise ParameterError(
            "{propagate} = {value!r}; dp_ode_oss carries a deterministic sampler's own states: use ddim or dpmpp",
            value=propagate,
        )
    return str(propagate)


def oss_memory_gb(points: int, trajectories: int, dims: int) -> float:
    """What `estimate_oss_paths` holds at once: the teacher's points and two levels of states (x, x0_hat, the previous
    x0_hat), [N+1, B, D] float64 each."""
    return 6 * points * trajectories * dims * 8 / 2**30


def check_oss_size(points: int, trajectories: int, dims: int, memory_gb: float) -> None:
    need = oss_memory_gb(points, trajectories, dims)
    if need > memory_gb:
        raise ParameterError(
            "dp_ode_oss holds every trajectory's states at every point of {grid}: {need:.1f} GB for "
            "{n} trajectories and {points} points, more than {memory_gb} = {limit}; use fewer "
            "{trajectories}, more processes ({procs}) or a coarser {grid}",
            need=need,
            n=trajectories,
            points=points,
            limit=memory_gb,
        )


class StepDistanceSums(Metric):
    """One level of the DP: per (i, j) the sum over trajectories of || step(state at j -> i) - teacher at i ||, and the
    trajectories."""

    full_state_update = False

    def __init__(self, size: int, **kwargs):
        super().__init__(**kwargs)
        self.add_state("sums", torch.zeros(size, size, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, distances: dict[int, tuple[Tensor, Tensor]], trajectories: int) -> None:
        """``distances[j]``: (the target grid indices, [B, targets] distances of the steps from the state at j)."""
        for j, (targets, d) in distances.items():
            self.sums[targets.to(self.sums.device), j] += d.sum(0)
        self.count += trajectories

    def compute(self) -> tuple[Tensor, Tensor]:
        return self.sums, self.count


def _steps(
    ab: Tensor, g: Tensor, x: Tensor, x0: Tensor, prev: tuple[Tensor, int] | None, j: int, targets: Tensor
) -> Tensor:
    """[len(targets), B, D]: the sampler's step from its state (x, x0_hat at g[j], the previous (x0_hat, grid index))
    to each target."""
    p = None if prev is None else g[prev[1]]
    a, b, d = (v.to(x.device)[:, None, None] for v in dpmpp_2m_coefficients(ab, p, g[j], g[targets]))
    out = a * x + b * x0
    return out + d * prev[0] if prev is not None else out


def _distances(
    ab: Tensor,
    g: Tensor,
    state: tuple[Tensor, tuple[Tensor, int] | None],
    x0: Tensor,
    j: int,
    targets: Tensor,
    teacher: Tensor,
    max_elements: int = 1 << 24,
) -> Tensor:
    """[B, len(targets)]: || step(state at j -> i) - teacher at i || for every target i, in chunks of targets."""
    x, prev = state
    out = torch.empty(x.shape[0], targets.numel(), dtype=torch.float64, device=x.device)
    chunk = max(1, max_elements // x.numel())
    for lo in range(0, targets.numel(), chunk):
        part = targets[lo : lo + chunk]
        out[:, lo : lo + chunk] = (_steps(ab, g, x, x0, prev, j, part) - teacher[part.to(teacher.device)]).norm(dim=2).T
    return out


def _useful(k: int, i: int, budgets: list[int]) -> bool:
    """Whether the state after k steps at grid index i can lie on a budget's path: the end (i = 0) of a k-step path, or
    a point from which K - k more steps reach 0 for some budget K > k."""
    return k in budgets if i == 0 else any(K > k and K - k <= i for K in budgets)


@torch.no_grad()
def estimate_oss_paths(
    model: DiffusionModel,
    trajectories: int,
    budgets: Iterable[int],
    grid: Iterable[int] | Tensor | None = None,
    *,
    propagate: str = "ddim",
    memory_gb: float = 2.0,
    options: EstimateOptions | None = None,
    **overrides: Any,
) -> OssPaths:
    """OSS's DP over ``propagate``'s own states on ``[0] + grid`` for every budget, from ``trajectories`` teacher
    trajectories (global indices from ``start_index``: the same x_T as `estimate_ode_matrix` with the same seed).
    Under torch.distributed each process passes its own trajectories; every level's sums are combined before it chooses.
    ``options``: `EstimateOptions` (or its fields as keywords); ``partial`` keeps the finished levels (the DP's tables
    and every trajectory's states; a bare path saves after each level): a rerun recomputes the teacher (N passes)
    and goes on from the last saved level."""
    opts = estimate_options(options, **overrides)
    seed, batch_size, start_index = opts.seed, opts.batch_size, opts.start_index
    check_propagate(propagate)
    if model.image_shape is None:
        raise ValueError(
            "this DiffusionModel has no image_shape; pass image_shape=(C, H, W) to run teacher trajectories"
        )
    g = full_grid(grid, model.T)
    N, dims = g.numel() - 1, math.prod(model.image_shape)
    budgets = sorted({int(K) for K in budgets})
    if not budgets or budgets[0] < 1 or budgets[-1] > N:
        raise ParameterError("dp_ode_oss {budgets} {value} must lie in 1..{N} (the size of {grid})", value=budgets, N=N)
    check_oss_size(N + 1, trajectories, dims, memory_gb)
    ab = model.schedule.ab
    partial = opts.partial_file(every=1)
    config = {
        "what": "oss",
        "model": model_fingerprint(model),
        "grid": g.tolist(),
        "seed": seed,
        "trajectories": trajectories,
        "start_index": start_index,
        "budgets": budgets,
        "propagate": propagate,
        "batch_size": batch_size,
    }
    saver = PartialSums(
        partial.path if partial else None, config, partial.every if partial else 1, partial.seconds if partial else 0
    )
    resumed = resume_levels(saver, model.device)
    x_T = trajectory_noise(seed, start_index, trajectories, model.image_shape)
    y = trajectory_labels(model, start_index, trajectories)
    xs, x0s = teacher_trajectory(model, x_T, g, y)
    teacher = xs.flatten(2)
    # level 0: x_T at N, whose x0_hat the teacher already computed
    dp = resumed if resumed is not None else OssLevels.start(N, budgets[-1], teacher[N], trajectories)
    known_x0 = {N: x0s[N].flatten(1)} if resumed is None else {}
    del xs, x0s
    sums = StepDistanceSums(N + 1).to(teacher.device)
    with sigterm_requests(enabled=partial is not None) as stop_requested:
        levels = tqdm(
            range(dp.done + 1, budgets[-1] + 1),
            initial=dp.done,
            total=budgets[-1],
            desc="oss levels",
            unit="level",
            disable=not opts.progress,
        )
        for k in levels:
            states = dp.states
            targets = {
                j: torch.tensor([i for i in range(j) if _useful(k, i, budgets)], dtype=torch.long)
                for j in sorted(states)
                if j > 0
            }
            targets = {j: t for j, t in targets.items() if t.numel()}
            x0 = dict(known_x0)
            todo = [j for j in targets if j not in x0]
            for group in call_groups(todo, trajectories, batch_size):
                preds = model.predict_many(
                    [states[j][0].view(-1, *model.image_shape) for j in group],
                    [int(g[j]) for j in group],
                    [y] * len(group),
                )
                x0.update({j: p.x0_hat.flatten(1) for j, p in zip(group, preds)})
            dp.passes += len(todo)
            priced = torch.zeros(N + 1, N + 1, dtype=torch.bool)
            for j, t in targets.items():
                priced[t, j] = True
            sums.reset()
            sums.update(
                {j: (t, _distances(ab, g, states[j], x0[j], j, t, teacher)) for j, t in targets.items()}, trajectories
            )
            total, dp.count = (v.cpu() for v in sums.compute())
            mean = torch.where(priced, total / dp.count, math.inf)
            dp.value[k], dp.back[k] = mean.min(dim=1)
            dp.back[k][~torch.isfinite(dp.value[k])] = -1
            new_states = {}
            for i in range(N):
                j = int(dp.back[k, i])
                if j >= 0 and i > 0:  # states at 0 end a path; they take no further step
                    x, prev = states[j]
                    carried = (x0[j], j) if propagate == "dpmpp" else None
                    new_states[i] = (_steps(ab, g, x, x0[j], prev, j, torch.tensor([i]))[0], carried)
            dp.states, dp.done, known_x0 = new_states, k, {}
            if k < budgets[-1]:  # after the last level only the paths remain to be read
                saver.tick(lambda: saver.save_state(dp.pack(), dp.done), k, stop_requested())
    saver.remove()
    paths, distance = {}, {}
    for K in budgets:
        path, i = [0], 0
        for k in range(K, 0, -1):
            i = int(dp.back[k, i])
            path.append(i)
        paths[K], distance[K] = tuple(path), float(dp.value[K, 0])
    return OssPaths(g, paths, distance, dp.passes, int(dp.count), propagate)
