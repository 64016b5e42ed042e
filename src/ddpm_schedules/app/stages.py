"""The cost-matrix stages of run_evaluation: cached matrices per objective, by precision target, by refinement, ODE."""

from __future__ import annotations

import json
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from torch import Tensor

from ddpm_schedules.app.keys import ODE_KEYS, config_keys
from ddpm_schedules.app.settings import Labels, OdeSettings, PrecisionSettings, ResumeSettings
from ddpm_schedules.costs.cost_matrix import estimate_cost_matrices
from ddpm_schedules.costs.grids import full_grid
from ddpm_schedules.costs.matrix import CostMatrix
from ddpm_schedules.costs.ode import estimate_ode_matrix
from ddpm_schedules.costs.options import EstimateOptions
from ddpm_schedules.costs.oss import estimate_oss_paths
from ddpm_schedules.costs.oss_state import OssPaths
from ddpm_schedules.costs.precision import estimate_to_precision
from ddpm_schedules.costs.refine import RefineSettings, refine_cost_matrices
from ddpm_schedules.models.model import DiffusionModel
from ddpm_schedules.models.noise import Processes
from ddpm_schedules.schedules.strategies import TEACHER
from ddpm_schedules.storage.files import atomic_write_json, cache_key
from ddpm_schedules.storage.resume import PartialFile

log = logging.getLogger(__name__)


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

    def options(self, seed: int, **changes: Any) -> EstimateOptions:
        """The estimators' options of this process: its batch size, progress bar and place, with ``seed``."""
        return EstimateOptions(
            seed=seed, batch_size=self.batch_size, progress=self.progress, procs=self.procs, **changes
        )


@dataclass
class CostStage:
    matrix: CostMatrix | OssPaths
    key: str
    file: Path
    cached: bool

    def describe(self) -> dict[str, Any]:
        out = {
            "grid_size": self.matrix.grid.numel() - 1,
            "file": str(self.file),
            "cached": self.cached,
            "count": self.matrix.count,
        }
        if isinstance(self.matrix, OssPaths):
            out |= {
                "passes_per_trajectory": self.matrix.passes,
                "propagate": self.matrix.propagate,
                "distance": {str(K): d for K, d in self.matrix.distance.items()},
            }
        return out


def _load(file: Path) -> CostMatrix | None:
    try:
        return CostMatrix.load(file) if file.is_file() else None
    except ValueError:
        return None  # damaged: estimate again and overwrite


def precision_stage(
    ctx: Context,
    data: Tensor,
    grid: list[int] | None,
    seed: int,
    labels: Labels,
    budgets: Sequence[int],
    settings: PrecisionSettings,
    start: CostStage | None = None,
) -> tuple[Tensor, CostStage | None, list[dict[str, Any]]]:
    """With a target, the ELBO matrix from `estimate_to_precision` (cached with its rounds); returns the
    examples it used.
    ``start``: refinement's matrix of the first examples, continued on its grid."""
    if settings.target_sem is None:
        return data, None, []
    g = full_grid(grid, ctx.model.T) if start is None else start.matrix.grid
    key = cache_key(
        ctx.model,
        **labels.cost_key(len(data)),
        grid=g.tolist(),
        seed=seed,
        target_sem=settings.target_sem,
        first=settings.first,
        budgets=list(budgets),
        start=start.key if start else None,
    )
    file = ctx.cache_dir / f"cost_matrix_{key[:20]}.pt"
    rounds_file = file.with_suffix(".rounds.json")
    cm = _load(file)
    if cm is not None and rounds_file.is_file():
        rounds = json.loads(rounds_file.read_text())
        return data[: rounds[-1]["examples"]], CostStage(cm, key, file, True), rounds
    partial = ctx.partial(file, ctx.resume.every_columns)  # the merged rounds; each round's sums beside it (.round<r>)
    cm, rounds = estimate_to_precision(
        ctx.model,
        data,
        budgets,
        settings.target_sem,
        grid,
        first=settings.first,
        start=start.matrix if start else None,
        options=ctx.options(seed, partial=partial),
    )
    if ctx.procs.rank == 0:
        if not rounds[-1]["met"]:
            worst, sem = max(rounds[-1]["sem_bpd"].items(), key=lambda kv: kv[1])
            log.warning(
                "cost.target_sem = %g bits/dim is not reached with all %d examples (K = %d: %.4f); raise cost.examples",
                settings.target_sem,
                rounds[-1]["examples"],
                worst,
                sem,
            )
        atomic_write_json(rounds_file, rounds)
        cm.save(file)
    return data[: rounds[-1]["examples"]], CostStage(cm, key, file, False), rounds


