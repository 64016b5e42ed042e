"""DDIM and DPM-Solver++(2M) along schedules, against loops written out from their papers."""

import math

import pytest
import torch
from conftest import tiny_model

from ddpm_schedules import Schedule, even_schedule, full_schedule
from ddpm_schedules.sampling.registry import SAMPLERS, check_samplers
from ddpm_schedules.sampling.samplers import quantize, sample_ddim, sample_dpmpp


@torch.no_grad()
def plain_ddim(model, x_T, timesteps, eta=0.0, draws=()):
    """improved-diffusion's ddim_sample loop: sigma = eta sqrt((1 - ab_prev)/(1 - ab) (1 - ab/ab_prev))."""
    ab, x, draws = model.schedule.ab, x_T.double(), iter(draws)
    for t, s in zip(reversed(timesteps), list(reversed(timesteps))[1:] + [0]):
        x0 = model.predict(x, t).x0_hat
        eps = (x - ab[t].sqrt() * x0) / (1 - ab[t]).sqrt()
        sigma = eta * ((1 - ab[s]) / (1 - ab[t]) * (1 - ab[t] / ab[s])).sqrt()
        x = ab[s].sqrt() * x0 + (1 - ab[s] - sigma**2).sqrt() * eps
        if s > 0 and eta > 0:
            x = x + sigma * next(draws).double()
    return quantize(x, model.levels).float()


