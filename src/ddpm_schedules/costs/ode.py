"""The ODE objective (GITS: Chen et al. 2024, "On the Trajectory Regularity of ODE-based Diffusion Sampling").

A teacher runs DDIM (eta = 0) from x_T ~ N(0, I) through every grid point. At each teacher point x_t
the one forward pass there gives the one-step DDIM jump to every s < t, and

    C[s, t] = E || jump_{t->s}(x_t^teacher) - x_s^teacher ||   (L2 over dimensions, mean over trajectories),

with x_0^teacher the teacher's final (unquantized) x0_hat. The DP on C picks the K-step schedule whose
jumps stay closest to the teacher: N forward passes per trajectory on an N-point grid, as the ELBO
matrix costs per example. Trajectory i starts from the noise rule's draw for (seed, i, t = 0), a t
no ELBO term uses, so the matrix is the same estimate for any chunk size or process count (equal up to the
network's rounding of other batch sizes).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Sequence

import torch
from torch import Tensor

from ddpm_schedules.costs.grids import full_grid
from ddpm_schedules.costs.matrix import CostMatrix, CostMatrixMetric, MatrixSums, from_moments
from ddpm_schedules.costs.moments import empty_moments
from ddpm_schedules.costs.multistep import check_multistep_size, multistep_distance_sums, trajectory_gram
from ddpm_schedules.costs.options import EstimateOptions, estimate_options
from ddpm_schedules.models.conditioning import balanced_labels
from ddpm_schedules.models.model import DiffusionModel
from ddpm_schedules.models.noise import example_noise
from ddpm_schedules.sampling.steps import ddim_step
from ddpm_schedules.storage.files import model_fingerprint
from ddpm_schedules.storage.progress import tqdm
from ddpm_schedules.storage.resume import resumable


def trajectory_noise(seed: int, start: int, count: int, shape: Sequence[int]) -> Tensor:
    """x_T of the trajectories start..start+count-1: the noise rule at t = 0."""
    return example_noise(seed, start, count, 0, tuple(shape))


def trajectory_labels(model: DiffusionModel, start: int, count: int) -> Tensor | None:
    """The labels of trajectories start..start+count-1 (class-balanced by global index; None: unconditional)."""
    return balanced_labels(torch.arange(start, start + count), model.num_classes)


def teacher_trajectory(
    model: DiffusionModel, x_T: Tensor, grid: Tensor, y: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """DDIM (eta = 0) from x_T through every grid point: (x at grid[0..N], x0_hat at grid[1..N]), [N+1, B, ...] float64.

    x[N] is x_T and x[0] the teacher's final x0_hat; row 0 of the second tensor is unused.
    """
    N = grid.numel() - 1
    xs = torch.empty((N + 1, *x_T.shape), dtype=torch.float64, device=model.device)
    x0s = torch.empty_like(xs)
    xs[N] = x = x_T.to(model.device, torch.float64)
    for j in range(N, 0, -1):
        t, s = int(grid[j]), int(grid[j - 1])
        x0s[j] = x0_hat = model.predict(x, t, y).x0_hat
        xs[j - 1] = x = ddim_step(model, x, x0_hat, t, s)  # s = 0: x0_hat itself
    return xs, x0s


def jump_distances(
    model: DiffusionModel, xs: Tensor, x0s: Tensor, grid: Tensor, j: int, max_elements: int = 1 << 22
) -> Tensor:
    """[B, j]: || jump_{t->s}(x_t) - x_s || for t = grid[j] and every s = grid[i], i < j (one DDIM step each)."""
    ab = model.schedule.ab.to(xs.device)
    t = int(grid[j])
    x_t, x0_hat = xs[j].flatten(1), x0s[j].flatten(1)
    eps = (x_t - ab[t].sqrt() * x0_hat) / (1 - ab[t]).sqrt()
    out = torch.empty(x_t.shape[0], j, dtype=torch.float64, device=xs.device)
    chunk = max(1, max_elements // x_t.numel())
    for lo in range(0, j, chunk):
        ab_s = ab[grid[lo : min(j, lo + chunk)].to(xs.device)][:, None, None]
        jumps = ab_s.sqrt() * x0_hat + (1 - ab_s).sqrt() * eps
        out[:, lo : lo + chunk] = (jumps - xs[lo : min(j, lo + chunk)].flatten(2)).norm(dim=2).T
    return out


def chunk_size(batch_size: int, points: int, dims: int, memory_gb: float) -> int:
    """Trajectories per chunk: at most batch_size, and their stored points (2 x points x dims float64) within
    memory_gb."""
    return max(1, min(batch_size, int(memory_gb * 2**30) // (2 * points * dims * 8)))


class OdeMetric(CostMatrixMetric):
    """The ODE matrix's moments and, with ``multistep``, the summed DPM-Solver++(2M) step distances [N+1]^3."""

    def __init__(self, size: int, multistep: bool = False, **kwargs):
        super().__init__(size, **kwargs)
        self.has_multistep = multistep
        if multistep:
            self.add_state("multistep", torch.zeros(size, size, size, dtype=torch.float64), dist_reduce_fx="sum")

    def compute(self) -> MatrixSums:
        """`CostMatrixMetric.compute`'s sums with the multistep sums when kept."""
        return replace(super().compute(), multistep=self.multistep.clone() if self.has_multistep else None)


