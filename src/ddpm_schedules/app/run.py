"""run_evaluation: from a model and data to an EvaluationResult, in named stages.

cost matrices (cached, one per objective the strategies need) -> schedules -> held-out bits/dim ->
sample quality per (schedule, sampler) -> reports. No Hydra here: `app.evaluate.evaluate` maps a config
onto this call. Under several processes every stage shards its examples (or sample chunks) by rank,
and the sums combine into the one-process result.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from torch import Tensor

from ddpm_schedules.app.guided import guided_schedules, unique
from ddpm_schedules.app.keys import config_keys
from ddpm_schedules.app.opt_stage import opt_base, opt_stage
from ddpm_schedules.app.outputs import EvaluationResult, result_rows, write_outputs
from ddpm_schedules.app.settings import EvaluateSettings, FrechetSettings, Labels
from ddpm_schedules.app.stages import (
    Context,
    data_matrices_stage,
    ode_matrix_stage,
    oss_stage,
    precision_stage,
    refine_stage,
)
from ddpm_schedules.costs.evaluation import ScheduleResult, evaluate_schedules
from ddpm_schedules.costs.grids import full_grid
from ddpm_schedules.models.model import DiffusionModel
from ddpm_schedules.models.noise import Processes
from ddpm_schedules.reports import live_views
from ddpm_schedules.reports.live import LiveLog
from ddpm_schedules.sampling.frechet import load_reference_stats
from ddpm_schedules.sampling.quality import DETERMINISTIC, quality_stage
from ddpm_schedules.schedules.schedule import Schedule, full_schedule
from ddpm_schedules.schedules.strategies import OPT, TEACHER, build_schedules, objectives_of
from ddpm_schedules.storage.files import file_digest, hash_parts


def held_out_stage(
    ctx: Context, data: Tensor, schedules: list[Schedule], seed: int, key: str, split: str, full_chain: bool
) -> tuple[list[ScheduleResult], ScheduleResult | None]:
    """Held-out bits/dim of every schedule (and the full chain) in one union pass."""
    extra = [full_schedule(ctx.model.T)] if full_chain else []
    held_key = hash_parts(key=key, split=split, examples=len(data))
    lo, hi = ctx.procs.shard(len(data))
    partial = ctx.partial(ctx.cache_dir / f"held_out_{held_key[:20]}.pt", ctx.resume.every_batches)
    results = evaluate_schedules(
        ctx.model, data[lo:hi], schedules + extra, options=ctx.options(seed, start_index=lo, partial=partial)
    )
    return results[: len(schedules)], (results[-1] if extra else None)


@config_keys(grid="cost.grid", gamma_file="model.gamma_file", samples="fid.samples")  # the stages' checks' parameters
def run_evaluation(
    model: DiffusionModel,
    cost_data: Tensor,
    eval_data: Tensor,
    settings: EvaluateSettings,
    *,
    reference: Tensor | None = None,
    procs: Processes = Processes(),
    logger: Any = None,
    provenance: dict[str, Any] | None = None,
) -> EvaluationResult:
    """Every stage in order, each logged live as it ends (process 0); process 0 writes the reports and, last and
    atomically, results.json. ``provenance`` (overrides, version, commit) heads results.md and results.json."""
    with LiveLog(logger if procs.rank == 0 else None).watching() as live:
        return _run_stages(model, cost_data, eval_data, settings, reference, procs, logger, live, provenance or {})


def _run_stages(
    model: DiffusionModel,
    cost_data: Tensor,
    eval_data: Tensor,
    settings: EvaluateSettings,
    reference: Tensor | None,
    procs: Processes,
    logger: Any,
    live: LiveLog,
    provenance: dict[str, Any],
) -> EvaluationResult:
    s = settings.resolve(model)
    cost, held, quality, fid, labels, ode = s.cost, s.held_out, s.quality, s.fid, s.labels, s.cost.ode
    grid, budgets, sample_budgets, strategies, ode_grid = (
        cost.grid,
        held.budgets,
        held.sample_budgets,
        held.strategies,
        s.ode_grid,
    )
    precision, refine, cost_seed = cost.precision, cost.refine, cost.seed
    ctx = Context(model, Path(s.cache_dir), s.batch_size, procs, s.resume)
    objectives = objectives_of(strategies)
    with ctx.timed("cost_matrix"):
        refine_rounds = None
        if (
            refine is not None and precision.target_sem is not None
        ):  # the grid from the first round, then rounds of examples on it
            first = cost_data[: min(max(1, precision.first), len(cost_data))]
            refined, refine_rounds = refine_stage(ctx, first, cost_seed, labels, ["elbo"], s.all_budgets, refine)
            grid = refined["elbo"].matrix.grid[1:].tolist()
            cost_data, precise, rounds = precision_stage(
                ctx, cost_data, grid, cost_seed, labels, budgets, precision, refined["elbo"]
            )
            others = [o for o in objectives if o not in (*TEACHER, "elbo")]
            costs = {"elbo": precise} | (
                data_matrices_stage(ctx, cost_data, grid, cost_seed, labels, others) if others else {}
            )
        elif refine is not None:
            costs, rounds = refine_stage(ctx, cost_data, cost_seed, labels, objectives, s.all_budgets, refine)
        else:
            cost_data, precise, rounds = precision_stage(ctx, cost_data, grid, cost_seed, labels, budgets, precision)
            others = [o for o in objectives if o not in TEACHER and not (precise and o == "elbo")]
            costs = ({"elbo": precise} if precise else {}) | (
                data_matrices_stage(ctx, cost_data, grid, cost_seed, labels, others) if others else {}
            )
    live.stage("cost_matrix", ctx.timings["cost_matrix"], *live_views.matrices(costs))
    if {"ode", "dpmpp"} & set(
        objectives
    ):  # dp_dpmpp's step costs come from dp_ode's teacher trajectories, with no extra pass
        with ctx.timed("ode_matrix"):
            costs["ode"] = ode_matrix_stage(ctx, cost_seed, ode, ode_grid, multistep="dpmpp" in objectives)
        live.stage("ode_matrix", ctx.timings["ode_matrix"], *live_views.matrices({"ode": costs["ode"]}))
    if (
        "oss" in objectives
    ):  # the same teacher, then a pass at every state the sampler reaches (about K N per trajectory)
        with ctx.timed("oss_paths"):
            costs["oss"] = oss_stage(ctx, cost_seed, ode, ode_grid, s.all_budgets)
        live.stage("oss_paths", ctx.timings["oss_paths"])
    matrices = {o: c.matrix for o, c in costs.items()} | (
        {"dpmpp": costs["ode"].matrix} if "dpmpp" in objectives else {}
    )
    if (
        model.var_type == "analytic" and model.gamma is None
    ):  # Gamma of the cost examples serves held-out bits/dim and sampling
        model.use_variance("analytic", matrices["elbo"].gamma)
    with ctx.timed("dp_and_schedules"):
        schedules = build_schedules([st for st in strategies if st.name not in OPT], matrices, budgets)  # opt: sampled
        sampled = unique(build_schedules(strategies, matrices, sample_budgets)) if sample_budgets else []
    live.stage("schedules", ctx.timings["dp_and_schedules"], tables=live_views.schedules(unique(schedules + sampled)))
    with ctx.timed("held_out_bpd"):
        results, full = (  # only opt strategies: nothing has bits/dim to report
            held_out_stage(ctx, eval_data, schedules, held.seed, costs["elbo"].key, labels.eval_split, held.full_chain)
            if schedules or held.full_chain
            else ([], None)
        )
    live.stage("held_out_bpd", ctx.timings["held_out_bpd"], live_views.bpd(results, full))
    with ctx.timed("sample_quality"):
        teacher_grid = Schedule(tuple(full_grid(ode_grid, model.T)[1:].tolist()), model.T, "teacher")
        teacher = teacher_grid if set(DETERMINISTIC) & set(quality.samplers) else None
        entries, grids, ref, guided, guided_sampled, optimised = [], {}, None, {}, [], {}
        for scale in held.guidance:  # s = 1: every strategy; another s: the teacher's DPs and the fixed ones
            started = time.perf_counter()
            model.set_guidance(scale)
            at = sampled if scale == 1 else guided_schedules(ctx, s, cost_seed, matrices, guided, scale)
            if any(opt_base(x.strategy) for x in at):
                with ctx.timed(f"opt_s{scale:g}"):
                    at, found = opt_stage(ctx, at, teacher_grid, cost.opt, cost.opt_start, fid)
                optimised |= found
                live.stage(f"opt_s{scale:g}", ctx.timings[f"opt_s{scale:g}"], *live_views.opt(found))
            guided_sampled += at if scale != 1 or optimised else []
            found, shown, ref = quality_stage(
                model, at, quality, procs, s.batch_size, fid, *_reference(ctx, fid, reference, labels), teacher
            )
            entries += [{**e, "guidance": scale} for e in found]
            named = {(k if scale == 1 or f"_s{scale:g}_" in k else f"{k}_s{scale:g}"): v for k, v in shown.items()}
            grids |= named
            live.stage(
                f"sample_quality_s{scale:g}", time.perf_counter() - started, *live_views.quality(found, scale, named)
            )
        model.set_guidance(1.0)
    elbo = costs["elbo"]
    result = EvaluationResult(
        model={
            "source": labels.model_source,
            "path": labels.model_path,
            "T": model.T,
            "mean_type": model.mean_type,
            "var_type": model.var_type,
            "trained_var_type": model.trained_var_type,
            "var_type_override": model.var_type != model.trained_var_type,
        },
        data={
            "name": labels.data_name,
            "levels": model.levels,
            "dims": math.prod(model.image_shape),
            "cost_split": labels.cost_split,
            "cost_examples": len(cost_data),
            "eval_split": labels.eval_split,
            "eval_examples": len(eval_data),
        },
        cost_matrix={
            "grid_size": elbo.matrix.grid.numel() - 1,
            "seconds": ctx.timings["cost_matrix"],
            "file": str(elbo.file),
            "cached": elbo.cached,
            "seed": cost_seed,
            "objectives": {o: c.describe() for o, c in costs.items()},
            "target_sem": precision.target_sem,
            "target_met": rounds[-1].get("met") if precision.target_sem is not None else None,
            "refine": refine.__dict__ if refine else None,
            "rounds": rounds,
            "refine_rounds": refine_rounds,
            "opt": optimised or None,
        },
        full_chain={"K": model.T, "bpd": full.bpd, "bpd_sem": full.bpd_sem} if full else None,
        fid={
            "features": fid.description if fid else None,
            "reference_split": fid.reference_split if fid else None,
            "reference_examples": len(reference) if fid and reference is not None else None,
            "samples": quality.samples if fid else None,
            "bootstrap": quality.bootstrap if fid else None,
            "samplers": list(quality.samplers),
            "ddim_eta": quality.ddim_eta,
            "sample_budgets": list(sample_budgets),
            "teacher_samples": quality.teacher_samples if teacher else None,
            "teacher": {"sampler": "ddim", "eta": 0.0, "steps": teacher.K} if teacher else None,
            "guidance": list(held.guidance),
            "guided_matrices": {f"{k:g}": v for k, v in guided.items()},
            "guidance_note": (
                "bits/dim and the dp / dp_mse schedules are the unguided model's (s = 1): the ELBO is defined for "
                "it only; at other s the teacher is guided and so are its DPs"
                if any(g != 1 for g in held.guidance)
                else None
            ),
        },
        results=result_rows(results, entries, elbo.matrix),
        sample_quality=entries,
        timings=ctx.timings,
        run=provenance,
        matrices=matrices,
        schedules=schedules,
        grids=grids,
    )
    if procs.rank == 0:
        write_outputs(
            Path(s.out_dir), model, result, elbo.matrix, unique(schedules + [x for x in sampled if not opt_base(x.strategy)] + guided_sampled), logger, ref,
            propagate=ode.propagate, artifact=f"{Path(str(labels.model_path or labels.model_source)).stem}-"
            f"{labels.data_name}", matrix_files=[c.file for c in costs.values()], timed=ctx.timed,
        )  # fmt: skip
    return result


def _reference(
    ctx: Context, fid: FrechetSettings | None, reference: Tensor | None, labels: Labels
) -> tuple[Any, str | None]:
    """What quality_stage compares with: the statistics of ``fid.reference_stats``, or this process's shard of the
    reference images and where their statistics are cached."""
    if fid is None:
        return None, None
    if fid.reference_stats is not None:
        return load_reference_stats(fid.reference_stats, fid.features), None
    shard = reference[slice(*ctx.procs.shard(len(reference)))]
    return shard, _reference_cache(ctx, fid, reference, labels) if ctx.procs.world == 1 else None


def _reference_cache(ctx: Context, fid: FrechetSettings, reference: Tensor, labels: Labels) -> str | None:
    """Where the reference images' feature moments are cached (one process only: the shards would differ); the key
    is the data, split, count, feature network (its file's digest) and resize."""
    weights = fid.digits_weights if fid.features == "digits" else fid.inception_weights
    key = hash_parts(
        features=fid.features,
        weights=file_digest(weights),
        data=labels.data_name,
        split=fid.reference_split,
        examples=len(reference),
        antialias=bool(fid.antialias),
        moments=True,
    )
    return str(ctx.cache_dir / f"fid_reference_{key[:20]}.pt")
