"""What one Adam step of the end-to-end schedule optimiser (costs/end_to_end.py) costs, measured per network size,
and what a whole optimisation then takes.

    python benchmarks/bench_opt.py [--only digits,cifar10,imagenet64] [--device cpu|cuda] [--sampler dpmpp]

For each network: the bundled digits model, and improved-diffusion's CIFAR-10 and ImageNet-64 UNets (random
weights: the cost does not depend on them), one optimiser step is timed as the optimiser takes it: the K-step
differentiable sampler on n draws, the distance to the teacher's samples, backward into the timesteps. The seconds
per draw and step then give a whole run: ``steps`` Adam steps on ``train`` draws plus a held-out check
(forward only, train + held-out draws) every ``check_every`` steps, at the defaults of conf/evaluate.yaml's
cost.opt and K = 10 (the teacher's 200-step trajectories come on top: 2 x 64 x 200 forward passes).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from ddpm_schedules.costs.end_to_end import params_from_schedule, schedule_from_params
from ddpm_schedules.models.checkpoints import load_checkpoint
from ddpm_schedules.models.flags import model_from_flags
from ddpm_schedules.sampling.continuous import CONTINUOUS_SAMPLERS
from ddpm_schedules.schedules.schedule import even_schedule

ROOT = Path(__file__).resolve().parents[1]
DRAWS = {"digits": 64, "cifar10": 4, "imagenet64": 1}  # draws timed per step on the CPU (the whole run: 64)


def model_for(name: str, device: torch.device):
    if name == "digits":
        return load_checkpoint(ROOT / "checkpoints" / "digits.ckpt").to(device)
    import yaml

    flags = {
        **yaml.safe_load((ROOT / "conf" / "unet" / f"{name}.yaml").read_text()),
        **yaml.safe_load((ROOT / "conf" / "diffusion" / "cosine.yaml").read_text()),
    }
    return model_from_flags(flags).to(device)


def seconds_per_draw(model, sampler: str, K: int, n: int, device: torch.device, repeats: int) -> tuple[float, float]:
    """(forward + backward, forward only) seconds per draw of one K-step pass, the median of ``repeats``."""
    run = CONTINUOUS_SAMPLERS[sampler]
    x = torch.randn(n, *model.image_shape, dtype=torch.float64, device=device)
    target = torch.zeros_like(x)
    u = params_from_schedule(model.schedule, even_schedule(model.T, K)).requires_grad_(True)

    def step() -> None:
        loss = (run(model, schedule_from_params(model.schedule, u), x) - target).flatten(1).norm(dim=1).mean()
        loss.backward()

    def forward() -> None:
        with torch.no_grad():
            run(model, schedule_from_params(model.schedule, u.detach()), x)

    out = []
    for fn in (step, forward):
        fn()  # warm-up
        times = []
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            began = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - began)
        out.append(sorted(times)[len(times) // 2] / n)
    return out[0], out[1]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--only", default="digits,cifar10,imagenet64")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sampler", default="dpmpp")
    p.add_argument("--K", type=int, default=10)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--train", type=int, default=64)
    p.add_argument("--heldout", type=int, default=64)
    p.add_argument("--check-every", type=int, default=10)
    a = p.parse_args()
    device = torch.device(a.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__} on {name}; {a.sampler}, K = {a.K}")
    checks = a.steps // a.check_every + 1
    for net in a.only.split(","):
        model = model_for(net, device)
        n = DRAWS[net] if device.type == "cpu" else 64
        both, fwd = seconds_per_draw(model, a.sampler, a.K, n, device, repeats=3 if net == "digits" else 1)
        total = a.steps * a.train * both + checks * (a.train + a.heldout) * fwd
        print(
            f"{net}: one Adam step {both * 1e3:.1f} ms per draw (forward + backward through {a.K} calls; "
            f"forward only {fwd * 1e3:.1f} ms), timed on {n} draws; {a.steps} steps on {a.train} draws + "
            f"{checks} checks on {a.train + a.heldout}: {total:.0f} s = {total / 3600:.2f} h per K"
        )


if __name__ == "__main__":
    main()
