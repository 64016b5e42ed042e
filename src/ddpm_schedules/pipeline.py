"""The one place that reads Hydra configs and wires the pieces; entry points call these and get metrics back."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import WeightAveraging
from pytorch_lightning.utilities.exceptions import SIGTERMException

from .lightning.data import ImageDataModule

log = logging.getLogger(__name__)


def build(node: Any, **kwargs: Any) -> Any:
    """hydra.utils.instantiate, with a ValueError from the target raised as itself (one line, the user's error)."""
    from hydra.errors import InstantiationException

    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__
        while cause is not None and not isinstance(cause, ValueError):
            cause = cause.__cause__
        if cause is None:
            raise
        raise cause from None


def configure_wandb_mode() -> None:
    """W&B runs offline unless the user has credentials or chose a mode (WANDB_MODE wins)."""
    if "WANDB_MODE" not in os.environ and not os.environ.get("WANDB_API_KEY"):
        os.environ["WANDB_MODE"] = "offline"


def model_flags(cfg: DictConfig) -> dict[str, Any]:
    """improved-diffusion flags = the model group (UNet) + the diffusion group (process and conventions)."""
    return {**OmegaConf.to_container(cfg.model, resolve=True), **OmegaConf.to_container(cfg.diffusion, resolve=True)}


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
            "set model.image_size / model.in_channels to match the data"
        )


def check_resume_checkpoint(path: str, flags: dict[str, Any]) -> None:
    """A checkpoint to resume from must exist and have been trained with the same model flags."""
    import torch

    if not Path(path).is_file():
        raise ValueError(f"ckpt_path {path!r} does not exist; point it at <run dir>/checkpoints/last.ckpt")
    try:
        saved = dict(torch.load(path, map_location="cpu", weights_only=False)["hyper_parameters"]["flags"])
    except Exception:
        raise ValueError(f"ckpt_path {path!r} is not a checkpoint written by train.py") from None
    differ = [f"{k}={saved.get(k)!r} (config: {v!r})" for k, v in flags.items() if k in saved and str(saved[k]) != str(v)]
    if differ:
        raise ValueError(f"ckpt_path {path!r} was trained with {', '.join(differ)}; resume with the flags it was trained with")


def train(cfg: DictConfig) -> dict[str, float]:
    """Train (or resume, with ``ckpt_path``) and return the final logged metrics."""
    pl.seed_everything(cfg.seed, workers=True)
    if "source" in cfg.model:
        raise ValueError(f"model={cfg.model.source} names a model to evaluate; train.py needs UNet flags, e.g. model=digits")
    datamodule: ImageDataModule = build(cfg.data)
    flags = model_flags(cfg)
    check_data_matches_model(datamodule, flags)
    if cfg.get("ckpt_path"):
        check_resume_checkpoint(cfg.ckpt_path, flags)
    module = build(cfg.module, flags=flags, levels=datamodule.levels)
    logger = build_logger(cfg)
    trainer: pl.Trainer = build(cfg.trainer, callbacks=build_callbacks(cfg), logger=logger)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    except SIGTERMException:
        from .resume import Preempted

        last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
        message = f"stopped by SIGTERM at step {trainer.global_step}; resume with ckpt_path={last}"
        log.warning(message)
        raise Preempted(message) from None
    finally:
        finish_wandb()
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


# --- evaluate.py ------------------------------------------------------------------------------

def load_model(cfg: DictConfig):
    """The model named by the ``model`` group: our checkpoint, an improved-diffusion .pt with flags, or a diffusers folder."""
    from .checkpoints import load_checkpoint, load_improved_diffusion

    source = cfg.model.get("source")
    if source == "checkpoint":
        return load_checkpoint(cfg.model.path)
    if source == "improved_diffusion":
        model = load_improved_diffusion(cfg.model.path, **OmegaConf.to_container(cfg.model.get("flags") or {}, resolve=True))
        model.levels = int(cfg.model.get("levels", 256))
        return model
    if source == "diffusers":
        from .diffusers_bridge import load_diffusers

        return load_diffusers(cfg.model.path, levels=int(cfg.model.get("levels", 256)))
    raise ValueError(f"model source {source!r} is not known; use model=checkpoint, model=improved_diffusion or model=diffusers")