def estimate_ode_matrix(
    model: DiffusionModel,
    trajectories: int,
    grid: Sequence[int] | Tensor | None = None,
    *,
    memory_gb: float = 2.0,
    multistep: bool = False,
    options: EstimateOptions | None = None,
    **overrides: Any,
) -> CostMatrix:
    """The GITS cost matrix on ``[0] + grid`` from ``trajectories`` teacher trajectories (global indices from
    ``start_index``); with ``multistep`` it carries DPM-Solver++(2M)'s step costs C2[p, c, n] from the same
    trajectories as ``two_step`` (multistep.py: no extra network pass).

    Trajectories are processed in chunks of at most ``batch_size`` whose stored points fit ``memory_gb``; under
    torch.distributed each process passes its own range and the sums combine as for the ELBO matrix. ``options``
    (`EstimateOptions`, or its fields as keywords) resume as in `estimate_cost_matrix` (the unit is a chunk; a bare
    path saves after every chunk).
    """
    opts = estimate_options(options, **overrides)
    seed, start_index = opts.seed, opts.start_index
    if model.image_shape is None:
        raise ValueError(
            "this DiffusionModel has no image_shape; pass image_shape=(C, H, W) to run teacher trajectories"
        )
    if isinstance(trajectories, bool) or not isinstance(trajectories, int) or trajectories < 1:
        raise ValueError(f"trajectories = {trajectories!r}; it must be a positive integer")
    g = full_grid(grid, model.T)
    if multistep:
        check_multistep_size(g.numel() - 1, memory_gb)
    dims = math.prod(model.image_shape)
    chunk = chunk_size(opts.batch_size, g.numel(), dims, memory_gb)
    starts = list(range(0, trajectories, chunk))
    metric = OdeMetric(g.numel(), multistep).to(model.device)
    config = {
        "what": "ode",
        "model": model_fingerprint(model),
        "grid": g.tolist(),
        "seed": seed,
        "trajectories": trajectories,
        "start_index": start_index,
        "chunk": chunk,
        **({"multistep": True} if multistep else {}),
    }
    with (
        resumable(model, metric, opts.partial_file(every=1), config) as (saver, done, stop_requested),
        tqdm(
            total=trajectories,
            initial=min(trajectories, done * chunk),
            desc="ode matrix",
            unit="traj",
            disable=not opts.progress,
        ) as bar,
    ):
        for c, lo in enumerate(starts[done:], start=done):
            m = min(chunk, trajectories - lo)
            x_T = trajectory_noise(seed, start_index + lo, m, model.image_shape)
            xs, x0s = teacher_trajectory(model, x_T, g, trajectory_labels(model, start_index + lo, m))
            for j in range(1, g.numel()):
                metric.update(jump_distances(model, xs, x0s, g, j), j)
            if multistep:
                metric.multistep += multistep_distance_sums(
                    model.schedule.ab.to(model.device), g.to(model.device), trajectory_gram(xs, x0s)
                )
            bar.update(m)
            saver.step(metric, c + 1, stop_requested())
    sums = metric.compute().cpu()
    saver.remove()
    cm = from_moments(sums.moments[:, 0], empty_moments(), g, dims, "ode")
    return (
        replace(cm, two_step=sums.multistep / float(sums.count[1])) if multistep else cm
    )  # every process's trajectories
