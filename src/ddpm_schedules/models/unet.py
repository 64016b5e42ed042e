"""The improved-DDPM UNet (Nichol & Dhariwal 2021), state-dict compatible with openai/improved-diffusion.

Module names, parameter shapes and numerics follow improved-diffusion's ``UNetModel``, so its
checkpoints load unchanged: GroupNorm(32) computed in float32, attention with the legacy head
layout (each head owns a contiguous [q; k; v] slice of the qkv channels) and q, k both scaled by
ch^-1/4, softmax in float32, zero-initialised output convolutions.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from ddpm_schedules.models.unet_blocks import (
    NORM_GROUPS,
    AttentionBlock,
    Downsample,
    ResBlock,
    TimestepSequential,
    Upsample,
    conv_nd,
    normalization,
    timestep_embedding,
    zero_module,
)

NUM_CLASSES = (
    1000  # improved-diffusion's script_util.NUM_CLASSES (ImageNet): the label_emb rows of class_cond checkpoints
)
DEFAULT_CHANNEL_MULT = {256: (1, 1, 2, 2, 4, 4), 64: (1, 2, 3, 4), 32: (1, 2, 2, 2)}


class UNetModel(nn.Module):
    """improved-diffusion's UNet: timestep (and class) embedding, ResBlocks, attention at the given ds rates."""

    def __init__(
        self,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int,
        attention_resolutions: Sequence[int],
        dropout: float = 0,
        channel_mult: Sequence[int] = (1, 2, 4, 8),
        conv_resample: bool = True,
        dims: int = 2,
        num_classes: int | None = None,
        use_checkpoint: bool = False,  # gradient checkpointing is a training detail: accepted and ignored
        num_heads: int = 1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
    ):
        super().__init__()
        if model_channels <= 0 or model_channels % NORM_GROUPS:
            raise ValueError(
                f"model_channels (num_channels) must be a positive multiple of {NORM_GROUPS} for GroupNorm(32), got "
                f"{model_channels}"
            )
        if num_res_blocks < 1 or not channel_mult:
            raise ValueError(
                f"need num_res_blocks >= 1 and a non-empty channel_mult, got {num_res_blocks} and {tuple(channel_mult)}"
            )
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        self.in_channels, self.model_channels, self.out_channels = in_channels, model_channels, out_channels
        self.num_res_blocks, self.channel_mult = num_res_blocks, tuple(channel_mult)
        self.attention_resolutions = tuple(attention_resolutions)
        self.num_classes = num_classes
        self.dims = dims

        emb_dim = 4 * model_channels
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, emb_dim)

        def res(ch_in: int, ch_out: int | None = None) -> ResBlock:
            return ResBlock(ch_in, emb_dim, dropout, ch_out, use_scale_shift_norm, dims)

        self.input_blocks = nn.ModuleList(
            [TimestepSequential(conv_nd(dims, in_channels, model_channels, 3, padding=1))]
        )
        skip_chans, ch, ds = [model_channels], model_channels, 1
        for level, mult in enumerate(self.channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [res(ch, mult * model_channels)]
                ch = mult * model_channels
                if ds in self.attention_resolutions:
                    layers.append(AttentionBlock(ch, num_heads))
                self.input_blocks.append(TimestepSequential(*layers))
                skip_chans.append(ch)
            if level != len(self.channel_mult) - 1:
                self.input_blocks.append(TimestepSequential(Downsample(ch, conv_resample, dims)))
                skip_chans.append(ch)
                ds *= 2

        self.middle_block = TimestepSequential(res(ch), AttentionBlock(ch, num_heads), res(ch))

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(self.channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [res(ch + skip_chans.pop(), mult * model_channels)]
                ch = mult * model_channels
                if ds in self.attention_resolutions:
                    layers.append(AttentionBlock(ch, num_heads_upsample))
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch, conv_resample, dims))
                    ds //= 2
                self.output_blocks.append(TimestepSequential(*layers))

        self.out = nn.Sequential(
            normalization(ch), nn.SiLU(), zero_module(conv_nd(dims, ch, out_channels, 3, padding=1))
        )

    @property
    def inner_dtype(self) -> torch.dtype:
        """The dtype of the UNet's torso (its input blocks)."""
        return next(self.input_blocks.parameters()).dtype

    def forward(self, x: Tensor, timesteps: Tensor, y: Tensor | None = None) -> Tensor:
        """[N, C, ...] noisy input and [N] timesteps (and [N] labels if class-conditional) -> [N, out_channels, ...]."""
        if (y is None) != (self.num_classes is None):
            raise ValueError(
                "this UNet is "
                + (
                    "class-conditional: pass labels y"
                    if self.num_classes is not None
                    else "unconditional: do not pass y"
                )
                + " (y must be given if and only if num_classes is set / class_cond=True)"
            )
        factor = 2 ** (len(self.channel_mult) - 1)
        if any(n % factor for n in x.shape[2 + (self.dims == 3) :]):
            raise ValueError(
                f"spatial size {tuple(x.shape[2:])} must be divisible by {factor} for {len(self.channel_mult)} UNet "
                "levels"
            )
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(self.time_embed[0].weight.dtype))
        if y is not None:
            if y.shape != (x.shape[0],):
                raise ValueError(f"labels y must have shape ({x.shape[0]},), got {tuple(y.shape)}")
            emb = emb + self.label_emb(y)
        hs, h = [], x.type(self.inner_dtype)
        for block in self.input_blocks:
            h = block(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h.type(x.dtype))


