"""The UNet's self-attention: improved-diffusion's legacy head layout and guided-diffusion's new order.

Both layouts hold the same [N, 3 H C, L] qkv channels of one 1x1 convolution; they differ only in
how those channels are cut into heads (`qkv_attention`). Numerics are those of the references:
q and k each scaled by C^-1/4 there, the same product 1/sqrt(C) as SDPA's ``scale`` here, softmax
accumulated in float32 (SDPA's CPU and CUDA kernels do so for half inputs).
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

from ddpm_schedules.models.unet_blocks import normalization, zero_module


def qkv_attention(qkv: Tensor, heads: int = 1, new_order: bool = False) -> Tensor:
    """[N, 3 H C, L] -> [N, H C, L]: softmax(q.k / sqrt(C)) v for each of the H heads, one fused kernel.

    Legacy order (improved-diffusion, guided-diffusion's ``QKVAttentionLegacy``): the heads are split
    first, each owning a contiguous [q; k; v] slice. New order (guided-diffusion's ``QKVAttention``,
    ``use_new_attention_order``): q, k and v are split first, then each into its heads.
    """
    n, width, length = qkv.shape
    if width % (3 * heads):
        raise ValueError(f"{width} qkv channels cannot be split into q, k, v of {heads} heads")
    ch = width // (3 * heads)
    if new_order:
        q, k, v = (part.reshape(n * heads, ch, length) for part in qkv.chunk(3, dim=1))
    else:
        q, k, v = qkv.reshape(n * heads, 3 * ch, length).split(ch, dim=1)
    q, k, v = (part.transpose(1, 2) for part in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, scale=1 / math.sqrt(ch))
    return out.transpose(1, 2).reshape(n, heads * ch, length)


def attention_heads(channels: int, num_heads: int = 1, num_head_channels: int = -1) -> int:
    """The number of heads: ``num_heads``, or channels // num_head_channels when that is not -1 (guided-diffusion)."""
    if num_head_channels == -1:
        if num_heads < 1 or channels % num_heads:
            raise ValueError(f"attention over {channels} channels cannot be split into num_heads = {num_heads} heads")
        return num_heads
    if num_head_channels < 1 or channels % num_head_channels:
        raise ValueError(
            f"attention over {channels} channels cannot be split into heads of num_head_channels = "
            f"{num_head_channels} channels (use a divisor of {channels}, or -1 for num_heads heads)"
        )
    return channels // num_head_channels


class AttentionBlock(nn.Module):
    """Multi-head self-attention over all spatial positions, with a residual connection."""

    def __init__(self, channels: int, num_heads: int = 1, num_head_channels: int = -1, new_order: bool = False):
        super().__init__()
        self.num_heads = attention_heads(channels, num_heads, num_head_channels)
        self.new_order = new_order
        self.norm = normalization(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = zero_module(nn.Conv1d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        h = qkv_attention(self.qkv(self.norm(x)), self.num_heads, self.new_order)
        return (x + self.proj_out(h)).reshape(b, c, *spatial)
