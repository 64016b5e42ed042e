"""The settings of an evaluation run, as plain frozen dataclasses (pipeline.py fills them from the config)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Labels:
    """What the inputs are called in results.json (the objects themselves do not know)."""

    model_source: str = "python"
    model_path: str = ""
    data_name: str = "data"
    cost_split: str = "val"
    eval_split: str = "test"


@dataclass(frozen=True)
class ResumeSettings:
    """How often partial sums are saved (see `estimate_cost_matrix`)."""

    every_columns: int = 50
    every_batches: int = 10
    every_seconds: float = 300.0


@dataclass(frozen=True)
class OdeSettings:
    """The dp_ode objective's teacher: trajectories, its grid (a `candidate_grid` spec; None: the cost grid), memory."""

    trajectories: int = 64
    grid: Any = None
    memory_gb: float = 2.0


@dataclass(frozen=True)
class FrechetSettings:
    features: str = "digits"  # "digits" (FD in a digits classifier's features) or "inception" (FID)
    digits_weights: str | None = None
    inception_weights: str | None = None
    antialias: bool = False
    reference_split: str = "test"

    @property
    def description(self) -> str:
        return "Inception-v3 pool3 (FID)" if self.features == "inception" else "digits classifier penultimate layer (FD, not FID)"


@dataclass(frozen=True)
class PrecisionSettings:
    """``cost.target_sem``: rounds of examples (``first``, then doubling) until every DP path's predicted bits/dim
    has at most this standard error; None: all of ``cost.examples`` at once."""

    target_sem: float | None = None
    first: int = 64
