"""Networks for benchmarks.

`SmallConvNet` is a plain residual conv net (16 blocks of 64-channel 3x3 convolutions at 8x8, about
150 MFLOP per example): a second, heavier network for `bench_cost_matrix.py --net stand-in`.
"""

import math

import torch
from torch import nn


class SmallConvNet(nn.Module):
    """A residual conv net with a timestep embedding, about the cost of the digits UNet per example."""

    def __init__(self, channels: int = 1, out_channels: int = 2, width: int = 64, blocks: int = 16):
        super().__init__()
        self.width = width
        self.inp = nn.Conv2d(channels, width, 3, padding=1)
        self.emb = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.GroupNorm(8, width), nn.SiLU(), nn.Conv2d(width, width, 3, padding=1))
            for _ in range(2 * blocks)
        )
        self.out = nn.Sequential(nn.GroupNorm(8, width), nn.SiLU(), nn.Conv2d(width, out_channels, 3, padding=1))

    def forward(self, x, timesteps):
        half = self.width // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=x.device) / half)
        ang = timesteps.float()[:, None] * freqs[None]
        e = self.emb(torch.cat([ang.cos(), ang.sin()], 1))[:, :, None, None]
        h = self.inp(x)
        for k in range(0, len(self.blocks), 2):
            h = h + self.blocks[k + 1](self.blocks[k](h) + e)
        return self.out(h)
