"""Typed reads of config keys: each refusal is one line naming the key and the value it got.

Only `get` takes a fallback value, for keys that a config group may leave out (an optional argument of a data
module); every other key is required: the YAML under conf/ is the one place its default is written.
"""

from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf

from ddpm_schedules.schedules.schedule import check_budgets
from ddpm_schedules.storage.errors import check_count, parameter_names

_ABSENT = object()

# `with config_keys(grid="cost.ode.grid"): ...` (or a decorator): the lower layers' errors name their own parameters,
# and the user reads the config keys instead; `config_keys("data")` names every argument of an object built from the
# data node `data.<argument>`.
config_keys = parameter_names

# the config keys of what the dp_ode teacher's checks (costs/ode.py, multistep.py, oss.py) name by their parameters
ODE_KEYS = {
    "grid": "cost.ode.grid",
    "memory_gb": "cost.ode.memory_gb",
    "trajectories": "cost.ode.trajectories",
    "propagate": "cost.ode.propagate",
    "procs": "fabric.devices",
}


def get(cfg: Any, key: str, default: Any = _ABSENT) -> Any:
    """The value at a dotted key as plain Python (lists, dicts), or ``default`` for an optional key; a missing key
    without one is an error."""
    value = OmegaConf.select(cfg, key, default=default)
    if value is _ABSENT:
        raise ValueError(f"{key} is missing from the config; add it (conf/ has every key with its default)")
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def count(cfg: Any, key: str, null_means: str | None = None) -> int | None:
    """A positive integer, or null where null means all (or none)."""
    return check_count(get(cfg, key), key, null_means)


def seed(cfg: Any, key: str) -> int:
    value = get(cfg, key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{key} = {value!r}; a seed is an integer >= 0")
    return value


def positive(cfg: Any, key: str, what: str) -> float:
    value = get(cfg, key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{key} = {value!r}; it must be a positive number of {what}")
    return float(value)


def flag(cfg: Any, key: str) -> bool:
    value = get(cfg, key)
    if not isinstance(value, bool):
        raise ValueError(f"{key} = {value!r}; use true or false")
    return value


def budgets(cfg: Any, key: str, empty_ok: bool = False) -> tuple[int, ...]:
    """Budgets K as sorted distinct positive integers (checked against the grid's size once T is known)."""
    value = get(cfg, key)
    if empty_ok and not value:
        return ()
    return tuple(check_budgets(value, None, name=key))


def check_fabric(fabric: dict[str, Any], cuda_devices: int) -> dict[str, Any]:
    """``fabric.devices`` against the GPUs this process sees (``cuda_devices``), where the accelerator is a GPU."""
    accelerator, devices = str(fabric.get("accelerator", "auto")), fabric.get("devices", 1)
    if accelerator in ("cuda", "gpu") and cuda_devices == 0:
        raise ValueError(
            f"fabric.accelerator = {accelerator!r} but no CUDA device is visible; use fabric.accelerator=cpu (or auto)"
        )
    on_gpu = accelerator in ("cuda", "gpu") or (accelerator == "auto" and cuda_devices > 0)
    if on_gpu and isinstance(devices, int) and not isinstance(devices, bool) and devices > cuda_devices:
        raise ValueError(
            f"fabric.devices = {devices} but {cuda_devices} GPU{'s are' if cuda_devices != 1 else ' is'} visible; "
            f"use fabric.devices={cuda_devices} or fewer (or make more GPUs visible with CUDA_VISIBLE_DEVICES)"
        )
    return fabric
