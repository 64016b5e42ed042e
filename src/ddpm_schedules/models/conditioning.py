"""Class labels and classifier-free guidance: which labels a network takes and how a guided output is formed.

Conventions, in one place:
- a class-conditional network takes labels 0..num_classes-1; with label dropout in training it also takes
  ``null_class`` = num_classes, the "no label" class (the extra class index of DiT in diffusers, whose null label
  is 1000 for ImageNet's 1000 classes). improved-diffusion's and ADM's checkpoints have no null class.
- guidance scale s (diffusers' ``guidance_scale``): eps = eps(x, null) + s (eps(x, y) - eps(x, null)); s = 1 is
  the conditional model unguided, s = 0 the unconditional one. Ho & Salimans (2021) write the same prediction as
  (1 + w) eps(x, y) - w eps(x, null), so s = 1 + w. The variance channels of a learned-variance network are the
  conditional pass's (as GLIDE and ADM's guided samplers keep them).
- examples drawn from noise (teacher trajectories, samples) take the class-balanced label i mod num_classes of
  their global index i, so every schedule and sampler sees the same (x_T, y) pairs for any batch or process count.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ddpm_schedules.storage.errors import ParameterError


@dataclass(frozen=True)
class LabeledImages:
    """Images x0 [N, C, H, W] with their class labels [N]: the data of a class-conditional model (slices like a
    tensor, so shards and rounds of examples keep each image's label)."""

    images: Tensor
    labels: Tensor

    def __post_init__(self) -> None:
        if self.labels.shape != (len(self.images),) or self.labels.is_floating_point():
            raise ValueError(
                f"labels must be {len(self.images)} integers, one per image, got {tuple(self.labels.shape)} "
                f"{self.labels.dtype}"
            )

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: slice) -> "LabeledImages":
        return LabeledImages(self.images[index], self.labels[index])

    def split(self, size: int) -> list[tuple[Tensor, Tensor]]:
        """(images, labels) batches of at most ``size``."""
        return list(zip(self.images.split(size), self.labels.split(size)))


def check_labels(y: Tensor | None, batch: int, num_classes: int | None) -> Tensor | None:
    """``y`` [batch] integer labels in 0..num_classes-1 for a class-conditional model, None for an unconditional."""
    if num_classes is None:
        if y is not None:
            raise ParameterError("labels were given for an unconditional model; pass {y}=None")
        return None
    if y is None:
        raise ParameterError(
            "this model is class-conditional ({num_classes} classes): pass {y}, each example's label",
            num_classes=num_classes,
        )
    if y.shape != (batch,) or y.is_floating_point():
        raise ParameterError(
            "{y} must be {batch} integer labels, one per example, got {shape} {dtype}",
            batch=batch,
            shape=tuple(y.shape),
            dtype=y.dtype,
        )
    if batch and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        bad = int(y[(y < 0) | (y >= num_classes)][0])
        raise ParameterError(
            "label {value} is out of range for a model with {num_classes} classes (0..{last}); "
            "check the data's labels against the checkpoint's classes",
            value=bad,
            num_classes=num_classes,
            last=num_classes - 1,
        )
    return y.long()


def check_guidance(scale: float, num_classes: int | None, null_class: int | None) -> float:
    """A guidance scale the model can use: 1 always; another needs a conditional model with a null class."""
    scale = float(scale)
    if not torch.isfinite(torch.tensor(scale)) or scale < 0:
        raise ParameterError("{scale} = {value!r} must be a finite number >= 0 (1: no guidance)", value=scale)
    if scale != 1 and num_classes is None:
        raise ParameterError(
            "{scale} = {value!r} needs a class-conditional model; this one is unconditional (use 1)",
            value=scale,
        )
    if scale != 1 and null_class is None:
        raise ParameterError(
            "{scale} = {value!r} needs a model trained with label dropout (a null class); this checkpoint has none "
            "(use 1)",
            value=scale,
        )
    return scale


def guided_output(cond: Tensor, uncond: Tensor, scale: float, channels: int) -> Tensor:
    """Classifier-free guidance of raw outputs: mean part uncond + s (cond - uncond), variance channels cond's."""
    mean = uncond[:, :channels] + scale * (cond[:, :channels] - uncond[:, :channels])
    return torch.cat([mean, cond[:, channels:]], dim=1)


def balanced_labels(indices: Tensor, num_classes: int | None) -> Tensor | None:
    """The label of the noise draw with global index i: i mod num_classes (None for an unconditional model)."""
    return None if num_classes is None else indices.long() % num_classes
