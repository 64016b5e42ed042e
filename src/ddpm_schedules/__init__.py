"""ELBO-optimal inference schedules for pre-trained DDPMs (Watson et al. 2021)."""

from ddpm_schedules.app.run import EvaluationResult, run_evaluation
from ddpm_schedules.costs.cost_matrix import estimate_cost_matrix
from ddpm_schedules.costs.evaluation import ScheduleResult, evaluate_schedules
from ddpm_schedules.costs.matrix import CostMatrix
from ddpm_schedules.costs.options import EstimateOptions
from ddpm_schedules.costs.terms import prior_nats, terms
from ddpm_schedules.models.checkpoints import load_checkpoint, load_improved_diffusion
from ddpm_schedules.models.diffusion import NoiseSchedule
from ddpm_schedules.models.guided_flags import load_guided_diffusion
from ddpm_schedules.models.model import DiffusionModel
from ddpm_schedules.sampling.samplers import sample_ancestral, sample_ddim, sample_dpmpp
from ddpm_schedules.schedules.dp import optimal_paths, optimal_schedules
from ddpm_schedules.schedules.schedule import (
    Schedule,
    even_schedule,
    full_schedule,
    load_schedules,
    quadratic_schedule,
    respaced_schedule,
    save_schedules,
)


def load_diffusers(path, levels: int = 256) -> DiffusionModel:
    """A local diffusers folder (unet/ + scheduler/) as a DiffusionModel; needs the [diffusers] extra."""
    from ddpm_schedules.models.diffusers_bridge import load_diffusers as load

    return load(path, levels)


__all__ = [
    "CostMatrix",
    "EstimateOptions",
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
    "load_guided_diffusion",
    "load_improved_diffusion",
    "load_schedules",
    "optimal_paths",
    "optimal_schedules",
    "prior_nats",
    "quadratic_schedule",
    "respaced_schedule",
    "run_evaluation",
    "sample_ancestral",
    "sample_ddim",
    "sample_dpmpp",
    "save_schedules",
    "terms",
]