@config_keys("cost.refine", examples="cost.examples")
def refine_stage(
    ctx: Context,
    data: Tensor,
    seed: int,
    labels: Labels,
    objectives: Sequence[str],
    budgets: Sequence[int],
    settings: RefineSettings,
) -> tuple[dict[str, CostStage], list[dict[str, Any]]]:
    """``cost.refine``: the data objectives' matrices on a grid refined around the DP's paths (refine.py), cached
    with its rounds."""
    wanted = [o for o in objectives if o not in TEACHER]
    key = cache_key(
        ctx.model,
        **labels.cost_key(len(data)),
        seed=seed,
        refine=settings.__dict__,
        budgets=list(budgets),
        objectives=wanted,
    )
    files = {o: ctx.cache_dir / f"cost_matrix_{key[:16]}_{o}.pt" for o in wanted}
    rounds_file = ctx.cache_dir / f"cost_matrix_{key[:16]}.rounds.json"
    cached = {o: _load(f) for o, f in files.items()}
    if all(cm is not None for cm in cached.values()) and rounds_file.is_file():
        return {o: CostStage(cm, key, files[o], True) for o, cm in cached.items()}, json.loads(rounds_file.read_text())
    lo, hi = ctx.procs.shard(len(data))
    partial = ctx.partial(
        ctx.cache_dir / f"cost_matrix_{key[:16]}.refine.pt", ctx.resume.every_columns
    )  # kept statistics, grid, rounds
    options = ctx.options(seed, start_index=lo, partial=partial)
    matrices, rounds = refine_cost_matrices(
        ctx.model, data[lo:hi], budgets, settings, wanted, examples=len(data), options=options
    )
    if ctx.procs.rank == 0:
        atomic_write_json(rounds_file, rounds)
        for o, cm in matrices.items():
            cm.save(files[o])
    return {o: CostStage(cm, key, files[o], False) for o, cm in matrices.items()}, rounds


def data_matrices_stage(
    ctx: Context, data: Tensor, grid: list[int] | None, seed: int, labels: Labels, objectives: Sequence[str]
) -> dict[str, CostStage]:
    """The data objectives' matrices (elbo, mse), from the cache (keyed by weights, data, grid, seed, conventions)
    or estimated together from one set of forward passes."""
    g = full_grid(grid, ctx.model.T)
    base = dict(**labels.cost_key(len(data)), grid=g.tolist(), seed=seed)
    keys = {o: cache_key(ctx.model, **base, **({} if o == "elbo" else {"objective": o})) for o in objectives}
    files = {o: ctx.cache_dir / f"cost_matrix_{k[:20]}.pt" for o, k in keys.items()}
    out = {o: CostStage(cm, keys[o], files[o], True) for o in objectives if (cm := _load(files[o])) is not None}
    missing = [o for o in objectives if o not in out]
    if missing:
        lo, hi = ctx.procs.shard(len(data))
        partial = ctx.partial(files[missing[0]], ctx.resume.every_columns)
        estimated = estimate_cost_matrices(
            ctx.model, data[lo:hi], missing, grid, options=ctx.options(seed, start_index=lo, partial=partial)
        )
        for o, cm in estimated.items():
            if ctx.procs.rank == 0:
                cm.save(files[o])
            out[o] = CostStage(cm, keys[o], files[o], False)
    return out


def teacher_key(grid: Tensor, seed: int, settings: OdeSettings) -> dict[str, Any]:
    """The teacher trajectories' part of a cache key: their grid, noise seed and count."""
    return {"grid": grid.tolist(), "seed": seed, "trajectories": settings.trajectories}


@config_keys(**ODE_KEYS)
def ode_matrix_stage(
    ctx: Context, seed: int, settings: OdeSettings, grid: list[int] | None, multistep: bool = False
) -> CostStage:
    """The dp_ode matrix from teacher DDIM trajectories (ode.py), with ``multistep`` also DPM-Solver++(2M)'s step costs
    (dp_dpmpp), cached like the others."""
    g = full_grid(grid, ctx.model.T)
    key = cache_key(
        ctx.model,
        objective="ode",
        **teacher_key(g, seed, settings),
        **({"multistep": True} if multistep else {}),
    )
    file = ctx.cache_dir / f"cost_matrix_{key[:20]}.pt"
    cm = _load(file)
    if cm is not None:
        return CostStage(cm, key, file, True)
    lo, hi = ctx.procs.shard(settings.trajectories)
    options = ctx.options(seed, start_index=lo, partial=ctx.partial(file, 1))
    cm = estimate_ode_matrix(
        ctx.model, hi - lo, grid, memory_gb=settings.memory_gb, multistep=multistep, options=options
    )
    if ctx.procs.rank == 0:
        cm.save(file)
    return CostStage(cm, key, file, False)


@config_keys(**ODE_KEYS)
def oss_stage(
    ctx: Context, seed: int, settings: OdeSettings, grid: list[int] | None, budgets: Sequence[int]
) -> CostStage:
    """dp_ode_oss's paths for every budget from the sampler's own states (oss.py), cached as plain JSON."""
    g = full_grid(grid, ctx.model.T)
    key = cache_key(
        ctx.model,
        objective="oss",
        **teacher_key(g, seed, settings),
        budgets=sorted(budgets),
        propagate=settings.propagate,
    )
    file = ctx.cache_dir / f"oss_paths_{key[:20]}.json"
    try:
        return CostStage(OssPaths.load(file), key, file, True)
    except ValueError:
        pass  # absent or damaged: run the DP
    lo, hi = ctx.procs.shard(settings.trajectories)
    options = ctx.options(seed, start_index=lo, partial=ctx.partial(file, 1))
    paths = estimate_oss_paths(
        ctx.model, hi - lo, budgets, grid, propagate=settings.propagate, memory_gb=settings.memory_gb, options=options
    )
    if ctx.procs.rank == 0:
        paths.save(file)
    return CostStage(paths, key, file, False)
