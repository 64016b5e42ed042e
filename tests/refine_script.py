"""A slow refinement or precision-rounds estimate to interrupt: argv = refine|precision, partial_path, log_path.

Each forward pass appends its timestep to the log (the columns this process estimated); the test kills it.
"""

import sys
import time

import torch
from conftest import quantized_data, tiny_model

from ddpm_schedules.costs.precision import estimate_to_precision
from ddpm_schedules.costs.refine import RefineSettings, refine_cost_matrices
from ddpm_schedules.storage.resume import PartialFile

REFINE = {
    "budgets": [2, 3, 5],
    "settings": RefineSettings(coarse="log:8", window=2, max_rounds=6),
    "objectives": ("elbo", "mse"),
    "seed": 4,
    "batch_size": 3,
}  # rounds of 8, 17, 4 and 1 new columns
PRECISION = {
    "budgets": [2, 4],
    "target_sem": 1e-9,
    "seed": 1,
    "batch_size": 4,
    "first": 4,
}  # unreachable: rounds of 4, 4, 8, 16 examples


class Logged(torch.nn.Module):
    """Sleeps ``delay`` per call (so that a kill lands mid-round) and logs each call's timestep to ``log``."""

    def __init__(self, net, delay: float = 0.0, log: str | None = None):
        super().__init__()
        self.net, self.delay, self.log = net, delay, log

    def forward(self, x, t):
        time.sleep(self.delay)
        if self.log:
            with open(self.log, "a") as f:
                f.write(f"{float(t[0])}\n")
        return self.net(x, t)


def refine_case(delay: float = 0.0, log: str | None = None):
    model = tiny_model("learned_range", T=60)
    model.net = Logged(model.net, delay, log)
    return model, quantized_data(6)


def precision_case(delay: float = 0.0, log: str | None = None):
    model = tiny_model("fixed_large", T=12)
    model.net = Logged(model.net, delay, log)
    return model, quantized_data(32, seed=3)


def run_refine(model, data, partial=None):
    return refine_cost_matrices(model, data, progress=False, partial=partial, **REFINE)


def run_precision(model, data, partial=None):
    return estimate_to_precision(model, data, progress=False, partial=partial, **PRECISION)


if __name__ == "__main__":
    mode, partial, log = sys.argv[1:4]
    if mode == "refine":
        run_refine(*refine_case(0.05, log), PartialFile(partial, every=1))
    else:
        run_precision(*precision_case(0.05, log), PartialFile(partial, every=1))
