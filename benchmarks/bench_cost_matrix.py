"""Cost-matrix estimation against the bare forward passes it needs.

    python benchmarks/bench_cost_matrix.py [--T 1000] [--examples 200] [--batch-size 200] [--naive]

For each variance type, `estimate_cost_matrix` runs with its network wrapped in a timer, so the
time spent in forward passes and the total are measured in the same run (this machine's speed
drifts by 2x over minutes, so separate runs are not comparable). Also printed: a separate loop of
the same T x (examples / batch) network calls on fixed inputs, best of --repeats.
"""

import argparse
import math
import time

import torch
import torch.utils.flop_counter
from nets import SmallConvNet

from ddpm_schedules import DiffusionModel, NoiseSchedule, estimate_cost_matrix
from ddpm_schedules.costs.terms import pair_terms
from ddpm_schedules.models.noise import example_noise


def make_net(name: str, out_channels: int) -> torch.nn.Module:
    """The digits UNet of conf/unet/digits.yaml, or the plain conv stand-in of nets.py."""
    if name == "stand-in":
        return SmallConvNet(1, out_channels)
    from pathlib import Path

    import yaml

    from ddpm_schedules.models.unet import create_unet

    flags = yaml.safe_load((Path(__file__).resolve().parents[1] / "conf" / "unet" / "digits.yaml").read_text())
    return create_unet(**{**flags, "learn_sigma": out_channels == 2})


def digits_like(n: int) -> torch.Tensor:
    from sklearn.datasets import load_digits

    x = torch.tensor(load_digits().images[:n], dtype=torch.float32)[:, None]
    return x / 16 * 2 - 1  # 17 levels in [-1, 1]


class TimedNet(torch.nn.Module):
    """Accumulates the wall time spent inside the wrapped network."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net
        self.seconds = 0.0

    def forward(self, x, timesteps):
        start = time.perf_counter()
        out = self.net(x, timesteps)
        self.seconds += time.perf_counter() - start
        return out


def bare_forward(model: DiffusionModel, data: torch.Tensor, batch_size: int) -> float:
    x = data[:batch_size]
    start = time.perf_counter()
    with torch.inference_mode():
        for t in range(1, model.T + 1):
            for lo in range(0, len(data), batch_size):
                xb = data[lo : lo + batch_size]
                model.net(xb, model.net_timesteps(torch.full((len(xb),), t)))
    del x
    return time.perf_counter() - start


def naive(model: DiffusionModel, data: torch.Tensor, batch_size: int) -> float:
    """One forward pass per column, then a Python loop over s with the elementwise formulas."""
    start = time.perf_counter()
    with torch.inference_mode():
        for t in range(1, model.T + 1):
            for lo in range(0, len(data), batch_size):
                x0 = data[lo : lo + batch_size]
                x_t = model.q_sample(x0, t, example_noise(0, lo, len(x0), t, tuple(x0.shape[1:])))
                pred = model.predict(x_t, t)
                for s in range(t):
                    pair_terms(model, x0, x_t, t, torch.tensor([s]), pred, fast=False)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--T", type=int, default=1000)
    p.add_argument("--examples", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=200)
    p.add_argument("--var-types", default="learned_range,fixed_large")
    p.add_argument(
        "--net", choices=["stand-in", "digits-unet"], default="digits-unet", help="the network whose passes are timed"
    )
    p.add_argument("--repeats", type=int, default=2, help="each timing is the best of this many runs")
    p.add_argument("--naive", action="store_true", help="also time a loop over s (slow)")
    a = p.parse_args()
    torch.manual_seed(0)
    data = digits_like(a.examples)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, T={a.T}, {a.examples} examples, batch {a.batch_size}"
    )
    with torch.utils.flop_counter.FlopCounterMode(display=False) as counter:
        make_net(a.net, 2)(data[:1], torch.zeros(1))
    print(f"network: {a.net}, {counter.get_total_flops() / 1e6:.0f} MFLOP per example")
    for var_type in a.var_types.split(","):
        out = 2 if var_type == "learned_range" else 1
        model = DiffusionModel(
            make_net(a.net, out).eval(),
            NoiseSchedule.named("cosine", a.T),
            var_type=var_type,
            levels=17,
            image_shape=(1, 8, 8),
        )
        bare_forward(model, data[: a.batch_size], a.batch_size)  # warm-up
        bare, ours, ratio = math.inf, math.inf, math.inf
        for _ in range(a.repeats):
            bare = min(bare, bare_forward(model, data, a.batch_size))
            timed = TimedNet(model.net)
            model.net = timed
            start = time.perf_counter()
            estimate_cost_matrix(model, data, batch_size=a.batch_size, progress=False)
            total = time.perf_counter() - start
            model.net = timed.net
            if total < ours:
                ours, ratio = total, total / timed.seconds
        line = (
            f"{var_type:14s} estimate_cost_matrix {ours:6.1f} s = {ratio:.3f} x its forward passes"
            f"   (separate bare loop {bare:6.1f} s)"
        )
        if a.naive:
            slow = naive(model, data, a.batch_size)
            line += f"   naive loop over s {slow:6.1f} s ({slow / bare:.2f} x the bare loop)"
        print(line, flush=True)


if __name__ == "__main__":
    main()
