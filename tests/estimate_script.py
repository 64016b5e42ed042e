"""A slow cost-matrix estimation to interrupt: argv = partial_path. Prints nothing; the test kills it."""

import sys
import time

import torch
from conftest import TinyNet, quantized_data

from ddpm_schedules import DiffusionModel, NoiseSchedule, estimate_cost_matrix
from ddpm_schedules.storage.resume import PartialFile


class Slow(torch.nn.Module):
    def __init__(self, net, delay):
        super().__init__()
        self.net, self.delay = net, delay

    def forward(self, x, t):
        time.sleep(self.delay)
        return self.net(x, t)


def make_model(delay: float = 0.0) -> DiffusionModel:
    torch.manual_seed(0)
    net = TinyNet(1, 2, T=12).double()
    return DiffusionModel(
        Slow(net, delay), NoiseSchedule.named("cosine", 12), var_type="learned_range", levels=17, image_shape=(1, 4, 4)
    )


def make_data() -> torch.Tensor:
    return quantized_data(10)


if __name__ == "__main__":
    estimate_cost_matrix(
        make_model(delay=0.1),
        make_data(),
        seed=3,
        batch_size=4,
        progress=False,
        partial=PartialFile(sys.argv[1], every=1),
    )
