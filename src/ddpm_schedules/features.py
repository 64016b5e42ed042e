"""Feature networks for Fréchet distances: a small digits classifier, and Inception from a local file.

The digits distance is a Fréchet distance in the penultimate features of a CNN trained on the
digits train split; it is reported as "FD (digits features)", never as FID (Inception).

    python -m ddpm_schedules.features checkpoints/digits_features.pt   # trains and saves the classifier
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import Tensor, nn

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


def train_digits_classifier(seed: int = 0, epochs: int = 40) -> tuple[DigitsClassifier, float]:
    """Train on the digits train split (random shifts by one pixel); returns the model and its test accuracy."""
    from .lightning.data import DigitsDataModule

    torch.manual_seed(seed)
    dm = DigitsDataModule()
    dm.setup()
    (x, y), (xt, yt) = dm.splits["train"], dm.splits["test"]
    model = DigitsClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(epochs):
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 64):
            idx = perm[i : i + 64]
            xb = torch.roll(x[idx], shifts=tuple(torch.randint(-1, 2, (2,)).tolist()), dims=(2, 3))
            loss = nn.functional.cross_entropy(model(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(xt).argmax(1) == yt).float().mean().item()
    return model, accuracy


def load_digits_features(path: str | Path) -> DigitsFeatures:
    path = Path(path)
    if not path.is_file():
        raise ValueError(
            f"digits feature network {str(path)!r} is missing; make it with `python -m ddpm_schedules.features {path}`"
        )
    model = DigitsClassifier()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True)["state_dict"])
    return DigitsFeatures(model)


def main() -> None:
    p = argparse.ArgumentParser(description="Train the digits feature network used for Fréchet distances.")
    p.add_argument("out", help="where to save it, e.g. checkpoints/digits_features.pt")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    model, accuracy = train_digits_classifier(a.seed)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "test_accuracy": accuracy, "seed": a.seed}, a.out)
    print(f"saved {a.out}: test accuracy {accuracy:.4f} on the 200 held-out digits")


if __name__ == "__main__":
    main()
