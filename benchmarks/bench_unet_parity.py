"""Our UNet against improved-diffusion's own ``UNetModel``: same weights, same batch, fp32, one run.

    git clone https://github.com/openai/improved-diffusion /tmp/improved-diffusion
    python benchmarks/bench_unet_parity.py --improved-diffusion /tmp/improved-diffusion [--batch 128]

The fixture UNet (tests/fixtures/improved_diffusion_tiny: 16x16 RGB, 32 channels, attention at 8,
learned sigmas) by default; ``--flags conf/unet/cifar10.yaml`` times a larger one with random
weights. improved-diffusion is imported from the given checkout (its code is not part of this
repository). Prints the median of ``--repeats`` timings for each network, the ratio ours / theirs
and the largest output difference; the variants (channels_last, torch.compile) are timed too.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

from ddpm_schedules import evaluate_schedules, load_improved_diffusion
from ddpm_schedules.models.unet import create_unet
from ddpm_schedules.schedules.schedule import full_schedule

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "improved_diffusion_tiny"
FLAG_KEYS = ("image_size", "num_channels", "num_res_blocks", "channel_mult", "attention_resolutions", "num_heads",
             "num_heads_upsample", "use_scale_shift_norm", "dropout", "learn_sigma", "class_cond", "in_channels")  # fmt: skip


def their_unet(checkout: Path, flags: dict) -> torch.nn.Module:
    """improved-diffusion's ``UNetModel`` built as its ``create_model`` does (channel_mult given explicitly)."""
    sys.path.insert(0, str(checkout))
    from improved_diffusion.unet import UNetModel  # noqa: PLC0415 - from the user's checkout

    res = [flags["image_size"] // int(r) for r in str(flags["attention_resolutions"]).split(",")]
    return UNetModel(
        in_channels=flags["in_channels"],
        model_channels=flags["num_channels"],
        out_channels=flags["in_channels"] * (2 if flags["learn_sigma"] else 1),
        num_res_blocks=flags["num_res_blocks"],
        attention_resolutions=tuple(res),
        dropout=flags["dropout"],
        channel_mult=tuple(int(c) for c in str(flags["channel_mult"]).split(",")),
        num_classes=None,
        num_heads=flags["num_heads"],
        num_heads_upsample=flags["num_heads_upsample"],
        use_scale_shift_norm=flags["use_scale_shift_norm"],
    )


def seconds(net: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, iters: int) -> float:
    """Seconds per forward pass of the batch, after two warm-up passes."""
    with torch.inference_mode():
        for _ in range(2):
            net(x, t)
        start = time.perf_counter()
        for _ in range(iters):
            net(x, t)
    return (time.perf_counter() - start) / iters


def full_chain(checkout: Path, flags: dict, images: int, compile_ours: bool) -> None:
    """Full-chain bits/dim on the fixture model: improved-diffusion's ``calc_bpd_loop`` against ``evaluate_schedules``."""
    from improved_diffusion.script_util import create_gaussian_diffusion  # noqa: PLC0415 - from the user's checkout

    names = ("learn_sigma", "sigma_small", "noise_schedule", "predict_xstart", "rescale_timesteps")
    diffusion = create_gaussian_diffusion(steps=flags["diffusion_steps"], **{k: flags[k] for k in names})
    state = torch.load(FIXTURE / "model.pt", map_location="cpu", weights_only=True)
    theirs = their_unet(checkout, flags).eval()
    theirs.load_state_dict(state)
    model = load_improved_diffusion(FIXTURE / "model.pt", levels=256, flags=flags).eval()
    x0 = (
        torch.randint(
            0, 256, (images, 3, flags["image_size"], flags["image_size"]), generator=torch.Generator().manual_seed(1)
        )
        / 127.5
        - 1
    )
    schedule = [full_schedule(model.T)]
    runs = {
        "improved-diffusion calc_bpd_loop": lambda: diffusion.calc_bpd_loop(theirs, x0)["total_bpd"].mean().item(),
        "evaluate_schedules (full chain)": lambda: (
            evaluate_schedules(model, x0, schedule, batch_size=images, progress=False)[0].bpd
        ),
    }
    if compile_ours:
        model.compile_network()
        evaluate_schedules(
            model, x0[:images], schedule, batch_size=images, progress=False
        )  # compiles once, outside the timing
        runs["evaluate_schedules, compiled"] = runs.pop("evaluate_schedules (full chain)")
    times = {}
    for name, run in runs.items():
        with torch.inference_mode() if "calc_bpd" in name else torch.no_grad():
            start = time.perf_counter()
            bpd = run()
        times[name] = time.perf_counter() - start
        print(f"  {name:36s} {times[name]:7.1f} s  {bpd:.5f} bits/dim")
    first = next(iter(times.values()))
    print("  time ratio to calc_bpd_loop: " + ", ".join(f"{n} {t / first:.3f}" for n, t in list(times.items())[1:]))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--improved-diffusion", type=Path, required=True, help="a checkout of openai/improved-diffusion")
    p.add_argument(
        "--flags", type=Path, default=None, help="a conf/unet/*.yaml instead of the fixture (random weights)"
    )
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="also time torch.compile(ours)")
    p.add_argument(
        "--full-chain", type=int, default=0, help="also time full-chain bits/dim on this many fixture images"
    )
    args = p.parse_args()
    if not (args.improved_diffusion / "improved_diffusion" / "unet.py").is_file():
        p.error(
            f"--improved-diffusion {args.improved_diffusion} has no improved_diffusion/unet.py; pass a checkout of openai/improved-diffusion"
        )

    if args.flags is None:
        flags = json.loads((FIXTURE / "flags.json").read_text())
        state = torch.load(FIXTURE / "model.pt", map_location="cpu", weights_only=True)
    else:
        flags = {
            "in_channels": 3,
            "num_heads_upsample": -1,
            "class_cond": False,
            **yaml.safe_load(args.flags.read_text()),
        }
        state = None
    ours = create_unet(**{k: flags[k] for k in FLAG_KEYS}).eval()
    if state is None:
        state = ours.state_dict()
        for v in state.values():
            v.normal_(0, 0.05) if v.is_floating_point() else None
    ours.load_state_dict(state)
    theirs = their_unet(args.improved_diffusion, flags).eval()
    theirs.load_state_dict(state)

    g = torch.Generator().manual_seed(0)
    size = flags["image_size"]
    x = torch.randn(args.batch, flags["in_channels"], size, size, generator=g)
    t = torch.randint(0, 1000, (args.batch,), generator=g).float()
    with torch.inference_mode():
        diff = (ours(x, t) - theirs(x, t)).abs().max().item()

    variants = {"improved-diffusion": (theirs, x), "ours": (ours, x)}
    variants["ours, channels_last"] = (
        ours.to(memory_format=torch.channels_last),
        x.to(memory_format=torch.channels_last),
    )
    if args.compile:
        fresh = create_unet(**{k: flags[k] for k in FLAG_KEYS}).eval()
        fresh.load_state_dict(state)
        variants["ours, torch.compile"] = (torch.compile(fresh), x)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):  # interleaved, so drift in machine speed hits every network alike
        for name, (net, inp) in variants.items():
            times[name].append(seconds(net, inp, t, args.iters))
    ours.to(memory_format=torch.contiguous_format)

    base = statistics.median(times["improved-diffusion"])
    print(f"batch {args.batch}, {torch.get_num_threads()} threads, max |ours - theirs| = {diff:.2e}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(
            f"  {name:22s} {med * 1e3:8.1f} ms/pass  {args.batch / med:8.1f} samples/s  time ratio to improved-diffusion {med / base:.3f}"
        )
    if args.full_chain:
        print(f"full chain, {args.full_chain} images, T = {flags['diffusion_steps']}:")
        full_chain(args.improved_diffusion, flags, args.full_chain, args.compile)


if __name__ == "__main__":
    main()