STRATEGIES = ("dp", "even", "quadratic", "respace:<spec>", "file:<path>")


def parse_strategies(strategies: list[str], budgets: list[int], T: int, grid_size: int) -> list[str]:
    """Check every strategy and budget before any heavy work; returns the strategies in order."""
    from .schedules import load_schedules, respaced_schedule

    for K in budgets:
        if isinstance(K, bool) or not isinstance(K, int) or not 1 <= K <= grid_size:
            raise ValueError(f"eval.budgets has {K!r}; every budget must be an integer in 1..{grid_size} (the cost grid's size)")
    for name in strategies:
        if name in ("dp", "even", "quadratic"):
            continue
        if name.startswith("respace:"):
            respaced_schedule(T, name[len("respace:") :])
        elif name.startswith("file:"):
            for sch in load_schedules(name[len("file:") :]):
                if sch.T != T:
                    raise ValueError(f"schedule file {name[5:]!r} holds a schedule for T = {sch.T}; the model has T = {T}")
        else:
            raise ValueError(f"unknown strategy {name!r} in eval.strategies; use {', '.join(STRATEGIES)}")
    return list(strategies)


def build_schedules(strategies: list[str], budgets: list[int], cm) -> list:
    """Every (strategy, K) schedule: the DP's for all budgets from one pass, then the baselines."""
    from .dp import optimal_schedules
    from .schedules import even_schedule, load_schedules, quadratic_schedule, respaced_schedule

    out = []
    dp = optimal_schedules(cm, budgets) if "dp" in strategies else {}
    for name in strategies:
        if name == "dp":
            out += [dp[K] for K in budgets]
        elif name == "even":
            out += [even_schedule(cm.T, K) for K in budgets]
        elif name == "quadratic":
            out += [quadratic_schedule(cm.T, K) for K in budgets]
        elif name.startswith("respace:"):
            out.append(respaced_schedule(cm.T, name[len("respace:") :]))
        else:
            out += [sch if sch.strategy != "custom" else type(sch)(sch.timesteps, sch.T, f"file:{Path(name[5:]).stem}")
                    for sch in load_schedules(name[len("file:") :])]  # fmt: skip
    return out


def launch_processes(cfg: DictConfig):
    """Lightning Fabric's processes for ``trainer.devices`` / ``trainer.num_nodes`` > 1 (DDP); None for one process."""
    t = cfg.get("trainer") or {}
    devices, nodes, strategy = t.get("devices", 1), t.get("num_nodes", 1), t.get("strategy", "auto")
    if devices == 1 and nodes == 1:
        return None
    from lightning_fabric import Fabric

    fabric = Fabric(accelerator=t.get("accelerator", "auto"), devices=devices, num_nodes=nodes, strategy=strategy)
    fabric.launch()
    return fabric


def shard(n: int, rank: int, world: int) -> tuple[int, int]:
    """The contiguous slice of n examples that process ``rank`` of ``world`` takes."""
    return rank * n // world, (rank + 1) * n // world


def _mix(*values: int) -> int:
    from .batches import _mix as mix

    return mix(*values)


