"""Pre-trained DDPMs from diffusers folders, and sampling with diffusers' own scheduler along our schedules.

Needs the optional extra: ``pip install 'ddpm-schedules[diffusers]'``. Nothing is fetched from a hub:
``path`` is a local folder with ``unet/`` and ``scheduler/`` (a saved pipeline has both).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ddpm_schedules.models.diffusion import NoiseSchedule
from ddpm_schedules.models.model import DiffusionModel

PREDICTION_TYPES = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}
VARIANCE_TYPES = ("fixed_small", "fixed_large", "learned_range")


def _require_diffusers():
    try:
        import diffusers
    except ImportError:
        raise ValueError("diffusers models need the optional extra: pip install 'ddpm-schedules[diffusers]'") from None
    return diffusers


class UNetOutput(nn.Module):
    """A diffusers UNet2DModel as ``net(x, timesteps[, y]) -> tensor`` (diffusers feeds the 0-based index; a
    class-conditional UNet takes the labels as ``class_labels``)."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x: Tensor, timesteps: Tensor, y: Tensor | None = None) -> Tensor:
        return self.unet(x, timesteps, class_labels=y).sample


def class_conventions(config: Any, null_class: int | None) -> dict[str, int | None]:
    """num_classes and null_class of a UNet2DModel config: a class-conditional UNet has ``num_class_embeds`` rows of a
    label lookup (``class_embed_type`` null); with ``null_class`` (its last row) it was trained with label dropout."""
    rows = config.get("num_class_embeds")
    if config.get("class_embed_type") is not None:
        raise ValueError(
            f"the UNet's class_embed_type={config['class_embed_type']!r} takes no integer labels; only the label "
            "lookup of num_class_embeds (class_embed_type null) is supported"
        )
    if rows is None:
        if null_class is not None:
            raise ValueError(f"model.null_class = {null_class} but the UNet is unconditional (no num_class_embeds)")
        return {"num_classes": None, "null_class": None}
    if null_class is not None and null_class != rows - 1:
        raise ValueError(
            f"model.null_class = {null_class} must be the label lookup's last row, {rows - 1} (num_class_embeds = "
            f"{rows}), or null for a UNet trained without label dropout"
        )
    return {"num_classes": rows if null_class is None else rows - 1, "null_class": null_class}


def scheduler_conventions(config: dict[str, Any]) -> dict[str, Any]:
    """The conventions of docs/design.md §1 from a diffusers scheduler config; refuses what has no DDPM ELBO."""
    name = config.get("_class_name", "scheduler")
    if "num_train_timesteps" not in config or ("beta_schedule" not in config and config.get("trained_betas") is None):
        raise ValueError(
            f"{name} has no discrete beta schedule (num_train_timesteps, beta_schedule), so no DDPM ELBO; use a "
            "DDPM-family scheduler config"
        )
    prediction = config.get("prediction_type", "epsilon")
    if prediction not in PREDICTION_TYPES:
        raise ValueError(f"{name} predicts {prediction!r}; supported prediction_type values: {list(PREDICTION_TYPES)}")
    variance = config.get("variance_type", "fixed_small")
    if variance not in VARIANCE_TYPES:
        raise ValueError(f"{name} has variance_type={variance!r}; supported: {VARIANCE_TYPES}")
    if config.get("thresholding"):
        raise ValueError(
            f"{name} uses dynamic thresholding, which makes p(x_s | x_t) non-Gaussian; set thresholding=false"
        )
    if config.get("clip_sample", True) and float(config.get("clip_sample_range", 1.0)) != 1.0:
        raise ValueError(
            f"{name} clips x0 to ±{config['clip_sample_range']}; only clip_sample_range=1 matches data in [-1, 1]"
        )
    return {
        "mean_type": PREDICTION_TYPES[prediction],
        "var_type": variance,
        "clip_denoised": bool(config.get("clip_sample", True)),
    }


def load_diffusers(path: str | Path, levels: int = 256, null_class: int | None = None) -> DiffusionModel:
    """A local diffusers folder (``unet/`` + ``scheduler/``, e.g. a saved DDPMPipeline) as a `DiffusionModel`; a
    class-conditional UNet (``num_class_embeds``) takes labels, and ``null_class`` names the "no label" row its
    training dropped labels to (classifier-free guidance: models/conditioning.py)."""
    diffusers = _require_diffusers()
    path = Path(path)
    if not (path / "unet").is_dir() or not (path / "scheduler").is_dir():
        raise ValueError(
            f"{str(path)!r} is not a diffusers folder with unet/ and scheduler/; save one with "
            "pipeline.save_pretrained(path)"
        )
    config_file = path / "scheduler" / "scheduler_config.json"
    try:
        config = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read the scheduler config {str(config_file)!r} ({type(e).__name__})") from None
    conventions = scheduler_conventions(config)
    # diffusers' own alpha_bar table: models were trained on it (float32 values, so 1 - alpha_bar carries
    # float32 rounding at small t); betas re-derived from it reproduce it exactly in float64
    ab = diffusers.DDPMScheduler.from_config(config).alphas_cumprod.double()
    betas = 1 - ab / torch.cat([torch.ones(1, dtype=ab.dtype), ab[:-1]])
    unet = diffusers.UNet2DModel.from_pretrained(path / "unet").eval()
    channels = unet.config.in_channels
    want = 2 * channels if conventions["var_type"] == "learned_range" else channels
    if unet.config.out_channels != want:
        raise ValueError(
            f"the UNet has {unet.config.out_channels} output channels but "
            f"variance_type={config.get('variance_type')!r} needs {want}; the scheduler config does not belong to "
            "this UNet"
        )
    size = unet.config.sample_size
    size = size if isinstance(size, int) else size[0]
    model = DiffusionModel(
        UNetOutput(unet),
        NoiseSchedule(betas),
        rescale_timesteps=False,
        levels=levels,
        image_shape=(channels, size, size),
        **conventions,
        **class_conventions(unet.config, null_class),
    ).eval()
    if unet.config.get("time_embedding_type", "positional") == "learned":  # an nn.Embedding of the step index
        model.timestep_input = "index"
    return model
