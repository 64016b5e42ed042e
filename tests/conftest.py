import math
from pathlib import Path

import pytest
import torch
from torch import nn

from ddpm_schedules import DiffusionModel, NoiseSchedule

FIXTURE = Path(__file__).parent / "fixtures" / "improved_diffusion_tiny"


class TinyNet(nn.Module):
    """A small conv net with a timestep embedding: enough to give t-dependent, non-trivial outputs."""

    def __init__(self, channels: int = 1, out_channels: int | None = None, width: int = 16, T: int = 1000):
        super().__init__()
        self.T = T
        self.inp = nn.Conv2d(channels, width, 3, padding=1)
        self.emb = nn.Linear(16, width)
        self.mid = nn.Conv2d(width, width, 3, padding=1)
        self.out = nn.Conv2d(width, out_channels or channels, 3, padding=1)

    def forward(self, x, timesteps):
        freqs = torch.exp(torch.arange(8, device=x.device) * -math.log(1000) / 8)
        ang = timesteps.to(x.dtype)[:, None] * freqs[None].to(x.dtype)
        e = self.emb(torch.cat([ang.sin(), ang.cos()], 1))
        h = torch.nn.functional.silu(self.inp(x) + e[:, :, None, None])
        h = torch.nn.functional.silu(self.mid(h))
        return self.out(h)


class CountingNet(nn.Module):
    """Wraps a network and counts examples per timestep it was called with."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.calls: dict[int, int] = {}

    def forward(self, x, timesteps):
        for t in timesteps.tolist():
            self.calls[int(t)] = self.calls.get(int(t), 0) + 1
        return self.net(x, timesteps)


def quantized_data(n: int, shape=(1, 4, 4), levels: int = 17, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, levels, (n, *shape), generator=g)
    # smooth-ish images: not all independent noise
    return (idx.float() / (levels - 1) * 2 - 1).clamp(-1, 1)


def tiny_model(var_type="learned_range", mean_type="eps", T=20, schedule="cosine", levels=17, shape=(1, 4, 4), seed=0, clip=True, dtype=torch.float64):
    torch.manual_seed(seed)
    C = shape[0]
    net = TinyNet(C, 2 * C if var_type == "learned_range" else C, T=T).to(dtype)
    return DiffusionModel(
        net,
        NoiseSchedule.named(schedule, T),
        mean_type=mean_type,
        var_type=var_type,
        rescale_timesteps=True,
        clip_denoised=clip,
        levels=levels,
        image_shape=shape,
    )


@pytest.fixture(scope="session")
def reference():
    return torch.load(FIXTURE / "reference.pt", weights_only=False)
