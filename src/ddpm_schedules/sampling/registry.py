"""The samplers by the names ``eval.samplers`` takes: one call form for all (samplers.py's docstring)."""

from __future__ import annotations

from typing import Sequence

from ddpm_schedules.sampling.samplers import sample_ancestral, sample_ddim, sample_dpmpp
from ddpm_schedules.sampling.solvers import sample_ipndm, sample_unipc
from ddpm_schedules.storage.errors import ParameterError

SAMPLERS = {
    "ancestral": sample_ancestral,
    "ddim": sample_ddim,
    "dpmpp": sample_dpmpp,
    "ipndm": sample_ipndm,
    "unipc": sample_unipc,
}
DETERMINISTIC = ("ddim", "dpmpp", "ipndm", "unipc")  # compared with the teacher's samples from the same x_T


def check_samplers(names: Sequence[str]) -> list[str]:
    """Sampler names checked before any work; the errors are `ParameterError`s naming the list ``samplers``."""
    names = list(names)
    if not names:
        raise ParameterError("{samplers} is empty; use e.g. [ancestral, ddim]")
    for name in names:
        if name not in SAMPLERS:
            raise ParameterError(
                "unknown sampler {name!r} in {samplers}; use {known}", name=name, known=", ".join(SAMPLERS)
            )
    return names
