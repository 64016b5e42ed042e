"""Monte Carlo estimate of the cost matrix C[s, t] = E KL term (s, t), one forward pass per column.

Sums live in a torchmetrics Metric (float64 moments, merged across processes), so shards estimated by several
processes combine into the single-process matrix (equal up to float64 summation order and the network's rounding
of other batch sizes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch import Tensor
from torchmetrics import Metric
from tqdm.auto import tqdm

from ddpm_schedules.costs.grids import full_grid
from ddpm_schedules.costs.moments import batch_moments, empty_moments, mean_sem, merge_moments
from ddpm_schedules.costs.options import EstimateOptions, estimate_options
from ddpm_schedules.costs.terms import pair_tables, pair_terms, prior_nats
from ddpm_schedules.models.diffusion import btil, c0, fixed_variance_kl, nats_to_bpd
from ddpm_schedules.models.model import DiffusionModel, Prediction, call_groups
from ddpm_schedules.models.noise import example_noise, indexed_batches
from ddpm_schedules.schedules.schedule import Schedule
from ddpm_schedules.storage.files import data_fingerprint, load_checked, model_fingerprint, save_checked
from ddpm_schedules.storage.resume import resumable

OBJECTIVES = ("elbo", "mse", "ode")  # the pair costs a DP can run on (ode: see ode.py)


class CostMatrixMetric(Metric):
    """Per-pair moments (count, mean, M2) of the costs of one or more objectives, per-column counts, the prior's moments."""

    full_state_update = False
    is_differentiable = False
    higher_is_better = False

    def __init__(self, size: int, objectives: int = 1, **kwargs):
        super().__init__(**kwargs)
        self.size = size
        self.add_state("moments", empty_moments(objectives, size, size), dist_reduce_fx=merge_moments)
        self.add_state("count", torch.zeros(size, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("prior_moments", empty_moments(), dist_reduce_fx=merge_moments)
        # analytic variance: per column, moments of ||x_0 - x0_hat||^2 and of ||eps||^2 / D (Gamma_t), see `analytic_moments`
        self.add_state("column_moments", empty_moments(2, size), dist_reduce_fx=merge_moments)

    def update(self, terms: Tensor, column: int, prior: Tensor | None = None) -> None:
        """Add ``terms`` [B, column] or [O, B, column] (the pairs (grid[i], grid[column]), i < column) of B examples."""
        terms = terms.to(torch.float64)
        terms = terms[None] if terms.ndim == 2 else terms
        if terms.ndim != 3 or terms.shape[0] != self.moments.shape[1] or terms.shape[2] != column:
            raise ValueError(f"terms for column {column} must be [{self.moments.shape[1]}, B, {column}], got {tuple(terms.shape)}")
        old = self.moments[:, :, :column, column]
        self.moments[:, :, :column, column] = merge_moments(torch.stack([old, batch_moments(terms, dim=1)]))
        self.count[column] += terms.shape[1]
        if prior is not None:
            self.prior_moments = merge_moments(torch.stack([self.prior_moments, batch_moments(prior.reshape(-1))]))

    def update_columns(self, column: int, sq_err: Tensor, eps_sq: Tensor) -> None:
        """Add B examples' ||x_0 - x0_hat||^2 and ||eps||^2 / D at column ``column`` (the analytic rule's statistics)."""
        old = self.column_moments[:, :, column]
        self.column_moments[:, :, column] = merge_moments(torch.stack([old, batch_moments(torch.stack([sq_err, eps_sq], 1), dim=0)]))

    def compute(self) -> MatrixSums:
        """The merged sums (under torch.distributed every process's moments are merged first: torchmetrics syncs)."""
        return MatrixSums(self.moments.clone(), self.prior_moments.clone(), self.column_moments.clone(), self.count.clone())


@dataclass
class MatrixSums:
    """What `CostMatrixMetric.compute` returns: the moments (count, mean, M2) of every pair, of the prior and of the
    analytic rule's per-column statistics, examples per column, and (ode.py, with multistep) the summed step distances."""

    moments: Tensor  # [3, O, N+1, N+1]
    prior_moments: Tensor  # [3]
    column_moments: Tensor  # [3, 2, N+1]
    count: Tensor  # [N+1]
    multistep: Tensor | None = None  # [N+1]^3

    def pairs_mean_sem(self) -> tuple[Tensor, Tensor]:
        """Each pair's mean [O, N+1, N+1] and its standard error; inf and NaN where i >= j."""
        mean, sem = mean_sem(self.moments)
        valid = torch.ones(mean.shape[-2:], dtype=torch.bool, device=mean.device).triu(1)
        return torch.where(valid, mean, torch.full_like(mean, math.inf)), torch.where(valid, sem, torch.full_like(sem, math.nan))

    def cpu(self) -> "MatrixSums":
        return MatrixSums(*(None if v is None else v.cpu() for v in (self.moments, self.prior_moments, self.column_moments,
                                                                      self.count, self.multistep)))  # fmt: skip


@dataclass
class CostMatrix:
    """An estimated cost matrix on a grid 0 = grid[0] < ... < grid[N] = T, in nats per example."""

    mean: Tensor  # [N+1, N+1] float64; mean[i, j] = C[grid[i], grid[j]] for i < j, inf elsewhere
    sem: Tensor  # [N+1, N+1] standard error of each mean, NaN where i >= j
    grid: Tensor  # [N+1] long
    prior: float  # mean prior KL, nats
    prior_sem: float
    count: int  # examples (or trajectories) per column
    dims: int  # D = C * H * W, for bits/dim
    objective: str = "elbo"  # elbo (nats), mse (paper's reweighting) or ode (trajectory error; ode.py)
    moments: Tensor | None = field(default=None, repr=False)  # [3, N+1, N+1] (count, mean, M2): lets matrices merge
    prior_moments: Tensor | None = field(default=None, repr=False)  # [3]
    gamma: Tensor | None = field(default=None, repr=False)  # [T+1] Gamma_t (NaN off the grid) of an analytic-variance matrix
    betas: Tensor | None = field(default=None, repr=False)  # [T] the model's betas, with gamma (analytic_ot needs both)
    two_step: Tensor | None = field(default=None, repr=False)  # [N+1]^3 DPM-Solver++(2M)'s step costs (ode, multistep.py)

    def merged(self, other: "CostMatrix") -> "CostMatrix":
        """The matrix of both sets of examples (e.g. two rounds of `estimate_to_precision`), from their moments."""
        if self.moments is None or other.moments is None:
            raise ValueError("only matrices estimated with their moments can be merged; estimate them again")
        if self.gamma is not None or other.gamma is not None:
            raise ValueError("analytic-variance matrices cannot be merged: each one's Gamma comes from its own examples")
        if not torch.equal(self.grid, other.grid) or self.objective != other.objective:
            raise ValueError("matrices of different grids or objectives cannot be merged")
        return from_moments(merge_moments(torch.stack([self.moments, other.moments])),
                            merge_moments(torch.stack([self.prior_moments, other.prior_moments])), self.grid, self.dims, self.objective)

    @property
    def T(self) -> int:
        return int(self.grid[-1])

    def grid_indices(self, timesteps: Iterable[int]) -> Tensor:
        """Positions in ``grid`` of the given timesteps (a subset of the grid that contains T)."""
        ts = sorted({int(t) for t in timesteps})
        pos = {int(t): i for i, t in enumerate(self.grid.tolist())}
        missing = [t for t in ts if t not in pos or t == 0]
        if missing:
            raise ValueError(f"timestep {missing[0]} is not on the cost matrix grid; pick timesteps from cost_matrix.grid[1:]")
        if not ts or ts[-1] != self.T:
            raise ValueError(f"a candidate grid must contain T = {self.T}")
        return torch.tensor([0] + [pos[t] for t in ts])

    def schedule_nats(self, schedule: Schedule) -> float:
        """Predicted negative ELBO (prior included) of any schedule whose timesteps are on the grid."""
        if schedule.T != self.T:
            raise ValueError(f"the schedule ends at T = {schedule.T}, the cost matrix at T = {self.T}")
        idx = self.grid_indices(schedule.timesteps).tolist()
        return self.prior + sum(float(self.mean[a, b]) for a, b in zip(idx, idx[1:]))

    def bpd(self, nats: float) -> float:
        """nats per example -> bits per dimension."""
        return nats_to_bpd(nats, self.dims)

    def save(self, path: str | Path) -> None:
        """Checksummed and written atomically (storage.save_checked): never half-written."""
        save_checked(self.__dict__, path)

    @classmethod
    def load(cls, path: str | Path) -> "CostMatrix":
        if not Path(path).is_file():
            raise ValueError(f"cost matrix file {str(path)!r} does not exist")
        try:
            return cls(**load_checked(path))
        except Exception as e:
            raise ValueError(f"cost matrix file {str(path)!r} is not a saved CostMatrix ({type(e).__name__}); recompute it") from None


def estimate_cost_matrix(
    model: DiffusionModel,
    data: Tensor | Iterable,
    grid: Sequence[int] | Tensor | None = None,
    *,
    objective: str = "elbo",
    options: EstimateOptions | None = None,
    **overrides: Any,
) -> CostMatrix:
    """Estimate C[s, t] of ``objective`` for every pair of ``[0] + grid`` on ``data`` (x_0 in [-1, 1]).

    ``options`` (`EstimateOptions`; ``overrides`` replace its fields: ``seed=``, ``batch_size=``, ...) say how it runs.
    Column t costs one forward pass per example, which serves every s < t on the grid:
    ``elbo`` is the KL term of the pair (Watson et al.; nats), ``mse`` the paper's reweighting
    (t - s) ||x_0 - x0_hat(x_t, t)||^2. Under torch.distributed each process passes its own shard (its
    ``start_index``), and the sums of all shards are combined into one matrix. With ``partial`` (a path: saved
    every 50 columns) the sums are saved as the columns are done, a rerun with the same model, data, grid, seed
    and batch size resumes from them, and SIGTERM saves and stops with `Preempted`. The file is removed once
    the matrix is complete. `estimate_cost_matrices` gives several objectives from the same passes.
    """
    return estimate_cost_matrices(model, data, [objective], grid, options=options, **overrides)[objective]


def estimate_cost_matrices(
    model: DiffusionModel,
    data: Tensor | Iterable,
    objectives: Sequence[str] = ("elbo",),
    grid: Sequence[int] | Tensor | None = None,
    *,
    options: EstimateOptions | None = None,
    **overrides: Any,
) -> dict[str, CostMatrix]:
    """`estimate_cost_matrix` of several data objectives (``elbo``, ``mse``) from one set of forward passes."""
    opts = estimate_options(options, **overrides)
    seed, batch_size = opts.seed, opts.batch_size
    if "ode" in objectives:
        raise ValueError("the ode objective runs teacher trajectories from noise, not data: use ode.estimate_ode_matrix(model, trajectories)")
    objectives = check_objectives(objectives, allowed=("elbo", "mse"))
    g = full_grid(grid, model.T)
    batches = indexed_batches(data, batch_size, model.levels, model.image_shape, opts.start_index)
    shape = tuple(batches[0][1].shape[1:])
    device = model.device
    # analytic variance without a given Gamma: Gamma_t comes from the column's own passes, so the KL of s >= 1 is
    # filled in afterwards from the moments of ||x_0 - x0_hat||^2 (it is affine in it); the decoder does not need Gamma
    gamma_from_passes = "elbo" in objectives and model.var_type == "analytic" and model.gamma is None
    if "elbo" in objectives and model.var_type == "analytic" and not gamma_from_passes:
        model.gamma_at(g[1:])  # every grid t needs a given Gamma_t
    metric = CostMatrixMetric(g.numel(), len(objectives)).to(device)
    # batch_size shapes the network calls (columns per call): a resume replays the interrupted run's calls only with it
    config = {"what": "cost_matrix", "sums": "moments", "model": model_fingerprint(model), "data": data_fingerprint(batches), "grid": g.tolist(), "seed": seed,
              "batch_size": batch_size}
    if objectives != ["elbo"]:
        config["objectives"] = objectives
    with resumable(model, metric, opts.partial_file(every=50), config) as (saver, done, stop_requested):
        bar = tqdm(desc="cost matrix", unit="col", disable=not opts.progress, initial=done, total=g.numel() - 1)
        for group in call_groups(range(done + 1, g.numel()), max(len(x0) for _, x0 in batches), batch_size):
            tables = {j: pair_tables(model, int(g[j]), g[:1] if gamma_from_passes else g[:j], device) for j in group} if "elbo" in objectives else {}
            for start, x0 in batches:  # each column's updates in batch order, as one column at a time
                x0 = x0.to(device)
                x_ts = [model.q_sample(x0, int(g[j]), example_noise(seed, start, x0.shape[0], int(g[j]), shape).to(device)) for j in group]
                for j, x_t, pred in zip(group, x_ts, model.predict_many(x_ts, [int(g[j]) for j in group])):
                    t = int(g[j])
                    terms = [elbo_terms(model, x0, x_t, t, g[:j], pred, tables[j], gamma_from_passes) if name == "elbo"
                             else mse_terms(x0, pred.x0_hat, t, g[:j]) for name in objectives]  # fmt: skip
                    metric.update(torch.stack(terms), j, prior_nats(model, x0) if j == 1 and "elbo" in objectives else None)
                    if gamma_from_passes:
                        metric.update_columns(j, ((x0.double() - pred.x0_hat) ** 2).flatten(1).sum(1), (pred.eps**2).flatten(1).mean(1))
            bar.update(len(group))
            saver.step(metric, group[-1], stop_requested(), units=len(group))
        bar.close()
    sums = metric.compute().cpu()
    moments, prior_moments = sums.moments, sums.prior_moments
    saver.remove()
    gamma = model.gamma if model.var_type == "analytic" else None
    if gamma_from_passes:
        k = objectives.index("elbo")
        moments[:, k], gamma = analytic_moments(model, g, moments[:, k], sums.column_moments, math.prod(shape))
    analytic = {"gamma": gamma, "betas": model.schedule.betas} if gamma is not None else {}
    none = empty_moments()
    return {name: from_moments(moments[:, k], prior_moments if name == "elbo" else none, g, math.prod(shape), name, **(analytic if name == "elbo" else {}))
            for k, name in enumerate(objectives)}  # fmt: skip


def elbo_terms(model: DiffusionModel, x0: Tensor, x_t: Tensor, t: int, s: Tensor, pred: Prediction, tables, decoder_only: bool) -> Tensor:
    """[B, S] ELBO terms of the pairs (s, t); with ``decoder_only`` only s = 0 is computed (the rest: zeros, filled later)."""
    if not decoder_only:
        return pair_terms(model, x0, x_t, t, s, pred, tables=tables)
    out = torch.zeros(x0.shape[0], s.numel(), dtype=torch.float64, device=x0.device)
    out[:, :1] = pair_terms(model, x0, x_t, t, s[:1], pred, tables=tables)
    return out


def analytic_moments(model: DiffusionModel, grid: Tensor, moments: Tensor, column_moments: Tensor, dims: int) -> tuple[Tensor, Tensor]:
    """The KL moments of every pair s >= 1 under the analytic variance, and Gamma [T+1] (NaN off the grid).

    Gamma_t is the column's mean ||eps||^2 / D; with sigma2(s, t) then fixed, KL = a + b ||x_0 - x0_hat||^2
    (`diffusion.fixed_variance_kl`), so its mean is a + b mean and its M2 is b^2 M2 of the squared errors.
    """
    gamma = torch.full((model.T + 1,), math.nan, dtype=torch.float64)
    gamma[grid[1:]] = column_moments[1, 1, 1:]
    moments = moments.clone()
    ns = model.schedule
    for j in range(2, grid.numel()):
        t, s = int(grid[j]), grid[1:j]
        sigma2 = torch.exp(ns.analytic_log_variance(s, t, gamma[t]))
        a = fixed_variance_kl(torch.zeros(1, dtype=torch.float64), c0(ns.ab[s], ns.ab[t]), btil(ns.ab[s], ns.ab[t]), sigma2, dims)[0]
        b = c0(ns.ab[s], ns.ab[t]) ** 2 / (2 * sigma2)
        n, mean_sq, m2_sq = column_moments[:, 0, j]
        moments[0, 1:j, j], moments[1, 1:j, j], moments[2, 1:j, j] = n, a + b * mean_sq, b**2 * m2_sq
    return moments, gamma


def from_moments(
    moments: Tensor, prior_moments: Tensor, grid: Tensor, dims: int, objective: str, gamma: Tensor | None = None, betas: Tensor | None = None
) -> CostMatrix:
    """A CostMatrix from the moments [3, N+1, N+1] of its pairs and [3] of the prior (mean inf, sem NaN where i >= j)."""
    mean, sem = mean_sem(moments)
    valid = torch.ones_like(mean, dtype=torch.bool).triu(1)
    prior, prior_sem = mean_sem(prior_moments) if prior_moments[0] > 0 else (torch.zeros(()), torch.zeros(()))
    return CostMatrix(
        mean=torch.where(valid, mean, torch.full_like(mean, math.inf)), sem=torch.where(valid, sem, torch.full_like(sem, math.nan)),
        grid=grid, prior=float(prior), prior_sem=float(prior_sem), count=int(moments[0, 0, 1:].min()) if grid.numel() > 1 else 0,
        dims=dims, objective=objective, moments=moments, prior_moments=prior_moments, gamma=gamma, betas=betas,
    )  # fmt: skip


def mse_terms(x0: Tensor, x0_hat: Tensor, t: int, s: Tensor) -> Tensor:
    """[B, S]: the paper's reweighted cost (t - s) ||x_0 - x0_hat(x_t, t)||^2, summed over dimensions."""
    sq_err = ((x0.double() - x0_hat.double()) ** 2).flatten(1).sum(1)
    return sq_err[:, None] * (t - s.to(x0.device, torch.float64))[None, :]


def check_objectives(objectives: Sequence[str], allowed: Sequence[str] = OBJECTIVES, key: str = "cost.objective") -> list[str]:
    """Distinct objective names, in order, each one of ``allowed``."""
    out = []
    for name in objectives:
        if name not in allowed:
            raise ValueError(f"unknown {key} {name!r}; use one of {', '.join(allowed)}")
        if name not in out:
            out.append(name)
    if not out:
        raise ValueError(f"{key} is empty; use one of {', '.join(allowed)}")
    return out