@pytest.mark.parametrize("var_type", ["fixed_large", "learned_range"])
def test_ddim_along_the_full_chain_equals_a_plain_ddim_loop(var_type):
    model = tiny_model(var_type, T=15)
    x_T = torch.randn(6, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    got = sample_ddim(model, full_schedule(15), x_T)
    torch.testing.assert_close(got, plain_ddim(model, x_T, list(range(1, 16))), rtol=0, atol=0)


def test_ddim_with_eta_draws_the_posterior_noise():
    model = tiny_model("fixed_small", T=15)
    sch = Schedule((2, 7, 11, 15), 15)
    gen = torch.Generator().manual_seed(1)
    draws = [torch.randn(5, 1, 4, 4, generator=gen, dtype=torch.float64) for _ in range(4)]
    got = sample_ddim(model, sch, draws[0], noise=draws[1:], eta=0.7)
    torch.testing.assert_close(
        got, plain_ddim(model, draws[0], [2, 7, 11, 15], eta=0.7, draws=draws[1:]), rtol=0, atol=0
    )
    assert not torch.equal(got, sample_ddim(model, sch, draws[0], noise=draws[1:]))  # eta = 0 ignores the draws


@torch.no_grad()
def plain_dpm_solver_pp_2m(model, x_T, timesteps):
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2) in log-SNR time: first order at the first step, second order
    after, and the last evaluation jumps to sigma = 0 (x_0 = x0_hat); x0 predictions are the model's x0_hat."""
    ab = model.schedule.ab
    alpha, sigma = (lambda t: ab[t].sqrt()), (lambda t: (1 - ab[t]).sqrt())
    lam = lambda t: torch.log(alpha(t) / sigma(t))  # noqa: E731
    ts = list(reversed(timesteps))
    x, prev_x0, prev_h = x_T.double(), None, None
    for i, t in enumerate(ts):
        x0 = model.predict(x, t).x0_hat
        if i == len(ts) - 1:  # to sigma = 0: x_0 = x0_hat
            return quantize(x0, model.levels).float()
        s = ts[i + 1]
        h = lam(s) - lam(t)
        r = None if prev_x0 is None else prev_h / h
        D = x0 if r is None else (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * prev_x0
        x = sigma(s) / sigma(t) * x - alpha(s) * torch.expm1(-h) * D
        prev_x0, prev_h = x0, h
    raise AssertionError


def test_dpmpp_along_a_schedule_equals_dpm_solver_pp_2m_written_out():
    model = tiny_model("learned_range", T=50, schedule="linear", levels=256)
    x_T = torch.randn(64, 1, 4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for sch in (even_schedule(50, 6), Schedule((1, 3, 8, 20, 33, 41, 50), 50)):
        got = sample_dpmpp(model, sch, x_T)
        assert torch.equal(got, plain_dpm_solver_pp_2m(model, x_T, list(sch.timesteps)))
        assert not torch.equal(got, sample_ddim(model, sch, x_T))  # second order is not DDIM


def test_dpmpp_steps_as_diffusers_dpm_solver_multistep_scheduler():
    """The reference implementation: diffusers' scheduler (second order, data prediction, final sigma 0) on the same
    betas."""
    diffusers = pytest.importorskip("diffusers")
    model = tiny_model("learned_range", T=50, schedule="linear", levels=256)
    scheduler = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=50,
        trained_betas=model.schedule.betas.numpy(),
        prediction_type="sample",
        algorithm_type="dpmsolver++",
        solver_order=2,
        final_sigmas_type="zero",
    )
    x_T = torch.randn(64, 1, 4, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for sch in (even_schedule(50, 6), Schedule((1, 3, 8, 20, 33, 41, 50), 50)):
        scheduler.set_timesteps(timesteps=sch.to_diffusers_timesteps())
        x = x_T
        for index in scheduler.timesteps.tolist():
            x = scheduler.step(model.predict(x, index + 1).x0_hat, index, x).prev_sample
        # diffusers keeps alpha_bar in float32: on the 256-level grid the samples still agree exactly
        assert torch.equal(sample_dpmpp(model, sch, x_T), quantize(x, 256).float())


def test_sampler_names_and_eta_are_checked():
    assert list(SAMPLERS) == ["ancestral", "ddim", "dpmpp", "ipndm", "unipc"]
    with pytest.raises(
        ValueError, match="unknown sampler 'euler' in samplers; use ancestral, ddim, dpmpp, ipndm, unipc"
    ):
        check_samplers(["ddim", "euler"])
    with pytest.raises(ValueError, match="^samplers is empty"):
        check_samplers([])
    with pytest.raises(ValueError, match="eta = -0.5; DDIM's eta must be a number >= 0"):
        sample_ddim(tiny_model("fixed_large", T=5), even_schedule(5, 2), 1, eta=-0.5)
    assert math.isfinite(float(sample_ddim(tiny_model("fixed_large", T=5), even_schedule(5, 2), 2).sum()))


@pytest.mark.parametrize(
    "sampler,eta", [("ancestral", 0.0), ("ddim", 0.5), ("dpmpp", 0.0), ("ipndm", 0.0), ("unipc", 0.0)]
)
def test_chunks_sharing_network_calls_draw_what_each_chunk_draws_alone(sampler, eta):
    """quality.draw_samples packs chunks into one batch: each chunk keeps its x_T and its generator's step noise."""
    from ddpm_schedules.models.noise import Processes
    from ddpm_schedules.sampling.quality import QualitySettings, chunk_noise, draw_samples

    model = tiny_model("learned_range", T=15)
    settings = QualitySettings(samples=10, chunk=3, seed=7, ddim_eta=eta)
    schedule = even_schedule(15, 5)
    alone = []  # one chunk at a time, as a single call of the sampler from the chunk's x_T and generator
    for c in range(4):
        x_T, gen = chunk_noise(model, 7, c, min(3, 10 - 3 * c))
        extra = {"eta": eta} if sampler == "ddim" else {}
        alone.append((c, SAMPLERS[sampler](model, schedule, x_T, generator=gen, **extra)))
    for batch_size in (3, 7, 100):  # 1, 2 or all 4 chunks per call
        got = draw_samples(model, sampler, schedule, settings, Processes(0, 1), batch_size)
        assert [c for c, _ in got] == [0, 1, 2, 3]
        for (_, a), (_, b) in zip(alone, got):
            assert torch.equal(a, b)


def test_the_samplers_share_one_signature():
    import inspect

    shared = ["model", "schedule", "x_T", "generator", "noise", "batch_size", "trajectory"]
    for name, sampler in SAMPLERS.items():
        params = inspect.signature(sampler).parameters
        assert list(params)[: len(shared)] == shared, name
        assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in list(params.values())[3:]), name
    model = tiny_model("fixed_small", T=10)
    with pytest.raises(TypeError, match="unexpected keyword argument 'eta'"):  # an option the sampler does not take
        SAMPLERS["dpmpp"](model, even_schedule(10, 3), 2, eta=0.5)
    with pytest.raises(TypeError, match="unexpected keyword argument 'eta'"):
        SAMPLERS["ancestral"](model, even_schedule(10, 3), 2, eta=0.5)


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_an_int_n_draws_x_T_first_and_every_sampler_starts_there(sampler):
    model = tiny_model("learned_range", T=12)
    sch = even_schedule(12, 4)
    extra = {"eta": 0.5} if sampler == "ddim" else {}
    from_n, traj = [], []
    got = SAMPLERS[sampler](model, sch, 5, generator=torch.Generator().manual_seed(2), trajectory=from_n, **extra)
    gen = torch.Generator().manual_seed(2)
    x_T = torch.randn(5, 1, 4, 4, generator=gen, dtype=torch.float64)
    assert torch.equal(SAMPLERS[sampler](model, sch, x_T, generator=gen, trajectory=traj, **extra), got)
    assert torch.equal(from_n[0], x_T) and len(from_n) == sch.K + 1  # x_T, tau_{K-1}, ..., tau_1, then x0_hat
    assert all(torch.equal(a, b) for a, b in zip(from_n, traj))
    assert torch.equal(quantize(from_n[-1], model.levels).float(), got)


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_the_batch_size_splits_network_calls_not_the_draws(sampler):
    model = tiny_model("learned_range", T=12)
    sch = even_schedule(12, 4)
    extra = {"eta": 1.0} if sampler == "ddim" else {}
    runs = []
    for batch_size in (None, 2, 3):
        traj = []
        gen = torch.Generator().manual_seed(5)
        SAMPLERS[sampler](model, sch, 7, generator=gen, batch_size=batch_size, trajectory=traj, **extra)
        runs.append(traj)
    # a float64 network may round a batch of another size differently in the last bits (about 1e-16 per output)
    for other in runs[1:]:
        for a, b in zip(runs[0], other, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)


def test_noise_x_T_and_batch_size_are_checked():
    model = tiny_model("fixed_small", T=10)
    sch = even_schedule(10, 3)
    x_T = torch.zeros(2, 1, 4, 4)
    old_form = (
        r"^noise must be 2 tensors of shape \(2, 1, 4, 4\), one per noisy step after x_T "
        r"\(x_T is passed as x_T\), got \(2, 1, 4, 4\), \(2, 1, 4, 4\), \(2, 1, 4, 4\)$"
    )
    with pytest.raises(ValueError, match=old_form):
        sample_ddim(model, sch, x_T, noise=[x_T, x_T, x_T], eta=1.0)  # the old form: x_T first
    with pytest.raises(ValueError, match="noise must give tensors of shape"):
        SAMPLERS["ancestral"](model, sch, x_T, noise=iter([x_T]))
    with pytest.raises(ValueError, match=r"x_T must have shape \[n, 1, 4, 4\] with n >= 1, got \(2, 4, 4\)"):
        sample_dpmpp(model, sch, x_T[:, 0])
    with pytest.raises(TypeError, match="x_T must be a tensor .* or a number of samples n, got float"):
        sample_dpmpp(model, sch, 2.0)
    with pytest.raises(ValueError, match="^n = 0; it must be a positive integer"):
        sample_dpmpp(model, sch, 0)
    with pytest.raises(ValueError, match="^batch_size = 0; it must be a positive integer or null"):
        sample_dpmpp(model, sch, 2, batch_size=0)
    assert torch.equal(sample_dpmpp(model, sch, x_T, noise=iter([])), sample_dpmpp(model, sch, x_T))  # draws nothing
