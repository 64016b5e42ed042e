"""What run_evaluation hands back and writes: `EvaluationResult` (results.json), its rows, and the files and
artifacts of process 0 (reports, schedule files that know their model, Gamma, FID reference statistics)."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Sequence

from torch import Tensor

from ddpm_schedules.costs.evaluation import ScheduleResult
from ddpm_schedules.costs.matrix import CostMatrix
from ddpm_schedules.models.model import DiffusionModel
from ddpm_schedules.reports import report
from ddpm_schedules.sampling.frechet import save_reference_stats
from ddpm_schedules.schedules.analytic import save_gamma
from ddpm_schedules.schedules.files import GUIDED, schedule_record, strategy_target
from ddpm_schedules.schedules.schedule import Schedule
from ddpm_schedules.storage.files import atomic_write_json, network_digest


@dataclass
class EvaluationResult:
    """What evaluate.py reports; ``to_json()`` is results.json."""

    model: dict[str, Any]
    data: dict[str, Any]
    cost_matrix: dict[str, Any]
    full_chain: dict[str, Any] | None
    fid: dict[str, Any]
    results: list[dict[str, Any]]
    sample_quality: list[dict[str, Any]]
    timings: dict[str, float]
    run: dict[str, Any] = field(default_factory=dict)  # overrides, output dir, package version, git commit
    matrices: dict[str, CostMatrix] = field(default_factory=dict, repr=False)
    schedules: list[Schedule] = field(default_factory=list, repr=False)
    grids: dict[str, Tensor] = field(default_factory=dict, repr=False)

    def to_json(self) -> dict[str, Any]:
        keys = ("run", "model", "data", "cost_matrix", "full_chain", "fid", "results", "sample_quality", "timings")
        return {k: getattr(self, k) for k in keys}


def result_rows(results: list[ScheduleResult], quality: list[dict[str, Any]], cm: CostMatrix) -> list[dict[str, Any]]:
    """One results.json entry per (strategy, K): bits/dim, ``predicted_bpd`` where every timestep is on the
    ELBO matrix's grid, and ``fid`` of the ancestral sampler (the chain the bits/dim belong to) where sampled."""
    grid = set(cm.grid.tolist())
    ancestral = {
        (q["strategy"], tuple(q["schedule"])): q["fid"]
        for q in quality
        if q["sampler"] == "ancestral" and q.get("guidance", 1.0) == 1
    }
    return [
        {
            "strategy": r.schedule.strategy,
            "K": r.schedule.K,
            "schedule": list(r.schedule.timesteps),
            "bpd": r.bpd,
            "bpd_sem": r.bpd_sem,
            "predicted_bpd": cm.bpd(cm.schedule_nats(r.schedule)) if set(r.schedule.timesteps) <= grid else None,
            "fid": ancestral.get((r.schedule.strategy, r.schedule.timesteps)),
            "terms_bpd": r.terms_bpd,
        }
        for r in results
    ]


def schedule_records(model: DiffusionModel, schedules: Sequence[Schedule], propagate: str) -> list[dict[str, Any]]:
    """Every schedule's file record: k-diffusion's sigmas, alphas_cumprod, what it was optimised for (objective,
    sampler, guidance scale) and the model's fingerprint (its network hashed once)."""
    digest = network_digest(model)
    records = []
    for sch in schedules:
        objective, sampler = strategy_target(sch.strategy, propagate=propagate)
        guided = GUIDED.match(sch.strategy) if objective else None
        scale = float(guided["scale"]) if guided else 1.0
        records.append(
            schedule_record(sch, model, objective=objective, sampler=sampler, guidance=scale, weights=digest)
        )
    return records


def write_outputs(
    out_dir: Path,
    model: DiffusionModel,
    result: EvaluationResult,
    cm: CostMatrix,
    schedules: Sequence[Schedule],
    logger: Any,
    reference_stats: Any,
    *,
    propagate: str,
    artifact: str,
    matrix_files: Sequence[Path],
    timed: Callable[[str], ContextManager] = lambda name: nullcontext(),
) -> None:
    """Reports and schedule files (timed as "report"), Gamma (analytic variances), the FID reference statistics,
    then results.json (last, atomically, with the report's time) and the W&B artifacts."""
    with timed("report"):
        records = schedule_records(model, schedules, propagate)
        report.write_evaluation(
            out_dir, result.to_json(), cm, schedules, result.grids, logger, records, model.schedule.ab
        )
    if model.var_type == "analytic":
        save_gamma(out_dir / "gamma.pt", model.gamma, model)  # model.gamma_file= reuses it
    if reference_stats is not None:  # pytorch-fid's layout: fid.reference_stats= reuses it, and other tools read it
        save_reference_stats(out_dir / "fid_reference_stats.npz", *reference_stats)
    atomic_write_json(out_dir / "results.json", result.to_json())
    report.log_artifacts(logger, out_dir, artifact, matrix_files)
