"""The one place that reads Hydra configs and wires the pieces; entry points call these and get metrics back."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning_fabric import Fabric
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import WeightAveraging
from pytorch_lightning.utilities.exceptions import SIGTERMException
from torch import Tensor

from ddpm_schedules.app.cli import user_error
from ddpm_schedules.app.run import (
    FrechetSettings,
    Labels,
    OdeSettings,
    PrecisionSettings,
    ResumeSettings,
    run_evaluation,
)
from ddpm_schedules.costs.grids import candidate_grid, full_grid
from ddpm_schedules.costs.precision import check_target_sem
from ddpm_schedules.costs.refine import RefineSettings, check_refine
from ddpm_schedules.lightning.data import ImageDataModule
from ddpm_schedules.models.checkpoints import UntrustedCheckpointError, read_checkpoint
from ddpm_schedules.models.model import DiffusionModel
from ddpm_schedules.models.noise import Processes
from ddpm_schedules.reports import report
from ddpm_schedules.sampling.frechet import fid_feature_extractor
from ddpm_schedules.sampling.quality import QualitySettings
from ddpm_schedules.sampling.samplers import check_eta, check_samplers
from ddpm_schedules.schedules.analytic import load_gamma
from ddpm_schedules.schedules.schedule import check_budgets
from ddpm_schedules.schedules.strategies import parse_strategies
from ddpm_schedules.storage.resume import Preempted

log = logging.getLogger(__name__)


def build(node: Any, **kwargs: Any) -> Any:
    """hydra.utils.instantiate, with a ValueError from the target raised as itself (one line, the user's error)."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        cause = user_error(e)
        if cause is None:
            raise
        raise cause from None


def configure_wandb_mode() -> None:
    """W&B runs offline unless the user has credentials or chose a mode (WANDB_MODE wins)."""
    if "WANDB_MODE" not in os.environ and not os.environ.get("WANDB_API_KEY"):
        os.environ["WANDB_MODE"] = "offline"


def model_flags(cfg: DictConfig) -> dict[str, Any]:
    """improved-diffusion flags = the unet group (network) + the diffusion group (process and conventions)."""
    return {**OmegaConf.to_container(cfg.unet, resolve=True), **OmegaConf.to_container(cfg.diffusion, resolve=True)}


def build_logger(cfg: DictConfig):
    if not cfg.get("logger"):
        return False
    if "WandbLogger" in str(cfg.logger.get("_target_", "")):
        configure_wandb_mode()
    return build(cfg.logger)


def build_callbacks(cfg: DictConfig) -> list[pl.Callback]:
    callbacks = [build(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    # the monitor must see the averaged weights, and the final checkpoint the raw ones beside them:
    # both run before weight averaging swaps back (on_validation_epoch_end) or copies over (on_train_end)
    return sorted(callbacks, key=lambda c: isinstance(c, WeightAveraging))


def check_data_matches_model(datamodule: ImageDataModule, flags: dict[str, Any]) -> None:
    want = (int(flags.get("in_channels", 3)), int(flags["image_size"]), int(flags["image_size"]))
    if tuple(datamodule.image_shape) != want:
        raise ValueError(
            f"the data has images of shape {tuple(datamodule.image_shape)} but the model is built for {want}; "
            "set unet.image_size / unet.in_channels to match the data"
        )


def check_resume_checkpoint(path: str, flags: dict[str, Any], trust_checkpoint: bool = False) -> None:
    """A checkpoint to resume from must exist, load as data (unless trusted) and have been trained with the same model flags."""
    if not Path(path).is_file():
        raise ValueError(f"ckpt_path {path!r} does not exist; point it at <run dir>/checkpoints/last.ckpt")
    try:
        saved = dict(read_checkpoint(path, trust_checkpoint, trust_hint="trust_checkpoint=true")["hyper_parameters"]["flags"])
    except UntrustedCheckpointError:
        raise
    except Exception:
        raise ValueError(f"ckpt_path {path!r} is not a checkpoint written by train.py") from None
    differ = [f"{k}={saved.get(k)!r} (config: {v!r})" for k, v in flags.items() if k in saved and str(saved[k]) != str(v)]
    if differ:
        raise ValueError(f"ckpt_path {path!r} was trained with {', '.join(differ)}; resume with the flags it was trained with")


def train(cfg: DictConfig) -> dict[str, float]:
    """Train (or resume, with ``ckpt_path``) and return the final logged metrics."""
    pl.seed_everything(cfg.seed, workers=True)
    check_counts(cfg)
    datamodule: ImageDataModule = build(cfg.data)
    flags = model_flags(cfg)
    check_data_matches_model(datamodule, flags)
    if cfg.get("ckpt_path"):
        check_resume_checkpoint(cfg.ckpt_path, flags, trust_checkpoint=bool(cfg.get("trust_checkpoint", False)))
    module = build(cfg.module, flags=flags, levels=datamodule.levels)
    logger = build_logger(cfg)
    trainer: pl.Trainer = build(cfg.trainer, callbacks=build_callbacks(cfg), logger=logger)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"), weights_only=not cfg.get("trust_checkpoint", False))
    except SIGTERMException:
        last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
        message = f"stopped by SIGTERM at step {trainer.global_step}; resume with ckpt_path={last}"
        log.warning(message)
        raise Preempted(message) from None
    finally:
        finish_wandb()
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


# --- evaluate.py ------------------------------------------------------------------------------

_ABSENT = object()
# every count a user types: a positive integer, or null where null means "all of the split" (all) or "none" (none)
COUNTS = {
    "cost.examples": "all", "eval.examples": "all", "fid.reference_examples": "all", "fid.samples": None, "sample.grid_size": None,
    "sample.chunk": None, "batch_size": None, "data.batch_size": None, "data.eval_batch_size": "all",
    "resume.every_columns": None, "resume.every_batches": None, "cost.ode.trajectories": None, "eval.teacher_samples": "none",
    "fid.bootstrap": "none", "cost.first_round": None,
}  # fmt: skip


def check_counts(cfg: DictConfig) -> None:
    """Every count key is a positive integer (or null where it means all or none); resume.every_seconds a positive number."""
    for key, null_means in COUNTS.items():
        value = OmegaConf.select(cfg, key, default=_ABSENT)
        if value is _ABSENT or (value is None and null_means):
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            allowed = f"a positive integer or null ({null_means})" if null_means else "a positive integer"
            raise ValueError(f"{key} = {value!r}; it must be {allowed}")
    seconds = OmegaConf.select(cfg, "resume.every_seconds", default=None)
    if seconds is not None and (isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds > 0):
        raise ValueError(f"resume.every_seconds = {seconds!r}; it must be a positive number of seconds")


def model_labels(cfg: DictConfig) -> tuple[str, str]:
    """(source, path) of the model group: the loader's name without 'load_', and the file it read."""
    target = str(cfg.model.get("_target_", ""))
    return target.rsplit(".", 1)[-1].removeprefix("load_") or "python", str(cfg.model.get("path", ""))


def frechet_settings(cfg: DictConfig) -> FrechetSettings | None:
    """The fid group as settings, with the feature network checked before any heavy work (None when disabled)."""
    if not cfg.fid.enabled:
        return None
    fid_feature_extractor(cfg.fid.features, cfg.fid.digits_weights, cfg.fid.inception_weights)
    keys = ("features", "digits_weights", "inception_weights", "antialias", "reference_split")
    return FrechetSettings(**{k: cfg.fid[k] for k in keys})


def quality_settings(cfg: DictConfig) -> QualitySettings:
    """Samplers, DDIM's eta and sample counts, checked before any heavy work."""
    samplers = check_samplers(list(cfg.eval.samplers))
    check_eta(cfg.eval.ddim_eta, "eval.ddim_eta")
    samples = cfg.fid.samples if cfg.fid.enabled else cfg.sample.grid_size
    teacher = cfg.eval.teacher_samples or 0
    if teacher > samples:
        raise ValueError(f"eval.teacher_samples = {teacher} exceeds the {samples} samples drawn per schedule; lower it or raise fid.samples")
    return QualitySettings(tuple(samplers), float(cfg.eval.ddim_eta), samples, cfg.sample.grid_size, cfg.sample.chunk, cfg.sample.seed,
                           teacher, cfg.fid.bootstrap or 0)  # fmt: skip


def refine_settings(cfg: DictConfig, T: int, budgets: list[int], examples: int) -> RefineSettings | None:
    """cost.refine as settings (None when disabled), checked against T, the budgets and the examples (with
    cost.target_sem, refinement runs on the first round's examples)."""
    node = cfg.cost.get("refine")
    if not node or not node.get("enabled"):
        return None
    if cfg.cost.get("target_sem") is not None:
        examples = min(max(1, int(cfg.cost.get("first_round", 64))), examples)
    settings = RefineSettings(**{k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if k != "enabled"})
    check_refine(settings, T, examples, budgets)
    return settings


def precision_settings(cfg: DictConfig) -> PrecisionSettings:
    """cost.target_sem (bits/dim, or null: all of cost.examples) and the first round's examples, checked."""
    target = cfg.cost.get("target_sem")
    return PrecisionSettings(None if target is None else check_target_sem(target), cfg.cost.get("first_round", 64))


def schedule_inputs(cfg: DictConfig, T: int) -> tuple[list[int] | None, list[int], list[int], list, OdeSettings]:
    """(cost grid, budgets, sample budgets, strategies, ode settings), each checked against the grids it needs."""
    spec = lambda node: OmegaConf.to_container(node) if OmegaConf.is_config(node) else node  # noqa: E731
    grid = candidate_grid(spec(cfg.cost.grid), T)
    strategies = parse_strategies(list(cfg.eval.strategies), T)
    ode = OdeSettings(cfg.cost.ode.trajectories, spec(cfg.cost.ode.grid), float(cfg.cost.ode.memory_gb))
    sizes = {"the cost grid's size": full_grid(grid, T).numel() - 1}
    if any(s.objective == "ode" for s in strategies):
        ode_grid = candidate_grid(ode.grid, T, "cost.ode.grid") if ode.grid is not None else grid
        sizes["the size of cost.ode.grid"] = full_grid(ode_grid, T).numel() - 1
    name, limit = min(sizes.items(), key=lambda kv: kv[1])
    budgets = check_budgets(list(cfg.eval.budgets), limit, "eval.budgets", name)
    sample_budgets = check_budgets(list(cfg.eval.sample_budgets), limit, "eval.sample_budgets", name) if cfg.eval.sample_budgets else []
    return grid, budgets, sample_budgets, strategies, ode


def launch_processes(cfg: DictConfig) -> Processes:
    """Lightning Fabric's processes (DDP) for ``fabric.devices`` or ``fabric.num_nodes`` > 1; one process otherwise."""
    f = OmegaConf.to_container(cfg.fabric, resolve=True)
    if f.get("devices", 1) == 1 and f.get("num_nodes", 1) == 1:
        return Processes()
    fabric = Fabric(**f)
    fabric.launch()
    return Processes(fabric.global_rank, fabric.world_size)


def device_for(procs: Processes) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", procs.rank % torch.cuda.device_count())
    return torch.device("cpu")


def take(datamodule: ImageDataModule, split: str, examples: int | None, key: str) -> Tensor:
    """The first ``examples`` images of a split, named by the config key that asked for them."""
    sizes = datamodule.split_sizes
    if split in sizes and examples is not None and examples > sizes[split]:
        raise ValueError(f"{key} = {examples} asks for {examples} {split} examples but the split has {sizes[split]}; lower it")
    return datamodule.tensor(split, examples)


def evaluation_data(cfg: DictConfig, model, procs: Processes) -> tuple[ImageDataModule, Tensor, Tensor, Tensor | None]:
    """The data module (checked against the model) and the cost, held-out and FID reference tensors."""
    datamodule: ImageDataModule = build(cfg.data)
    if tuple(datamodule.image_shape) != tuple(model.image_shape) or datamodule.levels != model.levels:
        raise ValueError(
            f"the data ({tuple(datamodule.image_shape)}, levels={datamodule.levels}) does not match the model "
            f"({tuple(model.image_shape)}, levels={model.levels}); evaluate the model on the data it was trained for"
        )
    cost_data = take(datamodule, cfg.cost.split, cfg.cost.examples, "cost.examples")
    eval_data = take(datamodule, cfg.eval.split, cfg.eval.examples, "eval.examples")
    if min(len(cost_data), len(eval_data)) < procs.world:
        raise ValueError(
            f"{procs.world} processes need at least {procs.world} examples each in cost.examples ({len(cost_data)}) and "
            f"eval.examples ({len(eval_data)}); raise them or lower fabric.devices"
        )
    reference = take(datamodule, cfg.fid.reference_split, cfg.fid.reference_examples, "fid.reference_examples") if cfg.fid.enabled else None
    return datamodule, cost_data, eval_data, reference


def build_model(cfg: DictConfig) -> DiffusionModel:
    """The model from cfg.model's loader, with model.var_type (an override of the checkpoint's rule) and its Gamma file."""
    node = OmegaConf.masked_copy(cfg.model, [k for k in cfg.model if k not in ("var_type", "gamma_file")])
    var_type, gamma_file = cfg.model.get("var_type"), cfg.model.get("gamma_file")
    if gamma_file is not None and var_type != "analytic":
        raise ValueError(f"model.gamma_file = {gamma_file!r} is only used with model.var_type=analytic; add it or drop the file")
    if var_type == "analytic":
        if cfg.cost.get("target_sem") is not None or (cfg.cost.get("refine") or {}).get("enabled"):
            raise ValueError("model.var_type=analytic estimates Gamma with the cost matrix in one set of passes: "
                             "use it without cost.target_sem and cost.refine")  # fmt: skip
        if cfg.eval.get("full_chain") and cfg.cost.grid is not None and gamma_file is None:
            raise ValueError(f"model.var_type=analytic with eval.full_chain=true needs Gamma at every t: use cost.grid=null, not {cfg.cost.grid!r}")
    model = build(node)
    if var_type is not None:
        model.use_variance(var_type, load_gamma(gamma_file, model) if gamma_file is not None else None)
    return model


def check_analytic_strategies(strategies: list, model: DiffusionModel, grid: list[int] | None) -> None:
    """analytic_ot reads Gamma at every t = 1..T: refused before any work without the analytic rule or with a coarse grid."""
    if not any(s.name == "analytic_ot" for s in strategies):
        return
    if model.var_type != "analytic":
        raise ValueError("eval.strategies has analytic_ot, which needs Gamma: evaluate with model.var_type=analytic")
    if grid is not None and model.gamma is None:
        raise ValueError(f"analytic_ot needs Gamma at every t = 1..T: use cost.grid=null, not {grid[:5]}...")


def compile_flag(cfg: DictConfig) -> bool:
    """``compile``: true or false (torch.compile the network)."""
    value = cfg.get("compile", False)
    if not isinstance(value, bool):
        raise ValueError(f"compile = {value!r}; use true or false")
    return value


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Cost matrix -> DP schedules -> held-out bits/dim, samples and FID per (strategy, K) -> reports; results.json's dict.

    Every input is checked before heavy work; results.json is written last and atomically.
    """
    try:
        check_counts(cfg)
        fid, quality, _ = frechet_settings(cfg), quality_settings(cfg), precision_settings(cfg)
        procs = launch_processes(cfg)
        model = build_model(cfg).to(device_for(procs)).set_precision(cfg.get("precision", 32)).compile_network(compile_flag(cfg))
        datamodule, cost_data, eval_data, reference = evaluation_data(cfg, model, procs)
        grid, budgets, sample_budgets, strategies, ode = schedule_inputs(cfg, model.T)
        check_analytic_strategies(strategies, model, grid)
        source, path = model_labels(cfg)
        result = run_evaluation(
            model, cost_data, eval_data, grid=grid, budgets=budgets, strategies=strategies, out_dir=cfg.paths.output_dir,
            cache_dir=cfg.cache_dir, sample_budgets=sample_budgets, cost_seed=cfg.cost.seed, eval_seed=cfg.eval.seed,
            full_chain=cfg.eval.full_chain, batch_size=cfg.batch_size, quality=quality, fid=fid, reference=reference, ode=ode,
            precision=precision_settings(cfg), refine=refine_settings(cfg, model.T, sorted(set(budgets) | set(sample_budgets)), len(cost_data)),
            resume=ResumeSettings(**cfg.resume), procs=procs, labels=Labels(source, path, type(datamodule).__name__, cfg.cost.split, cfg.eval.split),
            logger=build_logger(cfg) if procs.rank == 0 else None,
        )  # fmt: skip
        if procs.rank != 0:
            return {}
        print(report.results_table(result.to_json()))
        return result.to_json()
    finally:
        finish_wandb()


def finish_wandb() -> None:
    """End the W&B run of this job, so the next in-process multirun job gets its own."""
    if "wandb" in sys.modules:  # a job that never logged to W&B does not import it here
        import wandb

        if wandb.run is not None:
            wandb.finish()
