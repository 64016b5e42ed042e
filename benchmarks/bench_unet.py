"""UNet throughput: digits training steps/s on CPU, CIFAR-10 UNet forward samples/s, ImageNet-64 UNet bf16 on a GPU.

    python benchmarks/bench_unet.py [--device cpu|cuda] [--only digits,cifar10,imagenet64]

- digits: optimizer steps/s of `DiffusionModule` (L_hybrid) with conf/unet/digits.yaml, batch 64.
- cifar10: forward samples/s of improved-diffusion's CIFAR-10 UNet (128 channels, 3 res blocks,
  attention at 16 and 8, learned sigmas) at batch 64, inference mode.
- imagenet64: on CUDA, forward samples/s of the ImageNet-64 UNet at batch 64 in bf16 autocast
  (and on CPU in float32 with a smaller batch, for reference). Runs unchanged on a GPU machine.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import yaml

from ddpm_schedules.lightning.module import DiffusionModule
from ddpm_schedules.models.unet import create_unet

CONF = Path(__file__).resolve().parents[1] / "conf"


def flags(unet: str, diffusion: str = "cosine") -> dict:
    return {
        **yaml.safe_load((CONF / "unet" / f"{unet}.yaml").read_text()),
        **yaml.safe_load((CONF / "diffusion" / f"{diffusion}.yaml").read_text()),
    }


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def digits_steps(device: torch.device, steps: int = 30) -> float:
    module = DiffusionModule(flags("digits"), loss="hybrid", lr=1e-3, levels=17).to(device)
    opt = module.configure_optimizers()
    x0 = torch.rand(64, 1, 8, 8, device=device) * 2 - 1

    def step() -> None:
        t = torch.randint(1, module.model.T + 1, (64,), device=device)
        loss = module.losses(x0, t, torch.randn_like(x0))["loss"].mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        opt.step()

    for _ in range(3):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return steps / (time.perf_counter() - start)


def forward_rate(model: str, device: torch.device, batch: int, iters: int, dtype: torch.dtype | None = None) -> float:
    f = flags(model)
    keys = ("image_size", "num_channels", "num_res_blocks", "channel_mult", "attention_resolutions", "num_heads",
            "num_heads_upsample", "use_scale_shift_norm", "dropout", "learn_sigma", "class_cond", "in_channels")  # fmt: skip
    net = create_unet(**{k: f[k] for k in keys}).to(device).eval()
    x = torch.randn(batch, 3, f["image_size"], f["image_size"], device=device)
    t = torch.randint(0, 4000, (batch,), device=device).float()
    autocast = (
        torch.autocast(device.type, dtype=dtype) if dtype is not None else torch.autocast(device.type, enabled=False)
    )
    with torch.inference_mode(), autocast:
        net(x, t)
        sync(device)
        start = time.perf_counter()
        for _ in range(iters):
            net(x, t)
        sync(device)
    return batch * iters / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--only", default="digits,cifar10,imagenet64")
    a = p.parse_args()
    device = torch.device(a.device)
    which = a.only.split(",")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__} on {name}")
    if "digits" in which:
        print(f"digits UNet, L_hybrid, batch 64: {digits_steps(device):.1f} training steps/s")
    if "cifar10" in which:
        iters = 20 if device.type == "cuda" else 2
        print(f"CIFAR-10 UNet forward, batch 64, float32: {forward_rate('cifar10', device, 64, iters):.1f} samples/s")
    if "imagenet64" in which:
        if device.type == "cuda":
            rate = forward_rate("imagenet64", device, 64, 20, torch.bfloat16)
            print(f"ImageNet-64 UNet forward, batch 64, bf16: {rate:.1f} samples/s")
        else:
            print(
                f"ImageNet-64 UNet forward, batch 8, float32 (CPU): {forward_rate('imagenet64', device, 8, 1):.2f} samples/s"
            )


if __name__ == "__main__":
    main()
