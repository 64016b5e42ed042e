"""Cost matrix estimation: determinism, accumulation, consistency with a plain full-chain loop."""

import math

import pytest
import torch
from conftest import quantized_data, tiny_model
from torch.distributions import Normal, kl_divergence

from ddpm_schedules import CostMatrix, estimate_cost_matrix
from ddpm_schedules.costs.cost_matrix import estimate_cost_matrices
from ddpm_schedules.costs.matrix import CostMatrixMetric
from ddpm_schedules.costs.terms import terms
from ddpm_schedules.models.noise import example_noise

f64 = torch.float64


def test_batch_size_does_not_change_the_matrix():
    model = tiny_model("learned_range", T=12, dtype=torch.float32)
    data = quantized_data(30)
    ref = estimate_cost_matrix(model, data, seed=3, batch_size=64, progress=False)
    for bs in (1, 7):
        cm = estimate_cost_matrix(model, data, seed=3, batch_size=bs, progress=False)
        valid = torch.isfinite(ref.mean)
        torch.testing.assert_close(cm.mean[valid], ref.mean[valid], rtol=1e-6, atol=0)
        torch.testing.assert_close(cm.sem[valid], ref.sem[valid], rtol=1e-4, atol=1e-9)
        assert cm.prior == pytest.approx(ref.prior, rel=1e-9)
    # an iterable of (images, labels) batches is the same data
    loader = [(data[i : i + 10], torch.zeros(10)) for i in range(0, 30, 10)]
    cm = estimate_cost_matrix(model, loader, seed=3, progress=False)
    torch.testing.assert_close(cm.mean[valid], ref.mean[valid], rtol=1e-6, atol=0)
    other = estimate_cost_matrix(model, data, seed=4, batch_size=64, progress=False)
    assert not torch.allclose(other.mean[valid], ref.mean[valid], rtol=1e-3)


def test_example_noise_depends_only_on_seed_index_and_t():
    shape = (3, 8, 8)  # 192 dims: blocks of 21 examples
    whole = example_noise(5, 0, 1000, 7, shape)
    torch.testing.assert_close(example_noise(5, 37, 30, 7, shape), whole[37:67], rtol=0, atol=0)  # spans three blocks
    torch.testing.assert_close(example_noise(5, 999, 1, 7, shape), whole[999:], rtol=0, atol=0)
    assert not torch.equal(example_noise(5, 0, 4, 8, shape), whole[:4])
    assert not torch.equal(example_noise(6, 0, 4, 7, shape), whole[:4])


