"""evaluate.py's config -> `EvaluateSettings`: every check that needs no model, before anything is loaded.

Every key is read from the composed config without a fallback value: conf/evaluate.yaml and its groups are the one
place evaluate.py's defaults are written, and a key missing there is an error (only ``data.eval_batch_size``, which not
every data module takes, may be absent). The checks of the layers below name their own parameters; `config_keys`
renames them to the keys they were read from.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

from omegaconf import ListConfig

from ddpm_schedules.app.keys import ODE_KEYS, budgets, check_fabric, config_keys, count, flag, get, positive, seed
from ddpm_schedules.app.settings import (
    CostSettings,
    EvaluateSettings,
    FrechetSettings,
    HeldOutSettings,
    Labels,
    ModelSettings,
    OdeSettings,
    PrecisionSettings,
    ResumeSettings,
)
from ddpm_schedules.costs.end_to_end import OptSettings
from ddpm_schedules.costs.grids import check_spec
from ddpm_schedules.costs.oss import check_propagate
from ddpm_schedules.costs.precision import check_target_sem
from ddpm_schedules.costs.refine import RefineSettings
from ddpm_schedules.sampling.frechet import differentiable_features, fid_feature_extractor, load_reference_stats
from ddpm_schedules.sampling.inception import resolve_inception
from ddpm_schedules.sampling.quality import QualitySettings
from ddpm_schedules.sampling.registry import check_samplers
from ddpm_schedules.sampling.steps import check_eta
from ddpm_schedules.schedules.strategies import check_strategy_names


def evaluate_settings(cfg: Any) -> EvaluateSettings:
    """evaluate.py's config as settings: every check that needs no model, before anything is loaded."""
    fid = frechet_settings(cfg)
    every = ResumeSettings(
        every_columns=count(cfg, "resume.every_columns"),
        every_batches=count(cfg, "resume.every_batches"),
        every_seconds=positive(cfg, "resume.every_seconds", "seconds"),
    )
    count(cfg, "data.batch_size")
    if get(cfg, "data.eval_batch_size", None) is not None:  # not every data module takes one
        count(cfg, "data.eval_batch_size")
    labels = Labels(
        model_source=str(get(cfg, "model._target_")).rsplit(".", 1)[-1].removeprefix("load_"),
        model_path=str(get(cfg, "model.path")),
        data_name=str(get(cfg, "data._target_")).rsplit(".", 1)[-1],
        cost_split=str(get(cfg, "cost.split")),
        eval_split=str(get(cfg, "eval.split")),
    )
    cost, held_out = cost_settings(cfg), held_out_settings(cfg)
    check_opt_start(cost.opt_start, held_out.strategies)
    if cost.opt.distance == "features" and any(str(n).startswith("opt_") for n in held_out.strategies):
        if fid is None:
            raise ValueError(
                "cost.opt.distance = 'features' measures in the FD network of fid.features, and fid.enabled is "
                "false: enable fid or use cost.opt.distance=l2"
            )
        with config_keys("fid"):
            differentiable_features(fid.features, fid.digits_weights, fid.inception_weights)
    return EvaluateSettings(
        out_dir=Path(get(cfg, "paths.output_dir")),
        cache_dir=Path(get(cfg, "cache_dir")),
        batch_size=count(cfg, "batch_size", "auto: about 2^20 input values per call"),
        cost=cost,
        held_out=held_out,
        quality=quality_settings(cfg, fid),
        fid=fid,
        resume=every,
        model=model_settings(cfg),
        labels=labels,
        fabric=check_fabric(dict(get(cfg, "fabric")), cuda_devices()),
    )


def cost_settings(cfg: Any) -> CostSettings:
    target = get(cfg, "cost.target_sem")
    with config_keys(target_sem="cost.target_sem"):
        target = None if target is None else check_target_sem(target)
    refine = None
    if flag(cfg, "cost.refine.enabled"):
        refine = RefineSettings(**{k: v for k, v in get(cfg, "cost.refine").items() if k != "enabled"})
        with config_keys(grid="cost.refine.coarse"):
            check_spec(refine.coarse)
    with config_keys(**ODE_KEYS):
        ode = OdeSettings(
            trajectories=count(cfg, "cost.ode.trajectories"),
            grid=check_spec(get(cfg, "cost.ode.grid")),
            memory_gb=positive(cfg, "cost.ode.memory_gb", "GB"),
            propagate=check_propagate(get(cfg, "cost.ode.propagate")),
        )
    with config_keys(grid="cost.grid"):
        grid = check_spec(get(cfg, "cost.grid"))
    opt_node = dict(get(cfg, "cost.opt"))
    opt_start = str(opt_node.pop("start"))
    with config_keys(**{k: f"cost.opt.{k}" for k in opt_node}):
        opt = OptSettings(**opt_node)
    precision = PrecisionSettings(target_sem=target, first=count(cfg, "cost.first_round"))
    return CostSettings(
        split=str(get(cfg, "cost.split")),
        examples=count(cfg, "cost.examples", "all"),
        grid=grid,
        seed=seed(cfg, "cost.seed"),
        precision=precision,
        refine=refine,
        ode=ode,
        opt=opt,
        opt_start=opt_start,
    )


OPT_BASELINES = ("even", "quadratic", "karras", "logsnr", "exponential", "beta", "ays")


