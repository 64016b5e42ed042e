"""Coarse-to-fine refinement on the bundled digits model against the full-grid DP, with forward passes counted.

    python benchmarks/bench_refine.py [--coarse log:140] [--window 1] [--max-passes 50000]
    python benchmarks/bench_refine.py --checkpoint <a cosine-4000 digits model>.ckpt --budgets 8,16,32,64 --window 4 --max-passes 200000

The matrix is estimated on the 200 validation digits (cost.seed 0), as evaluate.py does; both sets of DP
schedules are then evaluated on the 200 test digits (eval.seed 1) in one pass, so their held-out
bits/dim share examples and noise.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ddpm_schedules import estimate_cost_matrix, evaluate_schedules, load_checkpoint, optimal_schedules
from ddpm_schedules.costs.matrix import CostMatrix
from ddpm_schedules.costs.refine import RefineSettings, refine_cost_matrices
from ddpm_schedules.lightning.data import DigitsDataModule

ROOT = Path(__file__).resolve().parents[1]
BUDGETS = [8, 16, 32, 64, 128]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--coarse", default="log:140")
    p.add_argument("--window", type=int, default=1)
    p.add_argument(
        "--bisect", action="store_true", help="also add the midpoints to each path timestep's grid neighbours"
    )
    p.add_argument("--max-passes", type=int, default=50_000, help="25%% of the full grid's 200,000")
    p.add_argument("--checkpoint", type=Path, default=ROOT / "checkpoints" / "digits.ckpt")
    p.add_argument("--budgets", default=",".join(map(str, BUDGETS)))
    p.add_argument("--max-rounds", type=int, default=10)
    p.add_argument(
        "--full-cache", type=Path, default=None, help="keep the full-grid matrix in this file (reused when it exists)"
    )
    a = p.parse_args()
    budgets = [int(k) for k in a.budgets.split(",")]
    model = load_checkpoint(a.checkpoint)
    dm = DigitsDataModule()
    cost, test = dm.tensor("val"), dm.tensor("test")
    start = time.perf_counter()
    matrices, history = refine_cost_matrices(
        model,
        cost,
        budgets,
        RefineSettings(
            coarse=a.coarse, window=a.window, bisect=a.bisect, max_passes=a.max_passes, max_rounds=a.max_rounds
        ),
        batch_size=200,
    )
    refine_s = time.perf_counter() - start
    refined = optimal_schedules(matrices["elbo"], budgets)
    start = time.perf_counter()
    if a.full_cache is not None and a.full_cache.exists():
        full_cm = CostMatrix.load(a.full_cache)
    else:
        full_cm = estimate_cost_matrix(model, cost, batch_size=200)
        if a.full_cache is not None:
            full_cm.save(a.full_cache)
    full = optimal_schedules(full_cm, budgets)
    full_s = time.perf_counter() - start
    results = evaluate_schedules(model, test, list(refined.values()) + list(full.values()), seed=1, batch_size=200)
    rows = {K: (r, f) for K, r, f in zip(budgets, results[: len(budgets)], results[len(budgets) :])}
    passes, full_passes = history[-1]["passes"], model.T * len(cost)
    print(json.dumps({"checkpoint": str(a.checkpoint), "T": model.T, "coarse": a.coarse, "window": a.window, "bisect": a.bisect, "rounds": [{k: h[k] for k in ("grid_size", "new_columns", "passes", "stopped") if k in h} for h in history],
                      "passes": passes, "full_grid_passes": full_passes, "fraction": round(passes / full_passes, 3),
                      "seconds_refined": round(refine_s, 1), "seconds_full_grid": round(full_s, 1)}, indent=1))  # fmt: skip
    print("| K | refined DP | full-grid DP | difference | max(SE, 0.005) |")
    for K, (r, f) in rows.items():
        print(
            f"| {K} | {r.bpd:.4f} ± {r.bpd_sem:.4f} | {f.bpd:.4f} ± {f.bpd_sem:.4f} | {r.bpd - f.bpd:+.4f} | {max(f.bpd_sem, 0.005):.4f} |"
        )


if __name__ == "__main__":
    main()
