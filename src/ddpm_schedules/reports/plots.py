"""The figures of a run: cost matrix with its DP paths, schedules on a log-SNR axis, bits/dim and Fréchet distance
against K with error bars, sample grids."""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # files and loggers only; never a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import FuncFormatter, NullFormatter  # noqa: E402

from ddpm_schedules.costs.matrix import CostMatrix  # noqa: E402
from ddpm_schedules.schedules.schedule import Schedule  # noqa: E402

DPI = 110
PLAIN = FuncFormatter(lambda v, _: f"{v:g}")
SPARSE = FuncFormatter(lambda v, _: f"{v:g}" if f"{v:e}"[0] in "25" else "")  # over decades: 20, 50, 200, ...


def plot_cost_matrix(cm: CostMatrix, paths: Sequence[Schedule] = ()) -> Figure:
    """log10 C[s, t] in bits/dim (s below t) on a colour scale clipped to its 2nd..98th percentile (a few near-zero
    or huge pairs would flatten the rest into one colour), with the steps of each DP path drawn on it."""
    bpd = cm.bpd(cm.mean)
    shown = torch.where(torch.isfinite(bpd) & (bpd > 0), bpd, torch.tensor(math.nan, dtype=bpd.dtype)).log10()
    finite = shown[torch.isfinite(shown)].numpy()
    vmin, vmax = np.percentile(finite, [2, 98]) if finite.size else (None, None)
    fig, ax = plt.subplots(figsize=(6.5, 4.5), dpi=DPI, layout="constrained")
    g = cm.grid.tolist()
    im = ax.imshow(
        shown.T.numpy(), origin="lower", aspect="auto", cmap="viridis", extent=(g[0], g[-1], g[0], g[-1]),
        vmin=vmin, vmax=vmax,
    )  # fmt: skip
    for i, sch in enumerate(sorted(paths, key=lambda s: s.K)):
        s, t = zip(*sch.pairs())
        ax.plot(s, t, marker="o", markersize=3, linewidth=1, color=f"C{i % 10}", label=f"{sch.strategy} K={sch.K}")
    ax.set_xlim(g[0], g[-1])
    ax.set_ylim(g[0], g[-1])
    ax.set_xlabel("s (to)")
    ax.set_ylabel("t (from)")
    ax.set_title(f"cost matrix, {cm.count} examples ({cm.objective})", fontsize=10)
    fig.colorbar(im, ax=ax, label="log10 bits/dim of the step t -> s (2-98 %)")
    if paths:
        fig.legend(loc="outside right upper", fontsize=7, title="DP paths", title_fontsize=7)
    return fig


def plot_schedules(schedules: Sequence[Schedule], ab: torch.Tensor | None = None) -> Figure:
    """One row of ticks per schedule, sorted by K then strategy, on log-SNR = log(ab / (1 - ab)) (the timestep
    when ``ab`` is not given): the karras and logsnr steps near T spread out instead of bunching."""
    rows = sorted(schedules, key=lambda s: (s.K, s.strategy))
    fig, ax = plt.subplots(figsize=(7, min(0.2 * len(rows) + 1.2, 11)), dpi=DPI, layout="constrained")
    snr = None if ab is None else (ab.double() / (1 - ab.double())).log()
    for row, sch in enumerate(rows):
        x = list(sch.timesteps) if snr is None else snr[list(sch.timesteps)].tolist()
        ax.scatter(x, [row] * sch.K, marker="|", s=60, color=f"C{sorted({s.K for s in rows}).index(sch.K) % 10}")
    for row in [i for i in range(1, len(rows)) if rows[i].K != rows[i - 1].K]:
        ax.axhline(row - 0.5, color="0.8", linewidth=0.5)
    ax.set_yticks(range(len(rows)), [f"{s.strategy} K={s.K}" for s in rows], fontsize=7 if len(rows) > 20 else 9)
    if snr is None:
        ax.set_xlabel("timestep t")
        ax.set_xlim(0, max(s.T for s in rows) + 1)
    else:
        ax.set_xlabel("log-SNR log(alpha_bar / (1 - alpha_bar)) of each step (left: t = T, right: t -> 0)")
    ax.set_ylim(len(rows) - 0.5, -0.5)
    return fig


def plot_bpd_vs_budget(
    bpd: Mapping[str, Mapping[int, float]],
    full_chain: float | None = None,
    title: str = "",
    sem: Mapping[str, Mapping[int, float]] | None = None,
) -> Figure:
    """bits/dim against K, one line per strategy with ± one standard error, the full chain dashed."""
    fig, ax = plt.subplots(figsize=(6.5, 4), dpi=DPI, layout="constrained")
    for name, by_k in bpd.items():
        ks = sorted(by_k)
        err = [(sem or {}).get(name, {}).get(k) or 0 for k in ks]
        ax.errorbar(ks, [by_k[k] for k in ks], yerr=err, marker="o", capsize=3, label=name)
    if full_chain is not None:
        ax.axhline(full_chain, color="k", linestyle="--", linewidth=1, label="full chain")
    _k_axis(ax, [k for by_k in bpd.values() for k in by_k])
    _log_y_if_wide(
        ax, [v for by_k in bpd.values() for v in by_k.values()] + ([full_chain] if full_chain is not None else [])
    )
    ax.set_xlabel("steps K")
    ax.set_ylabel("bits/dim (± 1 SE)")
    ax.set_title(title, fontsize=10)
    if bpd or full_chain is not None:  # a run of opt strategies alone has no bits/dim
        fig.legend(loc="outside right upper", fontsize=8)
    return fig


