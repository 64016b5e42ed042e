"""Typed reads of config keys: each refusal is one line naming the key and the value it got."""

from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf

from ddpm_schedules.schedules.schedule import check_budgets

_ABSENT = object()


def get(cfg: Any, key: str, default: Any = _ABSENT) -> Any:
    """The value at a dotted key as plain Python (lists, dicts), or ``default``; a missing required key is an error."""
    value = OmegaConf.select(cfg, key, default=default)
    if value is _ABSENT:
        raise ValueError(f"{key} is missing from the config; add it (conf/ has every key with its default)")
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def count(cfg: Any, key: str, null_means: str | None = None, default: Any = _ABSENT) -> int | None:
    """A positive integer, or null where null means all (or none)."""
    value = get(cfg, key, default)
    if value is None and null_means:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        allowed = f"a positive integer or null ({null_means})" if null_means else "a positive integer"
        raise ValueError(f"{key} = {value!r}; it must be {allowed}")
    return value


def seed(cfg: Any, key: str, default: Any = _ABSENT) -> int:
    value = get(cfg, key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{key} = {value!r}; a seed is an integer >= 0")
    return value


def positive(cfg: Any, key: str, what: str, default: Any = _ABSENT) -> float:
    value = get(cfg, key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{key} = {value!r}; it must be a positive number of {what}")
    return float(value)


def flag(cfg: Any, key: str, default: Any = _ABSENT) -> bool:
    value = get(cfg, key, default)
    if not isinstance(value, bool):
        raise ValueError(f"{key} = {value!r}; use true or false")
    return value


def budgets(cfg: Any, key: str, empty_ok: bool = False) -> tuple[int, ...]:
    """Budgets K as sorted distinct positive integers (checked against the grid's size once T is known)."""
    value = get(cfg, key)
    if empty_ok and not value:
        return ()
    return tuple(check_budgets(value, None, key))


def check_fabric(fabric: dict[str, Any], cuda_devices: int) -> dict[str, Any]:
    """``fabric.devices`` against the GPUs this process sees (``cuda_devices``), where the accelerator is a GPU."""
    accelerator, devices = str(fabric.get("accelerator", "auto")), fabric.get("devices", 1)
    if accelerator in ("cuda", "gpu") and cuda_devices == 0:
        raise ValueError(f"fabric.accelerator = {accelerator!r} but no CUDA device is visible; use fabric.accelerator=cpu (or auto)")
    on_gpu = accelerator in ("cuda", "gpu") or (accelerator == "auto" and cuda_devices > 0)
    if on_gpu and isinstance(devices, int) and not isinstance(devices, bool) and devices > cuda_devices:
        raise ValueError(f"fabric.devices = {devices} but {cuda_devices} GPU{'s are' if cuda_devices != 1 else ' is'} visible; "
                         f"use fabric.devices={cuda_devices} or fewer (or make more GPUs visible with CUDA_VISIBLE_DEVICES)")  # fmt: skip
    return fabric
