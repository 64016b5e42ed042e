"""The settings of evaluate.py and train.py as typed, frozen dataclasses, built and checked here from the config.

`evaluate_settings(cfg)` (evaluate_config.py) checks every key that does not depend on the model before anything is
loaded; `EvaluateSettings.resolve(model)` then checks what needs its T and variance rule (grids, budgets,
strategies, refinement), still before any data is read. Each refusal is one line naming the key and its value: the
checks of the layers below name their own parameters, and `config_keys` renames them to the keys they were read from.

The dataclasses' defaults are the Python API's (`run_evaluation` with settings built in code); evaluate.py sets every
field from conf/evaluate.yaml, the one place its defaults are written.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

from ddpm_schedules.app.keys import ODE_KEYS, config_keys
from ddpm_schedules.costs.end_to_end import OptSettings
from ddpm_schedules.costs.grids import GridSpec, candidate_grid, full_grid
from ddpm_schedules.costs.multistep import check_multistep_size
from ddpm_schedules.costs.oss import check_oss_size
from ddpm_schedules.costs.refine import RefineSettings, check_refine
from ddpm_schedules.models.conditioning import check_guidance
from ddpm_schedules.sampling.quality import QualitySettings
from ddpm_schedules.schedules.files import check_schedule_for
from ddpm_schedules.schedules.schedule import check_budgets
from ddpm_schedules.schedules.strategies import TEACHER, Strategy, parse_strategies


@dataclass(frozen=True)
class Labels:
    """What the inputs are called in results.json (the objects themselves do not know)."""

    model_source: str = "python"
    model_path: str = ""
    data_name: str = "data"
    cost_split: str = "val"
    eval_split: str = "test"

    def cost_key(self, examples: int) -> dict[str, Any]:
        """The cost examples' part of a cache key: the data set, its split and how many."""
        return {"data": self.data_name, "split": self.cost_split, "examples": examples}


@dataclass(frozen=True)
class ResumeSettings:
    """How often partial sums are saved (see `estimate_cost_matrix`)."""

    every_columns: int = 50
    every_batches: int = 10
    every_seconds: float = 300.0


@dataclass(frozen=True)
class OdeSettings:
    """The dp_ode objective's teacher: trajectories, its grid (a `candidate_grid` spec; None: the cost grid), memory."""

    trajectories: int = 64
    grid: GridSpec = None
    memory_gb: float = 2.0
    propagate: str = "ddim"  # the sampler whose own states dp_ode_oss carries (oss.py)


@dataclass(frozen=True)
class FrechetSettings:
    features: str = "digits"  # "digits" (FD in a digits classifier's features) or "inception" (FID)
    digits_weights: str | None = None
    inception_weights: str | None = None
    antialias: bool = False
    reference_split: str = "test"
    reference_examples: int | None = None
    reference_stats: str | None = None  # a .npz with mu and sigma (pytorch-fid's layout) instead of reference images

    @property
    def description(self) -> str:
        return (
            "Inception-v3 pool3 (FID; bilinear resize to 299)"
            if self.features == "inception"
            else "digits classifier penultimate layer (FD, not FID)"
        )


@dataclass(frozen=True)
class PrecisionSettings:
    """``cost.target_sem``: rounds of examples (``first``, then doubling) until every DP path's predicted bits/dim
    has at most this standard error; None: all of ``cost.examples`` at once."""

    target_sem: float | None = None
    first: int = 64


@dataclass(frozen=True)
class CostSettings:
    """The matrices the DP runs on: which examples, which grid, which seed, and how they are estimated."""

    split: str = "val"
    examples: int | None = 200
    grid: GridSpec = None  # a spec until `EvaluateSettings.resolve`, then the sorted timesteps (None: every step)
    seed: int = 0
    precision: PrecisionSettings = PrecisionSettings()
    refine: RefineSettings | None = None
    ode: OdeSettings = OdeSettings()
    opt: OptSettings = OptSettings()  # opt_<sampler>: end-to-end optimisation (costs/end_to_end.py)
    opt_start: str = (
        "dp"  # dp (the sampler's exact DP), best (the closest of the run's DPs), a strategy of the run, a baseline
    )


@dataclass(frozen=True)
class HeldOutSettings:
    """Held-out bits/dim per (strategy, K), and the budgets that are also sampled."""

    split: str = "test"
    examples: int | None = 200
    budgets: tuple[int, ...] = (8, 16, 32, 64, 128)
    sample_budgets: tuple[int, ...] = ()
    strategies: tuple[Any, ...] = ("dp", "even", "quadratic")  # names until `resolve`, then `Strategy` objects
    full_chain: bool = False
    seed: int = 1
    guidance: tuple[float, ...] = (1.0,)  # classifier-free guidance scales sampled (models/conditioning.py)


@dataclass(frozen=True)
class ModelSettings:
    """How the network runs: autocast precision, torch.compile, and an override of the checkpoint's variance rule."""

    precision: str = "32"
    compile: bool = False
    var_type: str | None = None
    gamma_file: str | None = None


