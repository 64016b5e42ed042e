"""The cost matrix as data: `CostMatrix` (C[s, t] on a grid, with its standard errors and moments), the torchmetrics
sums it is made from (`CostMatrixMetric`, merged across processes), and the objectives a DP can run on."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import torch
from torch import Tensor
from torchmetrics import Metric

from ddpm_schedules.costs.moments import batch_moments, empty_moments, mean_sem, merge_moments
from ddpm_schedules.models.diffusion import nats_to_bpd
from ddpm_schedules.schedules.schedule import Schedule
from ddpm_schedules.storage.errors import ParameterError
from ddpm_schedules.storage.files import load_checked, save_checked

OBJECTIVES = ("elbo", "mse", "ode")  # the pair costs a DP can run on (ode: see ode.py)


class CostMatrixMetric(Metric):
    """Per-pair moments (count, mean, M2) of the costs of one or more objectives, per-column counts, the prior's
    moments."""

    full_state_update = False
    is_differentiable = False
    higher_is_better = False

    def __init__(self, size: int, objectives: int = 1, **kwargs):
        super().__init__(**kwargs)
        self.size = size
        self.add_state("moments", empty_moments(objectives, size, size), dist_reduce_fx=merge_moments)
        self.add_state("count", torch.zeros(size, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("prior_moments", empty_moments(), dist_reduce_fx=merge_moments)
        # analytic variance: per column, moments of ||x_0 - x0_hat||^2 and of ||eps||^2 / D (Gamma_t),
        # see `analytic_moments`
        self.add_state("column_moments", empty_moments(2, size), dist_reduce_fx=merge_moments)

    def update(self, terms: Tensor, column: int, prior: Tensor | None = None) -> None:
        """Add ``terms`` [B, column] or [O, B, column] (the pairs (grid[i], grid[column]), i < column) of B examples."""
        terms = terms.to(torch.float64)
        terms = terms[None] if terms.ndim == 2 else terms
        if terms.ndim != 3 or terms.shape[0] != self.moments.shape[1] or terms.shape[2] != column:
            raise ValueError(
                f"terms for column {column} must be [{self.moments.shape[1]}, B, {column}], got {tuple(terms.shape)}"
            )
        old = self.moments[:, :, :column, column]
        self.moments[:, :, :column, column] = merge_moments(torch.stack([old, batch_moments(terms, dim=1)]))
        self.count[column] += terms.shape[1]
        if prior is not None:
            self.prior_moments = merge_moments(torch.stack([self.prior_moments, batch_moments(prior.reshape(-1))]))

    def update_columns(self, column: int, sq_err: Tensor, eps_sq: Tensor) -> None:
        """Add B examples' ||x_0 - x0_hat||^2 and ||eps||^2 / D at column ``column``
        (the analytic rule's statistics)."""
        old = self.column_moments[:, :, column]
        self.column_moments[:, :, column] = merge_moments(
            torch.stack([old, batch_moments(torch.stack([sq_err, eps_sq], 1), dim=0)])
        )

    def compute(self) -> MatrixSums:
        """The merged sums (under torch.distributed every process's moments are merged first: torchmetrics syncs)."""
        return MatrixSums(
            self.moments.clone(), self.prior_moments.clone(), self.column_moments.clone(), self.count.clone()
        )


@dataclass
class MatrixSums:
    """What `CostMatrixMetric.compute` returns: the moments (count, mean, M2) of every pair, of the prior and of the
    analytic rule's per-column statistics, examples per column, and (ode.py, with multistep) the summed step
    distances."""

    moments: Tensor  # [3, O, N+1, N+1]
    prior_moments: Tensor  # [3]
    column_moments: Tensor  # [3, 2, N+1]
    count: Tensor  # [N+1]
    multistep: Tensor | None = None  # [N+1]^3

    def pairs_mean_sem(self) -> tuple[Tensor, Tensor]:
        """Each pair's mean [O, N+1, N+1] and its standard error; inf and NaN where i >= j."""
        mean, sem = mean_sem(self.moments)
        valid = torch.ones(mean.shape[-2:], dtype=torch.bool, device=mean.device).triu(1)
        return torch.where(valid, mean, torch.full_like(mean, math.inf)), torch.where(
            valid, sem, torch.full_like(sem, math.nan)
        )

    def cpu(self) -> "MatrixSums":
        return MatrixSums(
            *(
                None if v is None else v.cpu()
                for v in (self.moments, self.prior_moments, self.column_moments, self.count, self.multistep)
            )
        )


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
    gamma: Tensor | None = field(
        default=None, repr=False
    )  # [T+1] Gamma_t (NaN off the grid) of an analytic-variance matrix
    betas: Tensor | None = field(default=None, repr=False)  # [T] the model's betas, with gamma (analytic_ot needs both)
    two_step: Tensor | None = field(
        default=None, repr=False
    )  # [N+1]^3 DPM-Solver++(2M)'s step costs (ode, multistep.py)

    def merged(self, other: "CostMatrix") -> "CostMatrix":
        """The matrix of both sets of examples (e.g. two rounds of `estimate_to_precision`), from their moments."""
        if self.moments is None or other.moments is None:
            raise ValueError("only matrices estimated with their moments can be merged; estimate them again")
        if self.gamma is not None or other.gamma is not None:
            raise ValueError(
                "analytic-variance matrices cannot be merged: each one's Gamma comes from its own examples"
            )
        if not torch.equal(self.grid, other.grid) or self.objective != other.objective:
            raise ValueError("matrices of different grids or objectives cannot be merged")
        return from_moments(
            merge_moments(torch.stack([self.moments, other.moments])),
            merge_moments(torch.stack([self.prior_moments, other.prior_moments])),
            self.grid,
            self.dims,
            self.objective,
        )

    @property
    def T(self) -> int:
        return int(self.grid[-1])

    def grid_indices(self, timesteps: Iterable[int]) -> Tensor:
        """Positions in ``grid`` of the given timesteps (a subset of the grid that contains T)."""
        ts = sorted({int(t) for t in timesteps})
        pos = {int(t): i for i, t in enumerate(self.grid.tolist())}
        missing = [t for t in ts if t not in pos or t == 0]
        if missing:
            raise ValueError(
                f"timestep {missing[0]} is not on the cost matrix grid; pick timesteps from cost_matrix.grid[1:]"
            )
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
            raise ValueError(
                f"cost matrix file {str(path)!r} is not a saved CostMatrix ({type(e).__name__}); recompute it"
            ) from None


def from_moments(
    moments: Tensor,
    prior_moments: Tensor,
    grid: Tensor,
    dims: int,
    objective: str,
    gamma: Tensor | None = None,
    betas: Tensor | None = None,
) -> CostMatrix:
    """A CostMatrix from the moments [3, N+1, N+1] of its pairs and [3] of the prior
    (mean inf, sem NaN where i >= j)."""
    mean, sem = mean_sem(moments)
    valid = torch.ones_like(mean, dtype=torch.bool).triu(1)
    prior, prior_sem = mean_sem(prior_moments) if prior_moments[0] > 0 else (torch.zeros(()), torch.zeros(()))
    return CostMatrix(
        mean=torch.where(valid, mean, torch.full_like(mean, math.inf)),
        sem=torch.where(valid, sem, torch.full_like(sem, math.nan)),
        grid=grid,
        prior=float(prior),
        prior_sem=float(prior_sem),
        count=int(moments[0, 0, 1:].min()) if grid.numel() > 1 else 0,
        dims=dims,
        objective=objective,
        moments=moments,
        prior_moments=prior_moments,
        gamma=gamma,
        betas=betas,
    )


def check_objectives(objectives: Sequence[str], allowed: Sequence[str] = OBJECTIVES) -> list[str]:
    """Distinct objective names, in order, each one of ``allowed``; else a `ParameterError` naming ``objective``."""
    out, known = [], ", ".join(allowed)
    for name in objectives:
        if name not in allowed:
            raise ParameterError("unknown {objective} {value!r}; use one of {known}", value=name, known=known)
        if name not in out:
            out.append(name)
    if not out:
        raise ParameterError("{objectives} is empty; use one of {known}", known=known)
    return out
