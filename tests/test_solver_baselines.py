"""The deterministic samplers' baselines against diffusers' own DPMSolverMultistepScheduler.set_timesteps."""

import numpy as np
import pytest
import torch

from ddpm_schedules import NoiseSchedule
from ddpm_schedules.schedules.solver_baselines import (
    AYS_SD_TIMESTEPS,
    SOLVER_BASELINES,
    ays_schedule,
    karras_schedule,
    strictly_increasing,
)

diffusers = pytest.importorskip("diffusers")

FLAGS = {
    "karras": "use_karras_sigmas",
    "logsnr": "use_lu_lambdas",
    "exponential": "use_exponential_sigmas",
    "beta": "use_beta_sigmas",
}
CONFIGS = [(1000, "linear"), (1000, "scaled_linear"), (4000, "linear"), (500, "scaled_linear")]


def scheduler(T: int, betas: str, **flags):
    return diffusers.DPMSolverMultistepScheduler(num_train_timesteps=T, beta_schedule=betas, **flags)


def ours(T: int, betas: str) -> NoiseSchedule:
    """The model as load_diffusers reads it: diffusers' own float32 alpha_bar table."""
    ab = scheduler(T, betas).alphas_cumprod.double()
    return NoiseSchedule(1 - ab / torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]]))


@pytest.mark.parametrize("name", list(FLAGS))
@pytest.mark.parametrize("T,betas", CONFIGS)
@pytest.mark.parametrize("K", [4, 8, 16, 32])
def test_baseline_timesteps_equal_diffusers(name, T, betas, K):
    s = scheduler(T, betas, **{FLAGS[name]: True})
    s.set_timesteps(K)
    theirs = sorted(t + 1 for t in s.timesteps.tolist())  # our 1-based t, ascending
    got = SOLVER_BASELINES[name](ours(T, betas), K)
    assert got.strategy == name and got.K == K and got.timesteps[-1] == T
    # equal to diffusers' where it has no repeat, and its largest step at T (float32 can truncate it to T - 1)
    assert list(got.timesteps) == strictly_increasing(theirs[:-1] + [T], T)
    if len(set(theirs)) == K and theirs[-1] == T:
        assert list(got.timesteps) == theirs


def test_repeated_timesteps_move_up_to_the_next_free_one():
    ns = NoiseSchedule.named("cosine", 20)  # a small model: Karras' dense small sigmas share timesteps
    s = karras_schedule(ns, 12)
    assert s.K == 12 and s.timesteps[-1] == 20 and all(a < b for a, b in zip(s.timesteps, s.timesteps[1:]))
    assert strictly_increasing([1, 1, 1, 2, 7, 7, 9], 9) == [1, 2, 3, 4, 7, 8, 9]
    with pytest.raises(ValueError, match="karras at K = 21: a model with T = 20 gives at most 20 distinct timesteps"):
        karras_schedule(ns, 21)


def test_ays_gives_the_published_timesteps_at_ten_steps_and_interpolates_in_log_sigma():
    ns = NoiseSchedule(np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2)
    assert ays_schedule(ns, 10).to_diffusers_timesteps() == list(AYS_SD_TIMESTEPS)
    twenty = ays_schedule(ns, 19).to_diffusers_timesteps()
    assert set(AYS_SD_TIMESTEPS) <= set(twenty)  # 19 levels: the 10 published and one between each pair
    assert ays_schedule(NoiseSchedule.named("linear", 4000), 10).timesteps[-1] == 4000


def test_baselines_are_strategies_that_need_the_models_noise_schedule():
    from ddpm_schedules.schedules.strategies import check_strategy_names, parse_strategies

    ns = NoiseSchedule.named("linear", 100)
    assert check_strategy_names(["karras", "logsnr", "exponential", "beta", "ays"]) == (
        "karras",
        "logsnr",
        "exponential",
        "beta",
        "ays",
    )
    karras, ays = parse_strategies(["karras", "ays"], 100, noise=ns)
    assert karras.objective is None and karras.build_all(None, [4, 8]) == [
        karras_schedule(ns, 4),
        karras_schedule(ns, 8),
    ]
    assert ays.build_all(None, [6]) == [ays_schedule(ns, 6)]
    with pytest.raises(ValueError, match="^strategies has 'karras', which needs the model's noise schedule"):
        parse_strategies(["karras"], 100)