def check_opt_start(start: str, strategies: Sequence[str]) -> None:
    """cost.opt.start: dp, best, a (non-opt) strategy of the run, or a baseline built without a matrix."""
    named = [str(n) for n in strategies if not str(n).startswith("opt_")]
    if start not in ("dp", "best", *OPT_BASELINES, *named):
        raise ValueError(
            f"cost.opt.start = {start!r}; use dp (the sampler's exact DP), best (the closest to the teacher of the "
            f"run's exact DPs), a strategy of eval.strategies or a baseline: {', '.join(OPT_BASELINES)}"
        )


def held_out_settings(cfg: Any) -> HeldOutSettings:
    with config_keys(strategies="eval.strategies"):
        strategies = check_strategy_names(get(cfg, "eval.strategies"))
    return HeldOutSettings(
        split=str(get(cfg, "eval.split")),
        examples=count(cfg, "eval.examples", "all"),
        budgets=budgets(cfg, "eval.budgets"),
        sample_budgets=budgets(cfg, "eval.sample_budgets", empty_ok=True),
        strategies=strategies,
        full_chain=flag(cfg, "eval.full_chain"),
        seed=seed(cfg, "eval.seed"),
        guidance=guidance_scales(get(cfg, "eval.guidance")),
    )


def guidance_scales(value: Any) -> tuple[float, ...]:
    """eval.guidance: a non-empty list of distinct numbers (the scales are checked against the model later)."""
    values = list(value) if isinstance(value, (list, tuple, ListConfig)) else [value]
    try:
        scales = tuple(float(v) for v in values if not isinstance(v, bool))
    except (TypeError, ValueError):
        scales = ()
    if not values or len(scales) != len(values) or len(set(scales)) != len(scales):
        raise ValueError(f"eval.guidance = {value!r} must be a non-empty list of distinct numbers, e.g. [1, 2, 4]")
    return scales


def frechet_settings(cfg: Any) -> FrechetSettings | None:
    """The fid group, with the feature network checked (None when disabled)."""
    if not flag(cfg, "fid.enabled"):
        return None
    fid = FrechetSettings(
        features=get(cfg, "fid.features"),
        digits_weights=get(cfg, "fid.digits_weights"),
        inception_weights=get(cfg, "fid.inception_weights"),
        antialias=flag(cfg, "fid.antialias"),
        reference_split=str(get(cfg, "fid.reference_split")),
        reference_examples=count(cfg, "fid.reference_examples", "all"),
        reference_stats=get(cfg, "fid.reference_stats"),
    )
    with config_keys("fid", path="fid.reference_stats"):
        fid_feature_extractor(fid.features, fid.digits_weights, fid.inception_weights)
        if fid.reference_stats is not None:
            load_reference_stats(fid.reference_stats, fid.features)
            fid = replace(fid, reference_stats=str(fid.reference_stats))
        if fid.features == "inception":  # the file found (the bundled one when none is given) keys the reference cache
            fid = replace(fid, inception_weights=resolve_inception(fid.inception_weights)[1])
    return fid


def quality_settings(cfg: Any, fid: FrechetSettings | None) -> QualitySettings:
    """Samplers, DDIM's eta and sample counts."""
    with config_keys(samplers="eval.samplers", eta="eval.ddim_eta"):
        samplers = check_samplers(get(cfg, "eval.samplers"))
        eta = get(cfg, "eval.ddim_eta")
        check_eta(eta)
    grid_size = count(cfg, "sample.grid_size")
    samples = count(cfg, "fid.samples") if fid else grid_size
    teacher = count(cfg, "eval.teacher_samples", "none") or 0
    if teacher > samples:
        raise ValueError(
            f"eval.teacher_samples = {teacher} exceeds the {samples} samples drawn per schedule; "
            "lower it or raise fid.samples"
        )
    return QualitySettings(
        samplers=tuple(samplers),
        ddim_eta=float(eta),
        samples=samples,
        grid_size=grid_size,
        chunk=count(cfg, "sample.chunk"),
        seed=seed(cfg, "sample.seed"),
        teacher_samples=teacher,
        bootstrap=count(cfg, "fid.bootstrap", "none") or 0,
    )


def model_settings(cfg: Any) -> ModelSettings:
    var_type, gamma_file = get(cfg, "model.var_type"), get(cfg, "model.gamma_file")
    if var_type is not None and var_type != "analytic":
        raise ValueError(f"model.var_type = {var_type!r}; use null (the checkpoint's rule) or analytic")
    if gamma_file is not None and var_type != "analytic":
        raise ValueError(
            f"model.gamma_file = {gamma_file!r} is only used with model.var_type=analytic; add it or drop the file"
        )
    if var_type == "analytic":
        if get(cfg, "cost.target_sem") is not None or flag(cfg, "cost.refine.enabled"):
            raise ValueError(
                "model.var_type=analytic estimates Gamma with the cost matrix in one set of passes: "
                "use it without cost.target_sem and cost.refine"
            )
        grid = get(cfg, "cost.grid")
        if flag(cfg, "eval.full_chain") and grid is not None and gamma_file is None:
            raise ValueError(
                f"model.var_type=analytic with eval.full_chain=true needs Gamma at every t: "
                f"use cost.grid=null, not {grid!r}"
            )
    precision = get(cfg, "precision")
    if str(precision) not in ("32", "bf16", "16"):
        raise ValueError(f"precision = {precision!r}; use 32, bf16 or 16 (autocast around the network pass)")
    return ModelSettings(
        precision=str(precision), compile=flag(cfg, "compile"), var_type=var_type, gamma_file=gamma_file
    )


def cuda_devices() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0