def plot_fd_vs_budget(quality: Sequence[dict[str, Any]], sampler: str, features: str) -> Figure:
    """Fréchet distance against K for one sampler label, one line per strategy, with bootstrap error bars."""
    return plot_quality_vs_budget(quality, sampler, "fid", "Fréchet distance (± bootstrap SE)", features)


def plot_teacher_distance_vs_budget(quality: Sequence[dict[str, Any]], sampler: str) -> Figure:
    """The mean L2 distance to the teacher's samples from the same x_T against K, ± SE, one line per strategy."""
    return plot_quality_vs_budget(
        quality, sampler, "teacher_distance", "distance to the teacher (± SE)", "same x_T as the teacher"
    )


def plot_quality_vs_budget(
    quality: Sequence[dict[str, Any]], sampler: str, key: str, ylabel: str, subtitle: str
) -> Figure:
    """``key`` (``<key>_sem`` its error bar) against K for one sampler label, one line per strategy."""
    fig, ax = plt.subplots(figsize=(6.5, 4), dpi=DPI, layout="constrained")
    mine = [q for q in quality if sampler_label(q) == sampler]
    for name in dict.fromkeys(q["strategy"] for q in quality):
        rows = sorted((q for q in mine if q["strategy"] == name and q.get(key) is not None), key=lambda q: q["K"])
        if rows:
            ax.errorbar(
                [q["K"] for q in rows],
                [q[key] for q in rows],
                yerr=[q.get(f"{key}_sem") or 0 for q in rows],
                marker="o",
                capsize=3,
                label=name,
            )
    _k_axis(ax, [q["K"] for q in mine] or [1])
    _log_y_if_wide(ax, [q[key] for q in mine if q.get(key) is not None])
    ax.set_xlabel("steps K")
    ax.set_ylabel(ylabel)
    ax.set_title(f"{sampler} sampler, {subtitle}", fontsize=9)
    fig.legend(loc="outside right upper", fontsize=8)
    return fig


def plot_opt_history(found: Mapping[str, Mapping[str, Any]]) -> Figure:
    """The end-to-end optimiser's distance to the teacher against its Adam step: held-out (solid, the draws it
    selects on) and training (dashed), one colour per opt strategy and K, the kept iterate marked."""
    fig, ax = plt.subplots(figsize=(6.5, 4), dpi=DPI, layout="constrained")
    for i, (name, rec) in enumerate(sorted(found.items())):
        if not rec["history"]:  # K = 1: nothing to optimise
            continue
        steps = [h["step"] for h in rec["history"]]
        colour = f"C{i % 10}"
        ax.plot(steps, [h["heldout"] for h in rec["history"]], color=colour, marker=".", label=name)
        ax.plot(steps, [h["train"] for h in rec["history"]], color=colour, linestyle="--", linewidth=0.8)
        kept = [h for h in rec["history"] if h["heldout"] == rec["distances"]["best"]][:1]
        ax.plot([h["step"] for h in kept], [h["heldout"] for h in kept], "*", color=colour, markersize=10)
    ax.set_xlabel("Adam step")
    ax.set_ylabel(f"distance to the teacher ({next(iter(found.values()), {}).get('distance', 'l2')})")
    ax.set_title("opt: held-out (solid; star: the kept iterate's) and training (dashed) distance", fontsize=9)
    if ax.lines:
        fig.legend(loc="outside right upper", fontsize=8)
    return fig


def sampler_label(entry: dict[str, Any]) -> str:
    """A sample-quality entry's sampler, with its guidance scale when it is not 1 (``ddim_s2``)."""
    scale = entry.get("guidance", 1.0)
    return entry["sampler"] if scale == 1 else f"{entry['sampler']}_s{scale:g}"


def _log_y_if_wide(ax, values: Sequence[float], ratio: float = 4.0) -> None:
    # one poor baseline (karras at K = 8: 10 bits/dim, FD 600) would flatten every other line on a linear axis
    if values and min(values) > 0 and max(values) / min(values) > ratio:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(PLAIN)  # 2, 3, 4, 6 rather than 2 x 10^0
        ax.yaxis.set_minor_formatter(PLAIN if max(values) / min(values) < 20 else SPARSE)


def _k_axis(ax, ks: Sequence[int]) -> None:
    """A log2 axis of K with the budgets themselves as its ticks."""
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(set(ks)), [str(k) for k in sorted(set(ks))])
    ax.xaxis.set_minor_formatter(NullFormatter())


def figure_array(fig: Figure) -> np.ndarray:
    """A drawn figure as an RGB uint8 array [H, W, 3] (what loggers take as an image)."""
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def sample_grid(samples: torch.Tensor, n: int = 64) -> np.ndarray:
    """Up to n images in [-1, 1] as one uint8 grid image [H, W, 3]."""
    x = samples[:n].clamp(-1, 1)
    x = ((x + 1) * 127.5).round().to(torch.uint8)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    cols = int(math.ceil(math.sqrt(len(x))))
    rows = int(math.ceil(len(x) / cols))
    C, H, W = x.shape[1:]
    grid = torch.full((C, rows * (H + 1) + 1, cols * (W + 1) + 1), 255, dtype=torch.uint8)
    for i, img in enumerate(x):
        r, c = divmod(i, cols)
        grid[:, 1 + r * (H + 1) : 1 + r * (H + 1) + H, 1 + c * (W + 1) : 1 + c * (W + 1) + W] = img
    return grid.permute(1, 2, 0).numpy()
