"""Loaders for pre-trained models: improved-diffusion `.pt` checkpoints with their flags."""

from __future__ import annotations

from pathlib import Path

from .model import DiffusionModel


def load_improved_diffusion(path: str | Path, **flags) -> DiffusionModel:
    """Load an improved-diffusion checkpoint with its training flags (image_size, num_channels, ...)."""
    raise NotImplementedError(
        "loading improved-diffusion checkpoints needs the improved-DDPM UNet, which is not part of this release yet"
    )
