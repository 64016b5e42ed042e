"""What evaluate.py shows: results.md (a header, then tables with the best per K marked), the figures, sample
grids, schedule files, and the same to the logger (W&B tables, line plots, images and artifacts; CSV metrics)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import matplotlib.pyplot as plt
import torch
from PIL import Image
from pytorch_lightning.loggers import WandbLogger

from ddpm_schedules.costs.matrix import CostMatrix
from ddpm_schedules.reports.guidance import plot_schedules_vs_guidance
from ddpm_schedules.reports.marks import TIE_RULE, best_and_ties, marked
from ddpm_schedules.reports.plots import (
    figure_array,
    plot_bpd_vs_budget,
    plot_cost_matrix,
    plot_fd_vs_budget,
    plot_opt_history,
    plot_schedules,
    plot_teacher_distance_vs_budget,
    sample_grid,
    sampler_label,
)
from ddpm_schedules.schedules.files import write_schedule_files
from ddpm_schedules.schedules.schedule import Schedule

Cell = tuple[float, float | None]  # (value, standard error)


def header(doc: dict[str, Any]) -> list[str]:
    """results.md's first lines: the model, the data, the overrides, the package version and git commit."""
    m, d, run = doc["model"], doc["data"], doc.get("run") or {}
    overrides = " ".join(run.get("overrides") or []) or "(none)"
    return [
        f"# {data_title(d['name'])}: {m.get('path') or m.get('source')}",
        "",
        f"- model: {m.get('path')} ({m.get('source')}; T = {m['T']}, {m['mean_type']}, {m['var_type']})",
        f"- data: {data_title(d['name'])}, {d['levels']} levels; cost matrix on {d['cost_split']} "
        f"({d['cost_examples']} examples), held out on {d['eval_split']} ({d['eval_examples']} examples)",
        f"- overrides: `{overrides}`",
        f"- ddpm-schedules {run.get('package_version') or '?'}, git {run.get('git_commit') or 'unknown'}",
        f"- {TIE_RULE}",
        "",
    ]


def data_title(name: str) -> str:
    """A data module's class name as people say it (DigitsDataModule: digits)."""
    return name[: -len("DataModule")].lower() if name.endswith("DataModule") else name


def results_table(doc: dict[str, Any]) -> str:
    """Markdown: the header, bits/dim (± standard error) per strategy and K, then per sampler (and guidance scale)
    the Fréchet distances and teacher distances; the best per K in bold, its ties within one SE marked."""
    ks = sorted({r["K"] for r in doc["results"]})
    lines = header(doc) + [
        f"bits/dim on {doc['data']['eval_split']} ({doc['data']['eval_examples']} examples), ancestral sampling's ELBO",
        "",
    ]
    lines += _table({(r["strategy"], r["K"]): (r["bpd"], r["bpd_sem"]) for r in doc["results"]}, ks, 3)
    if doc.get("full_chain"):
        fc = doc["full_chain"]
        lines += ["", f"full chain (K = {fc['K']}): {fc['bpd']:.3f} ± {fc['bpd_sem']:.3f} bits/dim"]
    quality = doc.get("sample_quality") or []
    fid = doc["fid"]
    for label in dict.fromkeys(sampler_label(q) for q in quality):
        rows = [q for q in quality if sampler_label(q) == label]
        sampler, scale = rows[0]["sampler"], rows[0].get("guidance", 1.0)
        guided = f", guidance s = {scale:g}" if scale != 1 else ""
        ks = sorted({q["K"] for q in rows})
        if fid["features"]:
            eta = f", eta = {fid['ddim_eta']}" if sampler == "ddim" else ""
            lines += [
                "",
                f"Fréchet distance ± bootstrap standard error, {sampler} sampler{eta}{guided}: {fid['samples']} "
                f"samples against {fid['reference_examples']} {fid['reference_split']} images, {fid['features']}",
                "",
            ]
            lines += _table({(q["strategy"], q["K"]): (q["fid"], q["fid_sem"]) for q in rows}, ks, 2)
        if any(q["teacher_distance"] is not None for q in rows):
            lines += [
                "",
                f"mean L2 distance of {sampler} samples{f' (guidance s = {scale:g})' if guided else ''} to the "
                f"{fid['teacher']['steps']}-step DDIM teacher's from the same x_T ({fid['teacher_samples']} samples)",
                "",
            ]
            cells = {
                (q["strategy"], q["K"]): (q["teacher_distance"], q.get("teacher_distance_sem"))
                for q in rows
                if q["teacher_distance"] is not None
            }
            lines += _table(cells, ks, 3)
    return "\n".join(lines)


