"""What evaluate.py shows: results tables, figures (cost matrix, schedules, bits/dim against K), sample grids,
logging."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # files and loggers only; never a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from PIL import Image  # noqa: E402
from pytorch_lightning.loggers import WandbLogger  # noqa: E402

from ddpm_schedules.costs.matrix import CostMatrix
from ddpm_schedules.reports.guidance import plot_schedules_vs_guidance  # noqa: E402
from ddpm_schedules.schedules.schedule import Schedule  # noqa: E402
from ddpm_schedules.storage.files import atomic_write_json  # noqa: E402


def plot_cost_matrix(cm: CostMatrix) -> Figure:
    """Heatmap of log10 C[s, t] in bits/dim over the grid (s below t)."""
    bpd = cm.bpd(cm.mean)
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


def plot_bpd_vs_budget(
    bpd: Mapping[str, Mapping[int, float]], full_chain: float | None = None, title: str = ""
) -> Figure:
    """bits/dim against the number of steps K, one line per strategy, the full chain as a dashed line."""
    fig, ax = plt.subplots(figsize=(5.5, 4), dpi=110)
    for name, by_k in bpd.items():
        ks = sorted(by_k)
        ax.plot(ks, [by_k[k] for k in ks], marker="o", label=name)
    if full_chain is not None:
        ax.axhline(full_chain, color="k", linestyle="--", linewidth=1, label="full chain")
    ax.set_xscale("log", base=2)
    _log_y_if_wide(
        ax, [v for by_k in bpd.values() for v in by_k.values()] + ([full_chain] if full_chain is not None else [])
    )
    ax.set_xlabel("steps K")
    ax.set_ylabel("bits/dim")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    return fig


def _log_y_if_wide(ax, values: Sequence[float], ratio: float = 4.0) -> None:
    # one poor baseline (karras at K = 8: 10 bits/dim, FD 600) would flatten every other line on a linear axis
    if values and min(values) > 0 and max(values) / min(values) > ratio:
        ax.set_yscale("log")


def figure_array(fig: Figure) -> np.ndarray:
    """A drawn figure as an RGB uint8 array [H, W, 3] (what loggers take as an image)."""
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def results_table(doc: dict[str, Any]) -> str:
    """Markdown: bits/dim (± standard error) per strategy and K, then one Fréchet-distance table per sampler."""
    ks = sorted({r["K"] for r in doc["results"]})
    lines = [
        f"bits/dim on {doc['data']['eval_split']} ({doc['data']['eval_examples']} examples), ancestral sampling's ELBO",
        "",
    ]
    lines += _table({(r["strategy"], r["K"]): f"{r['bpd']:.3f} ± {r['bpd_sem']:.3f}" for r in doc["results"]}, ks)
    if doc.get("full_chain"):
        fc = doc["full_chain"]
        lines += ["", f"full chain (K = {fc['K']}): {fc['bpd']:.3f} ± {fc['bpd_sem']:.3f} bits/dim"]
    quality = doc.get("sample_quality") or []
    fid = doc["fid"]
    for label in dict.fromkeys(sampler_label(q) for q in quality):
        rows = [q for q in quality if sampler_label(q) == label]
        sampler, scale = rows[0]["sampler"], rows[0].get("guidance", 1.0)
        guided = f", guidance s = {scale:g}" if scale != 1 else ""
        if fid["features"]:
            eta = f", eta = {fid['ddim_eta']}" if sampler == "ddim" else ""
            lines += [
                "",
                f"Fréchet distance ± bootstrap standard error, {sampler} sampler{eta}{guided}: {fid['samples']} "
                "samples "
                f"against {fid['reference_examples']} {fid['reference_split']} images, {fid['features']}",
                "",
            ]
            cells = {
                (q["strategy"], q["K"]): f"{q['fid']:.2f}"
                + (f" ± {q['fid_sem']:.2f}" if q["fid_sem"] is not None else "")
                for q in rows
            }
            lines += _table(cells, sorted({q["K"] for q in rows}))
        if any(q["teacher_distance"] is not None for q in rows):
            lines += [
                "",
                f"mean L2 distance of {sampler} samples{f' (guidance s = {scale:g})' if guided else ''} to the "
                f"{fid['teacher']['steps']}-step DDIM teacher's "
                f"from the same x_T ({fid['teacher_samples']} samples)",
                "",
            ]
            lines += _table(
                {
                    (q["strategy"], q["K"]): f"{q['teacher_distance']:.3f}"
                    + (f" ± {q['teacher_distance_sem']:.3f}" if q.get("teacher_distance_sem") is not None else "")
                    for q in rows
                    if q["teacher_distance"] is not None
                },
                sorted({q["K"] for q in rows}),
            )
    return "\n".join(lines)


def sampler_label(entry: dict[str, Any]) -> str:
    """A sample-quality entry's sampler, with its guidance scale when it is not 1 (``ddim_s2``)."""
    scale = entry.get("guidance", 1.0)
    return entry["sampler"] if scale == 1 else f"{entry['sampler']}_s{scale:g}"


def _table(cells: dict[tuple[str, int], str], ks: Sequence[int]) -> list[str]:
    names = list(dict.fromkeys(name for name, _ in cells))
    out = ["| strategy | " + " | ".join(f"K={k}" for k in ks) + " |", "|---" * (len(ks) + 1) + "|"]
    return out + [f"| {n} | " + " | ".join(cells.get((n, k), "") for k in ks) + " |" for n in names]


