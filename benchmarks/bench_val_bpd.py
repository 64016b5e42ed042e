"""val/bpd (the training-time estimate) against the full-chain bits/dim of evaluate_schedules on the same images.

    python benchmarks/bench_val_bpd.py [--checkpoint <another digits model, e.g. a cosine-4000 one>.ckpt]

Two models: the bundled digits model on the 200 validation digits (17 levels), and the improved-diffusion
fixture UNet (random weights, T = 100, 16x16 RGB) on 64 synthetic 8-bit images. The estimate uses
DiffusionModule's defaults (t <= 10 exactly, 8 geometric strata above); the old one-uniform-t estimate is shown
beside it. ``--checkpoint`` adds a row for another model trained on the digits (its 200 validation digits).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from ddpm_schedules import evaluate_schedules, full_schedule, load_checkpoint, load_improved_diffusion
from ddpm_schedules.costs.moments import MeanSem
from ddpm_schedules.costs.terms import full_chain_estimate, prior_nats, step_terms
from ddpm_schedules.lightning.data import DigitsDataModule, SyntheticDataModule

ROOT = Path(__file__).resolve().parents[1]


@torch.no_grad()
def compare(name: str, model, images: torch.Tensor, batch_size: int = 100) -> None:
    dims = images[0].numel()
    start = time.perf_counter()
    ours, one_t = MeanSem(), MeanSem()
    for b, x0 in enumerate(images.split(batch_size)):
        g = torch.Generator().manual_seed(b)
        ours.update(full_chain_estimate(model, x0, g) / (dims * math.log(2)))
        t = torch.randint(1, model.T + 1, (len(x0),), generator=g)
        x_t = model.q_sample(x0, t, torch.randn(x0.shape, generator=g, dtype=torch.float64)).to(x0.dtype)
        one_t.update(
            (model.T * step_terms(model, x0, x_t, t, model.predict(x_t, t)) + prior_nats(model, x0))
            / (dims * math.log(2))
        )
    estimate_s = time.perf_counter() - start
    start = time.perf_counter()
    full = evaluate_schedules(model, images, [full_schedule(model.T)], batch_size=batch_size, progress=False)[0]
    full_s = time.perf_counter() - start
    (mean, sem), (old, old_sem) = ours.compute(), one_t.compute()
    print(json.dumps({"model": name, "images": len(images), "val_bpd": round(float(mean), 4), "val_bpd_sem": round(float(sem), 4),
                      "full_chain_bpd": round(full.bpd, 4), "full_chain_sem": round(full.bpd_sem, 4),
                      "difference_in_sems": round((float(mean) - full.bpd) / float(sem), 2),
                      "one_uniform_t_bpd": round(float(old), 4), "one_uniform_t_sem": round(float(old_sem), 4),
                      "seconds_estimate": round(estimate_s, 1), "seconds_full_chain": round(full_s, 1)}))  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, default=None)
    a = p.parse_args()
    if a.checkpoint is not None:
        model = load_checkpoint(a.checkpoint)
        compare(f"{a.checkpoint.name} (T = {model.T})", model, DigitsDataModule().tensor("val"))
    digits = load_checkpoint(ROOT / "checkpoints" / "digits.ckpt")
    compare("digits (bundled)", digits, DigitsDataModule().tensor("val"))
    fixture = ROOT / "tests" / "fixtures" / "improved_diffusion_tiny"
    flags = json.loads((fixture / "flags.json").read_text())
    model = load_improved_diffusion(fixture / "model.pt", levels=256, **flags)
    data = SyntheticDataModule(sizes=(64, 64, 64), image_size=16, channels=3, levels=256)
    compare("improved-diffusion fixture UNet, 8-bit", model, data.tensor("test"), batch_size=64)


if __name__ == "__main__":
    main()