def _table(cells: dict[tuple[str, int], Cell], ks: Sequence[int], digits: int) -> list[str]:
    """Rows per strategy, columns per K: "value ± SE", the best per K in bold and its ties marked (marks.py)."""
    names = list(dict.fromkeys(name for name, _ in cells))
    text = {}
    for k in ks:
        column = [(n, cells[(n, k)]) for n in names if (n, k) in cells and cells[(n, k)][0] is not None]
        for (n, (v, se)), (best, tie) in zip(column, best_and_ties([c for _, c in column])):
            shown = f"{v:.{digits}f}" + (f" ± {se:.{digits}f}" if se is not None else "")
            text[(n, k)] = marked(shown, best, tie)
    out = ["| strategy | " + " | ".join(f"K={k}" for k in ks) + " |", "|---" * (len(ks) + 1) + "|"]
    return out + [f"| {n} | " + " | ".join(text.get((n, k), "") for k in ks) + " |" for n in names]


def write_evaluation(
    out_dir: Path,
    doc: dict[str, Any],
    cm: CostMatrix,
    schedules: Sequence[Schedule],
    grids: dict[str, torch.Tensor],
    logger,
    records: Sequence[dict[str, Any]] | None = None,
    ab: torch.Tensor | None = None,
) -> None:
    """results.md, plots, sample grids, schedules/ (``records``: schedule_record's files, one per schedule, and
    schedules.json), and the same to the logger. ``ab`` (alpha_bar, t = 0..T) puts the schedules on a log-SNR axis."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.md").write_text(results_table(doc) + "\n")
    grid_dir = out_dir / "samples"
    grid_dir.mkdir(exist_ok=True)
    write_schedule_files(out_dir / "schedules", records if records is not None else [s.to_dict() for s in schedules])
    figures = evaluation_figures(doc, cm, schedules, ab)
    for name, fig in figures.items():
        fig.savefig(out_dir / f"{name}.png")
    for name, samples in grids.items():
        grid = sample_grid(samples)
        Image.fromarray(grid).resize((grid.shape[1] * 4, grid.shape[0] * 4), Image.NEAREST).save(
            grid_dir / f"{_safe(name)}.png"
        )
    log_evaluation(logger, doc, figures)
    for fig in figures.values():
        plt.close(fig)


def evaluation_figures(
    doc: dict[str, Any], cm: CostMatrix, schedules: Sequence[Schedule], ab: torch.Tensor | None
) -> dict[str, Any]:
    """bpd_vs_K (± SE), the cost matrix with the ELBO DP's paths, the schedules by K, FD and the teacher distance
    against K per sampler, the end-to-end optimiser's history and the schedules against the guidance scale."""
    bpd: dict[str, dict[int, float]] = {}
    sem: dict[str, dict[int, float]] = {}
    for r in doc["results"]:
        bpd.setdefault(r["strategy"], {})[r["K"]] = r["bpd"]
        sem.setdefault(r["strategy"], {})[r["K"]] = r["bpd_sem"]
    full = doc["full_chain"]["bpd"] if doc.get("full_chain") else None
    d = doc["data"]
    title = f"held-out bits/dim, {data_title(d['name'])} ({d['eval_split']}, {d['eval_examples']} examples)"
    grid = set(cm.grid.tolist())
    paths = [s for s in schedules if s.strategy == "dp" and s.K <= 64 and set(s.timesteps) <= grid]
    figures = {
        "bpd_vs_K": plot_bpd_vs_budget(bpd, full, title=title, sem=sem),
        "cost_matrix": plot_cost_matrix(cm, paths),
        "schedules": plot_schedules([s for s in schedules if s.K <= 256], ab),
    }
    quality = doc.get("sample_quality") or []
    for sampler in dict.fromkeys(sampler_label(q) for q in quality):
        if doc["fid"]["features"]:
            figures[f"fd_vs_K_{sampler}"] = plot_fd_vs_budget(quality, sampler, doc["fid"]["features"])
        if any(q.get("teacher_distance") is not None for q in quality if sampler_label(q) == sampler):
            figures[f"teacher_distance_vs_K_{sampler}"] = plot_teacher_distance_vs_budget(quality, sampler)
    if (doc.get("cost_matrix") or {}).get("opt"):
        figures["opt_history"] = plot_opt_history(doc["cost_matrix"]["opt"])
    if len(doc["fid"].get("guidance") or [1]) > 1:
        figures["schedules_vs_guidance"] = plot_schedules_vs_guidance(doc.get("sample_quality") or [])
    return figures


