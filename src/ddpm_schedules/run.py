"""run_evaluation: from a model and data to an EvaluationResult, in named stages.

cost matrix (cached) -> schedules -> held-out bits/dim -> samples -> Fréchet distances -> reports.
No Hydra here: `pipeline.evaluate` maps a config onto this call. Under several processes every
stage shards its examples (or sample chunks) by rank, and the sums combine into the one-process result.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor

from . import report
from .cost_matrix import CostMatrix, estimate_cost_matrix, full_grid
from .evaluation import ScheduleResult, evaluate_schedules
from .frechet import frechet_distances
from .model import DiffusionModel
from .noise import mix, shard
from .resume import PartialFile
from .schedules import Schedule, full_schedule
from .storage import atomic_write_json, cache_key, file_digest, hash_parts
from .strategies import Strategy, build_schedules


@dataclass(frozen=True)
class Processes:
    """This process's place among ``world`` processes (one by default)."""

    rank: int = 0
    world: int = 1

    def shard(self, n: int) -> tuple[int, int]:
        return shard(n, self.rank, self.world)

    @property
    def partial_suffix(self) -> str:
        return f".rank{self.rank}.partial.pt" if self.world > 1 else ".partial.pt"


@dataclass(frozen=True)
class Labels:
    """What the inputs are called in results.json (the objects themselves do not know)."""

    model_source: str = "python"
    model_path: str = ""
    data_name: str = "data"
    cost_split: str = "val"
    eval_split: str = "test"


@dataclass(frozen=True)
class ResumeSettings:
    """How often partial sums are saved (see `estimate_cost_matrix`)."""

    every_columns: int = 50
    every_batches: int = 10
    every_seconds: float = 300.0


@dataclass(frozen=True)
class SampleSettings:
    seed: int = 0
    grid_size: int = 64  # samples shown per schedule
    chunk: int = 64  # samples per generator seeding: the unit shared out between processes


@dataclass(frozen=True)
class FrechetSettings:
    features: str = "digits"  # "digits" (FD in a digits classifier's features) or "inception" (FID)
    digits_weights: str | None = None
    inception_weights: str | None = None
    antialias: bool = False
    samples: int = 200
    reference_split: str = "test"

    @property
    def description(self) -> str:
        return "Inception-v3 pool3 (FID)" if self.features == "inception" else "digits classifier penultimate layer (FD, not FID)"


@dataclass
class EvaluationResult:
    """What evaluate.py reports; ``to_json()`` is results.json."""

    model: dict[str, Any]
    data: dict[str, Any]
    cost_matrix: dict[str, Any]
    full_chain: dict[str, Any] | None
    fid: dict[str, Any]
    results: list[dict[str, Any]]
    timings: dict[str, float]
    matrix: CostMatrix | None = field(default=None, repr=False)
    schedules: list[Schedule] = field(default_factory=list, repr=False)
    samples: dict[int, Tensor] = field(default_factory=dict, repr=False)

    def to_json(self) -> dict[str, Any]:
        keys = ("model", "data", "cost_matrix", "full_chain", "fid", "results", "timings")
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


@dataclass
class CostStage:
    matrix: CostMatrix
    key: str
    file: Path
    cached: bool


def cost_matrix_stage(ctx: Context, data: Tensor, grid: list[int] | None, seed: int, labels: Labels) -> CostStage:
    """The cost matrix, read from the cache (keyed by weights, data, grid, seed, conventions) or estimated."""
    g = full_grid(grid, ctx.model.T)
    key = cache_key(ctx.model, data=labels.data_name, split=labels.cost_split, examples=len(data), grid=g.tolist(), seed=seed)
    file = ctx.cache_dir / f"cost_matrix_{key[:20]}.pt"
    if file.is_file():
        try:
            return CostStage(CostMatrix.load(file), key, file, cached=True)
        except ValueError:
            pass  # damaged: estimate again and overwrite
    lo, hi = ctx.procs.shard(len(data))
    cm = estimate_cost_matrix(
        ctx.model, data[lo:hi], grid=grid, seed=seed, batch_size=ctx.batch_size, progress=ctx.progress, start_index=lo,
        partial=PartialFile(file.with_suffix(ctx.procs.partial_suffix), ctx.resume.every_columns, ctx.resume.every_seconds),
    )  # fmt: skip
    if ctx.procs.rank == 0:
        cm.save(file)
    return CostStage(cm, key, file, cached=False)


def held_out_stage(
    ctx: Context, data: Tensor, schedules: list[Schedule], seed: int, key: str, split: str, full_chain: bool
) -> tuple[list[ScheduleResult], ScheduleResult | None]:
    """Held-out bits/dim of every schedule (and the full chain) in one union pass."""
    extra = [full_schedule(ctx.model.T)] if full_chain else []
    held_key = hash_parts(key=key, split=split, examples=len(data))
    lo, hi = ctx.procs.shard(len(data))
    results = evaluate_schedules(
        ctx.model, data[lo:hi], schedules + extra, seed=seed, batch_size=ctx.batch_size, progress=ctx.progress, start_index=lo,
        partial=PartialFile(ctx.cache_dir / f"held_out_{held_key[:20]}{ctx.procs.partial_suffix}", ctx.resume.every_batches,
                            ctx.resume.every_seconds),
    )  # fmt: skip
    return results[: len(schedules)], (results[-1] if extra else None)


def sample_chunks(n: int, chunk: int, procs: Processes) -> list[int]:
    """The chunks of n samples this process draws (round robin over processes)."""
    return list(range(procs.rank, math.ceil(n / chunk), procs.world))


