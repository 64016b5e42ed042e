"""Schedule files that know their model: the schedule in every convention a sampler library takes, what it was
optimised for, and the noise schedule and weights it was made with.

A record is `Schedule.to_dict` plus

- ``sigmas``: k-diffusion's noise levels sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) at t = tau_K, ..., tau_1,
  then 0 (K + 1 values, descending), for ``sample_dpmpp_2m(model, x, sigmas)`` or diffusers'
  ``EulerDiscreteScheduler.set_timesteps(sigmas=...)``;
- ``alphas_cumprod``: alpha_bar at the same K steps (diffusers' ``alphas_cumprod[t - 1]``);
- ``objective``, ``sampler``, ``guidance``: the cost it minimises and the sampler it was chosen for (null for a fixed
  baseline), at classifier-free guidance scale ``guidance``;
- ``fingerprint``: {"T", "betas_sha256", "weights_sha256"}. A file for another noise schedule is refused in one line
  (its timesteps would mean other noise levels); other weights of the same noise schedule only warn.

alpha_bar_t is the model's float64 table ``schedule.ab[t]`` for the paper's 1-based t (``ab[0] = 1``): the network's
index t - 1, diffusers' timestep t - 1.
"""

from __future__ import annotations

import math
import re
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping

from ddpm_schedules.models.diffusion import NoiseSchedule
from ddpm_schedules.models.model import DiffusionModel
from ddpm_schedules.schedules.schedule import (
    Schedule,
    check_fingerprint,
    check_noise_fingerprint,
    load_schedules,
)
from ddpm_schedules.schedules.strategies import STRATEGIES
from ddpm_schedules.storage.files import atomic_write_json, betas_digest, network_digest

OBJECTIVES = ("elbo", "mse", "ode", "dpmpp", "oss", "end_to_end")  # costs/'s objectives (a stage above this one)
SAMPLER_NAMES = ("ancestral", "ddim", "dpmpp", "ipndm", "unipc")  # sampling/registry.py's SAMPLERS (above)
# the sampler each objective's schedule is chosen for: the ELBO and its MSE reweighting price ancestral steps, the
# ODE teacher's one-step jumps are DDIM's, dp_dpmpp prices DPM-Solver++(2M)'s own steps
OBJECTIVE_SAMPLER = {"elbo": "ancestral", "mse": "ancestral", "ode": "ddim", "dpmpp": "dpmpp"}
GUIDED = re.compile(r"^(?P<base>.+)_s(?P<scale>[0-9][0-9.e+-]*)$")  # app/guided.py's f"{name}_s{scale:g}"


def strategy_target(strategy_name: str, *, propagate: str = "ddim") -> tuple[str | None, str | None]:
    """(objective, sampler) a strategy's schedules were optimised for; (None, None) for a fixed schedule (even,
    quadratic, karras, ..., respace:<spec>, file:<path> or any other name). ``propagate``: the sampler dp_ode_oss
    carried (``cost.ode.propagate``); a guided variant (``dp_ode_s2``) maps as its base name."""
    if not isinstance(strategy_name, str) or not strategy_name:
        raise ValueError(f"strategy name {strategy_name!r} must be a non-empty string, e.g. 'dp' or 'dp_ode_s2'")
    if propagate not in ("ddim", "dpmpp"):
        raise ValueError(f"propagate = {propagate!r}; use ddim or dpmpp (the sampler whose states dp_ode_oss carried)")
    name = strategy_name
    guided = GUIDED.match(name)
    if name not in STRATEGIES and guided and guided["base"] in STRATEGIES:
        name = guided["base"]
    strategy = STRATEGIES.get(name)
    if strategy is not None and name.startswith("opt_"):  # the distance to the teacher, through the sampler
        return "end_to_end", strategy.sampler
    objective = strategy.objective if strategy is not None else None
    if objective is None:
        return None, None
    return objective, propagate if objective == "oss" else OBJECTIVE_SAMPLER[objective]


def noise_fingerprint(model: DiffusionModel | NoiseSchedule) -> dict[str, Any]:
    """{"T", "betas_sha256"} of a model's (or a NoiseSchedule's) noise schedule: the float64 betas' sha256."""
    noise = model.schedule if isinstance(model, DiffusionModel) else model
    return {"T": noise.T, "betas_sha256": betas_digest(noise.betas)}


