"""Optimal schedules for a closed-form denoiser of scikit-learn's digits, in seconds on a CPU.

    python examples/digits_demo.py [--T 1000] [--budgets 2,4,8,16,32,64]

The "network" is the exact posterior mean E[x_0 | x_t] of a Gaussian fitted to the training
split, so the demo needs no training and no download. It estimates the cost matrix on the
validation split, runs the DP for every budget and reports held-out bits/dim on the test split
for the DP, even and quadratic schedules next to the full T-step chain.
"""

from __future__ import annotations

import argparse

import torch
from sklearn.datasets import load_digits
from torch import nn

from ddpm_schedules import (
    DiffusionModel,
    NoiseSchedule,
    estimate_cost_matrix,
    evaluate_schedules,
    even_schedule,
    full_schedule,
    optimal_schedules,
    quadratic_schedule,
)


def digits_splits() -> dict[str, torch.Tensor]:
    """The 1,797 8x8 digits in [-1, 1] (17 levels), split 1397 / 200 / 200 by a fixed permutation."""
    x = torch.tensor(load_digits().images, dtype=torch.float32)[:, None] / 16 * 2 - 1
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return {"train": x[perm[:1397]], "val": x[perm[1397:1597]], "test": x[perm[1597:]]}


class GaussianDenoiser(nn.Module):
    """eps-prediction of the exact denoiser for x_0 ~ N(mu, Sigma): a linear map per timestep."""

    def __init__(self, train: torch.Tensor, schedule: NoiseSchedule):
        super().__init__()
        flat = train.flatten(1).double()
        self.register_buffer("mu", flat.mean(0))
        lam, U = torch.linalg.eigh(torch.cov(flat.T) + 1e-4 * torch.eye(flat.shape[1], dtype=torch.float64))
        self.register_buffer("lam", lam)
        self.register_buffer("U", U)
        self.register_buffer("ab", schedule.ab)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        ab = self.ab[timesteps.long() + 1][:, None]  # the network sees 0-based indices
        xt = x.flatten(1).double()
        centred = (xt - ab.sqrt() * self.mu) @ self.U
        x0 = self.mu + (centred * ab.sqrt() * self.lam / (ab * self.lam + 1 - ab)) @ self.U.T
        return ((xt - ab.sqrt() * x0) / (1 - ab).sqrt()).reshape(x.shape).to(x.dtype)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--T", type=int, default=1000)
    p.add_argument("--budgets", default="2,4,8,16,32,64")
    a = p.parse_args()
    budgets = [int(k) for k in a.budgets.split(",")]
    data = digits_splits()
    schedule = NoiseSchedule.named("linear", a.T)
    model = DiffusionModel(
        GaussianDenoiser(data["train"], schedule), schedule, var_type="fixed_large", levels=17, image_shape=(1, 8, 8)
    )
    cm = estimate_cost_matrix(model, data["val"], seed=0)
    dp = optimal_schedules(cm, budgets)
    schedules = [s for K in budgets for s in (dp[K], even_schedule(a.T, K), quadratic_schedule(a.T, K))]
    results = evaluate_schedules(model, data["test"], schedules + [full_schedule(a.T)], seed=1)
    full = results[-1]
    print(
        f"\nheld-out bits/dim (test split, {full.count} digits); full {a.T}-step chain: {full.bpd:.3f} ± {full.bpd_sem:.3f}"
    )
    print(f"{'K':>4} {'dp':>8} {'even':>8} {'quadratic':>10} {'dp predicted (val)':>19}   dp schedule")
    for i, K in enumerate(budgets):
        r_dp, r_even, r_quad = results[3 * i : 3 * i + 3]
        shown = ",".join(map(str, r_dp.schedule.timesteps[:6])) + ("..." if K > 6 else "")
        print(f"{K:>4} {r_dp.bpd:8.3f} {r_even.bpd:8.3f} {r_quad.bpd:10.3f} {r_dp.predicted_bpd:19.3f}   {shown}")


if __name__ == "__main__":
    main()
