"""Strategies: names in ``eval.strategies`` -> objects that build a Schedule for a budget K.

A name is parsed once, before any heavy work (a ``file:`` schedule is read then, a ``respace:`` spec
is checked then); the same objects later build the schedules. Adding a strategy is one class
(strategy_types.py) and one line in ``STRATEGIES`` (or ``PREFIXED`` for a ``name:<argument>`` strategy, a function of the argument, T and
the model's noise schedule or None).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping, Sequence

from ddpm_schedules.models.diffusion import NoiseSchedule
from ddpm_schedules.schedules.dp import PairCosts
from ddpm_schedules.schedules.schedule import (
    Schedule,
    check_noise_fingerprint,
    load_schedules,
    respaced_schedule,
)
from ddpm_schedules.schedules.solver_baselines import SOLVER_BASELINES
from ddpm_schedules.schedules.strategy_types import (  # noqa: F401 (the classes are this module's API too)
    AnalyticCosts,
    AnalyticOtStrategy,
    DpmppStrategy,
    ElboStrategy,
    EvenStrategy,
    FixedStrategy,
    MseStrategy,
    OdeStrategy,
    OptDdimStrategy,
    OptDpmppStrategy,
    OptimalStrategy,
    OptIpndmStrategy,
    OptStrategy,
    OptUnipcStrategy,
    OssStrategy,
    PathsByBudget,
    QuadraticStrategy,
    Strategy,
)
from ddpm_schedules.storage.errors import ParameterError


def respace(spec: str, T: int, noise: NoiseSchedule | None = None) -> FixedStrategy:
    """``respace:<spec>``: an improved-diffusion respacing string, e.g. ``respace:ddim50`` (``noise`` is not needed)."""
    return FixedStrategy(f"respace:{spec}", schedules=(respaced_schedule(T, spec),))


def from_file(path: str, T: int, noise: NoiseSchedule | None = None) -> FixedStrategy:
    """``file:<path>``: the schedules of a JSON file (read once, here). With the model's ``noise``, a file whose
    fingerprint names another noise schedule is refused (schedules/files.py; files without one are not checked)."""
    name = f"file:{Path(path).stem}"
    out = []
    for sch in load_schedules(path):
        if noise is not None:
            check_noise_fingerprint(sch.fingerprint, noise, f"schedule file {path!r}")
        if sch.T != T:
            raise ValueError(f"schedule file {path!r} holds a schedule for T = {sch.T}; the model has T = {T}")
        out.append(sch if sch.strategy != "custom" else replace(sch, strategy=name))
    return FixedStrategy(name, schedules=tuple(out))


@dataclass(frozen=True)
class SolverBaselineStrategy(Strategy):
    """A deterministic sampler's usual steps (``karras``, ``logsnr``, ``exponential``, ``beta``, ``ays``), from the
    model's noise levels as diffusers maps them (solver_baselines.py); needs no cost matrix."""

    noise: NoiseSchedule | None = None

    def build(self, cost_matrix: PairCosts, K: int) -> Schedule:
        return SOLVER_BASELINES[self.name](self.noise, K)


def solver_baseline(name: str, T: int, noise: NoiseSchedule | None) -> SolverBaselineStrategy:
    if noise is None or noise.T != T:
        raise ParameterError(
            "{strategies} has {name!r}, which needs the model's noise schedule: pass noise= to parse_strategies",
            name=name,
        )
    return SolverBaselineStrategy(name, noise=noise)


STRATEGIES = {
    "dp": ElboStrategy,
    "dp_mse": MseStrategy,
    "dp_ode": OdeStrategy,
    "dp_dpmpp": DpmppStrategy,
    "dp_ode_oss": OssStrategy,
    "analytic_ot": AnalyticOtStrategy,
    "even": EvenStrategy,
    "quadratic": QuadraticStrategy,
    "opt_ddim": OptDdimStrategy,
    "opt_dpmpp": OptDpmppStrategy,
    "opt_ipndm": OptIpndmStrategy,
    "opt_unipc": OptUnipcStrategy,
}
OPT = tuple(n for n in STRATEGIES if n.startswith("opt_"))
PREFIXED = {"respace": respace, "file": from_file}


