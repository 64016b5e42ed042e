"""Hydra's instantiate with the user's errors as one line, the logger, and the end of a W&B run."""

from __future__ import annotations

import os
import sys
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate

from ddpm_schedules.app.cli import user_error


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


def build_logger(node: Any):
    """The logger group's Lightning logger (False for none)."""
    if not node:
        return False
    if "WandbLogger" in str(node.get("_target_", "")):
        configure_wandb_mode()
    return build(node)


def finish_wandb() -> None:
    """End the W&B run of this job, so the next in-process multirun job gets its own."""
    if "wandb" in sys.modules:  # a job that never logged to W&B does not import it here
        import wandb

        if wandb.run is not None:
            wandb.finish()
