"""Analytic-DPM's variance on a fixed-variance model: held-out bits/dim of DP schedules with the analytic
variance, with the model's own fixed variance, and of the even and analytic_ot schedules; and how much Gamma
estimated on 200 vs 1,000 examples moves the predicted DP bits/dim.

    python train.py experiment=digits_fixed            # L_simple, fixed_large, linear betas, T = 1000
    python benchmarks/bench_analytic.py --checkpoint outputs/train/<run>/checkpoints/last.ckpt

The matrices and Gamma come from the 200 validation digits (cost seed 0), bits/dim from the 200 test
digits (seed 1), every schedule in one union pass per variance rule. Gamma on 1,000 examples comes from
the first 1,000 training digits.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ddpm_schedules import estimate_cost_matrix, evaluate_schedules, even_schedule, load_checkpoint, optimal_schedules
from ddpm_schedules.lightning.data import DigitsDataModule
from ddpm_schedules.schedules.analytic import analytic_ot_schedule

BUDGETS = [8, 16, 32, 64]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--gamma-examples", type=int, default=1000)
    p.add_argument("--budgets", default=",".join(map(str, BUDGETS)))
    p.add_argument("--out", type=Path, default=None, help="also write the numbers as JSON here")
    a = p.parse_args()
    budgets = [int(k) for k in a.budgets.split(",")]
    model = load_checkpoint(a.checkpoint)
    own = model.var_type
    dm = DigitsDataModule()
    val, test, train = dm.tensor("val"), dm.tensor("test"), dm.tensor("train", a.gamma_examples)
    start = time.perf_counter()

    fixed_cm = estimate_cost_matrix(model, val, batch_size=200)
    fixed_dp = optimal_schedules(fixed_cm, budgets)
    evens = [even_schedule(model.T, K) for K in budgets]
    fixed = evaluate_schedules(model, test, list(fixed_dp.values()) + evens, seed=1, batch_size=200)

    model.use_variance("analytic")
    analytic_cm = estimate_cost_matrix(model, val, batch_size=200)  # Gamma from the same passes
    gamma200 = analytic_cm.gamma
    analytic_dp = optimal_schedules(analytic_cm, budgets)
    ot = [analytic_ot_schedule(model.schedule, gamma200, K, analytic_cm.dims) for K in budgets]
    model.use_variance("analytic", gamma200)
    analytic = evaluate_schedules(model, test, list(analytic_dp.values()) + ot + evens, seed=1, batch_size=200)
    # the predicted values again, per example (the cost examples and noise): their standard errors
    predicted = evaluate_schedules(model, val, list(analytic_dp.values()), seed=0, batch_size=200)

    model.use_variance("analytic")
    gamma_more = estimate_cost_matrix(model, train, batch_size=200).gamma
    model.use_variance("analytic", gamma_more)
    more_cm = estimate_cost_matrix(model, val, batch_size=200)  # the same examples and noise, the other Gamma
    seconds = time.perf_counter() - start

    n = len(budgets)
    rows = []
    for i, K in enumerate(budgets):
        p200, p_more = (
            analytic_cm.bpd(analytic_dp[K].predicted_nats),
            more_cm.bpd(optimal_schedules(more_cm, [K])[K].predicted_nats),
        )
        rows.append({
            "K": K,
            "dp_analytic": _r(analytic[i]), "analytic_ot": _r(analytic[n + i]), "even_analytic": _r(analytic[2 * n + i]),
            f"dp_{own}": _r(fixed[i]), f"even_{own}": _r(fixed[n + i]),
            "predicted_dp_bpd_gamma200": p200, f"predicted_dp_bpd_gamma{a.gamma_examples}": p_more,
            "predicted_dp_bpd_sem": predicted[i].bpd_sem, "predicted_dp_bpd_recomputed": predicted[i].bpd,
            "dp_analytic_schedule": list(analytic_dp[K].timesteps), "analytic_ot_schedule": list(ot[i].timesteps),
        })  # fmt: skip
    out = {
        "checkpoint": str(a.checkpoint),
        "own_var_type": own,
        "T": model.T,
        "seconds": round(seconds, 1),
        "rows": rows,
    }
    print(json.dumps(out, indent=1))
    if a.out:
        a.out.write_text(json.dumps(out, indent=1))
    print(f"| K | DP, analytic | analytic_ot | even, analytic | DP, {own} | even, {own} |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        cells = [r["dp_analytic"], r["analytic_ot"], r["even_analytic"], r[f"dp_{own}"], r[f"even_{own}"]]
        print(f"| {r['K']} | " + " | ".join(f"{c['bpd']:.3f} ± {c['bpd_sem']:.3f}" for c in cells) + " |")
    print(f"\n| K | predicted DP bpd, Gamma on 200 | on {a.gamma_examples} | difference | its SE |")
    print("|---|---|---|---|---|")
    for r in rows:
        g200, gm = r["predicted_dp_bpd_gamma200"], r[f"predicted_dp_bpd_gamma{a.gamma_examples}"]
        print(f"| {r['K']} | {g200:.4f} | {gm:.4f} | {gm - g200:+.4f} | {r['predicted_dp_bpd_sem']:.4f} |")


def _r(result) -> dict:
    return {"bpd": result.bpd, "bpd_sem": result.bpd_sem}


if __name__ == "__main__":
    main()