def _int_tuple(value: str | int | Sequence[int], name: str) -> tuple[int, ...]:
    """'1,2,2' / 16 / (16, 8) -> a tuple of ints; a clear ValueError otherwise."""
    try:
        if isinstance(value, str):
            return tuple(int(v) for v in value.replace(" ", "").split(",") if v)
        if isinstance(value, int):
            return (value,)
        return tuple(int(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be comma-separated integers like '16,8', got {value!r}") from None


def create_unet(
    image_size: int,
    num_channels: int,
    num_res_blocks: int,
    channel_mult: str | Sequence[int] = "",
    attention_resolutions: str | Sequence[int] = "16,8",
    num_heads: int = 4,
    num_heads_upsample: int = -1,
    use_scale_shift_norm: bool = True,
    dropout: float = 0.0,
    learn_sigma: bool = False,
    class_cond: bool = False,
    in_channels: int = 3,
) -> UNetModel:
    """improved-diffusion's ``create_model``: flags -> UNetModel (plus explicit channel_mult and in_channels)."""
    mult = _int_tuple(channel_mult, "channel_mult")
    if not mult:
        if image_size not in DEFAULT_CHANNEL_MULT:
            raise ValueError(
                f"improved-diffusion derives channel_mult only for image_size {sorted(DEFAULT_CHANNEL_MULT)}; "
                f"for image_size {image_size} pass channel_mult explicitly, e.g. channel_mult='1,2,2'"
            )
        mult = DEFAULT_CHANNEL_MULT[image_size]
    factor = 2 ** (len(mult) - 1)
    if image_size % factor:
        raise ValueError(
            f"image_size {image_size} must be divisible by {factor} for channel_mult {','.join(map(str, mult))}"
        )
    resolutions = _int_tuple(attention_resolutions, "attention_resolutions")
    if any(r <= 0 for r in resolutions):
        raise ValueError(
            f"attention_resolutions must be positive resolutions like '16,8', got {attention_resolutions!r}"
        )
    return UNetModel(
        in_channels=in_channels,
        model_channels=num_channels,
        out_channels=2 * in_channels if learn_sigma else in_channels,
        num_res_blocks=num_res_blocks,
        attention_resolutions=tuple(image_size // r for r in resolutions),
        dropout=dropout,
        channel_mult=mult,
        num_classes=NUM_CLASSES if class_cond else None,
        num_heads=num_heads,
        num_heads_upsample=num_heads_upsample,
        use_scale_shift_norm=use_scale_shift_norm,
    )
