"""Two evaluate.py runs side by side: held-out bits/dim per (strategy, K) with standard errors, and which differ by more than 1 SE.

    python benchmarks/compare_results.py before/results.json after/results.json [--fields]

``--fields`` also lists every results.json field that differs, leaving out timings and paths (cache files);
rows are matched by (strategy, K, sampler), and rows that only one run has are listed as such.

For a whole Hydra multirun (means and standard errors over seeds, per group of overrides) use
``python -m ddpm_schedules.app.sweep multirun/evaluate/<date>_<time>`` instead (docs/evaluate.md, Sweeps).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

SKIP = {"timings", "file", "seconds", "path"}


ROW_KEYS = ("strategy", "K", "sampler")  # rows of results and sample_quality are matched by these, not by position


def _row_key(row: Any) -> tuple | None:
    return tuple(row.get(k) for k in ROW_KEYS) if isinstance(row, dict) and "strategy" in row and "K" in row else None


def differences(a: Any, b: Any, where: str = "") -> list[str]:
    """Paths of the fields that differ, leaving out timings and file paths; rows only in one run are listed as such."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [
            d for k in sorted(set(a) | set(b)) if k not in SKIP for d in differences(a.get(k), b.get(k), f"{where}.{k}")
        ]
    if isinstance(a, list) and isinstance(b, list) and a and b and all(_row_key(r) for r in a + b):
        rows_a, rows_b = {_row_key(r): r for r in a}, {_row_key(r): r for r in b}
        out = [f"{where}{list(k)} only in before" for k in rows_a if k not in rows_b]
        out += [f"{where}{list(k)} only in after" for k in rows_b if k not in rows_a]
        return out + [d for k in rows_a if k in rows_b for d in differences(rows_a[k], rows_b[k], f"{where}{list(k)}")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{where}[{i}]")]
    return [] if a == b else [where]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before")
    parser.add_argument("after")
    parser.add_argument("--fields", action="store_true")
    args = parser.parse_args()
    before, after = (json.load(open(p)) for p in (args.before, args.after))
    rows = {(r["strategy"], r["K"]): r for r in before["results"]}
    print("| strategy | K | before | after | difference | in SE of before |\n|---|---|---|---|---|---|")
    worst = 0.0
    for r in after["results"]:
        b = rows.get((r["strategy"], r["K"]))
        if b is None:
            continue
        diff = r["bpd"] - b["bpd"]
        worst = max(worst, abs(diff) / b["bpd_sem"])
        print(
            f"| {r['strategy']} | {r['K']} | {b['bpd']:.3f} ± {b['bpd_sem']:.3f} | {r['bpd']:.3f} ± {r['bpd_sem']:.3f} | "
            f"{diff:+.4f} | {diff / b['bpd_sem']:+.2f} |"
        )
    print(f"\nlargest |difference| / SE: {worst:.2f}")
    if args.fields:
        changed = differences(before, after)
        print(f"\n{len(changed)} fields differ" + (":\n" + "\n".join(changed) if changed else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