@pytest.mark.parametrize("var_type", ["fixed_small", "fixed_large", "learned_range"])
def test_mean_and_sem_are_those_of_the_per_example_terms(var_type):
    model = tiny_model(var_type, T=8)
    data = quantized_data(9)
    cm = estimate_cost_matrix(model, data, grid=[2, 5, 8], seed=1, batch_size=4, progress=False)
    assert cm.grid.tolist() == [0, 2, 5, 8] and cm.count == 9 and cm.dims == 16
    for j, t in enumerate(cm.grid.tolist()):
        if t == 0:
            continue
        s = cm.grid[:j]
        per_example = torch.cat(
            [terms(model, data[i : i + 1], t, s, example_noise(1, i, 1, t, (1, 4, 4))) for i in range(9)]
        )
        torch.testing.assert_close(cm.mean[:j, j], per_example.mean(0), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(cm.sem[:j, j], per_example.std(0) / 3, rtol=1e-6, atol=1e-12)
        assert torch.isinf(cm.mean[j:, j]).all() and torch.isnan(cm.sem[j:, j]).all()


def test_grid_matrix_is_a_submatrix_of_the_full_one():
    model = tiny_model("fixed_large", T=10)
    data = quantized_data(8)
    full = estimate_cost_matrix(model, data, seed=2, progress=False)
    sub = estimate_cost_matrix(model, data, grid=[10, 3, 7, 4], seed=2, progress=False)
    idx = torch.tensor([0, 3, 4, 7, 10])
    valid = torch.isfinite(sub.mean)
    torch.testing.assert_close(sub.mean[valid], full.mean[idx][:, idx][valid], rtol=1e-12, atol=0)


def plain_negative_elbo(model, x0, seed):
    """Per-example T-step negative ELBO with DDPM's consecutive-step formulas and torch.distributions."""
    ns, T = model.schedule, model.T
    shape = tuple(x0.shape[1:])
    total = torch.zeros(x0.shape[0], dtype=f64)
    for t in range(1, T + 1):
        noise = example_noise(seed, 0, x0.shape[0], t, shape).double()
        ab_t, ab_prev, beta = ns.ab[t], ns.ab[t - 1], ns.betas[t - 1]
        x_t = ab_t.sqrt() * x0 + (1 - ab_t).sqrt() * noise
        out = model.net(x_t, torch.full((x0.shape[0],), (t - 1) * 1000 / T, dtype=f64)).double()
        eps, v = out[:, :1], out[:, 1:]
        x0_hat = ((x_t - (1 - ab_t).sqrt() * eps) / ab_t.sqrt()).clamp(-1, 1)
        post_var = beta * (1 - ab_prev) / (1 - ab_t)
        floor = ns.betas[1] * (1 - ns.ab[1]) / (1 - ns.ab[2])  # improved-diffusion's clipped posterior_variance[0]
        frac = (v + 1) / 2
        log_var = frac * beta.log() + (1 - frac) * (post_var if t > 1 else floor).log()
        std = (0.5 * log_var).exp()
        if t == 1:
            n = Normal(x0_hat, std)
            h = 1 / (model.levels - 1)
            p = torch.where(
                x0 < -1 + h, n.cdf(x0 + h), torch.where(x0 > 1 - h, 1 - n.cdf(x0 - h), n.cdf(x0 + h) - n.cdf(x0 - h))
            )
            total += -p.log().flatten(1).sum(1)
        else:
            coef1, coef2 = beta * ab_prev.sqrt() / (1 - ab_t), (1 - ab_prev) * (1 - beta).sqrt() / (1 - ab_t)
            q = Normal(coef1 * x0 + coef2 * x_t, post_var.sqrt())
            p = Normal(coef1 * x0_hat + coef2 * x_t, std)
            total += kl_divergence(q, p).flatten(1).sum(1)
    total += kl_divergence(Normal(ns.ab[T].sqrt() * x0, (1 - ns.ab[T]).sqrt()), Normal(0.0, 1.0)).flatten(1).sum(1)
    return total


def test_superdiagonal_plus_prior_is_the_full_chain_negative_elbo():
    model = tiny_model("learned_range", T=15)
    data = quantized_data(6).double()
    cm = estimate_cost_matrix(model, data, seed=9, progress=False)
    chain = cm.prior + sum(float(cm.mean[t - 1, t]) for t in range(1, 16))
    ref = plain_negative_elbo(model, data, seed=9).mean().item()
    assert chain == pytest.approx(ref, rel=1e-6)


def test_metric_shards_merge_into_the_whole():
    g = torch.Generator().manual_seed(0)
    batches = [
        (torch.rand(5, j, generator=g, dtype=f64), torch.rand(5, generator=g, dtype=f64)) for j in (1, 2, 3, 1, 2, 3)
    ]
    whole, a, b = CostMatrixMetric(4), CostMatrixMetric(4), CostMatrixMetric(4)
    for k, (column, prior) in enumerate(batches):
        j = column.shape[1]
        whole.update(column, j, prior if j == 1 else None)
        (a if k < 3 else b).update(column, j, prior if j == 1 else None)
    a.merge_state(b)
    got, want = a.compute(), whole.compute()
    for x, y in zip(
        (got.moments, got.prior_moments, got.count, *got.pairs_mean_sem()),
        (want.moments, want.prior_moments, want.count, *want.pairs_mean_sem()),
    ):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=0, equal_nan=True)