@dataclass(frozen=True)
class EvaluateSettings:
    """Everything `run_evaluation` needs besides the model and the data: evaluate.py's config, typed and checked."""

    out_dir: Path = Path("outputs")
    cache_dir: Path = Path(".cache")
    batch_size: int | None = (
        None  # examples per network call; None: `auto_batch_size` of the model's images (set by `resolve`)
    )
    cost: CostSettings = CostSettings()
    held_out: HeldOutSettings = HeldOutSettings()
    quality: QualitySettings = QualitySettings()
    fid: FrechetSettings | None = None
    resume: ResumeSettings = ResumeSettings()
    model: ModelSettings = ModelSettings()
    labels: Labels = Labels()
    fabric: dict[str, Any] = field(default_factory=lambda: {"devices": 1, "num_nodes": 1})
    T: int | None = None  # set by `resolve`: the grids, budgets and strategies are then checked against it

    @property
    def ode_grid(self) -> list[int] | None:
        ode = self.cost.ode
        with config_keys(grid="cost.ode.grid"):
            return candidate_grid(ode.grid, self.T) if ode.grid is not None else self.cost.grid

    @property
    def all_budgets(self) -> list[int]:
        return sorted(set(self.held_out.budgets) | set(self.held_out.sample_budgets))

    @config_keys(strategies="eval.strategies", **ODE_KEYS)
    def resolve(self, model: Any) -> "EvaluateSettings":
        """The settings checked against ``model`` (its T, variance rule and Gamma): grids, budgets, strategies,
        refinement."""
        if self.T is not None:
            if self.T != model.T:
                raise ValueError(f"these settings were resolved for T = {self.T}, not the model's T = {model.T}")
            return self
        T, held = model.T, self.held_out
        with config_keys(grid="cost.grid"):
            grid = candidate_grid(self.cost.grid, T)
        strategies = parse_strategies([str(s) for s in held.strategies], T, noise=model.schedule)
        for sch in (sch for st in strategies for sch in getattr(st, "schedules", ())):
            check_schedule_for(sch, model)  # file: schedules made with other weights warn (another noise: refused)
        sizes = {"the cost grid's size": full_grid(grid, T).numel() - 1}
        resolved = replace(self, T=T, cost=replace(self.cost, grid=grid))
        if any(s.objective in TEACHER for s in strategies):
            sizes["the size of cost.ode.grid"] = full_grid(resolved.ode_grid, T).numel() - 1
        if any(s.objective == "dpmpp" for s in strategies):
            check_multistep_size(sizes["the size of cost.ode.grid"], self.cost.ode.memory_gb)
        if any(s.objective == "oss" for s in strategies) and model.image_shape is not None:
            check_oss_size(
                sizes["the size of cost.ode.grid"] + 1,
                self.cost.ode.trajectories,
                math.prod(model.image_shape),
                self.cost.ode.memory_gb,
            )
        name, limit = min(sizes.items(), key=lambda kv: kv[1])
        budgets = check_budgets(list(held.budgets), limit, "eval.budgets", name)
        sampled = (
            check_budgets(list(held.sample_budgets), limit, "eval.sample_budgets", name) if held.sample_budgets else []
        )
        _check_analytic(strategies, model, grid)
        _check_guidance(held.guidance, strategies, model)
        refine = self.cost.refine
        if refine is not None:
            examples = self.cost.examples or 10**9  # null: the whole split, checked when the data is read
            first = min(self.cost.precision.first, examples) if self.cost.precision.target_sem is not None else examples
            with config_keys("cost.refine"):
                check_refine(refine, T, first, sorted(set(budgets) | set(sampled)))
        return replace(
            resolved,
            held_out=replace(held, budgets=tuple(budgets), sample_budgets=tuple(sampled), strategies=tuple(strategies)),
            batch_size=self.batch_size or auto_batch_size(model.image_shape),
        )


AUTO_VALUES = 2**20  # input values per network call of `batch_size: null`


def auto_batch_size(image_shape: Sequence[int] | None) -> int:
    """About 2^20 input values per network call, at most 1,000 examples: 1,000 8x8 digits (5 timesteps of 200 per
    call), 341 CIFAR-10 images, 85 ImageNet-64 images. The activations, and so the memory, grow with it."""
    dims = math.prod(image_shape) if image_shape else 1
    return max(1, min(1000, AUTO_VALUES // dims))


def _check_guidance(scales: Sequence[float], strategies: list[Strategy], model: Any) -> None:
    """Every scale usable with the model (before any work); a data-objective strategy needs s = 1 among them: the
    ELBO (and the paper's MSE) is defined for the unguided model only."""
    with config_keys(scale="eval.guidance"):
        for scale in scales:
            check_guidance(scale, model.num_classes, model.null_class)
    data = [s.name for s in strategies if s.objective in ("elbo", "mse") or s.name == "analytic_ot"]
    if data and 1.0 not in scales:
        raise ValueError(
            f"eval.strategies has {', '.join(data)}, defined by the unguided model's ELBO, but eval.guidance = "
            f"{list(scales)} has no 1; add 1 to eval.guidance or drop {', '.join(data)}"
        )


def _check_analytic(strategies: list[Strategy], model: Any, grid: list[int] | None) -> None:
    """analytic_ot reads Gamma at every t = 1..T: refused before any work without the analytic rule or with a
    coarse grid."""
    if not any(s.name == "analytic_ot" for s in strategies):
        return
    if model.var_type != "analytic":
        raise ValueError("eval.strategies has analytic_ot, which needs Gamma: evaluate with model.var_type=analytic")
    if grid is not None and model.gamma is None:
        raise ValueError(f"analytic_ot needs Gamma at every t = 1..T: use cost.grid=null, not {grid[:5]}...")
