"""The settings of evaluate.py and train.py as typed, frozen dataclasses, built and checked here from the config.

`evaluate_settings(cfg)` checks every key that does not depend on the model before anything is loaded;
`EvaluateSettings.resolve(model)` then checks what needs its T and variance rule (grids, budgets,
strategies, refinement), still before any data is read. Each refusal is one line naming the key and its value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

from ddpm_schedules.app.keys import budgets, check_fabric, count, flag, get, positive, seed
from ddpm_schedules.costs.grids import GridSpec, candidate_grid, check_spec, full_grid
from ddpm_schedules.costs.multistep import check_multistep_size
from ddpm_schedules.costs.oss import check_oss_size, check_propagate
from ddpm_schedules.costs.precision import check_target_sem
from ddpm_schedules.costs.refine import RefineSettings, check_refine
from ddpm_schedules.sampling.frechet import fid_feature_extractor, load_reference_stats
from ddpm_schedules.sampling.inception import resolve_inception
from ddpm_schedules.sampling.quality import QualitySettings
from ddpm_schedules.sampling.samplers import check_eta, check_samplers
from ddpm_schedules.schedules.schedule import check_budgets
from ddpm_schedules.schedules.strategies import TEACHER, Strategy, check_strategy_names, parse_strategies


@dataclass(frozen=True)
class Labels:
    """What the inputs are called in results.json (the objects themselves do not know)."""

    model_source: str = "python"
    model_path: str = ""
    data_name: str = "data"
    cost_split: str = "val"
    eval_split: str = "test"


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
        return "Inception-v3 pool3 (FID; bilinear resize to 299)" if self.features == "inception" else "digits classifier penultimate layer (FD, not FID)"


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
    batch_size: int | None = None  # examples per network call; None: `auto_batch_size` of the model's images (set by `resolve`)
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
        return candidate_grid(ode.grid, self.T, "cost.ode.grid") if ode.grid is not None else self.cost.grid

    @property
    def all_budgets(self) -> list[int]:
        return sorted(set(self.held_out.budgets) | set(self.held_out.sample_budgets))

    def resolve(self, model: Any) -> "EvaluateSettings":
        """The settings checked against ``model`` (its T, variance rule and Gamma): grids, budgets, strategies, refinement."""
        if self.T is not None:
            if self.T != model.T:
                raise ValueError(f"these settings were resolved for T = {self.T}, not the model's T = {model.T}")
            return self
        T, held = model.T, self.held_out
        grid = candidate_grid(self.cost.grid, T)
        strategies = parse_strategies([str(s) for s in held.strategies], T, noise=model.schedule)
        sizes = {"the cost grid's size": full_grid(grid, T).numel() - 1}
        resolved = replace(self, T=T, cost=replace(self.cost, grid=grid))
        if any(s.objective in TEACHER for s in strategies):
            sizes["the size of cost.ode.grid"] = full_grid(resolved.ode_grid, T).numel() - 1
        if any(s.objective == "dpmpp" for s in strategies):
            check_multistep_size(sizes["the size of cost.ode.grid"], self.cost.ode.memory_gb)
        if any(s.objective == "oss" for s in strategies) and model.image_shape is not None:
            check_oss_size(sizes["the size of cost.ode.grid"] + 1, self.cost.ode.trajectories, math.prod(model.image_shape), self.cost.ode.memory_gb)
        name, limit = min(sizes.items(), key=lambda kv: kv[1])
        budgets = check_budgets(list(held.budgets), limit, "eval.budgets", name)
        sampled = check_budgets(list(held.sample_budgets), limit, "eval.sample_budgets", name) if held.sample_budgets else []
        _check_analytic(strategies, model, grid)
        refine = self.cost.refine
        if refine is not None:
            examples = self.cost.examples or 10**9  # null: the whole split, checked when the data is read
            first = min(self.cost.precision.first, examples) if self.cost.precision.target_sem is not None else examples
            check_refine(refine, T, first, sorted(set(budgets) | set(sampled)))
        return replace(resolved, held_out=replace(held, budgets=tuple(budgets), sample_budgets=tuple(sampled), strategies=tuple(strategies)),
                       batch_size=self.batch_size or auto_batch_size(model.image_shape))  # fmt: skip


AUTO_VALUES = 2**20  # input values per network call of `batch_size: null`


def auto_batch_size(image_shape: Sequence[int] | None) -> int:
    """About 2^20 input values per network call, at most 1,000 examples: 1,000 8x8 digits (5 timesteps of 200 per
    call), 341 CIFAR-10 images, 85 ImageNet-64 images. The activations, and so the memory, grow with it."""
    dims = math.prod(image_shape) if image_shape else 1
    return max(1, min(1000, AUTO_VALUES // dims))


def _check_analytic(strategies: list[Strategy], model: Any, grid: list[int] | None) -> None:
    """analytic_ot reads Gamma at every t = 1..T: refused before any work without the analytic rule or with a coarse grid."""
    if not any(s.name == "analytic_ot" for s in strategies):
        return
    if model.var_type != "analytic":
        raise ValueError("eval.strategies has analytic_ot, which needs Gamma: evaluate with model.var_type=analytic")
    if grid is not None and model.gamma is None:
        raise ValueError(f"analytic_ot needs Gamma at every t = 1..T: use cost.grid=null, not {grid[:5]}...")


# --- evaluate.py's config -> EvaluateSettings, every check that needs no model ------------------------------------

def cost_settings(cfg: Any) -> CostSettings:
    target = get(cfg, "cost.target_sem", None)
    precision = PrecisionSettings(None if target is None else check_target_sem(target), count(cfg, "cost.first_round", default=64))
    node = get(cfg, "cost.refine", None) or {}
    refine = None
    if node.get("enabled"):
        refine = RefineSettings(**{k: v for k, v in node.items() if k != "enabled"})
        check_spec(refine.coarse, "cost.refine.coarse")
    ode = OdeSettings(count(cfg, "cost.ode.trajectories"), check_spec(get(cfg, "cost.ode.grid", None), "cost.ode.grid"),
                      positive(cfg, "cost.ode.memory_gb", "GB", 2.0), check_propagate(get(cfg, "cost.ode.propagate", "ddim")))  # fmt: skip
    return CostSettings(str(get(cfg, "cost.split")), count(cfg, "cost.examples", "all"), check_spec(get(cfg, "cost.grid", None)),
                        seed(cfg, "cost.seed", 0), precision, refine, ode)  # fmt: skip


def held_out_settings(cfg: Any) -> HeldOutSettings:
    return HeldOutSettings(str(get(cfg, "eval.split")), count(cfg, "eval.examples", "all"), budgets(cfg, "eval.budgets"),
                           budgets(cfg, "eval.sample_budgets", empty_ok=True), check_strategy_names(get(cfg, "eval.strategies")),
                           flag(cfg, "eval.full_chain", False), seed(cfg, "eval.seed", 1))  # fmt: skip


def frechet_settings(cfg: Any) -> FrechetSettings | None:
    """The fid group, with the feature network checked (None when disabled)."""

    if not flag(cfg, "fid.enabled"):
        return None
    fid = FrechetSettings(*(get(cfg, f"fid.{k}", None) for k in ("features", "digits_weights", "inception_weights")),
                          flag(cfg, "fid.antialias", False), str(get(cfg, "fid.reference_split")),
                          count(cfg, "fid.reference_examples", "all"))  # fmt: skip
    fid_feature_extractor(fid.features, fid.digits_weights, fid.inception_weights)
    stats = get(cfg, "fid.reference_stats", None)
    if stats is not None:
        load_reference_stats(stats, fid.features)
        fid = replace(fid, reference_stats=str(stats))
    if fid.features == "inception":  # the file found (the bundled one when none is given) keys the reference cache
        fid = replace(fid, inception_weights=resolve_inception(fid.inception_weights)[1])
    return fid


def quality_settings(cfg: Any, fid: FrechetSettings | None) -> QualitySettings:
    """Samplers, DDIM's eta and sample counts."""
    samplers = check_samplers(get(cfg, "eval.samplers"))
    eta = get(cfg, "eval.ddim_eta", 0.0)
    check_eta(eta, "eval.ddim_eta")
    grid_size = count(cfg, "sample.grid_size")
    samples = count(cfg, "fid.samples") if fid else grid_size
    teacher = count(cfg, "eval.teacher_samples", "none") or 0
    if teacher > samples:
        raise ValueError(f"eval.teacher_samples = {teacher} exceeds the {samples} samples drawn per schedule; lower it or raise fid.samples")
    return QualitySettings(tuple(samplers), float(eta), samples, grid_size, count(cfg, "sample.chunk"), seed(cfg, "sample.seed", 0),
                           teacher, count(cfg, "fid.bootstrap", "none") or 0)  # fmt: skip


