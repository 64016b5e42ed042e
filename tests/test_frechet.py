"""Fréchet distances: equal to torchmetrics' FrechetInceptionDistance, bootstrap errors, the Inception path."""

import pickle

import pytest
import torch
from conftest import DIGITS_FEATURES, eval_cfg
from torchmetrics.image.fid import FrechetInceptionDistance

from ddpm_schedules.app.evaluate import evaluate
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


def test_inception_weights_that_need_unpickling_are_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (open, (str(tmp_path / "ran"), "w"))

    (tmp_path / "evil.pth").write_bytes(pickle.dumps({"fc.weight": Payload()}))
    with pytest.raises(ValueError, match="is not a plain state dict that torch.load\\(weights_only=True\\) reads"):
        fid_feature_extractor("inception", inception_weights=str(tmp_path / "evil.pth"))
    assert not (tmp_path / "ran").exists()


@pytest.mark.slow
def test_fid_with_inception_runs_end_to_end_on_a_weights_file_of_the_real_format(tmp_path, tiny_ckpt, monkeypatch):
    """torch-fidelity's FID Inception with random weights, saved as the released pt_inception-2015-12-05-6726825d.pth is."""
    inception = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3", reason="torch-fidelity (and torchvision) not importable")
    with monkeypatch.context() as m:  # the architecture without its download: keep the random initialisation
        m.setattr(inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None)
        m.setattr(inception, "load_state_dict_from_url", lambda *a, **k: {})
        torch.manual_seed(0)
        net = inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    weights = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(net.state_dict(), weights)
    doc = evaluate(eval_cfg(tmp_path, tiny_ckpt, "logger=none", "fid.features=inception", f"fid.inception_weights={weights}",
                            "eval.strategies=[dp,even]", "eval.samplers=[ddim]"))  # fmt: skip
    assert doc["fid"]["features"] == "Inception-v3 pool3 (FID)"
    assert all(q["fid"] > 0 and q["fid_sem"] > 0 for q in doc["sample_quality"])