def schedule_record(
    schedule: Schedule,
    model: DiffusionModel,
    *,
    objective: str | None = None,
    sampler: str | None = None,
    guidance: float = 1.0,
    weights: str | None = None,
) -> dict[str, Any]:
    """A schedule file's record: `Schedule.to_dict`, k-diffusion's ``sigmas``, ``alphas_cumprod``, the target
    (``strategy_target``), ``guidance`` and the model's fingerprint. ``weights``: the network's digest
    (`storage.files.network_digest`, computed here when None; pass it to hash a large network once)."""
    if schedule.T != model.T:
        raise ValueError(
            f"schedule {schedule.strategy!r} (K = {schedule.K}) ends at T = {schedule.T} but the model has "
            f"T = {model.T}; build the schedule for this model"
        )
    if objective is not None and objective not in OBJECTIVES:
        raise ValueError(f"objective = {objective!r}; use one of {', '.join(OBJECTIVES)} or None (strategy_target)")
    if sampler is not None and sampler not in SAMPLER_NAMES:
        raise ValueError(f"sampler = {sampler!r}; use one of {', '.join(SAMPLER_NAMES)} or None (strategy_target)")
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not math.isfinite(guidance):
        raise ValueError(f"guidance = {guidance!r}; use the classifier-free guidance scale, a finite number (1: none)")
    if weights is not None and not (
        isinstance(weights, str) and len(weights) == 64 and all(c in "0123456789abcdef" for c in weights)
    ):
        raise ValueError(
            f"weights = {weights!r}; pass the network's sha256 hex digest (storage.files.network_digest(model)) or "
            "None to compute it"
        )
    weights = network_digest(model) if weights is None else weights
    fingerprint = check_fingerprint(
        {**noise_fingerprint(model), "weights_sha256": weights}, f"schedule {schedule.strategy!r}"
    )
    ab = model.schedule.ab  # float64, ab[t] = alpha_bar of 1-based t, ab[0] = 1
    steps = list(reversed(schedule.timesteps))
    alphas_cumprod = [float(ab[t]) for t in steps]
    sigmas = [math.sqrt((1 - a) / a) for a in alphas_cumprod] + [0.0]
    return {
        **schedule.to_dict(),
        "sigmas": sigmas,
        "alphas_cumprod": alphas_cumprod,
        "objective": objective,
        "sampler": sampler,
        "guidance": float(guidance),
        "fingerprint": fingerprint,
    }


def _records(record_or_path: Mapping[str, Any] | Schedule | str | Path) -> tuple[list[Any], str]:
    """The fingerprints to check and the name of their source."""
    if isinstance(record_or_path, Schedule):
        return [record_or_path.fingerprint], f"schedule {record_or_path.strategy!r} (K = {record_or_path.K})"
    if isinstance(record_or_path, Mapping):
        name = f"schedule {record_or_path.get('strategy', 'custom')!r} (K = {record_or_path.get('K', '?')})"
        return [record_or_path.get("fingerprint")], name
    return [s.fingerprint for s in load_schedules(record_or_path)], f"schedule file {str(record_or_path)!r}"


def check_schedule_for(record_or_path: Mapping[str, Any] | Schedule | str | Path, model: DiffusionModel) -> None:
    """Refuse a schedule (a record, a Schedule read from a file or a file's path) made for another noise schedule
    than ``model``'s, in one line naming both; warn (one line) when it was made with other weights. No fingerprint
    (older files): no check."""
    _check(*_records(record_or_path), model)


def _check(fingerprints: list[Any], source: str, model: DiffusionModel) -> None:
    for fingerprint in fingerprints:
        check_noise_fingerprint(fingerprint, model.schedule, source)
    theirs = {f["weights_sha256"] for f in fingerprints if f is not None and f.get("weights_sha256")}
    ours = network_digest(model) if theirs else None  # hashing a large network only when there is something to match
    other = sorted(w for w in theirs if ours is not None and w != ours)
    if other:  # the same noise levels: it runs, but its optimality was measured on another network
        warnings.warn(
            f"{source} was made with other weights (sha256 {other[0][:8]}...) of this noise schedule; this model's "
            f"are {ours[:8]}...: it samples, but its predicted_nats and its optimality belong to the other weights",
            stacklevel=3,
        )


def load_schedule_file(path: str | Path, model: DiffusionModel | None = None) -> list[Schedule]:
    """`load_schedules`, checked against ``model`` when given (`check_schedule_for`), before any network pass."""
    schedules = load_schedules(path)
    if model is not None:
        _check([s.fingerprint for s in schedules], f"schedule file {str(path)!r}", model)
    return schedules


def _safe(name: str) -> str:
    """A strategy name as a file name (``file:mine`` -> ``file_mine``), as reports/report.py writes them."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def write_schedule_files(directory: str | Path, records: Iterable[Mapping[str, Any]]) -> list[Path]:
    """One ``<strategy>_K<K>.json`` per record and ``schedules.json`` (all of them, a list) in ``directory``, each
    written atomically; returns the paths, schedules.json last."""
    directory = Path(directory)
    records = [dict(r) for r in records]
    by_name: dict[str, dict[str, Any]] = {}
    for r in records:
        if not isinstance(r.get("strategy"), str) or not isinstance(r.get("K"), int):
            raise ValueError(f"a schedule record needs a strategy name and K; got keys {sorted(r)} (schedule_record)")
        name = f"{_safe(r['strategy'])}_K{r['K']}.json"
        if name in by_name and by_name[name] != r:
            raise ValueError(
                f"schedules {by_name[name]['strategy']!r} and {r['strategy']!r} (K = {r['K']}) would both be written "
                f"to {name}; give them distinct strategy names"
            )
        by_name[name] = r
    paths = []
    for name, r in by_name.items():
        atomic_write_json(directory / name, r)
        paths.append(directory / name)
    atomic_write_json(directory / "schedules.json", records)
    return [*paths, directory / "schedules.json"]