def model_settings(cfg: Any) -> ModelSettings:
    var_type, gamma_file = get(cfg, "model.var_type", None), get(cfg, "model.gamma_file", None)
    if var_type is not None and var_type != "analytic":
        raise ValueError(f"model.var_type = {var_type!r}; use null (the checkpoint's rule) or analytic")
    if gamma_file is not None and var_type != "analytic":
        raise ValueError(f"model.gamma_file = {gamma_file!r} is only used with model.var_type=analytic; add it or drop the file")
    if var_type == "analytic":
        if get(cfg, "cost.target_sem", None) is not None or (get(cfg, "cost.refine", None) or {}).get("enabled"):
            raise ValueError("model.var_type=analytic estimates Gamma with the cost matrix in one set of passes: "
                             "use it without cost.target_sem and cost.refine")  # fmt: skip
        grid = get(cfg, "cost.grid", None)
        if get(cfg, "eval.full_chain", False) and grid is not None and gamma_file is None:
            raise ValueError(f"model.var_type=analytic with eval.full_chain=true needs Gamma at every t: use cost.grid=null, not {grid!r}")
    precision = get(cfg, "precision", 32)
    if str(precision) not in ("32", "bf16", "16"):
        raise ValueError(f"precision = {precision!r}; use 32, bf16 or 16 (autocast around the network pass)")
    return ModelSettings(str(precision), flag(cfg, "compile", False), var_type, gamma_file)


