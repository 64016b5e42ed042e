"""Sample quality on RGB data: real-Inception FID per (strategy, sampler, K) for a model trained on photo patches.

    python train.py experiment=photos16                          # the model (16x16 patches of scikit-learn's photos)
    python benchmarks/bench_sample_quality.py --checkpoint outputs/train/<run>/checkpoints/last.ckpt [--samples 200]

It runs evaluate.py itself (so every number is the product's): the ELBO, MSE and ODE matrices on the val
patches, the DP schedules and the baselines, then for samplers ddim and dpmpp at K = 4, 6, 8, 10, 16 the FID
of ``--samples`` samples against the Inception statistics of the test patches (a region of the photos no
training patch touches), with bootstrap standard errors, and the distance of DDIM's samples to a 200-step
DDIM teacher from the same x_T. Prints a markdown table of FID ± SE (and writes it next to results.json).
FID from a few hundred samples is biased upwards (Chong & Forsyth 2020): compare rows, not absolute values. The
floor at the same sample size is printed below the table: the FID of ``--samples`` real train and val patches
against the same statistics (``--floor-only`` prints it alone, from an earlier run's fid_reference_stats.npz).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STRATEGIES = "dp,dp_mse,dp_ode,dp_dpmpp,dp_ode_oss,even,quadratic,karras,logsnr"


def table(results: dict) -> str:
    """FID ± SE per (sampler, strategy) row and K column; the teacher distance of DDIM below it."""
    rows = results["sample_quality"]
    budgets = sorted({r["K"] for r in rows})
    lines = [
        "| sampler | strategy | " + " | ".join(f"K={k}" for k in budgets) + " |",
        "|---|---|" + "---|" * len(budgets),
    ]
    for sampler in dict.fromkeys(r["sampler"] for r in rows):
        for strategy in dict.fromkeys(r["strategy"] for r in rows):
            cell = {r["K"]: r for r in rows if r["sampler"] == sampler and r["strategy"] == strategy}
            lines.append(f"| {sampler} | {strategy} | " + " | ".join(
                f"{cell[k]['fid']:.1f} ± {cell[k]['fid_sem']:.1f}" if k in cell else "" for k in budgets) + " |")  # fmt: skip
    lines += [
        "",
        "| teacher distance (ddim) | " + " | ".join(f"K={k}" for k in budgets) + " |",
        "|---|" + "---|" * len(budgets),
    ]
    for strategy in dict.fromkeys(r["strategy"] for r in rows):
        cell = {r["K"]: r for r in rows if r["sampler"] == "ddim" and r["strategy"] == strategy}
        lines.append(
            f"| {strategy} | "
            + " | ".join(f"{cell[k]['teacher_distance']:.3f}" if k in cell else "" for k in budgets)
            + " |"
        )
    return "\n".join(lines)


def floor(stats: Path, samples: int, bootstrap: int = 20) -> str:
    """FID ± SE of ``samples`` real train and val patches against the run's reference statistics: what a perfect
    sampler would score at this sample size (train: the model's own data; val: another region of the photos)."""
    import torch

    from ddpm_schedules.lightning.data import PhotoPatchesDataModule
    from ddpm_schedules.sampling.frechet import feature_network, features_of, frechet_distance, load_reference_stats

    reference = load_reference_stats(stats, "inception")
    network, data = feature_network("inception"), PhotoPatchesDataModule()
    data.setup()
    lines = ["| real patches | FID |", "|---|---|"]
    for split in ("train", "val"):
        rows = torch.randperm(len(data.splits[split]), generator=torch.Generator().manual_seed(0))[:samples].numpy()
        images = data.splits[split].read(rows)[0].double() / 127.5 - 1
        fid, sem = frechet_distance(reference, features_of(network, images), bootstrap=bootstrap)
        lines.append(f"| {samples} {split} patches | {fid:.1f} ± {sem:.1f} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, required=True, help="a train.py checkpoint of experiment=photos16")
    p.add_argument("--samples", type=int, default=200, help="samples per (strategy, sampler, K)")
    p.add_argument("--reference", type=int, default=1000, help="test patches for the Inception reference statistics")
    p.add_argument("--budgets", default="4,6,8,10,16")
    p.add_argument("--grid", default="4", help="cost.grid of the matrices (4: every 4th of the T = 1000 steps)")
    p.add_argument("--samplers", default="ddim,dpmpp")
    p.add_argument("--strategies", default=STRATEGIES)
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench_sample_quality")
    p.add_argument(
        "--floor-only", action="store_true", help="only the real patches' FID against --out's reference statistics"
    )
    a = p.parse_args()
    if a.floor_only:
        print(floor(a.out / "fid_reference_stats.npz", a.samples))
        return 0
    if not a.checkpoint.is_file():
        print(
            f"--checkpoint {a.checkpoint} does not exist; train one with: python train.py experiment=photos16",
            file=sys.stderr,
        )
        return 2
    cmd = [sys.executable, str(ROOT / "evaluate.py"), f"model.path={a.checkpoint}", "data=photos", "logger=none",
           f"eval.strategies=[{a.strategies}]", f"eval.samplers=[{a.samplers}]", f"eval.sample_budgets=[{a.budgets}]",
           "eval.budgets=[4,8,16]", f"cost.grid={a.grid}", "fid.features=inception", f"fid.samples={a.samples}", "fid.reference_split=test",
           f"fid.reference_examples={a.reference}", "sample.chunk=100", f"eval.teacher_samples={min(64, a.samples)}", f"hydra.run.dir={a.out}"]  # fmt: skip
    start = time.perf_counter()
    if subprocess.run(cmd, env={**os.environ, "WANDB_MODE": "offline"}, check=False).returncode:
        print("evaluate.py failed (its message is above)", file=sys.stderr)
        return 1
    seconds = time.perf_counter() - start
    results = json.loads((a.out / "results.json").read_text())
    text = (
        table(results)
        + "\n\n"
        + floor(a.out / "fid_reference_stats.npz", a.samples)
        + f"\n\n{a.samples} samples per cell against {a.reference} test patches; {seconds / 60:.1f} min in all.\n"
    )
    (a.out / "sample_quality.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
