"""The strategy classes: how each builds a Schedule for a budget K from its cost matrix (strategies.py names and
parses them)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar, Protocol, Sequence

from torch import Tensor

from ddpm_schedules.models.diffusion import NoiseSchedule
from ddpm_schedules.schedules.analytic import analytic_ot_schedule
from ddpm_schedules.schedules.dp import PairCosts, optimal_schedules
from ddpm_schedules.schedules.dp_multistep import MultistepCosts, optimal_multistep_schedules
from ddpm_schedules.schedules.schedule import Schedule, even_schedule, quadratic_schedule


class AnalyticCosts(PairCosts, Protocol):
    """A cost matrix that carries Analytic-DPM's Gamma (one value per t) and the betas it was estimated with."""

    gamma: Tensor | None
    betas: Tensor
    dims: int


@dataclass(frozen=True)
class Strategy:
    """A way to choose a schedule for each budget K; ``fixed`` strategies ignore K.

    ``objective`` names the cost matrix it is built from (None: it needs none).
    """

    name: str
    fixed: ClassVar[bool] = False
    objective: ClassVar[str | None] = None

    def build(self, cost_matrix: PairCosts, K: int) -> Schedule:
        raise NotImplementedError

    def build_all(self, cost_matrix: PairCosts, budgets: Sequence[int]) -> list[Schedule]:
        """One schedule per budget (fixed strategies: their own schedules, once)."""
        return [self.build(cost_matrix, K) for K in budgets]


@dataclass(frozen=True)
class OptimalStrategy(Strategy):
    """Watson et al.'s DP on a cost matrix: the schedule with the least cost for each K."""

    def build(self, cost_matrix: PairCosts, K: int) -> Schedule:
        return self.build_all(cost_matrix, [K])[0]

    def build_all(self, cost_matrix: PairCosts, budgets: Sequence[int]) -> list[Schedule]:
        by_k = optimal_schedules(cost_matrix, budgets)  # one DP pass serves every budget
        return [replace(by_k[K], strategy=self.name) for K in budgets]


@dataclass(frozen=True)
class ElboStrategy(OptimalStrategy):
    """``dp``: the ELBO-optimal schedules (Watson et al.)."""

    objective: ClassVar[str] = "elbo"


@dataclass(frozen=True)
class MseStrategy(OptimalStrategy):
    """``dp_mse``: the paper's MSE reweighting, (t - s) ||x_0 - x0_hat(x_t, t)||^2."""

    objective: ClassVar[str] = "mse"


@dataclass(frozen=True)
class OdeStrategy(OptimalStrategy):
    """``dp_ode``: the least deviation of one-step DDIM jumps from a DDIM teacher (GITS)."""

    objective: ClassVar[str] = "ode"


@dataclass(frozen=True)
class DpmppStrategy(Strategy):
    """``dp_dpmpp``: the exact DP over DPM-Solver++(2M)'s steps (dp_multistep.py) on the ODE teacher's step costs."""

    objective: ClassVar[str] = "dpmpp"

    def build(self, cost_matrix: MultistepCosts, K: int) -> Schedule:
        return self.build_all(cost_matrix, [K])[0]

    def build_all(self, cost_matrix: MultistepCosts, budgets: Sequence[int]) -> list[Schedule]:
        by_k = optimal_multistep_schedules(cost_matrix, budgets, self.name)
        return [by_k[K] for K in budgets]


class PathsByBudget(Protocol):
    """Paths chosen for every budget at once (costs/oss.py's `OssPaths`)."""

    T: int

    def schedule(self, K: int, strategy: str) -> Schedule: ...


@dataclass(frozen=True)
class OssStrategy(Strategy):
    """``dp_ode_oss``: Optimal Stepsize Distillation's DP over the sampler's own states (costs/oss.py)."""

    objective: ClassVar[str] = "oss"

    def build(self, cost_matrix: PathsByBudget, K: int) -> Schedule:
        return cost_matrix.schedule(K, self.name)


@dataclass(frozen=True)
class AnalyticOtStrategy(Strategy):
    """``analytic_ot``: Analytic-DPM's optimal trajectory from Gamma alone (no per-pair Monte Carlo; analytic.py).

    It reads Gamma from the ELBO matrix of a ``model.var_type=analytic`` run.
    """

    objective: ClassVar[str] = "elbo"

    def build(self, cost_matrix: AnalyticCosts, K: int) -> Schedule:
        if cost_matrix.gamma is None:
            raise ValueError(
                "the analytic_ot strategy needs Gamma: estimate the ELBO matrix under the analytic "
                "variance rule (DiffusionModel.use_variance('analytic'))"
            )
        return analytic_ot_schedule(NoiseSchedule(cost_matrix.betas), cost_matrix.gamma, K, cost_matrix.dims)


@dataclass(frozen=True)
class OptStrategy(Strategy):
    """``opt_<sampler>``: the exact DP's schedule for the sampler (dp_ode, or dp_dpmpp for dpmpp) as the start of
    end-to-end optimisation (costs/end_to_end.py, run by evaluate.py's opt stage): here, the start."""

    sampler: ClassVar[str] = "ddim"
    objective: ClassVar[str] = "ode"

    def build_all(self, cost_matrix, budgets: Sequence[int]) -> list[Schedule]:
        start = DpmppStrategy(self.name) if self.objective == "dpmpp" else OdeStrategy(self.name)
        return start.build_all(cost_matrix, budgets)


@dataclass(frozen=True)
class OptDdimStrategy(OptStrategy):
    sampler: ClassVar[str] = "ddim"


@dataclass(frozen=True)
class OptDpmppStrategy(OptStrategy):
    sampler: ClassVar[str] = "dpmpp"
    objective: ClassVar[str] = "dpmpp"


@dataclass(frozen=True)
class OptIpndmStrategy(OptStrategy):
    sampler: ClassVar[str] = "ipndm"


@dataclass(frozen=True)
class OptUnipcStrategy(OptStrategy):
    sampler: ClassVar[str] = "unipc"


@dataclass(frozen=True)
class EvenStrategy(Strategy):
    """improved-diffusion's even respacing (`even_schedule`)."""

    def build(self, cost_matrix: PairCosts, K: int) -> Schedule:
        return even_schedule(cost_matrix.T, K)


@dataclass(frozen=True)
class QuadraticStrategy(Strategy):
    """DDIM's quadratic spacing (`quadratic_schedule`)."""

    def build(self, cost_matrix: PairCosts, K: int) -> Schedule:
        return quadratic_schedule(cost_matrix.T, K)


@dataclass(frozen=True)
class FixedStrategy(Strategy):
    """Schedules fixed in advance (a respacing string or a schedules file): the same for every budget."""

    schedules: tuple[Schedule, ...] = ()
    fixed: ClassVar[bool] = True

    def build_all(self, cost_matrix: PairCosts, budgets: Sequence[int]) -> list[Schedule]:
        return list(self.schedules)