def check_strategy_names(names: Sequence[str]) -> tuple[str, ...]:
    """The names' form before T is known: known strategies, and every ``file:`` schedule readable. The errors of the
    strategy functions are `ParameterError`s naming the list ``strategies``."""
    if isinstance(names, str) or not names:
        raise ParameterError("{strategies} = {names!r}; use a non-empty list, e.g. [dp, even, quadratic]", names=names)
    for name in map(str, names):
        prefix, sep, argument = name.partition(":")
        if name not in STRATEGIES and name not in SOLVER_BASELINES and not (sep and prefix in PREFIXED):
            parse_strategy(name, 1)  # raises the unknown-name error
        if prefix == "file" and sep:
            try:
                load_schedules(argument)
            except ValueError as e:
                raise ParameterError("{strategies} has {name!r}: {error}", name=name, error=str(e)) from None
    return tuple(map(str, names))


def parse_strategy(name: str, T: int, noise: NoiseSchedule | None = None) -> Strategy:
    """One strategy from its name (``dp``, ``even``, ``karras``, ``respace:<spec>``, ``file:<path>``, ...); the solver
    baselines need ``noise``, the model's noise schedule."""
    name = str(name)
    if name in STRATEGIES:
        return STRATEGIES[name](name)
    if name.startswith("opt_"):
        raise ParameterError(
            "{strategies} has {name!r}: {sampler} has no differentiable implementation to optimise through; use "
            "{known}",
            name=name,
            sampler=name[4:],
            known=", ".join(OPT),
        )
    if name in SOLVER_BASELINES:
        return solver_baseline(name, T, noise)
    prefix, sep, argument = name.partition(":")
    if sep and prefix in PREFIXED:
        try:
            return PREFIXED[prefix](argument, T, noise)
        except ValueError as e:
            raise ParameterError("{strategies} has {name!r}: {error}", name=name, error=str(e)) from None
    known = [*STRATEGIES, *SOLVER_BASELINES, *(f"{p}:<{'spec' if p == 'respace' else 'path'}>" for p in PREFIXED)]
    raise ParameterError("unknown strategy {name!r} in {strategies}; use {known}", name=name, known=", ".join(known))


def parse_strategies(names: Sequence[str], T: int, noise: NoiseSchedule | None = None) -> list[Strategy]:
    """Every strategy of a list, checked before any heavy work."""
    if not names:
        raise ParameterError("{strategies} is empty; use e.g. [dp, even, quadratic]")
    return [parse_strategy(n, T, noise) for n in names]


def build_schedules(
    strategies: Sequence[Strategy], matrices: PairCosts | Mapping[str, PairCosts], budgets: Sequence[int]
) -> list[Schedule]:
    """Every (strategy, K) schedule, strategy by strategy in the order given; each DP runs on its objective's matrix."""
    if not isinstance(matrices, Mapping):
        matrices = {matrices.objective: matrices}
    missing = sorted({s.objective for s in strategies if s.objective and s.objective not in matrices})
    if missing:
        raise ValueError(
            f"no {', '.join(missing)} cost matrix for strategies "
            f"{[s.name for s in strategies if s.objective in missing]}"
        )
    some = next(iter(matrices.values()))
    return [sch for s in strategies for sch in s.build_all(matrices[s.objective] if s.objective else some, budgets)]


TEACHER = ("ode", "dpmpp", "oss")  # objectives priced on teacher trajectories from noise (ode.py, oss.py), not on data


def objectives_of(strategies: Sequence[Strategy]) -> list[str]:
    """The cost matrices the strategies need, ELBO first (it also gives every schedule's predicted bits/dim)."""
    return ["elbo"] + sorted({s.objective for s in strategies if s.objective and s.objective != "elbo"})