def sample_stage(ctx: Context, schedules: list[Schedule], n: int, settings: SampleSettings) -> dict[int, Tensor]:
    """n ancestral samples per schedule; chunk c of schedule i always gets the same noise, whichever process draws it."""
    out = {}
    for i, sch in enumerate(schedules):
        parts = [
            ctx.model.sample(sch, min(settings.chunk, n - c * settings.chunk), generator=torch.Generator().manual_seed(mix(settings.seed, i, c)),
                             batch_size=ctx.batch_size).cpu()
            for c in sample_chunks(n, settings.chunk, ctx.procs)
        ]  # fmt: skip
        out[i] = torch.cat(parts) if parts else torch.empty(0, *ctx.model.image_shape)
    return out


def frechet_stage(
    ctx: Context, samples: dict[int, Tensor], reference: Tensor, settings: FrechetSettings, chunk: int, data_name: str
) -> dict[int, float]:
    """The Fréchet distance of each schedule's first ``settings.samples`` samples to the reference images."""
    weights = settings.digits_weights if settings.features == "digits" else settings.inception_weights
    ref_key = hash_parts(features=settings.features, weights=file_digest(weights), data=data_name, split=settings.reference_split,
                         examples=len(reference), antialias=bool(settings.antialias))  # fmt: skip
    # this process holds whole chunks, in order: its share of the first settings.samples lies at the front
    keep = sum(min(chunk, settings.samples - c * chunk) for c in sample_chunks(settings.samples, chunk, ctx.procs))
    lo, hi = ctx.procs.shard(len(reference))
    return frechet_distances(
        reference[lo:hi], {i: s[:keep] for i, s in samples.items()}, features=settings.features,
        digits_weights=settings.digits_weights, inception_weights=settings.inception_weights, antialias=bool(settings.antialias),
        reference_cache=str(ctx.cache_dir / f"fid_reference_{ref_key[:20]}.pt") if ctx.procs.world == 1 else None,
    )  # fmt: skip


def result_rows(results: list[ScheduleResult], fids: dict[int, float], cm: CostMatrix) -> list[dict[str, Any]]:
    """One results.json entry per schedule; ``predicted_bpd`` where every timestep is on the matrix's grid."""
    grid = set(cm.grid.tolist())
    return [
        {
            "strategy": r.schedule.strategy, "K": r.schedule.K, "schedule": list(r.schedule.timesteps), "bpd": r.bpd,
            "bpd_sem": r.bpd_sem, "predicted_bpd": cm.bpd(cm.schedule_nats(r.schedule)) if set(r.schedule.timesteps) <= grid else None,
            "fid": fids.get(i), "terms_bpd": r.terms_bpd,
        }
        for i, r in enumerate(results)
    ]  # fmt: skip


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
    cost_seed: int = 0,
    eval_seed: int = 1,
    full_chain: bool = True,
    batch_size: int = 200,
    fid: FrechetSettings | None = None,
    reference: Tensor | None = None,
    sample: SampleSettings = SampleSettings(),
    resume: ResumeSettings = ResumeSettings(),
    procs: Processes = Processes(),
    labels: Labels = Labels(),
    logger: Any = None,
) -> EvaluationResult:
    """Every stage in order; process 0 writes the reports and, last and atomically, results.json."""
    ctx = Context(model, Path(cache_dir), batch_size, procs, resume)
    with ctx.timed("cost_matrix"):
        cost = cost_matrix_stage(ctx, cost_data, grid, cost_seed, labels)
    with ctx.timed("dp_and_schedules"):
        schedules = build_schedules(strategies, cost.matrix, budgets)
    with ctx.timed("held_out_bpd"):
        results, full = held_out_stage(ctx, eval_data, schedules, eval_seed, cost.key, labels.eval_split, full_chain)
    with ctx.timed("sampling"):
        samples = sample_stage(ctx, schedules, max(fid.samples if fid else 0, sample.grid_size), sample)
    with ctx.timed("fid"):
        fids = frechet_stage(ctx, samples, reference, fid, sample.chunk, labels.data_name) if fid else {}
    cm = cost.matrix
    result = EvaluationResult(
        model={"source": labels.model_source, "path": labels.model_path, "T": model.T, "mean_type": model.mean_type, "var_type": model.var_type},
        data={"name": labels.data_name, "levels": model.levels, "dims": math.prod(model.image_shape), "cost_split": labels.cost_split,
              "cost_examples": len(cost_data), "eval_split": labels.eval_split, "eval_examples": len(eval_data)},
        cost_matrix={"grid_size": cm.grid.numel() - 1, "seconds": ctx.timings["cost_matrix"], "file": str(cost.file), "cached": cost.cached,
                     "seed": cost_seed},
        full_chain={"K": model.T, "bpd": full.bpd, "bpd_sem": full.bpd_sem} if full else None,
        fid={"features": fid.description if fid else None, "reference_split": fid.reference_split if fid else None,
             "reference_examples": len(reference) if fid else None, "samples": fid.samples if fid else None},
        results=result_rows(results, fids, cm), timings=ctx.timings, matrix=cm, schedules=schedules, samples=samples,
    )  # fmt: skip
    if procs.rank == 0:
        with ctx.timed("report"):
            report.write_evaluation(Path(out_dir), result.to_json(), cm, schedules, samples, logger)
        atomic_write_json(Path(out_dir) / "results.json", result.to_json())
    return result