RESULT_COLUMNS = ["strategy", "K", "bpd", "bpd_sem", "predicted_bpd", "schedule"]
QUALITY_COLUMNS = ["strategy", "K", "sampler", "guidance", "fid", "fid_sem", "teacher_distance"]
QUALITY_COLUMNS += ["teacher_distance_sem", "schedule"]


def summary_metrics(doc: dict[str, Any]) -> dict[str, float]:
    """bpd/<strategy>/K<K>, fid/<strategy>/<sampler>/K<K> (and _sem), teacher_distance/<strategy>/<sampler>/K<K>."""
    metrics = {f"bpd/{r['strategy']}/K{r['K']}": r["bpd"] for r in doc["results"]}
    metrics |= quality_metrics(doc.get("sample_quality") or [])
    if doc.get("full_chain"):
        metrics["bpd/full_chain"] = doc["full_chain"]["bpd"]
    return metrics


def quality_metrics(entries: Sequence[dict[str, Any]]) -> dict[str, float]:
    """fid/, fid_sem/ and teacher_distance/<strategy>/<sampler label>/K<K> of sample-quality entries."""
    return {
        f"{key}/{q['strategy']}/{sampler_label(q)}/K{q['K']}": q[key]
        for q in entries
        for key in ("fid", "fid_sem", "teacher_distance")
        if q.get(key) is not None
    }


def log_evaluation(logger, doc: dict[str, Any], figures: dict) -> None:
    """The summary metrics; with W&B also the results and sample-quality tables (typed columns: the schedule as a
    list of timesteps), line plots of bits/dim and FD against K per strategy, and the figures."""
    if not logger:
        return
    metrics = summary_metrics(doc)
    if not isinstance(logger, WandbLogger):
        logger.log_metrics(metrics)
        logger.save()
        return
    logger.experiment.summary.update(metrics)
    rows = [[r[c] for c in RESULT_COLUMNS] for r in doc["results"]]
    logger.log_table("results", columns=RESULT_COLUMNS, data=rows)
    quality = doc.get("sample_quality") or []
    rows = [[q.get(c, 1.0 if c == "guidance" else None) for c in QUALITY_COLUMNS] for q in quality]
    logger.log_table("sample_quality", columns=QUALITY_COLUMNS, data=rows)
    charts = {"charts/bpd_vs_K": _line_series([(r["strategy"], r["K"], r["bpd"]) for r in doc["results"]], "bpd")}
    for label in dict.fromkeys(sampler_label(q) for q in quality):
        lines = [
            (q["strategy"], q["K"], q["fid"]) for q in quality if sampler_label(q) == label and q["fid"] is not None
        ]
        if lines:
            charts[f"charts/fd_vs_K_{label}"] = _line_series(lines, f"Fréchet distance, {label}")
    logger.experiment.log({k: v for k, v in charts.items() if v is not None})
    for name, fig in figures.items():
        logger.log_image(f"plots/{name}", images=[figure_array(fig)])


def _line_series(points: Sequence[tuple[str, int, float]], title: str):
    """A W&B line chart, one line per strategy, over the union of the Ks (a strategy without a K has a gap)."""
    import wandb

    ks = sorted({k for _, k, _ in points})
    by = {}
    for name, k, v in points:
        by.setdefault(name, {})[k] = v
    if not ks:
        return None
    ys = [[by[n].get(k, math.nan) for k in ks] for n in by]
    return wandb.plot.line_series(xs=ks, ys=ys, keys=list(by), title=title, xname="K")


def log_artifacts(logger, out_dir: Path, name: str, matrix_files: Sequence[Path]) -> None:
    """W&B Artifacts: ``schedules-<name>`` (schedules.json, results.json, results.md) and ``cost-matrices-<name>``
    (the cached matrices), so a schedule can be fetched by name and version (``<artifact>:v3``, ``:latest``)."""
    if not isinstance(logger, WandbLogger):
        return
    import wandb

    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in name)[:100]
    found = wandb.Artifact(f"schedules-{safe}", type="schedules", description="evaluate.py's schedules and results")
    for file in ("schedules/schedules.json", "results.json", "results.md"):
        if (out_dir / file).is_file():
            found.add_file(str(out_dir / file), name=file)
    logger.experiment.log_artifact(found)
    files = [Path(f) for f in matrix_files if f and Path(f).is_file()]
    if files:
        matrices = wandb.Artifact(f"cost-matrices-{safe}", type="cost_matrix", description="the cached cost matrices")
        for f in files:
            matrices.add_file(str(f), name=f.name)
        logger.experiment.log_artifact(matrices)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
