"""Hydra's instantiate with the user's errors as one line, the logger, and the end of a W&B run."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ddpm_schedules.app.cli import user_error
from ddpm_schedules.storage.provenance import git_commit, package_version


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


def build_logger(node: Any, job_type: str | None = None, config: DictConfig | None = None):
    """The logger group's Lightning logger (False for none). A W&B run gets its name, group, tags and job type from
    the Hydra job where the config leaves them null, and starts now with ``config`` (resolved) as its config."""
    if not node:
        return False
    wandb = "WandbLogger" in str(node.get("_target_", ""))
    if wandb:
        configure_wandb_mode()
        node = OmegaConf.merge(node, {k: v for k, v in run_identity(job_type).items() if node.get(k) is None})
    logger = build(node)
    if wandb and config is not None:
        logger.log_hyperparams(run_config(config))  # the run starts here, before the first stage
    return logger


def hydra_job() -> dict[str, Any]:
    """The Hydra job this process runs: its overrides, output and sweep directory and number ({} outside Hydra)."""
    if not HydraConfig.initialized():
        return {}
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    return {
        "name": hc.job.name,
        "overrides": list(hc.overrides.task),
        "override_dirname": hc.job.override_dirname,
        "output_dir": hc.runtime.output_dir,
        "sweep_dir": str(hc.sweep.dir) if multirun else None,
        "num": int(hc.job.num) if multirun else None,
    }


def run_identity(job_type: str | None) -> dict[str, Any]:
    """W&B's name (the override string), group (the sweep directory's name), tags (the overrides) and job type."""
    job = hydra_job()
    out: dict[str, Any] = {"job_type": job_type}
    if job:
        out["name"] = job["override_dirname"] or Path(job["output_dir"]).name
        out["group"] = Path(job["sweep_dir"]).name if job["sweep_dir"] else None  # as app.sweep's summary run
        out["tags"] = [o[:64] for o in job["overrides"]][:50] or None  # W&B's limits: 64 characters a tag
    return out


def run_config(cfg: DictConfig) -> dict[str, Any]:
    """The whole config, resolved where it can be, with the Hydra job, the package version and its git commit."""
    try:
        plain = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException:  # ${hydra:...} outside a Hydra app (the compose API): keep the interpolations
        plain = OmegaConf.to_container(cfg, resolve=False)
    job = hydra_job()
    return {
        **plain,
        "overrides": job.get("overrides", []),
        "hydra_job": job,
        "package_version": package_version(),
        "git_commit": git_commit(),
    }


def provenance() -> dict[str, Any]:
    """results.json's "run": the overrides, the Hydra job's directories, the package version and git commit."""
    job = hydra_job()
    return {
        "overrides": job.get("overrides", []),
        "output_dir": job.get("output_dir"),
        "sweep_dir": job.get("sweep_dir"),
        "job_num": job.get("num"),
        "package_version": package_version(),
        "git_commit": git_commit(),
    }


def finish_wandb(exit_code: int = 0) -> None:
    """End the W&B run of this job (failed when ``exit_code`` is not 0), so the next in-process multirun job gets
    its own."""
    if "wandb" in sys.modules:  # a job that never logged to W&B does not import it here
        import wandb

        if wandb.run is not None:
            wandb.finish(exit_code=exit_code)