def plot_fd_vs_budget(quality: Sequence[dict[str, Any]], sampler: str, features: str) -> Figure:
    """Fréchet distance against K for one sampler, one line per strategy, with bootstrap error bars."""
    fig, ax = plt.subplots(figsize=(5.5, 4), dpi=110)
    for name in dict.fromkeys(q["strategy"] for q in quality):
        rows = sorted(
            (q for q in quality if q["strategy"] == name and sampler_label(q) == sampler and q["fid"] is not None),
            key=lambda q: q["K"],
        )
        if rows:
            ax.errorbar(
                [q["K"] for q in rows],
                [q["fid"] for q in rows],
                yerr=[q["fid_sem"] or 0 for q in rows],
                marker="o",
                capsize=3,
                label=name,
            )
    ax.set_xscale("log", base=2)
    _log_y_if_wide(ax, [q["fid"] for q in quality if sampler_label(q) == sampler and q["fid"] is not None])
    ax.set_xlabel("steps K")
    ax.set_ylabel("Fréchet distance")
    ax.set_title(f"{sampler} sampler, {features}", fontsize=9)
    ax.legend()
    fig.tight_layout()
    return fig


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


def write_evaluation(
    out_dir: Path,
    doc: dict[str, Any],
    cm: CostMatrix,
    schedules: Sequence[Schedule],
    grids: dict[str, torch.Tensor],
    logger,
) -> None:
    """results.md, plots, sample grids, schedules/*.json, and the same to the logger (W&B, CSV)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.md").write_text(results_table(doc) + "\n")
    sched_dir, grid_dir = out_dir / "schedules", out_dir / "samples"
    sched_dir.mkdir(exist_ok=True)
    grid_dir.mkdir(exist_ok=True)
    for sch in schedules:
        atomic_write_json(sched_dir / f"{_safe(sch.strategy)}_K{sch.K}.json", sch.to_dict())
    bpd: dict[str, dict[int, float]] = {}
    for r in doc["results"]:
        bpd.setdefault(r["strategy"], {})[r["K"]] = r["bpd"]
    full = doc["full_chain"]["bpd"] if doc.get("full_chain") else None
    figures = {
        "bpd_vs_K": plot_bpd_vs_budget(bpd, full, title=f"held-out bits/dim, {doc['data']['name']}"),
        "cost_matrix": plot_cost_matrix(cm),
        "schedules": plot_schedules([s for s in schedules if s.K <= 256]),
    }
    if doc["fid"]["features"]:
        for sampler in dict.fromkeys(sampler_label(q) for q in doc.get("sample_quality") or []):
            figures[f"fd_vs_K_{sampler}"] = plot_fd_vs_budget(doc["sample_quality"], sampler, doc["fid"]["features"])
    if len(doc["fid"].get("guidance") or [1]) > 1:
        figures["schedules_vs_guidance"] = plot_schedules_vs_guidance(doc.get("sample_quality") or [])
    for name, fig in figures.items():
        fig.savefig(out_dir / f"{name}.png")
    images = {}
    for name, samples in grids.items():
        images[name] = grid = sample_grid(samples)
        Image.fromarray(grid).resize((grid.shape[1] * 4, grid.shape[0] * 4), Image.NEAREST).save(
            grid_dir / f"{_safe(name)}.png"
        )
    log_evaluation(logger, doc, figures, images)
    for fig in figures.values():
        plt.close(fig)


def log_evaluation(logger, doc: dict[str, Any], figures: dict, grids: dict) -> None:
    """Summary keys bpd/<strategy>/K<K>, fid/<strategy>/<sampler>/K<K> (and _sem), teacher_distance/<strategy>/K<K>,
    results tables and the images."""
    if not logger:
        return
    metrics = {f"bpd/{r['strategy']}/K{r['K']}": r["bpd"] for r in doc["results"]}
    for q in doc.get("sample_quality") or []:
        for key, value in (("fid", q["fid"]), ("fid_sem", q["fid_sem"])):
            if value is not None:
                metrics[f"{key}/{q['strategy']}/{sampler_label(q)}/K{q['K']}"] = value
        if q["teacher_distance"] is not None:
            metrics[f"teacher_distance/{q['strategy']}/{sampler_label(q)}/K{q['K']}"] = q["teacher_distance"]
    if doc.get("full_chain"):
        metrics["bpd/full_chain"] = doc["full_chain"]["bpd"]
    if isinstance(logger, WandbLogger):
        logger.experiment.summary.update(metrics)
        columns = ["strategy", "K", "bpd", "bpd_sem", "predicted_bpd", "schedule"]
        rows = [
            [r["strategy"], r["K"], r["bpd"], r["bpd_sem"], r["predicted_bpd"], json.dumps(r["schedule"])]
            for r in doc["results"]
        ]
        logger.log_table("results", columns=columns, data=rows)
        columns = ["strategy", "K", "sampler", "guidance", "fid", "fid_sem", "teacher_distance", "teacher_distance_sem"]
        columns += ["schedule"]
        rows = [
            [json.dumps(q[c]) if c == "schedule" else q.get(c, 1.0 if c == "guidance" else None) for c in columns]
            for q in doc.get("sample_quality") or []
        ]
        logger.log_table("sample_quality", columns=columns, data=rows)
        for name, fig in figures.items():
            logger.log_image(f"plots/{name}", images=[figure_array(fig)])
        for name, grid in grids.items():
            logger.log_image(f"samples/{name}", images=[grid])
        logger.log_hyperparams({"fid_features": doc["fid"]["features"]})
    else:
        logger.log_metrics(metrics)
        logger.save()


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
