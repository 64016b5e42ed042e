"""A reduced-precision network pass (precision=bf16) against float32: the change in every DP schedule's predicted bits/dim.

    python benchmarks/bench_precision.py [--precision bf16] [--grid log:140]

The matrix is estimated twice on the 200 validation digits with the bundled model, once per precision;
for each budget's float32 DP schedule the change of its predicted bits/dim is set against the Monte Carlo
standard error of that prediction (the spread of the per-example totals of its pairs).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ddpm_schedules import estimate_cost_matrix, evaluate_schedules, load_checkpoint, optimal_schedules
from ddpm_schedules.costs.grids import candidate_grid
from ddpm_schedules.lightning.data import DigitsDataModule

ROOT = Path(__file__).resolve().parents[1]
BUDGETS = [8, 16, 32, 64, 128]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--precision", default="bf16")
    p.add_argument("--grid", default="log:140")
    a = p.parse_args()
    model = load_checkpoint(ROOT / "checkpoints" / "digits.ckpt")
    data = DigitsDataModule().tensor("val")
    grid = candidate_grid(a.grid, model.T)
    timings, matrices = {}, {}
    for precision in ("32", a.precision):
        model.set_precision(precision)
        start = time.perf_counter()
        matrices[precision] = estimate_cost_matrix(model, data, grid=grid, batch_size=200, progress=False)
        timings[precision] = round(time.perf_counter() - start, 1)
    model.set_precision("32")
    paths = optimal_schedules(matrices["32"], BUDGETS)
    sems = [r.bpd_sem for r in evaluate_schedules(model, data, list(paths.values()), batch_size=200, progress=False)]
    rows = []
    for (K, sch), sem in zip(paths.items(), sems):
        fp32, low = (matrices[p].bpd(matrices[p].schedule_nats(sch)) for p in ("32", a.precision))
        rows.append({"K": K, "fp32_bpd": round(fp32, 5), f"{a.precision}_bpd": round(low, 5), "change": f"{low - fp32:+.2e}",
                     "mc_sem": round(sem, 4), "change_over_sem": round(abs(low - fp32) / sem, 4)})  # fmt: skip
    print(json.dumps({"grid": a.grid, "seconds": timings, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
