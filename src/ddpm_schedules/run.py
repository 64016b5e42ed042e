"""run_evaluation: from a model and data to an EvaluationResult, in named stages.

cost matrices (cached, one per objective the strategies need) -> schedules -> held-out bits/dim ->
sample quality per (schedule, sampler) -> reports. No Hydra here: `pipeline.evaluate` maps a config
onto this call. Under several processes every stage shards its examples (or sample chunks) by rank,
and the sums combine into the one-process result.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from torch import Tensor

from . import report
from .cost_matrix import CostMatrix, estimate_cost_matrices
from .evaluation import ScheduleResult, evaluate_schedules
from .grids import candidate_grid, full_grid
from .model import DiffusionModel
from .noise import Processes
from .ode import estimate_ode_matrix
from .precision import estimate_to_precision
from .quality import QualitySettings, quality_stage
from .resume import PartialFile
from .schedules import Schedule, full_schedule
from .settings import (
    FrechetSettings,
    Labels,
    OdeSettings,
    PrecisionSettings,
    ResumeSettings,
)
from .storage import atomic_write_json, cache_key, file_digest, hash_parts
from .strategies import Strategy, build_schedules, objectives_of


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
    matrices: dict[str, CostMatrix] = field(default_factory=dict, repr=False)
    schedules: list[Schedule] = field(default_factory=list, repr=False)
    grids: dict[str, Tensor] = field(default_factory=dict, repr=False)

    def to_json(self) -> dict[str, Any]:
        keys = ("model", "data", "cost_matrix", "full_chain", "fid", "results", "sample_quality", "timings")
        return {k: getattr(self, k) for k in keys}


@dataclass
class Context:
    """What every stage needs: the model, where this process stands, caching and resuming."""

    model: DiffusionModel
    cache_dir: Path
    batch_size: int = 200
    procs: Processes = Processes()
    resume: ResumeSettings = ResumeSettings()
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def progress(self) -> bool:
        return self.procs.rank == 0

    @contextmanager
    def timed(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.timings[name] = time.perf_counter() - start

    def partial(self, file: Path, every: int) -> PartialFile:
        return PartialFile(file.with_suffix(self.procs.partial_suffix), every, self.resume.every_seconds)


@dataclass
class CostStage:
    matrix: CostMatrix
    key: str
    file: Path
    cached: bool

    def describe(self) -> dict[str, Any]:
        return {"grid_size": self.matrix.grid.numel() - 1, "file": str(self.file), "cached": self.cached, "count": self.matrix.count}


def _load(file: Path) -> CostMatrix | None:
    try:
        return CostMatrix.load(file) if file.is_file() else None
    except ValueError:
        return None  # damaged: estimate again and overwrite


def precision_stage(ctx: Context, data: Tensor, grid: list[int] | None, seed: int, labels: Labels, budgets: Sequence[int],
                    settings: PrecisionSettings) -> tuple[Tensor, CostStage | None, list[dict[str, Any]]]:
    """With a target, the ELBO matrix from `estimate_to_precision` (cached with its rounds); returns the examples it used."""
    if settings.target_sem is None:
        return data, None, []
    g = full_grid(grid, ctx.model.T)
    key = cache_key(ctx.model, data=labels.data_name, split=labels.cost_split, examples=len(data), grid=g.tolist(), seed=seed,
                    target_sem=settings.target_sem, first=settings.first, budgets=list(budgets))  # fmt: skip
    file = ctx.cache_dir / f"cost_matrix_{key[:20]}.pt"
    rounds_file = file.with_suffix(".rounds.json")
    cm = _load(file)
    if cm is not None and rounds_file.is_file():
        rounds = json.loads(rounds_file.read_text())
        return data[: rounds[-1]["examples"]], CostStage(cm, key, file, True), rounds
    cm, rounds = estimate_to_precision(ctx.model, data, budgets, settings.target_sem, grid, seed, ctx.batch_size, settings.first,
                                       ctx.progress, ctx.procs)  # fmt: skip
    if ctx.procs.rank == 0:
        atomic_write_json(rounds_file, rounds)
        cm.save(file)
    return data[: rounds[-1]["examples"]], CostStage(cm, key, file, False), rounds


def data_matrices_stage(ctx: Context, data: Tensor, grid: list[int] | None, seed: int, labels: Labels, objectives: Sequence[str]) -> dict[str, CostStage]:
    """The data objectives' matrices (elbo, mse), from the cache (keyed by weights, data, grid, seed, conventions)
    or estimated together from one set of forward passes."""
    g = full_grid(grid, ctx.model.T)
    base = dict(data=labels.data_name, split=labels.cost_split, examples=len(data), grid=g.tolist(), seed=seed)
    keys = {o: cache_key(ctx.model, **base, **({} if o == "elbo" else {"objective": o})) for o in objectives}
    files = {o: ctx.cache_dir / f"cost_matrix_{k[:20]}.pt" for o, k in keys.items()}
    out = {o: CostStage(cm, keys[o], files[o], True) for o in objectives if (cm := _load(files[o])) is not None}
    missing = [o for o in objectives if o not in out]
    if missing:
        lo, hi = ctx.procs.shard(len(data))
        estimated = estimate_cost_matrices(
            ctx.model, data[lo:hi], missing, grid=grid, seed=seed, batch_size=ctx.batch_size, progress=ctx.progress, start_index=lo,
            partial=ctx.partial(files[missing[0]], ctx.resume.every_columns),
        )  # fmt: skip
        for o, cm in estimated.items():
            if ctx.procs.rank == 0:
                cm.save(files[o])
            out[o] = CostStage(cm, keys[o], files[o], False)
    return out


def ode_matrix_stage(ctx: Context, seed: int, settings: OdeSettings, grid: list[int] | None) -> CostStage:
    """The dp_ode matrix from teacher DDIM trajectories (ode.py), cached like the others."""
    g = full_grid(grid, ctx.model.T)
    key = cache_key(ctx.model, objective="ode", grid=g.tolist(), seed=seed, trajectories=settings.trajectories)
    file = ctx.cache_dir / f"cost_matrix_{key[:20]}.pt"
    cm = _load(file)
    if cm is not None:
        return CostStage(cm, key, file, True)
    lo, hi = ctx.procs.shard(settings.trajectories)
    cm = estimate_ode_matrix(ctx.model, hi - lo, grid=grid, seed=seed, batch_size=ctx.batch_size, progress=ctx.progress, start_index=lo,
                             partial=ctx.partial(file, 1), memory_gb=settings.memory_gb)  # fmt: skip
    if ctx.procs.rank == 0:
        cm.save(file)
    return CostStage(cm, key, file, False)


def held_out_stage(
    ctx: Context, data: Tensor, schedules: list[Schedule], seed: int, key: str, split: str, full_chain: bool
) -> tuple[list[ScheduleResult], ScheduleResult | None]:
    """Held-out bits/dim of every schedule (and the full chain) in one union pass."""
    extra = [full_schedule(ctx.model.T)] if full_chain else []
    held_key = hash_parts(key=key, split=split, examples=len(data))
    lo, hi = ctx.procs.shard(len(data))
    results = evaluate_schedules(
        ctx.model, data[lo:hi], schedules + extra, seed=seed, batch_size=ctx.batch_size, progress=ctx.progress, start_index=lo,
        partial=ctx.partial(ctx.cache_dir / f"held_out_{held_key[:20]}.pt", ctx.resume.every_batches),
    )  # fmt: skip
    return results[: len(schedules)], (results[-1] if extra else None)


def result_rows(results: list[ScheduleResult], quality: list[dict[str, Any]], cm: CostMatrix) -> list[dict[str, Any]]:
    """One results.json entry per (strategy, K): bits/dim, ``predicted_bpd`` where every timestep is on the
    ELBO matrix's grid, and ``fid`` of the ancestral sampler (the chain the bits/dim belong to) where sampled."""
    grid = set(cm.grid.tolist())
    ancestral = {(q["strategy"], tuple(q["schedule"])): q["fid"] for q in quality if q["sampler"] == "ancestral"}
    return [
        {
            "strategy": r.schedule.strategy, "K": r.schedule.K, "schedule": list(r.schedule.timesteps), "bpd": r.bpd,
            "bpd_sem": r.bpd_sem, "predicted_bpd": cm.bpd(cm.schedule_nats(r.schedule)) if set(r.schedule.timesteps) <= grid else None,
            "fid": ancestral.get((r.schedule.strategy, r.schedule.timesteps)), "terms_bpd": r.terms_bpd,
        }
        for r in results
    ]  # fmt: skip


