"""A slow cost-matrix estimation to interrupt: argv = partial_path [cond]. Prints nothing; the test kills it.

With ``cond`` the model is the tiny class-conditional UNet and the data carry labels (the conditional ELBO)."""

import sys
import time

import torch
from conftest import TinyNet, cond_model, quantized_data

from ddpm_schedules import DiffusionModel, NoiseSchedule, estimate_cost_matrix
from ddpm_schedules.models.conditioning import LabeledImages
from ddpm_schedules.storage.resume import PartialFile


class Slow(torch.nn.Module):
    def __init__(self, net, delay):
        super().__init__()
        self.net, self.delay = net, delay

    def forward(self, x, t, *labels):
        time.sleep(self.delay)
        return self.net(x, t, *labels)


def make_model(delay: float = 0.0) -> DiffusionModel:
    torch.manual_seed(0)
    net = TinyNet(1, 2, T=12).double()
    return DiffusionModel(
        Slow(net, delay), NoiseSchedule.named("cosine", 12), var_type="learned_range", levels=17, image_shape=(1, 4, 4)
    )


def make_data() -> torch.Tensor:
    return quantized_data(10)


def make_cond_model(delay: float = 0.0) -> DiffusionModel:
    """The tiny conditional UNet (20 steps, 10 classes and a null class), float64."""
    model = cond_model()
    model.net = Slow(model.net, delay)
    return model


def make_cond_data(seed: int = 0) -> LabeledImages:
    """10 digits-sized images, each with its own label (a permutation of 0..9 by ``seed``)."""
    labels = torch.randperm(10, generator=torch.Generator().manual_seed(seed))
    return LabeledImages(quantized_data(10, shape=(1, 8, 8)), labels)


if __name__ == "__main__":
    cond = sys.argv[2:] == ["cond"]
    estimate_cost_matrix(
        make_cond_model(delay=0.1) if cond else make_model(delay=0.1),
        make_cond_data() if cond else make_data(),
        seed=3,
        batch_size=4,
        progress=False,
        partial=PartialFile(sys.argv[1], every=1),
    )
