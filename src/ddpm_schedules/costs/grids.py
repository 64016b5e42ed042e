"""Candidate grids: which timesteps a cost matrix estimates and a DP may use (always ending at T).

Specs, as ``cost.grid`` and the monitor's ``grid`` take them:

- ``null``: every step 1..T;
- ``k`` (an integer): every k-th step, plus T;
- ``"log:<n>"``: n points spaced geometrically from 1 to T (dense at small t, where 8-bit data's
  decoder and first steps decide most of the bits);
- ``"dense:<t0>,<k>"``: every step up to t0, then every multiple of k, plus T;
- a list of timesteps.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ddpm_schedules.storage.errors import ParameterError

GridSpec = int | str | Sequence[int] | None
HINT = "use null (every step), an integer stride k, 'log:<n>', 'dense:<t0>,<k>' or a list of timesteps"


def log_grid(n: int, T: int) -> list[int]:
    """n timesteps spaced geometrically from 1 to T, at least one apart (all T when n >= T)."""
    n = min(n, T)
    if n == 1:
        return [T]
    out: list[int] = []
    for i in range(n):
        t = max(out[-1] + 1 if out else 1, round(T ** (i / (n - 1))))
        out.append(min(t, T - (n - 1 - i)))  # leave room for the points still to come
    return out


def dense_grid(t0: int, k: int, T: int) -> list[int]:
    """Every step 1..t0, then every multiple of k above t0, plus T."""
    return sorted(set(range(1, min(t0, T) + 1)) | set(range(k * (t0 // k + 1), T + 1, k)) | {T})


def candidate_grid(grid: GridSpec, T: int) -> list[int] | None:
    """A grid spec -> sorted candidate timesteps (None for every step); a one-line `ParameterError` naming ``grid``
    otherwise."""
    if grid is None:
        return None
    if isinstance(grid, bool):
        raise ParameterError("{grid} = {value!r}; {hint}", value=grid, hint=HINT)
    if isinstance(grid, int):
        if not 1 <= grid <= T:
            raise ParameterError(
                "{grid} = {value}; an integer grid is a stride >= 1 and <= T = {T} (every k-th step, plus T)",
                value=grid,
                T=T,
            )
        return sorted(set(range(grid, T + 1, grid)) | {T})
    if isinstance(grid, str):
        return _named(grid, T)
    if isinstance(grid, (list, tuple)):
        return _listed(grid, T)
    raise ParameterError("{grid} = {value!r}; {hint}", value=grid, hint=HINT)


def check_spec(grid: GridSpec) -> GridSpec:
    """A spec's form, before T is known (a stride or timesteps beyond T are refused once it is); lists become tuples."""
    if isinstance(grid, (list, tuple)):
        values = list(grid)
        bad = [t for t in values if isinstance(t, bool) or not isinstance(t, int) or t < 1]
        if not values or bad:
            raise ParameterError(
                "{grid} = {value!r}; every timestep must be a positive integer{got}", value=values, got=_got(bad)
            )
        return tuple(values)
    if isinstance(grid, str):
        _named(grid, 1)
    elif grid is not None and (isinstance(grid, bool) or not isinstance(grid, int) or grid < 1):
        raise ParameterError("{grid} = {value!r}; {hint} (a stride is an integer >= 1)", value=grid, hint=HINT)
    return grid


def _got(bad: list) -> str:
    return f" (got {bad[0]!r})" if bad else ""


def _listed(grid: Sequence, T: int) -> list[int]:
    """A list of timesteps: integers in 1..T that include T."""
    values = list(grid)
    bad = [t for t in values if isinstance(t, bool) or not isinstance(t, int) or not 1 <= t <= T]
    if not values or bad:
        raise ParameterError(
            "{grid} = {value!r}; every timestep must be an integer in 1..T = {T}{got}", value=values, T=T, got=_got(bad)
        )
    if T not in values:
        raise ParameterError(
            "{grid} = {value!r} lacks T = {T}; every schedule ends there: append {T}", value=values, T=T
        )
    return sorted(set(values))


def _named(spec: str, T: int) -> list[int]:
    kind, _, args = spec.partition(":")
    try:
        values = [int(v) for v in args.split(",")] if args else []
    except ValueError:
        values = []
    if kind == "log" and len(values) == 1 and values[0] >= 1:
        return log_grid(values[0], T)
    if kind == "dense" and len(values) == 2 and values[0] >= 0 and values[1] >= 1:
        return dense_grid(values[0], values[1], T)
    raise ParameterError("{grid} = {value!r}; {hint} (n >= 1, t0 >= 0, k >= 1)", value=spec, hint=HINT)


def full_grid(grid: Sequence[int] | Tensor | None, T: int) -> Tensor:
    """[0] + the candidate timesteps, validated: integers in 1..T, containing T."""
    if grid is None:
        return torch.arange(T + 1)
    g = sorted({int(t) for t in torch.as_tensor(grid).reshape(-1).tolist()})
    if not g or g[0] < 1 or g[-1] > T:
        raise ValueError(f"grid values must lie in 1..{T}, got {g[:1] + g[-1:] if g else 'an empty grid'}")
    if g[-1] != T:
        raise ValueError(f"the grid must contain T = {T} (every schedule ends there); append {T} to it")
    return torch.tensor([0] + g)


def grid_size(grid: GridSpec, T: int) -> int:
    """How many candidate timesteps a spec gives (T for every step)."""
    g = candidate_grid(grid, T)
    return T if g is None else len(set(g))
