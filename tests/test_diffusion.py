"""Pair formulas, KL and decoder against independent references."""

import pytest
import torch
from conftest import quantized_data, tiny_model
from torch.distributions import Normal, kl_divergence

from ddpm_schedules import NoiseSchedule
from ddpm_schedules.costs.terms import pair_terms
from ddpm_schedules.models import diffusion as dm
from ddpm_schedules.models.chebyshev import chebyshev_exp_sums, chebyshev_order

f64 = torch.float64


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_pair_coefficients_are_the_gaussian_conditional(name):
    """q(x_s | x_t, x_0) from the joint Gaussian of (x_s, x_t) given x_0, for arbitrary pairs."""
    ns = NoiseSchedule.named(name, 200)
    s = torch.tensor([1, 3, 50, 120, 0])
    t = torch.tensor([2, 90, 51, 200, 7])
    ab_s, ab_t = ns.ab[s], ns.ab[t]
    var_s, var_t = 1 - ab_s, 1 - ab_t
    cov = (ab_t / ab_s).sqrt() * var_s  # x_t = sqrt(ab_t/ab_s) x_s + noise
    c1 = cov / var_t
    c0 = ab_s.sqrt() - c1 * ab_t.sqrt()
    var = var_s - cov**2 / var_t
    torch.testing.assert_close(dm.c1(ab_s, ab_t), c1, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(dm.c0(ab_s, ab_t), c0, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(dm.btil(ab_s, ab_t), var, rtol=1e-9, atol=1e-15)


def test_consecutive_pairs_are_ddpm_posterior():
    ns = NoiseSchedule.named("linear", 100)
    t = torch.arange(2, 101)
    beta, ab_t, ab_prev = ns.betas[t - 1], ns.ab[t], ns.ab[t - 1]
    torch.testing.assert_close(dm.btil(ab_prev, ab_t), beta * (1 - ab_prev) / (1 - ab_t), rtol=1e-12, atol=0)
    torch.testing.assert_close(dm.c0(ab_prev, ab_t), beta * ab_prev.sqrt() / (1 - ab_t), rtol=1e-12, atol=0)
    torch.testing.assert_close(dm.c1(ab_prev, ab_t), (1 - ab_prev) * (1 - beta).sqrt() / (1 - ab_t), rtol=1e-12, atol=0)
    torch.testing.assert_close(dm.beta_ts(ab_prev, ab_t), beta, rtol=1e-10, atol=0)


def test_normal_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    m1, m2 = torch.randn(100, generator=g, dtype=f64), torch.randn(100, generator=g, dtype=f64)
    lv1, lv2 = torch.randn(100, generator=g, dtype=f64), torch.randn(100, generator=g, dtype=f64)
    ref = kl_divergence(Normal(m1, (0.5 * lv1).exp()), Normal(m2, (0.5 * lv2).exp()))
    torch.testing.assert_close(dm.normal_kl(m1, lv1, m2, lv2), ref, rtol=1e-12, atol=1e-14)


def test_fixed_variance_closed_form_matches_torch_distributions():
    g = torch.Generator().manual_seed(1)
    D, B = 12, 3
    x0, x0_hat = torch.randn(B, D, generator=g, dtype=f64), torch.randn(B, D, generator=g, dtype=f64)
    c0, btil, sigma2 = (
        torch.tensor([0.3, 0.9], dtype=f64),
        torch.tensor([0.01, 0.2], dtype=f64),
        torch.tensor([0.02, 0.5], dtype=f64),
    )
    got = dm.fixed_variance_kl(((x0 - x0_hat) ** 2).sum(1), c0, btil, sigma2, D)
    for j in range(2):
        ref = kl_divergence(Normal(c0[j] * x0, btil[j].sqrt()), Normal(c0[j] * x0_hat, sigma2[j].sqrt())).sum(1)
        torch.testing.assert_close(got[:, j], ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("f_lo,f_hi", [(0.0, 1.0), (-0.2, 1.2), (-1.0, 2.0), (0.4, 0.4)])
def test_learned_range_closed_form_matches_torch_distributions(f_lo, f_hi):
    g = torch.Generator().manual_seed(2)
    B, D = 3, 10
    x0, x0_hat = torch.randn(B, D, generator=g, dtype=f64), torch.randn(B, D, generator=g, dtype=f64)
    frac = f_lo + torch.rand(B, D, generator=g, dtype=f64) * (f_hi - f_lo)  # the network may leave [0, 1]
    c0 = torch.tensor([0.2, 0.7, 0.99, 1e-3], dtype=f64)
    log_btil = torch.tensor([-5.0, -2.0, -0.1, -13.5], dtype=f64)
    max_log = torch.tensor([-4.0, -1.0, -0.05, -0.01], dtype=f64)  # Delta up to 13.5: cosine T = 4000 reaches it
    got = dm.learned_range_kl((x0 - x0_hat) ** 2, frac, c0, log_btil, max_log)
    for j in range(4):
        log_var = frac * max_log[j] + (1 - frac) * log_btil[j]
        ref = kl_divergence(
            Normal(c0[j] * x0, (0.5 * log_btil[j]).exp()), Normal(c0[j] * x0_hat, (0.5 * log_var).exp())
        )
        torch.testing.assert_close(got[:, j], ref.sum(1), rtol=1e-10, atol=1e-12)


def column_kl_reference(x0, x0_hat, frac, ns, t, s):
    """KL of the pairs (s, t) per example, summed over dimensions with torch.distributions (no expansion)."""
    min_log, max_log = ns.log_variance_range(s, t)
    c0 = dm.c0(ns.ab[s], ns.ab[t])
    out = torch.empty(x0.shape[0], s.numel(), dtype=f64)
    for j in range(s.numel()):
        log_var = frac * max_log[j] + (1 - frac) * min_log[j]
        out[:, j] = kl_divergence(
            Normal(c0[j] * x0, (0.5 * min_log[j]).exp()), Normal(c0[j] * x0_hat, (0.5 * log_var).exp())
        ).sum(1)
    return out


@pytest.mark.parametrize("extreme_v", [-7.0, -9.0])  # f = -3 and f = -4: improved-diffusion does not clamp v
def test_one_example_with_an_extreme_variance_leaves_the_others_exact(extreme_v):
    """Cosine T = 4000, column t = 4000: one dimension of one example at v = -7 (or -9) in the batch."""
    ns = NoiseSchedule.named("cosine", 4000)
    g = torch.Generator().manual_seed(5)
    B, D, t = 4, 48, 4000
    x0, x0_hat = torch.rand(B, D, generator=g, dtype=f64) * 2 - 1, torch.rand(B, D, generator=g, dtype=f64) * 2 - 1
    v = torch.rand(B, D, generator=g, dtype=f64) * 2 - 1
    v[2, 5] = extreme_v
    frac = (v + 1) / 2
    s = torch.tensor([1, 2, 40, 1000, 3000, 3999])
    min_log, max_log = ns.log_variance_range(s, t)
    got = dm.learned_range_kl((x0 - x0_hat) ** 2, frac, dm.c0(ns.ab[s], ns.ab[t]), min_log, max_log)
    want = column_kl_reference(x0, x0_hat, frac, ns, t, s)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)  # every example, the extreme one included
    alone = dm.learned_range_kl((x0[:1] - x0_hat[:1]) ** 2, frac[:1], dm.c0(ns.ab[s], ns.ab[t]), min_log, max_log)
    torch.testing.assert_close(got[:1], alone, rtol=1e-12, atol=1e-12)  # an ordinary example is what it is alone


def test_wide_ranges_fall_back_to_direct_sums_within_a_memory_bound():
    g = torch.Generator().manual_seed(6)
    frac = torch.rand(3, 20, generator=g, dtype=f64) * 2 - 0.5
    frac[1, 3] = -6.0  # needs far more than 8 terms
    weights, delta = torch.rand(2, 3, 20, generator=g, dtype=f64), torch.linspace(0.1, 13.0, 7, dtype=f64)
    exact = torch.einsum("wbd,bsd->wbs", weights, torch.exp(-frac[:, None, :] * delta[None, :, None]))
    got = chebyshev_exp_sums(frac, weights, delta, max_order=8, max_elements=40)  # 40 elements: 2 s at a time
    torch.testing.assert_close(got, exact, rtol=1e-12, atol=0)
    assert chebyshev_order(0.0) == 1 and chebyshev_order(20.0) > chebyshev_order(5.0)


@pytest.mark.parametrize("levels", [2, 17, 256])
@pytest.mark.parametrize("mean,log_scale", [(0.1, -3.0), (-0.97, -6.0), (0.5, 1.0), (3.0, -2.0)])
def test_decoder_probabilities_sum_to_one(levels, mean, log_scale):
    x = torch.linspace(-1, 1, levels, dtype=f64)
    logp = dm.discretized_gaussian_log_likelihood(x, torch.full_like(x, mean), torch.full_like(x, log_scale), levels)
    torch.testing.assert_close(logp.exp().sum(), torch.tensor(1.0, dtype=f64), rtol=1e-12, atol=0)


def test_decoder_matches_normal_cdf_and_keeps_tail_precision():
    levels = 256
    x = torch.linspace(-1, 1, levels, dtype=f64)
    mean, scale = torch.full_like(x, 0.3), torch.full_like(x, 0.01)
    ours = dm.discretized_gaussian_log_likelihood(x, mean, scale.log(), levels)
    n = Normal(mean, scale)
    h = 1 / (levels - 1)
    ref = torch.where(
        x < -1 + h, n.cdf(x + h), torch.where(x > 1 - h, 1 - n.cdf(x - h), n.cdf(x + h) - n.cdf(x - h))
    ).log()
    near = ref > -10  # where the plain CDF difference (1 + erf) is still accurate
    torch.testing.assert_close(ours[near], ref[near], rtol=1e-9, atol=1e-12)
    # far in the tail the CDF difference underflows to 0; the log-space form still decays quadratically
    far = ours[x < -0.5]
    assert torch.isfinite(far).all() and (far < -1000).all() and (far.diff() > 0).all()
    z = (x[x < -0.5] - 0.3) / 0.01
    torch.testing.assert_close(far, -0.5 * z**2, rtol=0.02, atol=0)


def test_prior_kl_matches_torch_distributions():
    x0 = quantized_data(5, (2, 3, 3), levels=256).double()
    ab_T = torch.tensor(0.01, dtype=f64)
    ref = kl_divergence(Normal(ab_T.sqrt() * x0, (1 - ab_T).sqrt()), Normal(0.0, 1.0)).flatten(1).sum(1)
    torch.testing.assert_close(dm.prior_kl(x0, ab_T), ref, rtol=1e-12, atol=1e-15)


def test_variance_table():
    ns = NoiseSchedule.named("cosine", 50)
    s = torch.tensor([0, 0, 3, 10])
    for t in (1, 2, 30):
        st = s[s < t]
        small = ns.fixed_log_variance("fixed_small", st, t).exp()
        large = ns.fixed_log_variance("fixed_large", st, t).exp()
        floor = dm.btil(ns.ab[1], ns.ab[2])
        for k, sv in enumerate(st.tolist()):
            if sv == 0:
                torch.testing.assert_close(small[k], floor, rtol=1e-14, atol=0)
                torch.testing.assert_close(large[k], floor if t == 1 else 1 - ns.ab[t], rtol=1e-14, atol=0)
            else:
                torch.testing.assert_close(small[k], dm.btil(ns.ab[sv], ns.ab[t]))
                torch.testing.assert_close(large[k], 1 - ns.ab[t] / ns.ab[sv])
        lo, hi = ns.log_variance_range(st, t)
        torch.testing.assert_close(lo.exp(), small)
        torch.testing.assert_close(hi.exp(), torch.where(st == 0, 1 - ns.ab[t], large))


@pytest.mark.parametrize("var_type", ["fixed_small", "fixed_large", "learned_range"])
@pytest.mark.parametrize("mean_type", ["eps", "x0", "v"])
def test_fast_path_equals_elementwise_path(var_type, mean_type):
    model = tiny_model(var_type, mean_type, T=30, clip=mean_type != "x0")
    x0 = quantized_data(6).double()
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3), dtype=f64)
    for t in (1, 2, 17, 30):
        s = torch.arange(t)
        x_t = model.q_sample(x0, t, noise)
        pred = model.predict(x_t, t)
        fast = pair_terms(model, x0, x_t, t, s, pred)
        slow = pair_terms(model, x0, x_t, t, s, pred, fast=False)
        torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-12)
        assert (fast[:, 1:] >= -1e-12).all()  # a KL


def test_bad_schedule_input():
    with pytest.raises(ValueError, match="unknown noise_schedule 'quad'"):
        NoiseSchedule.named("quad", 10)
    with pytest.raises(ValueError, match="in \\(0, 1\\]"):
        NoiseSchedule([0.1, 1.5])
    with pytest.raises(ValueError, match=">= 2"):
        NoiseSchedule.named("linear", 1)
