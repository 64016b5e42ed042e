"""ELBO-optimal inference schedules for pre-trained DDPMs (Watson et al. 2021)."""

from .checkpoints import load_checkpoint, load_improved_diffusion
from .cost_matrix import CostMatrix, estimate_cost_matrix
from .diffusion import NoiseSchedule
from .dp import optimal_paths, optimal_schedules
from .evaluation import ScheduleResult, evaluate_schedules
from .model import DiffusionModel
from .run import EvaluationResult, run_evaluation
from .sampling import sample_ancestral
from .schedules import (
    Schedule,
    even_schedule,
    full_schedule,
    quadratic_schedule,
    respaced_schedule,
)


def load_diffusers(path, levels: int = 256) -> DiffusionModel:
    """A local diffusers folder (unet/ + scheduler/) as a DiffusionModel; needs the [diffusers] extra."""
    from .diffusers_bridge import load_diffusers as load

    return load(path, levels)


__all__ = [
    "CostMatrix",
    "DiffusionModel",
    "EvaluationResult",
    "NoiseSchedule",
    "Schedule",
    "ScheduleResult",
    "estimate_cost_matrix",
    "evaluate_schedules",
    "even_schedule",
    "full_schedule",
    "load_checkpoint",
    "load_diffusers",
    "load_improved_diffusion",
    "optimal_paths",
    "optimal_schedules",
    "quadratic_schedule",
    "respaced_schedule",
    "run_evaluation",
    "sample_ancestral",
]