def unique(schedules: Sequence[Schedule]) -> list[Schedule]:
    """Schedules without repeats (a fixed strategy's schedule is built for every budget list)."""
    seen, out = set(), []
    for s in schedules:
        if (s.strategy, s.timesteps) not in seen:
            seen.add((s.strategy, s.timesteps))
            out.append(s)
    return out


def run_evaluation(
    model: DiffusionModel,
    cost_data: Tensor,
    eval_data: Tensor,
    *,
    grid: list[int] | None,
    budgets: Sequence[int],
    strategies: Sequence[Strategy],
    out_dir: str | Path,
    cache_dir: str | Path,
    sample_budgets: Sequence[int] = (),
    cost_seed: int = 0,
    eval_seed: int = 1,
    full_chain: bool = True,
    batch_size: int = 200,
    quality: QualitySettings = QualitySettings(),
    fid: FrechetSettings | None = None,
    reference: Tensor | None = None,
    ode: OdeSettings = OdeSettings(),
    precision: PrecisionSettings = PrecisionSettings(),
    resume: ResumeSettings = ResumeSettings(),
    procs: Processes = Processes(),
    labels: Labels = Labels(),
    logger: Any = None,
) -> EvaluationResult:
    """Every stage in order; process 0 writes the reports and, last and atomically, results.json."""
    ctx = Context(model, Path(cache_dir), batch_size, procs, resume)
    objectives = objectives_of(strategies)
    ode_grid = candidate_grid(ode.grid, model.T, "cost.ode.grid") if ode.grid is not None else grid
    with ctx.timed("cost_matrix"):
        cost_data, precise, rounds = precision_stage(ctx, cost_data, grid, cost_seed, labels, budgets, precision)
        others = [o for o in objectives if o != "ode" and not (precise and o == "elbo")]
        costs = ({"elbo": precise} if precise else {}) | (data_matrices_stage(ctx, cost_data, grid, cost_seed, labels, others) if others else {})
    if "ode" in objectives:
        with ctx.timed("ode_matrix"):
            costs["ode"] = ode_matrix_stage(ctx, cost_seed, ode, ode_grid)
    matrices = {o: c.matrix for o, c in costs.items()}
    with ctx.timed("dp_and_schedules"):
        schedules = build_schedules(strategies, matrices, budgets)
        sampled = unique(build_schedules(strategies, matrices, sample_budgets)) if sample_budgets else []
    with ctx.timed("held_out_bpd"):
        results, full = held_out_stage(ctx, eval_data, schedules, eval_seed, costs["elbo"].key, labels.eval_split, full_chain)
    with ctx.timed("sample_quality"):
        ref_cache = _reference_cache(ctx, fid, reference, labels) if fid and procs.world == 1 else None
        shard = reference[slice(*procs.shard(len(reference)))] if fid else None
        teacher = Schedule(tuple(full_grid(ode_grid, model.T)[1:].tolist()), model.T, "teacher") if "ddim" in quality.samplers else None
        entries, grids = quality_stage(model, sampled, quality, procs, batch_size, fid, shard, ref_cache, teacher)
    elbo = costs["elbo"]
    result = EvaluationResult(
        model={"source": labels.model_source, "path": labels.model_path, "T": model.T, "mean_type": model.mean_type, "var_type": model.var_type},
        data={"name": labels.data_name, "levels": model.levels, "dims": math.prod(model.image_shape), "cost_split": labels.cost_split,
              "cost_examples": len(cost_data), "eval_split": labels.eval_split, "eval_examples": len(eval_data)},
        cost_matrix={"grid_size": elbo.matrix.grid.numel() - 1, "seconds": ctx.timings["cost_matrix"], "file": str(elbo.file),
                     "cached": elbo.cached, "seed": cost_seed, "objectives": {o: c.describe() for o, c in costs.items()},
                     "target_sem": precision.target_sem, "rounds": rounds},
        full_chain={"K": model.T, "bpd": full.bpd, "bpd_sem": full.bpd_sem} if full else None,
        fid={"features": fid.description if fid else None, "reference_split": fid.reference_split if fid else None,
             "reference_examples": len(reference) if fid else None, "samples": quality.samples if fid else None,
             "bootstrap": quality.bootstrap if fid else None, "samplers": list(quality.samplers), "ddim_eta": quality.ddim_eta,
             "sample_budgets": list(sample_budgets), "teacher_samples": quality.teacher_samples if teacher else None,
             "teacher": {"sampler": "ddim", "eta": 0.0, "steps": teacher.K} if teacher else None},
        results=result_rows(results, entries, elbo.matrix), sample_quality=entries, timings=ctx.timings,
        matrices=matrices, schedules=schedules, grids=grids,
    )  # fmt: skip
    if procs.rank == 0:
        with ctx.timed("report"):
            report.write_evaluation(Path(out_dir), result.to_json(), elbo.matrix, unique(schedules + sampled), grids, logger)
        atomic_write_json(Path(out_dir) / "results.json", result.to_json())
    return result


def _reference_cache(ctx: Context, fid: FrechetSettings, reference: Tensor, labels: Labels) -> str | None:
    """Where the reference images' feature moments are cached (one process only: the shards would differ)."""
    weights = fid.digits_weights if fid.features == "digits" else fid.inception_weights
    key = hash_parts(features=fid.features, weights=file_digest(weights), data=labels.data_name, split=fid.reference_split,
                     examples=len(reference), antialias=bool(fid.antialias), moments=True)  # fmt: skip
    return str(ctx.cache_dir / f"fid_reference_{key[:20]}.pt")
