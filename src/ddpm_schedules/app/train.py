"""train.py's job: TrainSettings from the config, then Lightning's Trainer.fit; the final logged metrics back."""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig
from pytorch_lightning.callbacks import WeightAveraging
from pytorch_lightning.utilities.exceptions import SIGTERMException

from ddpm_schedules.app.build import build, build_logger, finish_wandb, hydra_job
from ddpm_schedules.app.keys import config_keys, count, flag, get, seed
from ddpm_schedules.lightning.callbacks import ScheduleMonitor
from ddpm_schedules.lightning.data import ImageDataModule
from ddpm_schedules.models.checkpoints import UntrustedCheckpointError, read_checkpoint
from ddpm_schedules.storage.resume import Preempted

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainSettings:
    """train.py's config, typed and checked; the groups Hydra instantiates (data, module, trainer, ...) stay config
    nodes. Every key is read without a fallback value: conf/train.yaml and its groups hold the defaults."""

    seed: int
    flags: dict[
        str, Any
    ]  # improved-diffusion's flags: the unet group (network) + the diffusion group (process, conventions)
    output_dir: Path
    ckpt_path: str | None = None
    trust_checkpoint: bool = False
    data: Any = None
    module: Any = None
    trainer: Any = None
    logger: Any = None
    callbacks: dict[str, Any] = field(default_factory=dict)  # the callbacks group's nodes by name, in order


def train_settings(cfg: DictConfig) -> TrainSettings:
    """train.py's config as settings, every check that needs no data or model first."""
    count(cfg, "data.batch_size")
    flags = {**get(cfg, "unet"), **get(cfg, "diffusion")}
    ckpt_path = get(cfg, "ckpt_path")
    trust = flag(cfg, "trust_checkpoint")
    if ckpt_path:
        check_resume_checkpoint(str(ckpt_path), flags, trust)
    callbacks = {name: node for name, node in (cfg.get("callbacks") or {}).items() if node is not None}
    return TrainSettings(
        seed=seed(cfg, "seed"),
        flags=flags,
        output_dir=Path(get(cfg, "paths.output_dir")),
        ckpt_path=ckpt_path or None,
        trust_checkpoint=trust,
        data=cfg.data,
        module=cfg.module,
        trainer=cfg.trainer,
        logger=cfg.get("logger"),
        callbacks=callbacks,
    )


def train(cfg: DictConfig) -> dict[str, float]:
    """Train (or resume, with ``ckpt_path``) and return the final logged metrics."""
    s = train_settings(cfg)
    pl.seed_everything(s.seed, workers=True)
    with config_keys("data"):  # the data module's arguments are the data group's keys; its files are read here
        datamodule: ImageDataModule = build(s.data)
        check_data_matches_model(datamodule, s.flags)
    with config_keys("module"):
        module = build(s.module, flags=s.flags, levels=datamodule.levels)
    logger = build_logger(s.logger, "train", cfg)
    trainer: pl.Trainer = build(
        s.trainer, callbacks=build_callbacks(s.callbacks), logger=logger, **job_devices(s.trainer)
    )
    exit_code = 1  # a crash or a stop marks the W&B run failed, with what it had logged
    try:
        with config_keys(**fit_keys(s.callbacks)):
            trainer.fit(module, datamodule=datamodule, ckpt_path=s.ckpt_path, weights_only=not s.trust_checkpoint)
        exit_code = 0
    except SIGTERMException:
        last = s.output_dir / "checkpoints" / "last.ckpt"
        message = f"stopped by SIGTERM at step {trainer.global_step}; resume with ckpt_path={last}"
        log.warning(message)
        raise Preempted(message) from None
    finally:
        finish_wandb(exit_code)
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


def job_devices(trainer: Any) -> dict[str, Any]:
    """Job j of a Hydra multirun on one machine with n visible GPUs (joblib) trains on GPU j mod n when the trainer
    asks for one GPU; {} otherwise (Lightning's own choice)."""
    num = hydra_job().get("num")
    if num is None or not torch.cuda.is_available() or trainer.get("accelerator") not in ("gpu", "cuda", "auto"):
        return {}
    if trainer.get("devices") not in (1, "1", None) or trainer.get("num_nodes", 1) != 1:
        return {}
    return {"devices": [num % torch.cuda.device_count()]}


def build_callbacks(nodes: Mapping[str, Any]) -> list[pl.Callback]:
    callbacks = []
    for name, node in nodes.items():
        with config_keys(f"callbacks.{name}"):  # a callback's arguments are its node's keys
            callbacks.append(build(node))
    # the monitor must see the averaged weights, and the final checkpoint the raw ones beside them:
    # both run before weight averaging swaps back (on_validation_epoch_end) or copies over (on_train_end)
    return sorted(callbacks, key=lambda c: isinstance(c, WeightAveraging))


def fit_keys(callbacks: Mapping[str, Any]) -> dict[str, str]:
    """What trainer.fit's errors name by parameter: the module's ``lr`` and the schedule monitor's arguments (the
    monitor checks its grid, strategies and budgets against T when the fit starts)."""
    keys = {"lr": "module.lr"}
    for name, node in callbacks.items():
        if str(node.get("_target_", "")).endswith(f".{ScheduleMonitor.__name__}"):
            keys |= {arg: f"callbacks.{name}.{arg}" for arg in inspect.signature(ScheduleMonitor).parameters}
    return keys


def check_data_matches_model(datamodule: ImageDataModule, flags: dict[str, Any]) -> None:
    want = (int(flags.get("in_channels", 3)), int(flags["image_size"]), int(flags["image_size"]))
    if tuple(datamodule.image_shape) != want:
        raise ValueError(
            f"the data has images of shape {tuple(datamodule.image_shape)} but the model is built for {want}; "
            "set unet.image_size / unet.in_channels to match the data"
        )


def check_resume_checkpoint(path: str, flags: dict[str, Any], trust_checkpoint: bool = False) -> None:
    """A checkpoint to resume from must exist, load as data (unless trusted) and have been trained with the same
    model flags."""
    if not Path(path).is_file():
        raise ValueError(f"ckpt_path = {path!r} does not exist; point it at <run dir>/checkpoints/last.ckpt")
    try:
        saved = dict(read_checkpoint(path, trust_checkpoint)["hyper_parameters"]["flags"])  # opt-in named as its key
    except UntrustedCheckpointError:
        raise
    except Exception:
        raise ValueError(f"ckpt_path = {path!r} is not a checkpoint written by train.py") from None
    differ = [
        f"{k}={saved.get(k)!r} (config: {v!r})" for k, v in flags.items() if k in saved and str(saved[k]) != str(v)
    ]
    if differ:
        raise ValueError(
            f"ckpt_path = {path!r} was trained with {', '.join(differ)}; resume with the flags it was trained with"
        )
