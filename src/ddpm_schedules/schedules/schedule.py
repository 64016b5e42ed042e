"""Schedules as plain data: 0 = tau_0 < tau_1 < ... < tau_K = T, with the baselines and exports."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from ddpm_schedules.models.diffusion import NoiseSchedule
from ddpm_schedules.storage.errors import ParameterError
from ddpm_schedules.storage.files import atomic_write_json, betas_digest


@dataclass(frozen=True)
class Schedule:
    """An inference time schedule (tau_1, ..., tau_K) in the paper's 1-based convention; tau_0 = 0 is implicit.

    ``predicted_nats`` is set on DP schedules: the negative ELBO per example (prior included) that
    the cost matrix predicts for it. ``fingerprint`` is set on schedules read from a file that names the model it
    was made for (schedules/files.py): {"T", "betas_sha256", "weights_sha256"}, plain data, not part of `to_dict`.
    """

    timesteps: tuple[int, ...]
    T: int
    strategy: str = "custom"
    predicted_nats: float | None = field(default=None, compare=False)
    fingerprint: Mapping[str, Any] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        ts = tuple(int(t) for t in self.timesteps)
        object.__setattr__(self, "timesteps", ts)
        if self.fingerprint is not None:
            object.__setattr__(self, "fingerprint", check_fingerprint(self.fingerprint, f"schedule {self.strategy!r}"))
        if not ts:
            raise ValueError("a schedule needs at least one timestep; it must end at T")
        bad = [b for a, b in zip((0,) + ts, ts) if b <= a]
        if bad:
            raise ValueError(
                f"schedule {list(ts)} is not strictly increasing from 1 (at {bad[0]}); sort it and drop repeats"
            )
        if ts[-1] != self.T:
            raise ValueError(f"schedule {list(ts)} ends at {ts[-1]}, not at T = {self.T}; append {self.T}")

    @property
    def K(self) -> int:
        """Number of network evaluations."""
        return len(self.timesteps)

    def pairs(self) -> list[tuple[int, int]]:
        """The transitions (s, t): (0, tau_1), (tau_1, tau_2), ..., (tau_{K-1}, T)."""
        return list(zip((0,) + self.timesteps[:-1], self.timesteps))

    def to_model_indices(self) -> list[int]:
        """0-based indices the network was trained on (improved-diffusion's `use_timesteps`)."""
        return [t - 1 for t in self.timesteps]

    def to_diffusers_timesteps(self) -> list[int]:
        """Descending 0-based indices for diffusers' `DDPMScheduler.set_timesteps(timesteps=...)`."""
        return [t - 1 for t in reversed(self.timesteps)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy,
            "K": self.K,
            "T": self.T,
            "timesteps": list(self.timesteps),
            "model_indices": self.to_model_indices(),
            "diffusers_timesteps": self.to_diffusers_timesteps(),
            "predicted_nats": self.predicted_nats,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Schedule":
        try:
            return cls(
                tuple(d["timesteps"]),
                int(d["T"]),
                d.get("strategy", "custom"),
                d.get("predicted_nats"),
                d.get("fingerprint"),
            )
        except KeyError as e:
            raise ValueError(f"a schedule needs the keys 'timesteps' and 'T'; {e.args[0]!r} is missing") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "Schedule":
        return cls.from_dict(json.loads(text))


def check_fingerprint(fingerprint: Any, source: str) -> dict[str, Any]:
    """A schedule file's ``fingerprint`` as a plain dict, checked: an int ``T``, a hex ``betas_sha256`` and a hex or
    null ``weights_sha256``; else a one-line ValueError naming ``source``."""
    ok = isinstance(fingerprint, Mapping)
    if ok:
        T, betas, weights = (fingerprint.get(k) for k in ("T", "betas_sha256", "weights_sha256"))
        ok = (
            isinstance(T, int)
            and not isinstance(T, bool)
            and _is_digest(betas)
            and (weights is None or _is_digest(weights))
        )
    if not ok:
        raise ValueError(
            f"{source} has a malformed fingerprint {fingerprint!r}; it needs T (an int), betas_sha256 and "
            "weights_sha256 (sha256 hex digests, weights may be null): rewrite it with write_schedule_files() or "
            "drop the key"
        )
    return {"T": T, "betas_sha256": betas, "weights_sha256": weights}


def _is_digest(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def check_noise_fingerprint(fingerprint: Mapping[str, Any] | None, noise: NoiseSchedule, source: str) -> None:
    """Refuse a schedule made for another noise schedule than ``noise`` (another T or other betas) in one line naming
    both; no fingerprint (an older file) passes unchecked."""
    if fingerprint is None:
        return
    fingerprint = check_fingerprint(fingerprint, source)
    T, betas = noise.T, betas_digest(noise.betas)
    if fingerprint["T"] != T or fingerprint["betas_sha256"] != betas:
        raise ValueError(
            f"{source} was made for a noise schedule with T = {fingerprint['T']}, betas sha256 "
            f"{fingerprint['betas_sha256'][:8]}...; this model has T = {T}, betas {betas[:8]}...; find schedules for "
            "this model's noise schedule (evaluate.py writes them)"
        )


def check_budgets(
    budgets: int | Iterable[int], limit: int | None, name: str = "budgets", limit_name: str = "T"
) -> list[int]:
    """Budgets as sorted distinct integers in 1..limit (no upper limit for None); else a `ParameterError` naming them
    ``name`` (the caller's parameter)."""
    one = not isinstance(budgets, (list, tuple, set, range))
    budgets = [budgets] if one else list(budgets)
    if not budgets:
        raise ParameterError("{" + name + "} is empty; pass at least one K, e.g. [8, 16, 32]")
    for K in budgets:
        if isinstance(K, bool) or not isinstance(K, (int, np.integer)) or not 1 <= K <= (limit or K):
            bound = f"an integer in 1..{limit} ({limit_name})" if limit else "a positive integer"
            template = "{%s} = {value!r} must be {bound}" if one else "{%s} has {value!r}; every budget must be {bound}"
            raise ParameterError(template % name, value=K, bound=bound)
    return sorted({int(K) for K in budgets})


def even_schedule(T: int, K: int) -> Schedule:
    """Even stride: improved-diffusion's one-section respacing plus 1, tau_i ~ 1 + (T - 1)(i - 1)/(K - 1).

    Rounding is improved-diffusion's own (an accumulated float stride, Python's round), so the
    schedule is exactly the `timestep_respacing="K"` chain of a released model; K = 1 is (T,).
    """
    check_budgets(K, T, "budget K", "T")
    if K == 1:
        return Schedule((T,), T, "even")
    return Schedule(tuple(sorted(i + 1 for i in space_timesteps(T, str(K)))), T, "even")


def quadratic_schedule(T: int, K: int) -> Schedule:
    """DDIM's quadratic spacing: tau_i = max(tau_{i-1} + 1, round(T (i/K)^2)), tau_K = T."""
    check_budgets(K, T, "budget K", "T")
    taus: list[int] = []
    for i in range(1, K):
        taus.append(max((taus[-1] if taus else 0) + 1, round(T * (i / K) ** 2)))
    return Schedule(tuple(taus) + (T,), T, "quadratic")


def space_timesteps(T: int, spec: str) -> set[int]:
    """improved-diffusion's `space_timesteps`: 0-based indices kept by a respacing string.

    "ddimN" takes the integer stride giving exactly N steps from 0; "a,b,c" splits 0..T-1 into
    equal sections and takes a, b, c evenly rounded steps from them.
    """
    spec = str(spec).strip()
    if spec.startswith("ddim"):
        try:
            n = int(spec[len("ddim") :])
        except ValueError:
            raise ValueError(f"respacing {spec!r} is not of the form 'ddimN' (e.g. 'ddim50')") from None
        for stride in range(1, T):
            if len(range(0, T, stride)) == n:
                return set(range(0, T, stride))
        raise ValueError(f"respacing {spec!r}: no integer stride gives exactly {n} steps out of T = {T}")
    try:
        counts = [int(c) for c in spec.split(",")]
    except ValueError:
        raise ValueError(f"respacing {spec!r} is neither 'ddimN' nor comma-separated counts like '10,15,20'") from None
    if not counts or min(counts) < 1:
        raise ValueError(f"respacing {spec!r}: every section count must be >= 1")
    size_per, extra = divmod(T, len(counts))
    start, steps = 0, set()
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"respacing {spec!r}: section {i} has {size} steps, fewer than the {count} asked for")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            steps.add(start + round(cur))
            cur += stride
        start += size
    return steps


def respaced_schedule(T: int, spec: str) -> Schedule:
    """An improved-diffusion respacing string ("ddim50", "10,15,20") as a schedule: indices + 1, T appended."""
    taus = sorted(i + 1 for i in space_timesteps(T, spec))
    if taus[-1] != T:
        taus.append(T)
    return Schedule(tuple(taus), T, f"respace:{spec}")


def full_schedule(T: int) -> Schedule:
    """Every step, 1..T: the model's own full chain."""
    return Schedule(tuple(range(1, T + 1)), T, "full")


def save_schedules(schedules: Sequence[Schedule], path: str | Path) -> None:
    """Write schedules as one JSON list (atomically)."""
    atomic_write_json(path, [s.to_dict() for s in schedules])


def load_schedules(path: str | Path) -> list[Schedule]:
    """Read schedules written by `save_schedules` or `Schedule.to_json` (a list or a single object)."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(
            f"schedule file {str(p)!r} does not exist; write one with save_schedules() or Schedule.to_json()"
        )
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"schedule file {str(p)!r} is not valid JSON ({e.msg} at line {e.lineno})") from None
    return [Schedule.from_dict(d) for d in (data if isinstance(data, list) else [data])]
