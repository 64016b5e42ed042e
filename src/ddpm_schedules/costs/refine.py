"""Coarse-to-fine grid refinement (``cost.refine``): forward passes only where the DP's paths go.

Start from a coarse grid that keeps small t dense (e.g. ``log:100``), run the DP for every requested
budget and every objective (elbo, mse), add every timestep within ``window`` of a timestep any optimal
path uses (and, with ``bisect``, the midpoints between it and its neighbours on the grid, so that a wide
gap of a coarse grid at large t is searched in a few rounds, not only at its edges), and run the DP again
on the union grid; repeat until the paths need no new timestep (or a round or pass budget is spent).
A column's forward passes are made once: what its pairs need of each example's prediction at t is
kept (`terms.ColumnStats`: one number per example for fixed variances, a few dozen Chebyshev moments
for learned ones, not the [D] prediction), so the pairs of an old column with a newly added s cost no
pass. The result is a `CostMatrix` on the final candidate grid, on which the DP is exact. With a partial file, the kept
statistics, the grid and the rounds are saved as the columns are done, and a rerun continues (refine_state.py).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from ddpm_schedules.costs.grids import GridSpec, candidate_grid, full_grid
from ddpm_schedules.costs.matrix import CostMatrix, CostMatrixMetric, from_moments
from ddpm_schedules.costs.moments import empty_moments
from ddpm_schedules.costs.options import EstimateOptions, estimate_options
from ddpm_schedules.costs.refine_state import RefineState
from ddpm_schedules.costs.terms import column_stats, pair_tables, prior_nats, stats_tables, stats_terms
from ddpm_schedules.models.model import DiffusionModel, call_groups
from ddpm_schedules.models.noise import example_noise, indexed_batches
from ddpm_schedules.schedules.dp import optimal_schedules
from ddpm_schedules.storage.errors import ParameterError, check_count, parameter_names
from ddpm_schedules.storage.files import data_fingerprint, model_fingerprint
from ddpm_schedules.storage.progress import tqdm
from ddpm_schedules.storage.resume import PartialSums, sigterm_requests


@dataclass(frozen=True)
class RefineSettings:
    coarse: GridSpec = "log:100"  # the first grid
    window: int = 5  # timesteps added on each side of every timestep an optimal path uses
    bisect: bool = (
        False  # also the midpoints between each path timestep and its grid neighbours: wide gaps shrink by half a round
    )
    max_rounds: int = 10
    max_passes: int | None = None  # forward passes (examples x columns) at most; None: no limit
    memory_gb: float = 4.0  # the kept column statistics (about 8 (2K + 5) bytes per example and column) at most


def check_refine(settings: RefineSettings, T: int, examples: int, budgets: Sequence[int] = ()) -> None:
    """One-line errors for a window < 0, rounds < 1, a coarse grid smaller than a budget, or a pass budget below
    what the coarse grid needs: `ParameterError`s naming the fields of ``settings``."""
    with parameter_names(grid="coarse"):
        coarse = candidate_grid(settings.coarse, T)
    size = T if coarse is None else len(set(coarse) | {T})
    if budgets and max(budgets) > size:
        raise ParameterError(
            "{coarse} has {size} timesteps but the largest budget is K = {K}; use a finer {coarse}",
            size=size,
            K=max(budgets),
        )
    if isinstance(settings.window, bool) or not isinstance(settings.window, int) or settings.window < 0:
        raise ParameterError(
            "{window} = {value!r}; it must be an integer >= 0 (timesteps added on each side)", value=settings.window
        )
    if not isinstance(settings.bisect, bool):
        raise ParameterError("{bisect} = {value!r}; it must be true or false", value=settings.bisect)
    check_count(settings.max_rounds, "max_rounds")
    need = examples * size
    if settings.max_passes is not None and settings.max_passes < need:
        raise ParameterError(
            "{max_passes} = {value} is below the {need} passes the coarse grid needs ({n} examples); "
            "raise it or coarsen {coarse}",
            value=settings.max_passes,
            need=need,
            n=examples,
        )


def refine_cost_matrices(
    model: DiffusionModel,
    data: Tensor,
    budgets: Sequence[int],
    settings: RefineSettings = RefineSettings(),
    objectives: Sequence[str] = ("elbo",),
    *,
    examples: int | None = None,
    options: EstimateOptions | None = None,
    **overrides: Any,
) -> tuple[dict[str, CostMatrix], list[dict[str, Any]]]:
    """The refined matrices of the data objectives and one record per round; the grid grows around the DP paths of
    every objective (a grid refined for the ELBO alone misses where the MSE objective's paths go).

    ``options``: `EstimateOptions` (or its fields as keywords). Under torch.distributed each process passes its
    shard (``start_index``: its first example's global index) and ``examples``, the total, for the pass count;
    the matrices combine as `estimate_cost_matrix`'s.
    With ``partial`` (a `PartialFile`, or a path: saved every 50 columns) the kept statistics, the grid and
    the rounds are saved after every round and as the columns are done; a rerun of the same configuration
    estimates only the columns not yet kept, SIGTERM saves and stops with `Preempted`, and the file is
    removed once the refinement is complete.
    """
    opts = estimate_options(options, **overrides)
    seed, batch_size, start_index = opts.seed, opts.batch_size, opts.start_index
    T = model.T
    examples = len(data) if examples is None else examples
    check_refine(settings, T, examples, budgets)
    batches = indexed_batches(data, batch_size, model.levels, model.image_shape, start_index, model.num_classes)
    partial = opts.partial_file(every=50)
    config = (
        {
            "what": "refine",
            "model": model_fingerprint(model),
            "data": data_fingerprint(batches),
            "seed": seed,
            "settings": asdict(settings),
            "budgets": [int(K) for K in budgets],
            "objectives": list(objectives),
            "start_index": start_index,
            "examples": examples,
            "batch_size": batch_size,
        }
        if partial
        else {}
    )
    saver = PartialSums(
        partial.path if partial else None, config, partial.every if partial else 1, partial.seconds if partial else 0
    )
    state = RefineState.load(saver, model.device) if partial else None
    if state is None:
        state = RefineState(set(candidate_grid(settings.coarse, T) or range(1, T + 1)) | {T})
    matrices = None
    with sigterm_requests(enabled=partial is not None) as stop_requested:
        while state.round < settings.max_rounds:
            if state.new is None:
                state.new = sorted(state.grid - set(state.kept))
            if settings.max_passes is not None and state.passes + len(state.new) * examples > settings.max_passes:
                state.history.append({"round": state.round, "stopped": "max_passes", "passes": state.passes})
                break
            todo = [t for t in state.new if t not in state.kept]  # a resumed round: only the columns not kept yet
            _estimate_columns(
                model,
                batches,
                todo,
                state.kept,
                seed,
                settings.memory_gb,
                opts.progress,
                lambda: saver.tick(lambda: state.save(saver), len(state.kept), stop_requested()),
                batch_size,
            )
            state.passes += len(state.new) * examples
            grid = sorted(state.grid)
            matrices = matrices_from_stats(model, batches, state.kept, grid, objectives)
            paths = {
                o: optimal_schedules(matrices[o], budgets) for o in objectives
            }  # each objective's DP needs its own paths' columns
            # int keys: the partial file holds plain values only (weights_only)
            state.history.append(
                {
                    "round": state.round,
                    "grid_size": len(grid),
                    "new_columns": len(state.new),
                    "passes": state.passes,
                    "paths": {o: {int(K): list(p.timesteps) for K, p in ps.items()} for o, ps in paths.items()},
                }
            )
            used = [t for ps in paths.values() for p in ps.values() for t in p.timesteps]
            near = wanted_timesteps(grid, used, settings.window, settings.bisect, T)
            if near <= state.grid:
                break  # the paths need nothing new: the DP on a larger grid would give them again
            state.grid |= near
            state.round, state.new = state.round + 1, None
            saver.tick(
                lambda: state.save(saver), len(state.kept), stop_requested(), force=True
            )  # every round ends on disk
    if (
        matrices is None
    ):  # resumed after the last round's columns (a pass budget, or the rounds, ran out): the kept grid's
        matrices = matrices_from_stats(model, batches, state.kept, sorted(state.kept), objectives)
    saver.remove()
    return matrices, state.history


def wanted_timesteps(grid: list[int], used: list[int], window: int, bisect: bool, T: int) -> set[int]:
    """The timesteps within ``window`` of each used one and, with ``bisect``, halfway to its neighbours on ``grid``."""
    out = {u for t in used for u in range(max(1, t - window), min(T, t + window) + 1)}
    if bisect:
        pos = {t: i for i, t in enumerate(grid)}
        for t in used:
            i = pos[t]
            below, above = grid[i - 1] if i else 0, grid[i + 1] if i + 1 < len(grid) else t
            out |= {u for u in ((below + t) // 2, (t + above + 1) // 2) if below < u < above}
    return out


@torch.no_grad()
def _estimate_columns(
    model: DiffusionModel,
    batches: list,
    columns: list[int],
    out: dict,
    seed: int,
    memory_gb: float,
    progress: bool,
    after: Callable[[], None] = lambda: None,
    batch_size: int = 64,
) -> None:
    """The `ColumnStats` of each of ``columns`` into ``out``; ``after`` runs once each column is in (to save it)."""
    kept = sum(st.nbytes for stats in out.values() for st in stats)
    if out and kept / len(out) * (len(out) + len(columns)) > memory_gb * 2**30:  # checked before the round's passes
        raise _too_much(len(out) + len(columns), memory_gb)
    was_training = model.training
    model.eval()
    try:
        bar = tqdm(total=len(columns), desc="refine", unit="col", disable=not progress)
        # several columns per network call
        for group in call_groups(columns, max(len(b.x0) for b in batches), batch_size):
            stats, tables = {t: [] for t in group}, {t: stats_tables(model, t, model.device) for t in group}
            for start, x0, y in batches:
                x0 = x0.to(model.device)
                x_ts = [
                    model.q_sample(
                        x0, t, example_noise(seed, start, x0.shape[0], t, tuple(x0.shape[1:])).to(model.device)
                    )
                    for t in group
                ]
                for t, pred in zip(group, model.predict_many(x_ts, group, [y] * len(group))):
                    stats[t].append(column_stats(model, x0, pred, t, tables=tables[t]))
            for t in group:
                out[t] = stats[t]
                kept += sum(st.nbytes for st in stats[t])
                if kept > memory_gb * 2**30:
                    raise _too_much(len(out), memory_gb)
                after()
            bar.update(len(group))
        bar.close()
    finally:
        model.train(was_training)


def _too_much(columns: int, memory_gb: float) -> ParameterError:
    return ParameterError(
        "keeping the statistics of {columns} columns needs more than {memory_gb} = {value}; "
        "raise it, use fewer {examples} or a coarser grid",
        columns=columns,
        value=memory_gb,
    )


def matrices_from_stats(
    model: DiffusionModel, batches: list, kept: dict, grid: list[int], objectives: Sequence[str]
) -> dict[str, CostMatrix]:
    """Every pair of ``[0] + grid`` from the kept column statistics (no forward pass)."""
    g = full_grid(grid, model.T)
    metric = CostMatrixMetric(g.numel(), len(objectives))
    for j in range(1, g.numel()):
        t = int(g[j])
        tables = pair_tables(model, t, g[:j], model.device) if "elbo" in objectives else None
        for (_, x0, _), stats in zip(batches, kept[t]):
            terms = [
                stats_terms(model, stats, tables)
                if o == "elbo"
                else stats.sq_err[:, None] * (t - g[:j].to(stats.sq_err))[None, :]
                for o in objectives
            ]
            prior = prior_nats(model, x0.to(model.device)) if j == 1 and "elbo" in objectives else None
            metric.update(torch.stack(terms), j, prior)
    sums = metric.compute()
    moments, prior_moments = sums.moments, sums.prior_moments
    dims = math.prod(batches[0][1].shape[1:])
    return {
        o: from_moments(moments[:, k], prior_moments if o == "elbo" else empty_moments(), g, dims, o)
        for k, o in enumerate(objectives)
    }
