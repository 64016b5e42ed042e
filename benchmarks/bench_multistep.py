"""What dp_dpmpp adds to dp_ode: the Gram matrices, the two-step costs and the three-state DP (no network pass).

    python benchmarks/bench_multistep.py [--points 200] [--trajectories 64] [--dims 64,12288] [--budgets 16,64]

Synthetic stored points stand in for the teacher's (the cost does not depend on their values): per trajectory
the Gram matrix of its 2N + 1 vectors of D dimensions (O(N^2 D)) and the [N+1]^3 distances from it (O(N^3),
independent of D); then the DP for every budget up to K (O(K N^3)). Prints seconds per stage and the totals for
the given number of trajectories.
"""

from __future__ import annotations

import argparse
import time

import torch

from ddpm_schedules.costs.multistep import multistep_distance_sums, trajectory_gram
from ddpm_schedules.models.diffusion import NoiseSchedule
from ddpm_schedules.schedules.dp_multistep import optimal_multistep_paths


def timed(fn, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--points", type=int, default=200, help="N, the ODE grid's size (cost.ode.grid 5 at T = 1000)")
    p.add_argument("--trajectories", type=int, default=64)
    p.add_argument("--dims", default="64,12288", help="D per image: 64 for the 8x8 digits, 12288 for ImageNet 64x64")
    p.add_argument("--budgets", default="16,64")
    p.add_argument("--chunk", type=int, default=64, help="trajectories per call (the ODE matrix's chunk)")
    a = p.parse_args()
    N, T = a.points, 1000
    grid = torch.cat([torch.zeros(1, dtype=torch.long), torch.linspace(T / N, T, N).round().long()])
    ab = NoiseSchedule.named("cosine", T).ab
    print(f"N = {N}, {a.trajectories} trajectories, {torch.get_num_threads()} threads")
    for D in map(int, a.dims.split(",")):
        xs, x0s = (
            torch.randn(N + 1, a.chunk, D, dtype=torch.float64),
            torch.randn(N + 1, a.chunk, D, dtype=torch.float64),
        )
        gram = timed(lambda: trajectory_gram(xs, x0s)) / a.chunk
        print(f"D = {D}: Gram {gram * 1e3:.1f} ms per trajectory, {gram * a.trajectories:.2f} s for all")
    G = trajectory_gram(xs, x0s)  # a chunk of trajectories at once, as estimate_ode_matrix passes them
    sums = timed(lambda: multistep_distance_sums(ab, grid, G), repeat=1) / a.chunk
    print(
        f"two-step distances (any D, {a.chunk} trajectories per call): {sums:.3f} s per trajectory, {sums * a.trajectories:.1f} s for all"
    )
    C1, C2 = torch.rand(N + 1, N + 1, dtype=torch.float64), torch.rand(N + 1, N + 1, N + 1, dtype=torch.float64)
    optimal_multistep_paths(C1[:8, :8], C2[:8, :8, :8], [2])  # compile
    for K in map(int, a.budgets.split(",")):
        dp = timed(lambda: optimal_multistep_paths(C1, C2, list(range(1, K + 1))), repeat=1)
        print(f"three-state DP, every K <= {K}: {dp:.2f} s")


if __name__ == "__main__":
    main()
