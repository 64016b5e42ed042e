"""Fréchet distances: equal to torchmetrics' FrechetInceptionDistance, bootstrap errors (the Inception path:
test_inception.py)."""

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
    gaussian_frechet_distance,
    moments,
)

U = torch.finfo(torch.float64).eps / 2  # float64's unit roundoff


def rounding_bound(s1, s2, eigenvalues=None, general=False):
    """What float64 rounding can move a Fréchet distance of covariances S1, S2 (F x F) by, to first order.

    Every route reduces tr((S1 S2)^(1/2)) to the eigenvalues lambda_i of S1 S2, those of the symmetric
    S1^(1/2) S2 S1^(1/2): forming it from rounded inputs and F x F products, and a backward-stable symmetric
    eigen-solver, move each by at most d = c F u ||S1|| ||S2|| (Weyl's inequality; c = 10 for the solvers' and
    products' small constants). A general eigen-solver on S1 S2 (``general``) adds its eigenvector matrix's condition,
    sqrt(cond(S1)) (Bauer-Fike). A square root turns an error d into at most min(sqrt(d), d / sqrt(lambda)) (the first
    near 0), the distance counts it twice, and the two traces add c F u (tr S1 + tr S2). ``eigenvalues``: the exact
    lambda_i where known, else computed (first order)."""
    F = s1.shape[0]
    e1 = torch.linalg.eigvalsh(s1)
    d = 10 * F * U * float(e1[-1]) * float(torch.linalg.eigvalsh(s2)[-1])
    if general:
        d *= float((e1[-1] / e1[0]).sqrt())
    if eigenvalues is None:
        vals, vecs = torch.linalg.eigh(s1)
        root = (vecs * vals.clamp(min=0).sqrt()) @ vecs.T
        eigenvalues = torch.linalg.eigvalsh(root @ s2 @ root)
    lam = eigenvalues.clamp(min=0)
    per = torch.minimum(torch.full_like(lam, d**0.5), d / lam.sqrt())
    return float(2 * per.sum()) + 10 * F * U * float(s1.trace() + s2.trace())


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
    feats = {True: features_of(network, reference), False: features_of(network, fakes)}
    for real, x in feats.items():  # its float64 sums: equal up to summation order, n u per term (n rows)
        side = "real" if real else "fake"
        n = int(getattr(metric, f"{side}_features_num_samples"))
        mean = getattr(metric, f"{side}_features_sum") / n
        cov = (getattr(metric, f"{side}_features_cov_sum") - n * torch.outer(mean, mean)) / (n - 1)
        ours, a = moments(x), x.abs()
        assert ((ours[0] - mean).abs() <= n * U * a.mean(0)).all()
        assert ((ours[1] - cov).abs() <= n * U * (a.T @ a + n * torch.outer(a.mean(0), a.mean(0))) / (n - 1) * 2).all()
    fd, sem = frechet_distance(moments(feats[True]), feats[False], bootstrap=20)
    # the metric returns float32 (half an ulp: 2^-24 relative), both routes the float64 rounding above
    tol = 2.0**-24 * fd + 2 * rounding_bound(moments(feats[True])[1], moments(feats[False])[1])
    assert abs(fd - float(metric.compute())) <= tol
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
    mu, sigma = (
        torch.randn(128, generator=g, dtype=torch.float64),
        torch.randn(128, 128, generator=g, dtype=torch.float64),
    )
    save_reference_stats(tmp_path / "ref.npz", mu, sigma)
    with np.load(tmp_path / "ref.npz") as stats:  # what pytorch-fid reads
        assert sorted(stats.files) == ["mu", "sigma"] and stats["sigma"].shape == (128, 128)
    got = load_reference_stats(tmp_path / "ref.npz", "digits")
    assert torch.equal(got[0], mu) and torch.equal(got[1], sigma)
    np.savez(tmp_path / "no_sigma.npz", mu=mu.numpy())
    with pytest.raises(ValueError, match="^path = .*no_sigma.npz' has no sigma array"):
        load_reference_stats(tmp_path / "no_sigma.npz", "digits")
    np.savez(tmp_path / "inception.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    with pytest.raises(ValueError, match="holds mu \\(2048,\\) and sigma \\(2048, 2048\\), but features=digits gives"):
        load_reference_stats(tmp_path / "inception.npz", "digits")


@pytest.mark.slow
def test_a_runs_reference_statistics_serve_the_next_run_without_reference_images(tmp_path, tiny_ckpt):
    from conftest import eval_cfg

    from ddpm_schedules.app.evaluate import evaluate

    first = evaluate(eval_cfg(tmp_path, tiny_ckpt, "logger=none", "eval.samplers=[ddim]"))
    stats = tmp_path / "run" / "fid_reference_stats.npz"
    assert stats.is_file()
    again = evaluate(
        eval_cfg(
            tmp_path / "b",
            tiny_ckpt,
            "logger=none",
            "eval.samplers=[ddim]",
            f"fid.reference_stats={stats}",
            "fid.reference_split=nonexistent",
        )
    )  # the images are never read
    assert [q["fid"] for q in again["sample_quality"]] == pytest.approx(
        [q["fid"] for q in first["sample_quality"]], rel=1e-9
    )


def covariance_of(rows, g, spread=0.5):
    """Moments of ``rows`` standard normal rows times a well-conditioned mixing matrix I + spread * Z / sqrt(F)."""
    F = 150
    mixing = torch.eye(F, dtype=torch.float64) + spread * torch.randn(F, F, generator=g, dtype=torch.float64) / F**0.5
    return moments(torch.randn(rows, F, generator=g, dtype=torch.float64) @ mixing)


@pytest.mark.parametrize("n,reference_n", [(40, 500), (150, 600)])
def test_the_few_sample_route_is_torchmetrics_formula(n, reference_n):
    """With no more samples than features the distance is taken in the samples' space: torchmetrics' value (its
    general eigen-solver on S1 S2, F x F) within both routes' rounding."""
    from torchmetrics.image.fid import _compute_fid

    from ddpm_schedules.sampling.frechet import _few_sample_fid

    g = torch.Generator().manual_seed(n + reference_n)
    ref = covariance_of(reference_n, g)
    feats = torch.randn(n, 150, generator=g, dtype=torch.float64) * 1.5 + 0.3
    feats = feats[torch.randint(n, (n,), generator=g)]  # a bootstrap resample: repeated rows, lower rank
    ours = float(_few_sample_fid(*ref, feats))
    tol = rounding_bound(ref[1], moments(feats)[1]) + rounding_bound(ref[1], moments(feats)[1], general=True)
    assert abs(ours - float(_compute_fid(*ref, *moments(feats)))) <= tol
    assert frechet_distance(ref, feats)[0] == ours  # the same route


def test_the_closed_form_is_exact_for_commuting_covariances():
    """S1 = Q diag(a) Q^T, S2 = Q diag(b) Q^T: the distance is ||mu1 - mu2||^2 + sum (sqrt(a) - sqrt(b))^2."""
    g = torch.Generator().manual_seed(3)
    F = 64
    q = torch.linalg.qr(torch.randn(F, F, generator=g, dtype=torch.float64))[0]
    a, b = (0.5 + 1.5 * torch.rand(F, generator=g, dtype=torch.float64) for _ in range(2))
    s1, s2 = ((q * v) @ q.T for v in (a, b))
    mu1, mu2 = (torch.randn(F, generator=g, dtype=torch.float64) for _ in range(2))
    exact = float((mu1 - mu2).square().sum() + (a.sqrt() - b.sqrt()).square().sum())
    got = float(gaussian_frechet_distance(mu1, s1, mu2, s2))
    assert abs(got - exact) <= rounding_bound(s1, s2, eigenvalues=a * b)
    assert float(gaussian_frechet_distance(mu2, s2, mu1, s1)) == pytest.approx(got, abs=2 * rounding_bound(s1, s2))


def test_the_closed_form_matches_torchmetrics_and_scipy():
    """Full-rank covariances (more samples than features): the symmetric route against torchmetrics' general
    eigenvalues of S1 S2 and scipy's matrix square root of S1 S2, each within both routes' rounding."""
    scipy_linalg = pytest.importorskip("scipy.linalg")
    from torchmetrics.image.fid import _compute_fid

    g = torch.Generator().manual_seed(4)
    (mu1, s1), (mu2, s2) = covariance_of(600, g), covariance_of(600, g, spread=0.8)
    mu2 = mu2 + 0.1
    ours = float(gaussian_frechet_distance(mu1, s1, mu2, s2))
    tol = rounding_bound(s1, s2) + rounding_bound(s1, s2, general=True)
    assert abs(ours - float(_compute_fid(mu1, s1, mu2, s2))) <= tol
    tr_sqrt = float(torch.from_numpy(scipy_linalg.sqrtm((s1 @ s2).numpy())).trace().real)
    assert abs(ours - float((mu1 - mu2).square().sum() + s1.trace() + s2.trace() - 2 * tr_sqrt)) <= tol
    feats = torch.randn(600, 150, generator=g, dtype=torch.float64)  # frechet_distance's route for n > F
    assert frechet_distance((mu1, s1), feats)[0] == float(gaussian_frechet_distance(mu1, s1, *moments(feats)))


@pytest.mark.parametrize("n", [12, 40])
def test_the_few_sample_route_is_exact_with_singular_covariances(n):
    """n <= F rows built so that S2 = Q diag(b) Q^T with b zero outside n - 1 directions, and a reference S1 =
    Q diag(a) Q^T with zeros of its own: the distance is ||mu1 - mu2||^2 + sum a + sum b - 2 sum sqrt(a b)."""
    g = torch.Generator().manual_seed(n)
    F = 40
    q = torch.linalg.qr(torch.randn(F, F, generator=g, dtype=torch.float64))[0]
    a = 0.5 + 1.5 * torch.rand(F, generator=g, dtype=torch.float64)
    a[n // 2 : n // 2 + 10] = 0  # singular, partly inside the samples' directions
    b = torch.zeros(F, dtype=torch.float64)
    b[: n - 1] = 0.5 + 1.5 * torch.rand(n - 1, generator=g, dtype=torch.float64)
    centred = torch.randn(n, n - 1, generator=g, dtype=torch.float64)
    w = torch.linalg.qr(centred - centred.mean(0))[0]  # orthonormal columns orthogonal to the ones vector
    mu1, mu2 = (torch.randn(F, generator=g, dtype=torch.float64) for _ in range(2))
    feats = (n - 1) ** 0.5 * (w * b[: n - 1].sqrt()) @ q[:, : n - 1].T + mu2
    s1, s2 = (q * a) @ q.T, (q * b) @ q.T
    exact = float((mu1 - mu2).square().sum() + a.sum() + b.sum() - 2 * (a * b).sqrt().sum())
    got = frechet_distance((mu1, s1), feats)[0]
    assert abs(got - exact) <= rounding_bound(s1, s2, eigenvalues=a * b)
