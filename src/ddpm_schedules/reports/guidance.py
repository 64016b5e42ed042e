"""How the optimal schedule moves with the classifier-free guidance scale s (``eval.guidance``)."""

from __future__ import annotations

import re
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

GUIDED_NAME = re.compile(r"(?P<base>.+)_s(?P<scale>[0-9.e+-]+)$")


def guided_paths(quality: Sequence[dict[str, Any]]) -> dict[tuple[str, int], dict[float, list[int]]]:
    """{(DP strategy, K): {s: timesteps}} of the teacher DPs found at every scale (``dp_ode`` at s = 1 and
    ``dp_ode_s2`` at s = 2 are one strategy's schedules)."""
    out: dict[tuple[str, int], dict[float, list[int]]] = {}
    scaled = {GUIDED_NAME.match(q["strategy"]).group("base") for q in quality if GUIDED_NAME.match(q["strategy"])}
    for q in quality:
        m = GUIDED_NAME.match(q["strategy"])
        base = m.group("base") if m and q.get("guidance", 1.0) != 1 else q["strategy"]
        if base in scaled:
            out.setdefault((base, q["K"]), {})[q.get("guidance", 1.0)] = list(q["schedule"])
    return out


def plot_schedules_vs_guidance(quality: Sequence[dict[str, Any]]) -> Figure:
    """One panel per K: the timesteps of each teacher DP (dp_ode, dp_dpmpp, dp_ode_oss) against s, log-t axis."""
    paths = guided_paths(quality)
    ks = sorted({k for _, k in paths})
    fig, axes = plt.subplots(1, max(1, len(ks)), figsize=(4.2 * max(1, len(ks)), 3.4), dpi=110, squeeze=False)
    names = sorted({name for name, _ in paths})
    for ax, K in zip(axes[0], ks):
        for n, name in enumerate(names):
            by_scale = paths.get((name, K), {})
            for i, (scale, steps) in enumerate(sorted(by_scale.items())):
                offset = 0.06 * (n - (len(names) - 1) / 2)  # strategies side by side at one s
                label = name if i == 0 else None
                ax.scatter(steps, [scale + offset] * len(steps), marker="|", s=90, color=f"C{n}", label=label)
        ax.set_xscale("log")
        ax.set_xlabel("timestep t")
        ax.set_ylabel("guidance scale s")
        ax.set_title(f"K = {K}", fontsize=9)
    if names and ks:
        axes[0][0].legend(fontsize=7, loc="upper left", bbox_to_anchor=(0, -0.22), ncol=len(names), frameon=False)
    fig.tight_layout()
    return fig
