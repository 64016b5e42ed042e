"""evaluate.py's opt stage: every ``opt_<sampler>`` start schedule (its exact DP's, or ``cost.opt.start``'s
baseline) optimised end to end against the ODE teacher's samples (costs/end_to_end.py), cached like a matrix."""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from types import SimpleNamespace
from typing import Any, Sequence

import torch.distributed

from ddpm_schedules.app.settings import FrechetSettings
from ddpm_schedules.app.stages import Context
from ddpm_schedules.costs.end_to_end import Features, OptSettings, optimize_schedule
from ddpm_schedules.sampling.frechet import differentiable_features
from ddpm_schedules.schedules.files import GUIDED
from ddpm_schedules.schedules.schedule import Schedule
from ddpm_schedules.schedules.strategies import OPT, STRATEGIES, parse_strategy
from ddpm_schedules.storage.files import atomic_write_json, cache_key, file_digest


def opt_base(name: str) -> str | None:
    """The opt strategy a schedule belongs to (``opt_ddim``, also at a guidance scale: ``opt_ddim_s2``), or None."""
    guided = GUIDED.match(name)
    base = guided["base"] if guided and guided["base"] in OPT else name
    return base if base in OPT else None


def opt_stage(
    ctx: Context,
    schedules: Sequence[Schedule],
    teacher: Schedule,
    settings: OptSettings,
    start: str,
    fid: FrechetSettings | None = None,
) -> tuple[list[Schedule], dict[str, Any]]:
    """``schedules`` with each opt start replaced by its optimised (rounded) schedule; what each run found. With
    ``settings.distance = "features"`` the distance is in ``fid``'s feature network (checked by the settings)."""
    out, found = [], {}
    features, network = None, None
    if settings.distance == "features":
        if fid is None:  # evaluate_settings refuses this first; the check is for callers of run_evaluation
            raise ValueError("cost.opt.distance = 'features' needs the fid settings' feature network; fid is None")
        weights = fid.digits_weights if fid.features == "digits" else fid.inception_weights
        network = {"features": fid.features, "weights": file_digest(weights)}
        features = differentiable_features(fid.features, fid.digits_weights, fid.inception_weights)
    for sch in schedules:
        base = opt_base(sch.strategy)
        if base is None:
            out.append(sch)
            continue
        origins = _starts(ctx, sch, base, schedules, start)
        key = cache_key(
            ctx.model,
            opt=asdict(settings),
            sampler=STRATEGIES[base].sampler,
            start=[o.timesteps for o in origins],
            teacher=teacher.timesteps,
            guidance=ctx.model.guidance,
            **({"network": network} if network else {}),
        )
        file = ctx.cache_dir / f"opt_{key[:20]}.json"
        cached, record = None, None
        if ctx.procs.rank == 0:  # process 0 optimises (or reads the cache); the others take what it found
            cached = file.is_file()
            record = (
                json.loads(file.read_text()) if cached else _optimise(ctx, base, origins, teacher, settings, features)
            )
            if not cached:
                atomic_write_json(file, record)
        if ctx.procs.world > 1:  # one schedule for every process (GPUs may round an optimisation differently)
            shared = [(cached, record)]
            torch.distributed.broadcast_object_list(shared, src=0)
            cached, record = shared[0]
        found[f"{sch.strategy}/K{sch.K}"] = {**record, "file": str(file), "cached": cached}
        out.append(Schedule(tuple(record["timesteps"]), sch.T, sch.strategy))
    return out, found


def _base_name(name: str) -> str:
    guided = GUIDED.match(name)
    return guided["base"] if guided else name


def _starts(ctx: Context, sch: Schedule, base: str, schedules: Sequence[Schedule], start: str) -> list[Schedule]:
    """The start schedules of one opt schedule (``cost.opt.start``): the sampler's own DP (``dp``); it and every
    other exact DP sampled at this K (``best``: the closest on the training draws wins); one strategy of the run;
    or a baseline's schedule, to measure what the DP start gives."""
    own = Schedule(sch.timesteps, sch.T, "dp_dpmpp" if base == "opt_dpmpp" else "dp_ode")
    at_k = [s for s in schedules if s.K == sch.K and opt_base(s.strategy) is None]
    if start == "dp":
        return [own]
    if start == "best":
        dps = [s for s in at_k if _base_name(s.strategy).startswith("dp") and s.timesteps != own.timesteps]
        return [own] + list({s.timesteps: s for s in dps}.values())
    named = [s for s in at_k if _base_name(s.strategy) == start]
    if named:
        return named[:1]
    baseline = parse_strategy(start, ctx.model.T, ctx.model.schedule)
    return [replace(baseline.build(SimpleNamespace(T=ctx.model.T), sch.K), strategy=start)]


def _optimise(
    ctx: Context,
    base: str,
    origins: list[Schedule],
    teacher: Schedule,
    settings: OptSettings,
    features: Features | None,
) -> dict[str, Any]:
    """One optimisation as its cache record."""
    sampler = STRATEGIES[base].sampler
    result = optimize_schedule(ctx.model, sampler, origins, teacher, settings, ctx.progress, features)
    return {
        "timesteps": list(result.schedule.timesteps),
        "continuous": result.continuous,
        "start": list(result.start.timesteps),
        "start_strategy": result.start.strategy,
        "candidates": result.candidates,
        "distance": settings.distance,
        "distances": result.distances,
        "history": result.history,
        "seconds": result.seconds,
        "network_calls": result.network_calls,
    }
