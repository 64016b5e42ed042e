"""Checkpoints written atomically: a kill while saving never leaves a half-written last.ckpt."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning_fabric.plugins import TorchCheckpointIO

from ddpm_schedules.storage.files import atomic_torch_save


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch.save checkpoints, written to a temporary file and renamed over the target."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options (got {storage_options!r})")
        atomic_torch_save(checkpoint, path)
