"""The building blocks of improved-diffusion's UNet: embeddings, GroupNorm32, ResBlock, resampling.

Names, shapes and numerics are improved-diffusion's and guided-diffusion's (see unet.py): GroupNorm
computed in float32, ResBlocks that can resample (guided-diffusion's ``resblock_updown``). Attention
is in unet_attention.py.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NORM_GROUPS = 32


def timestep_embedding(timesteps: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding [N, dim]: cos then sin of t * max_period^(-i/half), zero-padded to odd dim."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half).to(timesteps.device)
    args = timesteps[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


def conv_nd(dims: int, *args, **kwargs) -> nn.Module:
    """A 1-D, 2-D or 3-D convolution."""
    if dims not in (1, 2, 3):
        raise ValueError(f"dims must be 1, 2 or 3, got {dims!r}")
    return (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1](*args, **kwargs)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a module's parameters in place (output convs start as the identity residual)."""
    for p in module.parameters():
        p.detach().zero_()
    return module


def convert_convs(module: nn.Module, src: torch.dtype, dst: torch.dtype) -> None:
    """Cast the parameters of ``module``'s convolutions that are ``src`` to ``dst`` in place (guided-diffusion's
    ``convert_module_to_f16`` / ``_f32``: only convolutions change, GroupNorm and Linear layers keep theirs)."""
    for conv in module.modules():
        if isinstance(conv, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            for p in (conv.weight, conv.bias):
                if p is not None and p.dtype == src:
                    p.data = p.data.to(dst)


def float32_state(module: nn.Module, state: dict[str, Tensor], prefix: str, local_metadata: dict) -> None:
    """A state-dict hook: while ``module.torso_fp16``, its float16 tensors are saved as float32 (as loaded)."""
    if getattr(module, "torso_fp16", False):
        for key, value in state.items():
            if key.startswith(prefix) and value.dtype == torch.float16 and not isinstance(value, nn.Parameter):
                state[key] = value.float()


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in at least float32 (float64 for a float64 model) and cast back to the input dtype."""

    def forward(self, x: Tensor) -> Tensor:
        dtype = torch.promote_types(torch.promote_types(x.dtype, self.weight.dtype), torch.float32)
        out = F.group_norm(x.to(dtype), self.num_groups, self.weight.to(dtype), self.bias.to(dtype), self.eps)
        return out.type(x.dtype)


def normalization(channels: int) -> GroupNorm32:
    """The UNet's normalization layer: GroupNorm with 32 groups."""
    return GroupNorm32(NORM_GROUPS, channels)


class TimestepBlock(nn.Module):
    """A block whose forward takes the timestep embedding as a second argument."""

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class TimestepSequential(nn.Sequential):
    """A Sequential that hands the timestep embedding to the children that take it."""

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


class Upsample(nn.Module):
    """Nearest-neighbour x2 upsampling (inner two dims for 3-D), then an optional 3x3 conv."""

    def __init__(self, channels: int, use_conv: bool, dims: int = 2):
        super().__init__()
        self.channels, self.dims = channels, dims
        if use_conv:
            self.conv = conv_nd(dims, channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        if self.dims == 3:
            x = F.interpolate(x, (x.shape[2], x.shape[3] * 2, x.shape[4] * 2), mode="nearest")
        else:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if hasattr(self, "conv") else x


class Downsample(nn.Module):
    """x2 downsampling: a stride-2 3x3 conv, or average pooling when ``use_conv`` is false."""

    def __init__(self, channels: int, use_conv: bool, dims: int = 2):
        super().__init__()
        self.channels = channels
        stride = 2 if dims != 3 else (1, 2, 2)
        if use_conv:
            self.op = conv_nd(dims, channels, channels, 3, stride=stride, padding=1)
        else:
            self.op = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)[dims - 1](kernel_size=stride, stride=stride)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class ResBlock(TimestepBlock):
    """Residual block conditioned on the timestep embedding (additive or scale-shift norm).

    ``up`` / ``down``: the block also resamples x2 (guided-diffusion's ``resblock_updown``): nearest
    upsampling or average pooling of both paths, the main one between its first activation and its
    first convolution. The resamplers ``h_upd`` and ``x_upd`` hold no parameters.
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: int | None = None,
        use_scale_shift_norm: bool = False,
        dims: int = 2,
        up: bool = False,
        down: bool = False,
    ):
        super().__init__()
        if up and down:
            raise ValueError("a ResBlock resamples up or down, not both")
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(
            normalization(channels), nn.SiLU(), conv_nd(dims, channels, out_channels, 3, padding=1)
        )
        self.updown = up or down
        if self.updown:
            resample = Upsample if up else Downsample
            self.h_upd, self.x_upd = resample(channels, False, dims), resample(channels, False, dims)
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels)
        )
        self.out_layers = nn.Sequential(
            normalization(out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            zero_module(conv_nd(dims, out_channels, out_channels, 3, padding=1)),
        )
        self.skip_connection = nn.Identity() if out_channels == channels else conv_nd(dims, channels, out_channels, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        if self.updown:
            h = self.in_layers[2](self.h_upd(self.in_layers[:2](x)))
            x = self.x_upd(x)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)
        emb_out = emb_out.reshape(*emb_out.shape, *([1] * (h.ndim - emb_out.ndim)))
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h
