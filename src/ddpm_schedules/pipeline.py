"""The one place that reads Hydra configs and wires the pieces; entry points call these and get metrics back."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import WeightAveraging

from .lightning.callbacks import ScheduleMonitor
from .lightning.data import ImageDataModule


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
    return instantiate(cfg.logger)


def build_callbacks(cfg: DictConfig) -> list[pl.Callback]:
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    # the monitor must see the averaged weights: run it before weight averaging swaps them back
    return sorted(callbacks, key=lambda c: isinstance(c, WeightAveraging) and not isinstance(c, ScheduleMonitor))


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
    datamodule: ImageDataModule = instantiate(cfg.data)
    flags = model_flags(cfg)
    check_data_matches_model(datamodule, flags)
    if cfg.get("ckpt_path"):
        check_resume_checkpoint(cfg.ckpt_path, flags)
    module = instantiate(cfg.module, flags=flags, levels=datamodule.levels)
    logger = build_logger(cfg)
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=build_callbacks(cfg), logger=logger)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    finally:
        if isinstance(logger, pl.loggers.WandbLogger):
            import wandb

            wandb.finish()  # one W&B run per job, also between in-process multirun jobs
    return {k: float(v) for k, v in trainer.callback_metrics.items()}