def cost_grid(grid: Any, T: int) -> list[int] | None:
    if grid is None:
        return None
    if isinstance(grid, int):
        if grid < 1:
            raise ValueError(f"cost.grid = {grid}; an integer grid is a stride >= 1 (every k-th step)")
        return sorted(set(range(grid, T + 1, grid)) | {T})
    return sorted(int(t) for t in grid)


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Cost matrix -> DP schedules -> held-out bits/dim, samples and FID per (strategy, K) -> reports.

    Every input is checked before heavy work; results.json is written last and atomically.
    """
    try:
        return _evaluate(cfg, lambda: build_logger(cfg))
    finally:
        finish_wandb()


def finish_wandb() -> None:
    """End the W&B run of this job, so the next in-process multirun job gets its own."""
    import sys

    if "wandb" in sys.modules:
        import wandb

        if wandb.run is not None:
            wandb.finish()


def _evaluate(cfg: DictConfig, make_logger) -> dict[str, Any]:
    import math
    import time

    import torch

    from . import report
    from .cost_matrix import CostMatrix, estimate_cost_matrix, full_grid
    from .evaluation import evaluate_schedules, frechet_distances
    from .schedules import full_schedule

    out_dir = Path(cfg.paths.output_dir)
    timings: dict[str, float] = {}
    model = load_model(cfg)
    fabric = launch_processes(cfg)
    rank, world = (fabric.global_rank, fabric.world_size) if fabric else (0, 1)
    model = model.to(fabric.device if fabric else ("cuda" if torch.cuda.is_available() else "cpu"))
    datamodule: ImageDataModule = build(cfg.data)
    if tuple(datamodule.image_shape) != tuple(model.image_shape) or datamodule.levels != model.levels:
        raise ValueError(
            f"the data ({tuple(datamodule.image_shape)}, levels={datamodule.levels}) does not match the model "
            f"({tuple(model.image_shape)}, levels={model.levels}); evaluate the model on the data it was trained for"
        )
    grid = cost_grid(OmegaConf.to_container(cfg.cost.grid) if OmegaConf.is_config(cfg.cost.grid) else cfg.cost.grid, model.T)
    g = full_grid(grid, model.T)
    budgets = list(cfg.eval.budgets)
    strategies = parse_strategies(list(cfg.eval.strategies), budgets, model.T, g.numel() - 1)
    fid_on = bool(cfg.fid.enabled)
    if fid_on:  # the feature network must be there before any heavy work
        from .evaluation import fid_feature_extractor

        fid_feature_extractor(cfg.fid.features, cfg.fid.digits_weights, cfg.fid.inception_weights)
    cost_data = datamodule.tensor(cfg.cost.split, cfg.cost.examples)
    eval_data = datamodule.tensor(cfg.eval.split, cfg.eval.examples)
    if min(len(cost_data), len(eval_data)) < world:
        raise ValueError(f"{world} processes need at least {world} cost and eval examples each; raise cost.examples / eval.examples")
    logger = make_logger() if rank == 0 else False
    suffix = f".rank{rank}.partial.pt" if world > 1 else ".partial.pt"

    # 1. the cost matrix, cached by model weights, data, grid, seed and conventions
    start = time.perf_counter()
    key = report.cache_key(model, data=type(datamodule).__name__, split=cfg.cost.split, examples=len(cost_data), grid=g.tolist(), seed=cfg.cost.seed)
    cache = Path(cfg.cache_dir) / f"cost_matrix_{key[:20]}.pt"
    cached = cache.is_file()
    if cached:
        try:
            cm = CostMatrix.load(cache)
        except ValueError:
            cached = False
    if not cached:
        lo, hi = shard(len(cost_data), rank, world)
        cm = estimate_cost_matrix(
            model, cost_data[lo:hi], grid=grid, seed=cfg.cost.seed, batch_size=cfg.batch_size, progress=rank == 0, start_index=lo,
            partial=cache.with_suffix(suffix), save_every_columns=cfg.resume.every_columns, save_every_seconds=cfg.resume.every_seconds,
        )  # fmt: skip
        if rank == 0:
            cm.save(cache)
    timings["cost_matrix"] = time.perf_counter() - start

    # 2. schedules; 3. held-out bits/dim of all of them (and the full chain) in one union pass
    start = time.perf_counter()
    schedules = build_schedules(strategies, budgets, cm)
    timings["dp_and_schedules"] = time.perf_counter() - start
    start = time.perf_counter()
    extra = [full_schedule(model.T)] if cfg.eval.full_chain else []
    held_key = report.hash_parts(key=key, split=cfg.eval.split, examples=len(eval_data))
    lo, hi = shard(len(eval_data), rank, world)
    results = evaluate_schedules(
        model, eval_data[lo:hi], schedules + extra, seed=cfg.eval.seed, batch_size=cfg.batch_size, progress=rank == 0, start_index=lo,
        partial=Path(cfg.cache_dir) / f"held_out_{held_key[:20]}{suffix}", save_every_batches=cfg.resume.every_batches,
        save_every_seconds=cfg.resume.every_seconds,
    )  # fmt: skip
    full = results[len(schedules)] if extra else None
    results = results[: len(schedules)]
    timings["held_out_bpd"] = time.perf_counter() - start

    # 4. samples and Fréchet distances per schedule
    start = time.perf_counter()
    samples = {}
    n = max(int(cfg.fid.samples) if fid_on else 0, int(cfg.sample.grid_size))
    chunk = int(cfg.sample.chunk)
    for i, sch in enumerate(schedules):
        # chunk c of schedule i always gets the same noise, whichever process draws it
        parts = [model.sample(sch, min(chunk, n - c * chunk), generator=torch.Generator().manual_seed(_mix(cfg.sample.seed, i, c)),
                              batch_size=cfg.batch_size).cpu()
                 for c in range(rank, math.ceil(n / chunk), world)]  # fmt: skip
        samples[i] = torch.cat(parts) if parts else torch.empty(0, *model.image_shape)
    timings["sampling"] = time.perf_counter() - start
    start = time.perf_counter()
    fids: dict[int, float] = {}
    if fid_on:
        reference = datamodule.tensor(cfg.fid.reference_split, cfg.fid.reference_examples)
        ref_lo, ref_hi = shard(len(reference), rank, world)
        weights = cfg.fid.digits_weights if cfg.fid.features == "digits" else cfg.fid.inception_weights
        ref_key = report.hash_parts(features=cfg.fid.features, weights=report.file_digest(weights), data=type(datamodule).__name__,
                                    split=cfg.fid.reference_split, examples=len(reference), antialias=bool(cfg.fid.antialias))  # fmt: skip
        mine = [c for c in range(rank, math.ceil(n / chunk), world)]
        keep = sum(max(0, min(chunk, int(cfg.fid.samples) - c * chunk)) for c in mine)  # this process's share of fid.samples
        fids = frechet_distances(
            reference[ref_lo:ref_hi],
            {i: s[:keep] for i, s in samples.items()},
            features=cfg.fid.features,
            digits_weights=cfg.fid.digits_weights,
            inception_weights=cfg.fid.inception_weights,
            antialias=bool(cfg.fid.antialias),
            reference_cache=str(Path(cfg.cache_dir) / f"fid_reference_{ref_key[:20]}.pt") if world == 1 else None,
        )
    timings["fid"] = time.perf_counter() - start

    # 5. reports (one process writes them); results.json last
    if rank != 0:
        return {}
    start = time.perf_counter()
    doc = {
        "model": {"source": cfg.model.source, "path": str(cfg.model.path), "T": model.T, "mean_type": model.mean_type, "var_type": model.var_type},
        "data": {
            "name": type(datamodule).__name__, "levels": model.levels, "dims": math.prod(model.image_shape),
            "cost_split": cfg.cost.split, "cost_examples": len(cost_data), "eval_split": cfg.eval.split, "eval_examples": len(eval_data),
        },
        "cost_matrix": {"grid_size": g.numel() - 1, "seconds": timings["cost_matrix"], "file": str(cache), "cached": cached, "seed": cfg.cost.seed},
        "full_chain": {"K": model.T, "bpd": full.bpd, "bpd_sem": full.bpd_sem} if full else None,
        "fid": {
            "features": ("Inception-v3 pool3 (FID)" if cfg.fid.features == "inception" else "digits classifier penultimate layer (FD, not FID)") if fid_on else None,
            "reference_split": cfg.fid.reference_split if fid_on else None,
            "reference_examples": int(cfg.fid.reference_examples) if fid_on else None,
            "samples": int(cfg.fid.samples) if fid_on else None,
        },
        "results": [
            {
                "strategy": r.schedule.strategy, "K": r.schedule.K, "schedule": list(r.schedule.timesteps), "bpd": r.bpd,
                "bpd_sem": r.bpd_sem, "predicted_bpd": cm.bpd(cm.schedule_nats(r.schedule)) if set(r.schedule.timesteps) <= set(g.tolist()) else None,
                "fid": fids.get(i), "terms_bpd": r.terms_bpd,
            }
            for i, r in enumerate(results)
        ],
        "timings": timings,
    }  # fmt: skip
    report.write_evaluation(out_dir, doc, cm, schedules, samples, logger)
    timings["report"] = time.perf_counter() - start
    report.write_json_atomic(out_dir / "results.json", doc)
    print(report.results_table(doc))
    return doc