def test_save_load_round_trip(tmp_path):
    model = tiny_model("fixed_small", T=6)
    cm = estimate_cost_matrix(model, quantized_data(5), progress=False)
    cm.save(tmp_path / "cm.pt")
    back = CostMatrix.load(tmp_path / "cm.pt")
    torch.testing.assert_close(back.mean, cm.mean)
    assert (back.prior, back.count, back.dims, back.T) == (cm.prior, cm.count, cm.dims, 6)
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a saved CostMatrix"):
        CostMatrix.load(tmp_path / "bad.pt")
    blob = torch.load(tmp_path / "cm.pt", weights_only=True)
    blob["payload"][len(blob["payload"]) // 2] ^= 1  # one flipped bit in the numbers
    torch.save(blob, tmp_path / "flipped.pt")
    with pytest.raises(ValueError, match="not a saved CostMatrix \\(ValueError\\)"):
        CostMatrix.load(tmp_path / "flipped.pt")
    with pytest.raises(ValueError, match="does not exist"):
        CostMatrix.load(tmp_path / "missing.pt")


def test_bad_input():
    model = tiny_model("fixed_small", T=6)
    data = quantized_data(4)
    with pytest.raises(ValueError, match="must contain T = 6"):
        estimate_cost_matrix(model, data, grid=[1, 3], progress=False)
    with pytest.raises(ValueError, match="must lie in 1..6"):
        estimate_cost_matrix(model, data, grid=[0, 6], progress=False)
    with pytest.raises(ValueError, match=r"shape \(1, 8, 8\) but the model expects \(1, 4, 4\)"):
        estimate_cost_matrix(model, quantized_data(4, (1, 8, 8)), progress=False)
    with pytest.raises(ValueError, match="scale images to \\[-1, 1\\]"):
        estimate_cost_matrix(model, data * 3, progress=False)
    with pytest.raises(ValueError, match="levels = 17"):
        estimate_cost_matrix(model, quantized_data(4, levels=256), progress=False)
    with pytest.raises(ValueError, match="\\[B, C, H, W\\]"):
        estimate_cost_matrix(model, data[:, 0], progress=False)
    with pytest.raises(ValueError, match="no examples"):
        estimate_cost_matrix(model, [], progress=False)
    with pytest.raises(ValueError, match="NaN or Inf"):
        estimate_cost_matrix(model, data.masked_fill(data > 0.9, math.nan), progress=False)

    class Exploding(torch.nn.Module):
        def forward(self, x, ts):
            out = torch.zeros_like(x)
            return out.masked_fill((ts == 4 * 1000 / 6)[:, None, None, None], math.nan)

    model.net = Exploding()
    with pytest.raises(ValueError, match="NaN or Inf at t = 5"):
        estimate_cost_matrix(model, data, progress=False)


def test_shards_with_start_index_combine_into_the_whole():
    """What each DDP process does: estimate its own shard with its global start index."""
    model = tiny_model("learned_range", T=8)
    data = quantized_data(10)
    whole = estimate_cost_matrix(model, data, seed=7, progress=False)
    a = estimate_cost_matrix(model, data[:6], seed=7, progress=False)
    b = estimate_cost_matrix(model, data[6:], seed=7, progress=False, start_index=6)
    valid = torch.isfinite(whole.mean)
    combined = (a.mean * 6 + b.mean * 4) / 10
    torch.testing.assert_close(combined[valid], whole.mean[valid], rtol=1e-12, atol=0)
    assert (a.prior * 6 + b.prior * 4) / 10 == pytest.approx(whole.prior, rel=1e-12)
    unshifted = estimate_cost_matrix(model, data[6:], seed=7, progress=False)
    assert not torch.allclose(unshifted.mean[valid], b.mean[valid])


class CallSizes(torch.nn.Module):
    """Records the batch size of every network call."""

    def __init__(self, net):
        super().__init__()
        self.net, self.sizes = net, []

    def forward(self, x, ts):
        self.sizes.append(x.shape[0])
        return self.net(x, ts)


def test_columns_share_network_calls_up_to_batch_size_with_the_same_results():
    """Fewer examples than batch_size: several columns (timesteps) per call, and every number as with one column per
    call."""
    from ddpm_schedules import evaluate_schedules, even_schedule
    from ddpm_schedules.costs.refine import RefineSettings, refine_cost_matrices

    model, data = tiny_model("learned_range", T=30), quantized_data(6)
    schedules = [even_schedule(30, 4), even_schedule(30, 7)]
    runs = {}
    for batch_size in (6, 20):  # one column per call; three per call (20 // 6)
        model.net = counter = CallSizes(model.net)
        cms = estimate_cost_matrices(model, data, ["elbo", "mse"], seed=3, batch_size=batch_size, progress=False)
        held = evaluate_schedules(model, data, schedules, seed=4, batch_size=batch_size, progress=False)
        refined, _ = refine_cost_matrices(
            model,
            data,
            [3, 5],
            RefineSettings(coarse=3, window=1),
            ("elbo",),
            seed=5,
            batch_size=batch_size,
            progress=False,
        )
        model.net = counter.net
        runs[batch_size] = (cms, held, refined, counter.sizes)
    (cms1, held1, ref1, sizes1), (cms3, held3, ref3, sizes3) = runs[6], runs[20]
    assert set(sizes1) == {6} and max(sizes3) == 18 and len(sizes3) < len(sizes1) / 2.5
    # Not bit for bit: a CPU's kernels may round a batch of 18 differently from one of 6 (the tiny network runs in
    # float64, u = 1.1e-16; the KL's logs, exps and sums amplify that by at most ~1e3, measured 1e-15), so 1e-12.
    for name in ("elbo", "mse"):
        torch.testing.assert_close(cms1[name].mean, cms3[name].mean, rtol=1e-12, atol=0)
        torch.testing.assert_close(cms1[name].sem, cms3[name].sem, rtol=1e-12, atol=0, equal_nan=True)
    for a, b in zip(held1, held3):
        assert a.bpd == pytest.approx(b.bpd, rel=1e-12) and a.bpd_sem == pytest.approx(b.bpd_sem, rel=1e-12)
        assert a.terms_bpd == pytest.approx(b.terms_bpd, rel=1e-12, abs=1e-15)
    assert torch.equal(ref1["elbo"].grid, ref3["elbo"].grid)  # the same columns chosen
    torch.testing.assert_close(ref1["elbo"].mean, ref3["elbo"].mean, rtol=1e-12, atol=0)
