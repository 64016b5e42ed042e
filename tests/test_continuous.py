"""Continuous timesteps of a discrete-time model: at integer t exactly today's tables and predictions; between them
the log-SNR linear, alpha_bar monotone and differentiable in t."""

import pytest
import torch
from conftest import tiny_model

from ddpm_schedules.models.continuous import predict_continuous
from ddpm_schedules.models.diffusion import NoiseSchedule


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_alpha_bar_at_integer_t_is_the_table_and_between_it_the_log_snr_is_linear(name):
    noise = NoiseSchedule.named(name, 40)
    t = torch.arange(1, 41, dtype=torch.float64)
    assert torch.equal(noise.alpha_bar_at(t), noise.ab[1:])  # bit for bit
    lam = lambda ab: torch.log(ab / (1 - ab))  # noqa: E731
    for lo, frac in ((1, 0.5), (7, 0.25), (39, 0.9)):
        want = lam(noise.ab[lo]) + frac * (lam(noise.ab[lo + 1]) - lam(noise.ab[lo]))
        torch.testing.assert_close(
            lam(noise.alpha_bar_at(torch.tensor(lo + frac, dtype=torch.float64))), want, rtol=1e-12, atol=0
        )
    dense = noise.alpha_bar_at(torch.linspace(1, 40, 1000, dtype=torch.float64))
    assert bool((dense[1:] < dense[:-1]).all())  # strictly decreasing: a monotone schedule stays monotone


def test_alpha_bar_at_is_differentiable_and_checks_its_range():
    noise = NoiseSchedule.named("cosine", 40)
    t = torch.tensor([3.3, 17.5], dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(noise.alpha_bar_at(t).sum(), t)
    h = 1e-6
    numeric = (noise.alpha_bar_at(t.detach() + h) - noise.alpha_bar_at(t.detach() - h)) / (2 * h)
    torch.testing.assert_close(grad, numeric, rtol=1e-6, atol=0)  # smooth inside a step: central differences
    with pytest.raises(ValueError, match=r"^continuous t = 0\.5 is outside \[1, T = 40\]"):
        noise.alpha_bar_at(torch.tensor(0.5))


@pytest.mark.parametrize("rescale", [True, False])
def test_predict_continuous_at_integer_t_is_predict(rescale):
    model = tiny_model("learned_range", T=20)
    model.rescale_timesteps = rescale
    x = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for t in (1, 7, 20):
        a, b = model.predict(x, t), predict_continuous(model, x, float(t))
        assert torch.equal(a.x0_hat, b.x0_hat) and torch.equal(a.eps, b.eps) and torch.equal(a.frac, b.frac)
    t = torch.tensor([2.0, 5.5, 11.25], dtype=torch.float64, requires_grad=True)
    out = predict_continuous(model, x, t).x0_hat
    (grad,) = torch.autograd.grad(out.sum(), t)
    assert torch.isfinite(grad).all() and bool((grad != 0).all())  # through alpha_bar and the timestep embedding


def test_a_lookup_timestep_embedding_refuses_fractional_t():
    model = tiny_model("fixed_small", T=10)
    model.timestep_input = "index"
    with pytest.raises(ValueError, match="^a fractional timestep needs a network whose timestep input is continuous"):
        predict_continuous(model, torch.zeros(1, 1, 4, 4), 2.5)
