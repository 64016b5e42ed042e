"""The GPU figures of docs/performance.md and docs/scaling.md, measured in one run (benchmarks/gpu_check.sh runs it).

    python benchmarks/gpu_check.py --out outputs/gpu_check/gpu_check.json           # on a CUDA machine
    python benchmarks/gpu_check.py --smoke --out /tmp/gpu_check.json                # the same steps, tiny, on the CPU

1. Forward passes per second of the ImageNet-64 UNet (conf/unet/imagenet64.yaml, learned variances, random
   weights) at batch 256: float32, bf16 autocast, and bf16 with torch.compile.
2. The ELBO cost matrix of 256 synthetic 64x64 uint8 images at T = 4,000 on the `dense:10,20` grid (every
   step to 10, then every 20th), and refinement from `log:140` (window 4, budgets 8..64) on the same images.
3. GPU-hours for docs/scaling.md's settings (16,384 examples): the measured seconds per pass (one example
   at one column) times the columns of the full grid and of the refined grids. The refined column counts
   are the fractions measured on the digits models (19.8% for budgets to 64, 50.3% to 256): refinement
   on random weights says nothing about where a trained model's paths go.

``--smoke`` runs every step with the tiny UNet (8x8), T = 40, 8 examples and batch 8 on the CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch
import yaml

from ddpm_schedules import estimate_cost_matrix
from ddpm_schedules.costs.grids import candidate_grid
from ddpm_schedules.costs.refine import RefineSettings, refine_cost_matrices
from ddpm_schedules.lightning.module import DiffusionModule

CONF = Path(__file__).resolve().parents[1] / "conf"
FULL = {"unet": "imagenet64", "T": 4000, "batch": 256, "iters": 20, "examples": 256, "grid": "dense:10,20", "coarse": "log:140",
        "window": 4, "budgets": [8, 16, 32, 64], "levels": 256}  # fmt: skip
SMOKE = {"unet": "tiny", "T": 40, "batch": 8, "iters": 3, "examples": 8, "grid": "dense:4,4", "coarse": "log:12", "window": 1,
         "budgets": [2, 4], "levels": 17}  # fmt: skip
# docs/scaling.md's settings: examples, and the columns of each grid at T = 4,000 (refined: the digits models' measured fractions)
SCALING_EXAMPLES = 16384
SCALING_GRIDS = {"full grid (4,000 columns)": 4000, "refined, budgets 8..64 (19.8%: 790 columns)": 790,
                 "refined, budgets 8..256 (50.3%: 2,010 columns)": 2010}  # fmt: skip


def build_model(size: dict, device: torch.device):
    flags = {
        **yaml.safe_load((CONF / "unet" / f"{size['unet']}.yaml").read_text()),
        "noise_schedule": "cosine",
        "diffusion_steps": size["T"],
    }
    return DiffusionModule(flags, loss="hybrid", levels=size["levels"]).model.to(device).eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def passes_per_second(model, size: dict, device: torch.device) -> float:
    """Examples per second through `DiffusionModel.predict` at random timesteps (two warm-up calls, which compile)."""
    C, H, W = model.image_shape
    x = torch.randn(size["batch"], C, H, W, device=device)
    t = torch.randint(1, size["T"] + 1, (size["batch"],), device=device)
    for _ in range(2):
        model.predict(x, t)
    sync(device)
    start = time.perf_counter()
    for _ in range(size["iters"]):
        model.predict(x, t)
    sync(device)
    return size["batch"] * size["iters"] / (time.perf_counter() - start)


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU")
    p.add_argument("--precision", default="bf16", help="of the cost-matrix passes (32, bf16 or 16)")
    p.add_argument("--out", type=Path, default=Path("outputs/gpu_check/gpu_check.json"))
    a = p.parse_args()
    if not a.smoke and not torch.cuda.is_available():
        print(
            "gpu_check.py: no CUDA device is visible (torch.cuda.is_available() is False); run it on a GPU machine, or pass --smoke"
        )
        return 2
    size, device = (SMOKE, torch.device("cpu")) if a.smoke else (FULL, torch.device("cuda"))
    begin = time.perf_counter()
    rates = {}
    for name, precision, compiled in (("fp32", "32", False), ("bf16", "bf16", False), ("bf16_compiled", "bf16", True)):
        model = build_model(size, device).set_precision(precision).compile_network(compiled)
        rates[name], seconds = timed(lambda: passes_per_second(model, size, device))
        print(f"passes/s {name}: {rates[name]:.1f} ({seconds:.1f} s with warm-up)", flush=True)
    model = build_model(size, device).set_precision(a.precision)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, size["levels"], (size["examples"], *model.image_shape), generator=g)
    data = (images.float() / (size["levels"] - 1) * 2 - 1).to(device)
    grid = candidate_grid(size["grid"], size["T"])
    cm, matrix_s = timed(lambda: estimate_cost_matrix(model, data, grid=grid, batch_size=size["batch"], progress=False))
    columns = len(grid)
    print(f"cost matrix: {size['examples']} examples x {columns} columns in {matrix_s:.1f} s", flush=True)
    settings = RefineSettings(coarse=size["coarse"], window=size["window"])
    (refined, rounds), refine_s = timed(
        lambda: refine_cost_matrices(model, data, size["budgets"], settings, batch_size=size["batch"], progress=False)
    )
    refined_columns = refined["elbo"].grid.numel() - 1
    print(f"refined: {refined_columns} columns after {len(rounds)} rounds in {refine_s:.1f} s", flush=True)
    per_pass = matrix_s / (size["examples"] * columns)
    hours = {name: SCALING_EXAMPLES * cols * per_pass / 3600 for name, cols in SCALING_GRIDS.items()}
    doc = {
        "smoke": a.smoke,
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "unet": size["unet"], "T": size["T"], "batch": size["batch"],
        "passes_per_second": {k: round(v, 1) for k, v in rates.items()},
        "cost_matrix": {"examples": size["examples"], "grid": size["grid"], "columns": columns, "precision": a.precision,
                        "seconds": round(matrix_s, 2), "seconds_per_pass": per_pass, "finite": bool(torch.isfinite(cm.mean[cm.mean < math.inf]).all())},
        "refined": {"coarse": size["coarse"], "window": size["window"], "budgets": size["budgets"], "columns": refined_columns,
                    "rounds": len(rounds), "seconds": round(refine_s, 2)},
        "gpu_hours": {"examples": SCALING_EXAMPLES, "T": 4000, "hours": {k: round(v, 3) for k, v in hours.items()}},
        "wall_seconds": round(time.perf_counter() - begin, 1),
    }  # fmt: skip
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(doc, indent=1))
    print(f"\nGPU-hours at T = 4,000 for {SCALING_EXAMPLES:,} examples ({doc['device']}, {a.precision} passes):")
    for name, h in hours.items():
        print(f"  {name}: {h:.2f}")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
