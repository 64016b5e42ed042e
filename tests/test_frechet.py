"""Fréchet distances: equal to torchmetrics' FrechetInceptionDistance, bootstrap errors (the Inception path: test_inception.py)."""

import pytest
import torch
from conftest import DIGITS_FEATURES
from torchmetrics.image.fid import FrechetInceptionDistance

from ddpm_schedules.lightning.data import DigitsDataModule
from ddpm_schedules.sampling.frechet import (
    feature_network,
    features_of,
    fid_feature_extractor,
    frechet_distance,
    moments,
)


@pytest.fixture(scope="module")
def digits():
    dm = DigitsDataModule()
    return dm.tensor("train", 600), dm.tensor("test", 200)


def test_distance_and_moments_are_torchmetrics_own(digits):
    reference, fakes = digits
    fakes = (fakes + 0.25 * torch.randn(fakes.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    metric = FrechetInceptionDistance(feature=fid_feature_extractor("digits", str(DIGITS_FEATURES)))
    metric.update(reference, real=True)
    metric.update(fakes, real=False)
    network = feature_network("digits", str(DIGITS_FEATURES))
    fd, sem = frechet_distance(moments(features_of(network, reference)), features_of(network, fakes), bootstrap=20)
    assert fd == pytest.approx(float(metric.compute()), rel=1e-6)
    assert 0 < sem < fd


def test_bootstrap_error_shrinks_with_the_sample_size(digits):
    reference, _ = digits
    network = feature_network("digits", str(DIGITS_FEATURES))
    ref = moments(features_of(network, reference[:300]))
    pool = features_of(network, reference[300:])
    small, large = (frechet_distance(ref, pool[:n], bootstrap=40, seed=1)[1] for n in (50, 300))
    assert large < small


def test_reference_statistics_round_trip_in_pytorch_fids_layout(tmp_path):
    import numpy as np

    from ddpm_schedules.sampling.frechet import load_reference_stats, save_reference_stats

    g = torch.Generator().manual_seed(0)
    mu, sigma = torch.randn(128, generator=g, dtype=torch.float64), torch.randn(128, 128, generator=g, dtype=torch.float64)
    save_reference_stats(tmp_path / "ref.npz", mu, sigma)
    with np.load(tmp_path / "ref.npz") as stats:  # what pytorch-fid reads
        assert sorted(stats.files) == ["mu", "sigma"] and stats["sigma"].shape == (128, 128)
    got = load_reference_stats(tmp_path / "ref.npz", "digits")
    assert torch.equal(got[0], mu) and torch.equal(got[1], sigma)
    np.savez(tmp_path / "no_sigma.npz", mu=mu.numpy())
    with pytest.raises(ValueError, match="^fid.reference_stats = .*no_sigma.npz' has no sigma array"):
        load_reference_stats(tmp_path / "no_sigma.npz", "digits")
    np.savez(tmp_path / "inception.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    with pytest.raises(ValueError, match="holds mu \\(2048,\\) and sigma \\(2048, 2048\\), but fid.features=digits gives 128 features"):
        load_reference_stats(tmp_path / "inception.npz", "digits")


@pytest.mark.slow
def test_a_runs_reference_statistics_serve_the_next_run_without_reference_images(tmp_path, tiny_ckpt):
    from conftest import eval_cfg

    from ddpm_schedules.app.evaluate import evaluate

    first = evaluate(eval_cfg(tmp_path, tiny_ckpt, "logger=none", "eval.samplers=[ddim]"))
    stats = tmp_path / "run" / "fid_reference_stats.npz"
    assert stats.is_file()
    again = evaluate(eval_cfg(tmp_path / "b", tiny_ckpt, "logger=none", "eval.samplers=[ddim]", f"fid.reference_stats={stats}",
                              "fid.reference_split=nonexistent"))  # fmt: skip  # the images are never read
    assert [q["fid"] for q in again["sample_quality"]] == pytest.approx([q["fid"] for q in first["sample_quality"]], rel=1e-9)


@pytest.mark.parametrize("n,reference_n", [(40, 500), (40, 120), (120, 120)])
def test_the_few_sample_route_is_torchmetrics_formula(n, reference_n):
    """With no more samples than features the distance is taken in the samples' space: torchmetrics' value, exactly."""
    from torchmetrics.image.fid import _compute_fid

    from ddpm_schedules.sampling.frechet import _few_sample_fid

    g = torch.Generator().manual_seed(n + reference_n)
    ref = moments(torch.randn(reference_n, 150, generator=g, dtype=torch.float64) @ torch.randn(150, 150, generator=g, dtype=torch.float64))
    feats = torch.randn(n, 150, generator=g, dtype=torch.float64) * 1.5 + 0.3
    feats = feats[torch.randint(n, (n,), generator=g)]  # a bootstrap resample: repeated rows, lower rank
    ours = float(_few_sample_fid(*ref, feats))
    assert ours == pytest.approx(float(_compute_fid(*ref, *moments(feats))), rel=1e-8)
    assert frechet_distance(ref, feats)[0] == pytest.approx(ours, rel=1e-12)