def cuda_devices() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def evaluate_settings(cfg: Any) -> EvaluateSettings:
    """evaluate.py's config as settings: every check that needs no model, before anything is loaded."""
    fid = frechet_settings(cfg)
    every = ResumeSettings(count(cfg, "resume.every_columns"), count(cfg, "resume.every_batches"),
                           positive(cfg, "resume.every_seconds", "seconds"))  # fmt: skip
    if get(cfg, "data.batch_size", None) is not None:
        count(cfg, "data.batch_size")
    count(cfg, "data.eval_batch_size", "all", default=None)
    target = str(get(cfg, "model._target_", ""))
    labels = Labels(target.rsplit(".", 1)[-1].removeprefix("load_") or "python", str(get(cfg, "model.path", "")),
                    str(get(cfg, "data._target_", "data")).rsplit(".", 1)[-1], str(get(cfg, "cost.split")), str(get(cfg, "eval.split")))  # fmt: skip
    cost, held_out = cost_settings(cfg), held_out_settings(cfg)
    return EvaluateSettings(Path(get(cfg, "paths.output_dir")), Path(get(cfg, "cache_dir")), count(cfg, "batch_size", "auto: about 2^20 input values per call"), cost, held_out,
                            quality_settings(cfg, fid), fid, every, model_settings(cfg), labels, check_fabric(dict(get(cfg, "fabric", None) or {}), cuda_devices()))  # fmt: skip
