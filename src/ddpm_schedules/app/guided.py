"""Which schedules are sampled at each classifier-free guidance scale (``eval.guidance``)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Sequence

from ddpm_schedules.app.settings import EvaluateSettings
from ddpm_schedules.app.stages import Context, ode_matrix_stage, oss_stage
from ddpm_schedules.costs.matrix import CostMatrix
from ddpm_schedules.schedules.schedule import Schedule
from ddpm_schedules.schedules.strategies import TEACHER, build_schedules


def unique(schedules: Sequence[Schedule]) -> list[Schedule]:
    """Schedules without repeats (a fixed strategy's schedule is built for every budget list)."""
    seen, out = set(), []
    for s in schedules:
        if (s.strategy, s.timesteps) not in seen:
            seen.add((s.strategy, s.timesteps))
            out.append(s)
    return out


def guided_schedules(
    ctx: Context,
    s: EvaluateSettings,
    seed: int,
    matrices: dict[str, CostMatrix],
    guided: dict[float, dict[str, Any]],
    scale: float,
) -> list[Schedule]:
    """The sampled schedules at guidance ``scale`` (the model is guided already): the teacher objectives' matrices
    of the guided teacher (cached like the unguided), their DPs and the fixed strategies; the ELBO and MSE DPs are
    defined for the unguided model only and are left out. ``guided`` receives each scale's matrices' keys."""
    held, ode = s.held_out, s.cost.ode
    strategies = [st for st in held.strategies if st.objective is None or st.objective in TEACHER]
    wanted = {st.objective for st in strategies if st.objective}
    at = {o: m for o, m in matrices.items() if o not in TEACHER}
    if wanted & {"ode", "dpmpp"}:
        stage = ode_matrix_stage(ctx, seed, ode, s.ode_grid, multistep="dpmpp" in wanted)
        at |= {"ode": stage.matrix} | ({"dpmpp": stage.matrix} if "dpmpp" in wanted else {})
        guided.setdefault(scale, {})["ode"] = stage.describe()
    if "oss" in wanted:
        stage = oss_stage(ctx, seed, ode, s.ode_grid, s.all_budgets)
        at["oss"] = stage.matrix
        guided.setdefault(scale, {})["oss"] = stage.describe()
    built = build_schedules(strategies, at, held.sample_budgets)
    # a guided teacher's DP is another schedule: named for its scale, so its file and rows stand beside s = 1's
    return unique([replace(x, strategy=f"{x.strategy}_s{scale:g}") if _guided(x, strategies) else x for x in built])


def _guided(schedule: Schedule, strategies: Sequence[Any]) -> bool:
    return any(st.name == schedule.strategy and st.objective in TEACHER for st in strategies)
