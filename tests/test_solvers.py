"""iPNDM against an independent implementation in k-diffusion's sigma space, UniPC against diffusers'
UniPCMultistepScheduler along the same (non-even) schedule from the same x_T."""

import pytest
import torch
from conftest import tiny_model

from ddpm_schedules import Schedule, even_schedule
from ddpm_schedules.sampling.solvers import sample_ipndm, sample_unipc

T = 50
SCHEDULES = [Schedule((1, 3, 8, 20, 33, 41, 50), T), even_schedule(T, 4), Schedule((50,), T), Schedule((9, 50), T)]


@pytest.fixture(scope="module")
def model():
    return tiny_model("learned_range", T=T, schedule="linear", levels=256)


@pytest.fixture(scope="module")
def x_T():
    return torch.randn(16, 1, 4, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)


def final(sampler, model, schedule, x_T, **options):
    trajectory = []
    sampler(model, schedule, x_T, trajectory=trajectory, **options)
    return trajectory[-1]


@torch.no_grad()
def ipndm_in_sigma_space(model, timesteps, x_T):
    """iPNDM as written for the variance-exploding ODE dx/dsigma = (x - D(x, sigma)) / sigma: Adams-Bashforth of
    order up to 4 on the derivatives with the fixed coefficients, Euler steps in sigma."""
    ab = model.schedule.ab
    sig = lambda t: ((1 - ab[t]) / ab[t]).sqrt().item()  # noqa: E731
    points = list(reversed(timesteps)) + [0]
    x, ds = x_T / ab[points[0]].sqrt(), []
    coefficients = {
        1: [1],
        2: [3 / 2, -1 / 2],
        3: [23 / 12, -16 / 12, 5 / 12],
        4: [55 / 24, -59 / 24, 37 / 24, -9 / 24],
    }
    for t, s in zip(points, points[1:]):
        denoised = model.predict(x * ab[t].sqrt(), t).x0_hat
        ds = [(x - denoised) / sig(t)] + ds[:3]
        d = sum(c * di for c, di in zip(coefficients[len(ds)], ds))
        x = x + ((sig(s) if s > 0 else 0.0) - sig(t)) * d
    return x


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: str(list(s.timesteps)))
def test_ipndm_is_the_sigma_space_multistep_method(model, x_T, schedule):
    # both float64 from the same network outputs: they differ by the change of variables' rounding (measured 1e-13)
    ours = final(sample_ipndm, model, schedule, x_T)
    torch.testing.assert_close(ours, ipndm_in_sigma_space(model, schedule.timesteps, x_T), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: str(list(s.timesteps)))
def test_unipc_steps_as_diffusers_unipc_multistep_scheduler(model, x_T, schedule, order):
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.UniPCMultistepScheduler(
        num_train_timesteps=T,
        trained_betas=model.schedule.betas.numpy(),
        prediction_type="sample",
        solver_order=order,
        solver_type="bh2",
        predict_x0=True,
        lower_order_final=True,
        final_sigmas_type="zero",
    )
    # UniPC's set_timesteps takes no list: set the step count, then its timesteps and sigmas from the schedule
    # (what a schedule file's diffusers_timesteps and sigmas hold), in float64 so only the arithmetic's order differs
    scheduler.set_timesteps(schedule.K)
    ab = model.schedule.ab
    steps = list(reversed(schedule.timesteps))
    scheduler.timesteps = torch.tensor([t - 1 for t in steps])
    scheduler.sigmas = torch.tensor([((1 - ab[t]) / ab[t]).sqrt().item() for t in steps] + [0.0], dtype=torch.float64)
    x = x_T
    for index in scheduler.timesteps.tolist():
        x = scheduler.step(model.predict(x, index + 1).x0_hat, index, x).prev_sample
    # diffusers recomputes alpha and sigma from the sigmas (1 / sqrt(1 + sigma^2)): measured 8e-16; an error in a
    # coefficient or a missed correction moves x by 1e-3 or more (test_unipc_corrects_and_ipndm_multisteps)
    torch.testing.assert_close(final(sample_unipc, model, schedule, x_T, order=order), x, rtol=1e-9, atol=1e-10)


def test_unipc_corrects_and_ipndm_multisteps(model, x_T):
    """Neither collapses to DDIM: the corrector and the history change the samples on a 7-step schedule."""
    from ddpm_schedules.sampling.samplers import sample_ddim

    sch = SCHEDULES[0]
    ddim = final(sample_ddim, model, sch, x_T)
    for got in (final(sample_unipc, model, sch, x_T), final(sample_ipndm, model, sch, x_T)):
        assert (got - ddim).abs().max() > 1e-3


def test_unipc_order_is_checked(model):
    with pytest.raises(ValueError, match=r"^order = 4; UniPC's order must be 1, 2 or 3"):
        sample_unipc(model, SCHEDULES[0], 2, order=4)


@pytest.mark.slow
def test_evaluate_samples_with_ipndm_and_unipc_and_measures_their_teacher_distance(tmp_path):
    from conftest import TINY, eval_cfg, save_tiny_checkpoint
    from test_conditioning import perturbed_state  # a fresh UNet outputs 0 (zero output convs): every sample alike

    from ddpm_schedules.app.evaluate import evaluate

    ckpt = save_tiny_checkpoint(tmp_path / "tiny.ckpt", TINY, perturbed_state(TINY))
    overrides = ["logger=none", "eval.samplers=[ipndm,unipc]", "eval.strategies=[dp_ode,even]"]
    doc = evaluate(eval_cfg(tmp_path, ckpt, *overrides))
    rows = {(q["strategy"], q["sampler"]): q for q in doc["sample_quality"]}
    assert set(rows) == {(s, m) for s in ("dp_ode", "even") for m in ("ipndm", "unipc")}
    assert all(q["fid"] > 0 and q["teacher_distance"] > 0 and q["teacher_distance_sem"] > 0 for q in rows.values())
