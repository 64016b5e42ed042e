"""The exact DP against the classic numpy loop, and at the paper's largest size.

    python benchmarks/bench_dp.py

1. T = 1000, every budget K = 1..1000: `optimal_paths` and the classic loop
   (for k: M = E[:, None] + C; E = M.min(0); ptr = M.argmin(0)) must give the same paths and
   costs; prints both times and the speed-up.
2. T = 4000, K <= 1000: wall time and the peak memory of the tables.
"""

import sys
import time
from pathlib import Path

import numpy as np

from ddpm_schedules import optimal_paths

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from references import classic_paths  # tests/references.py: the reference the tests use too


def cost_like(n: int, seed: int = 0) -> np.ndarray:
    """A cost-matrix-shaped test matrix: longer jumps cost more, plus noise."""
    rng = np.random.default_rng(seed)
    s, t = np.meshgrid(np.arange(n + 1), np.arange(n + 1), indexing="ij")
    return np.abs(t - s) ** 1.5 / n + rng.exponential(0.05, (n + 1, n + 1))


def main() -> None:
    optimal_paths(cost_like(20), range(1, 21))  # compile (cached on disk after the first run)
    C = cost_like(1000)
    t_ours, t_ref = [], []
    for _ in range(3):  # best of 3 each, interleaved
        start = time.perf_counter()
        ours = optimal_paths(C, range(1, 1001))
        t_ours.append(time.perf_counter() - start)
        start = time.perf_counter()
        ref = classic_paths(C, 1000)
        t_ref.append(time.perf_counter() - start)
    t_ours, t_ref = min(t_ours), min(t_ref)
    assert ours == ref, "paths or costs differ from the classic loop"
    print(
        f"T=1000, K=1..1000: optimal_paths {t_ours:.3f} s, classic numpy loop {t_ref:.2f} s, speed-up {t_ref / t_ours:.1f}x, identical"
    )
    C = cost_like(4000)
    start = time.perf_counter()
    optimal_paths(C, range(1, 1001))
    t_big = time.perf_counter() - start
    tables = 4001 * 1001 * (8 + 4) / 2**20
    print(
        f"T=4000, K=1..1000: optimal_paths {t_big:.2f} s (tables {tables:.0f} MiB + the matrix {C.nbytes / 2**20:.0f} MiB)"
    )


if __name__ == "__main__":
    main()
