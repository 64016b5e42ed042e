"""Train the digits classifier whose penultimate features give Fréchet distances on the digits data.

python scripts/train_digits_features.py checkpoints/digits_features.pt
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

from ddpm_schedules.lightning.data import DigitsDataModule
from ddpm_schedules.sampling.frechet import DigitsClassifier


def train_digits_classifier(seed: int = 0, epochs: int = 40) -> tuple[DigitsClassifier, float]:
    """Train on the digits train split (random shifts by one pixel); returns the model and its test accuracy."""
    torch.manual_seed(seed)
    dm = DigitsDataModule()
    dm.setup()
    (x, y), (xt, yt) = (dm.tensor("train"), dm.labels("train")), (dm.tensor("test"), dm.labels("test"))
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", help="where to save it, e.g. checkpoints/digits_features.pt")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    model, accuracy = train_digits_classifier(a.seed)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "test_accuracy": accuracy, "seed": a.seed}, a.out)
    print(f"saved {a.out}: test accuracy {accuracy:.4f} on the 200 held-out digits")


if __name__ == "__main__":
    main()
