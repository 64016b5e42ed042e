"""DiffusionModel: conventions, ancestral sampling and input checks."""

import pytest
import torch
from conftest import quantized_data, tiny_model

from ddpm_schedules import DiffusionModel, NoiseSchedule, Schedule, even_schedule
from ddpm_schedules.costs.terms import step_terms, terms
from ddpm_schedules.sampling.samplers import sample_ancestral


@pytest.mark.parametrize("var_type", ["fixed_small", "fixed_large", "learned_range"])
def test_samples_are_on_the_levels_grid_and_reproducible(var_type):
    model = tiny_model(var_type, T=20, levels=17)
    sch = even_schedule(20, 5)
    a = sample_ancestral(model, sch, 9, generator=torch.Generator().manual_seed(0), batch_size=4)
    b = sample_ancestral(model, sch, 9, generator=torch.Generator().manual_seed(0), batch_size=4)
    c = sample_ancestral(model, sch, 9, generator=torch.Generator().manual_seed(1), batch_size=4)
    assert a.shape == (9, 1, 4, 4) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    steps = (a.double() + 1) * 16 / 2
    assert torch.equal(steps, steps.round()) and a.min() >= -1 and a.max() <= 1


def test_one_step_sample_is_the_quantized_denoised_prior_draw():
    model = tiny_model("fixed_small", T=10, levels=5)
    x_T = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    got = sample_ancestral(model, Schedule((10,), 10), 3, generator=torch.Generator().manual_seed(4))
    x0_hat = model.predict(x_T, 10).x0_hat
    assert torch.equal(got, (torch.round((x0_hat + 1) / 2 * 4) / 4 * 2 - 1).float())


def test_sampler_uses_the_pair_posterior():
    """With a network that predicts x0 = 0 exactly, x_s | x_t is N(c1 x_t, btil): check the moments."""

    class Zero(torch.nn.Module):
        def forward(self, x, ts):
            return torch.zeros_like(x)

    ns = NoiseSchedule.named("linear", 50)
    model = DiffusionModel(Zero(), ns, mean_type="x0", var_type="fixed_small", levels=256, image_shape=(1, 32, 32))
    # x_T ~ N(0, 1) -> x_s = c1 x_T + sqrt(btil) z has variance c1^2 + btil; check on a 2-step schedule's middle point
    s, t = 20, 50
    ab_s, ab_t = ns.ab[s], ns.ab[t]
    c1 = (ab_t / ab_s).sqrt() * (1 - ab_s) / (1 - ab_t)
    btil = (1 - ab_t / ab_s) * (1 - ab_s) / (1 - ab_t)
    seen = []
    original = model.predict

    def spy(x, tt, y=None):
        seen.append((tt, x.double().var().item()))
        return original(x, tt, y)

    model.predict = spy
    sample_ancestral(model, Schedule((s, t), 50), 64, generator=torch.Generator().manual_seed(0))
    assert seen[0][0] == t and seen[1][0] == s
    assert seen[1][1] == pytest.approx((c1**2 + btil).item(), rel=0.05)


def test_timestep_conventions():
    ns = NoiseSchedule.named("linear", 4000)
    plain = DiffusionModel(lambda x, t: x, ns)
    scaled = DiffusionModel(lambda x, t: x, ns, rescale_timesteps=True)
    t = torch.tensor([1, 2, 4000])
    assert plain.net_timesteps(t).tolist() == [0, 1, 3999]
    assert scaled.net_timesteps(t).tolist() == pytest.approx([0.0, 0.25, 999.75])


@pytest.mark.parametrize("mean_type", ["eps", "x0", "v"])
def test_mean_types_recover_x0_from_a_perfect_network(mean_type):
    ns = NoiseSchedule.named("cosine", 100)
    x0 = quantized_data(4, levels=256).double()
    noise = torch.randn_like(x0)
    t = 37
    ab = ns.ab[t]
    target = {"eps": noise, "x0": x0, "v": ab.sqrt() * noise - (1 - ab).sqrt() * x0}[mean_type]
    model = DiffusionModel(lambda x, ts: target, ns, mean_type=mean_type, var_type="fixed_small", clip_denoised=False)
    x_t = model.q_sample(x0, t, noise)
    torch.testing.assert_close(model.predict(x_t, t).x0_hat, x0, rtol=0, atol=1e-12)


def test_bad_input():
    model = tiny_model("fixed_small", T=10)
    x0 = quantized_data(2).double()
    with pytest.raises(ValueError, match="s = 5 is not in 0..4"):
        terms(model, x0, 5, [1, 5])
    with pytest.raises(ValueError, match="t = 11 is outside 1..10"):
        terms(model, x0, 11, [1])
    with pytest.raises(ValueError, match="t = 0 is outside"):
        terms(model, x0, 0, [0])
    with pytest.raises(ValueError, match="noise has shape"):
        terms(model, x0, 5, [1], noise=torch.zeros(3, 1, 4, 4))
    with pytest.raises(ValueError, match="unknown mean_type 'epsilon'"):
        DiffusionModel(model.net, model.schedule, mean_type="epsilon")
    with pytest.raises(ValueError, match="unknown var_type"):
        DiffusionModel(model.net, model.schedule, var_type="learned")
    with pytest.raises(ValueError, match="levels must be an integer >= 2"):
        DiffusionModel(model.net, model.schedule, levels=1)
    learned = DiffusionModel(model.net, model.schedule, var_type="learned_range")
    with pytest.raises(ValueError, match="returned 1 channels for 1-channel input; var_type='learned_range' needs 2"):
        terms(learned, x0, 3, [0])
    with pytest.raises(ValueError, match="no image_shape"):
        sample_ancestral(DiffusionModel(model.net, model.schedule), even_schedule(10, 2), 1)
    with pytest.raises(ValueError, match="ends at T = 12"):
        sample_ancestral(model, even_schedule(12, 2), 1)


@pytest.mark.parametrize("var_type", ["fixed_small", "fixed_large", "learned_range"])
def test_step_terms_are_the_consecutive_pair_terms(var_type):
    """The per-example training term at each example's own t equals the column computation."""
    model = tiny_model(var_type, T=12)
    x0 = quantized_data(5).double()
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t = torch.tensor([1, 2, 7, 12, 1])
    x_t = torch.cat([model.q_sample(x0[i : i + 1], int(t[i]), noise[i : i + 1]) for i in range(5)])
    got = step_terms(model, x0, x_t, t, model.predict(x_t, t))
    for i in range(5):
        ref = terms(model, x0[i : i + 1], int(t[i]), [int(t[i]) - 1], noise[i : i + 1])[0, 0]
        assert got[i].item() == pytest.approx(ref.item(), rel=1e-10)
