"""Fréchet distances between samples and reference images, with torchmetrics' FrechetInceptionDistance.

Two feature networks: Inception-v3 pool3 from a local weights file (FID proper), and a small digits
classifier (its penultimate features; reported as "FD (digits features)", never as FID). The digits
classifier is trained by `scripts/train_digits_features.py`.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance

from .storage import load_checked, save_checked

FEATURE_KINDS = ("digits", "inception")


class DigitsClassifier(nn.Module):
    """Conv net for 8x8 digits in [-1, 1]; ``features`` is the 128-d penultimate layer."""

    num_features = 128

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
            nn.Flatten(), nn.Linear(64 * 4 * 4, self.num_features), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Linear(self.num_features, 10)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x.float())

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class DigitsFeatures(nn.Module):
    """The classifier's penultimate features, as torchmetrics' FrechetInceptionDistance takes a feature module."""

    def __init__(self, classifier: DigitsClassifier):
        super().__init__()
        self.classifier = classifier.eval()
        self.num_features = classifier.num_features

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.uint8:  # torchmetrics probes with uint8 images
            x = x.float() / 127.5 - 1
        return self.classifier.features(x[:, :1])


def load_digits_features(path: str | Path) -> DigitsFeatures:
    path = Path(path)
    if not path.is_file():
        raise ValueError(
            f"digits feature network {str(path)!r} is missing; make it with `python scripts/train_digits_features.py {path}`"
        )
    model = DigitsClassifier()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True)["state_dict"])
    return DigitsFeatures(model)


INCEPTION_HINT = (
    "download torch-fidelity's FID Inception weights (pt_inception-2015-12-05-6726825d.pth, from the torch-fidelity "
    "GitHub releases) on a machine with internet access and pass fid.inception_weights=<path>"
)


def fid_feature_extractor(features: str, digits_weights: str | None = None, inception_weights: str | None = None):
    """The feature network for Fréchet distances, checked before any heavy work."""
    if features == "digits":
        return load_digits_features(digits_weights or "")
    if features == "inception":
        if not inception_weights or not Path(inception_weights).is_file():
            raise ValueError(f"fid.inception_weights file {inception_weights!r} is missing; {INCEPTION_HINT}")
        if importlib.util.find_spec("torch_fidelity") is None:
            raise ValueError("fid.features=inception needs torch-fidelity: pip install 'ddpm-schedules[inception]'")
        return None
    raise ValueError(f"unknown fid.features {features!r}; use one of {FEATURE_KINDS}")


def frechet_distances(
    reference: Tensor,
    fakes: dict,
    features: str = "digits",
    digits_weights: str | None = None,
    inception_weights: str | None = None,
    antialias: bool = False,
    batch_size: int = 100,
    reference_cache: str | None = None,
) -> dict:
    """Fréchet distance of each set of samples (values in [-1, 1]) to ``reference``, with torchmetrics.

    ``features="inception"`` is FID proper (Inception-v3 pool3, uint8 RGB, ``antialias=False`` for
    numbers comparable with the literature); ``"digits"`` uses the digits classifier's features.
    Reference statistics are computed once and kept across the sets; with ``reference_cache`` (a
    file path) they are saved there and reused by later runs.
    """
    extractor = fid_feature_extractor(features, digits_weights, inception_weights)
    if extractor is not None:
        fid = FrechetInceptionDistance(feature=extractor, reset_real_features=False)
        prepare = lambda x: x.float()  # noqa: E731
    else:
        fid = FrechetInceptionDistance(feature=2048, reset_real_features=False, feature_extractor_weights_path=inception_weights, antialias=antialias)

        def prepare(x: Tensor) -> Tensor:
            x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
            return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x

    real_states = ("real_features_sum", "real_features_cov_sum", "real_features_num_samples")
    cache = Path(reference_cache) if reference_cache else None
    saved = _load_reference_stats(cache, real_states)
    if saved is not None:
        for name, value in saved.items():
            setattr(fid, name, value)
    else:
        for chunk in reference.split(batch_size):
            fid.update(prepare(chunk), real=True)
        if cache is not None:
            save_checked({name: getattr(fid, name) for name in real_states}, cache)
    out = {}
    for key, samples in fakes.items():
        fid.reset()  # keeps the reference features (reset_real_features=False)
        for chunk in samples.split(batch_size):
            fid.update(prepare(chunk), real=False)
        out[key] = float(fid.compute())
    return out


def _load_reference_stats(cache: Path | None, names: tuple[str, ...]) -> dict[str, Tensor] | None:
    """Cached reference statistics, or None when there are none or the file is damaged (then they are recomputed)."""
    if cache is None or not cache.is_file():
        return None
    try:
        saved = load_checked(cache)
    except ValueError:
        return None
    return saved if isinstance(saved, dict) and set(saved) == set(names) else None
