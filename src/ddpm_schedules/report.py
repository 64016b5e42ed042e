"""Figures people would rather look at than read: the cost matrix, schedules, bits/dim against K."""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # files and loggers only; never a window
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from .cost_matrix import CostMatrix  # noqa: E402
from .schedules import Schedule  # noqa: E402


def plot_cost_matrix(cm: CostMatrix) -> Figure:
    """Heatmap of log10 C[s, t] in bits/dim over the grid (s below t)."""
    bpd = cm.mean / (cm.dims * math.log(2))
    shown = torch.where(torch.isfinite(bpd) & (bpd > 0), bpd, torch.tensor(math.nan, dtype=bpd.dtype)).log10()
    fig, ax = plt.subplots(figsize=(5.5, 4.5), dpi=110)
    g = cm.grid.tolist()
    im = ax.imshow(shown.T.numpy(), origin="lower", aspect="auto", cmap="viridis", extent=(g[0], g[-1], g[0], g[-1]))
    ax.set_xlabel("s (to)")
    ax.set_ylabel("t (from)")
    ax.set_title(f"cost matrix, {cm.count} examples")
    fig.colorbar(im, ax=ax, label="log10 bits/dim of the step t -> s")
    fig.tight_layout()
    return fig


def plot_schedules(schedules: Sequence[Schedule]) -> Figure:
    """One row of tick marks per schedule: where each spends its steps."""
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(schedules) + 1.2), dpi=110)
    for row, sch in enumerate(schedules):
        ax.scatter(sch.timesteps, [row] * sch.K, marker="|", s=120, color=f"C{row % 10}")
    ax.set_yticks(range(len(schedules)), [f"{s.strategy} K={s.K}" for s in schedules])
    ax.set_xlabel("timestep t")
    ax.set_xlim(0, max(s.T for s in schedules) + 1)
    ax.invert_yaxis()
    fig.tight_layout()
    return fig


def plot_bpd_vs_budget(bpd: Mapping[str, Mapping[int, float]], full_chain: float | None = None, title: str = "") -> Figure:
    """bits/dim against the number of steps K, one line per strategy, the full chain as a dashed line."""
    fig, ax = plt.subplots(figsize=(5.5, 4), dpi=110)
    for name, by_k in bpd.items():
        ks = sorted(by_k)
        ax.plot(ks, [by_k[k] for k in ks], marker="o", label=name)
    if full_chain is not None:
        ax.axhline(full_chain, color="k", linestyle="--", linewidth=1, label="full chain")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("steps K")
    ax.set_ylabel("bits/dim")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    return fig
