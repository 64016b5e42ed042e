"""DataModules: images as float tensors in [-1, 1] with their number of `levels` and split sizes.

Nothing is downloaded: digits ship with scikit-learn; CIFAR-10, image folders and .npz arrays are
read from a local path, and a missing path is an error that says what to get and where to put it.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Sequence

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

SPLITS = ("train", "val", "test")


class ImageDataset(Dataset):
    """(image, label) pairs from uint8 or [-1, 1] tensors, with optional random horizontal flips."""

    def __init__(self, images: Tensor, labels: Tensor | None = None, random_flip: bool = False):
        self.images = images
        self.labels = labels if labels is not None else torch.zeros(len(images), dtype=torch.long)
        self.random_flip = random_flip

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        x = self.images[i]
        if self.random_flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x, self.labels[i]


def to_unit_range(images: Tensor, levels: int) -> Tensor:
    """Integer pixel values 0..levels-1 -> floats in [-1, 1]."""
    return images.float() / (levels - 1) * 2 - 1


def split_indices(n: int, sizes: Sequence[int], seed: int = 0) -> list[Tensor]:
    """Consecutive slices of one fixed random permutation of range(n)."""
    if sum(sizes) > n:
        raise ValueError(f"split sizes {list(sizes)} need {sum(sizes)} examples but the dataset has {n}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    out, start = [], 0
    for size in sizes:
        out.append(perm[start : start + size])
        start += size
    return out


class ImageDataModule(pl.LightningDataModule):
    """Holds train / val / test tensors in [-1, 1]; subclasses only load them."""

    levels: int = 256

    def __init__(self, batch_size: int = 64, eval_batch_size: int | None = None, num_workers: int = 0, random_flip: bool = False):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.random_flip = random_flip
        self.splits: dict[str, tuple[Tensor, Tensor]] = {}

    def load(self) -> dict[str, tuple[Tensor, Tensor]]:
        """{split: (images [N, C, H, W] in [-1, 1], labels [N])}."""
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if not self.splits:
            self.splits = self.load()

    @property
    def image_shape(self) -> tuple[int, int, int]:
        self.setup()
        return tuple(self.splits["train"][0].shape[1:])

    @property
    def split_sizes(self) -> dict[str, int]:
        self.setup()
        return {k: len(v[0]) for k, v in self.splits.items()}

    def tensor(self, split: str, examples: int | None = None) -> Tensor:
        """The first ``examples`` images of a split (all if None): a fixed, reproducible subset."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; use one of {SPLITS}")
        self.setup()
        images = self.splits[split][0]
        if examples is not None and examples > len(images):
            raise ValueError(f"asked for {examples} {split} examples but the split has {len(images)}; lower the number")
        return images if examples is None else images[:examples]

    def _loader(self, split: str, shuffle: bool, batch_size: int) -> DataLoader:
        self.setup()
        images, labels = self.splits[split]
        ds = ImageDataset(images, labels, random_flip=self.random_flip and split == "train")
        return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, num_workers=self.num_workers, drop_last=shuffle)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True, self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False, self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False, self.eval_batch_size)


class DigitsDataModule(ImageDataModule):
    """scikit-learn's bundled 8x8 digits (values 0..16, 17 levels): 1,397 / 200 / 200 by a fixed permutation."""

    levels = 17

    def __init__(self, sizes: Sequence[int] = (1397, 200, 200), seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.sizes, self.seed = tuple(sizes), seed

    def load(self) -> dict[str, tuple[Tensor, Tensor]]:
        from sklearn.datasets import (
            load_digits,  # 1.8 s to import: paid only by runs that use the digits
        )

        digits = load_digits()
        images = to_unit_range(torch.tensor(digits.images, dtype=torch.long)[:, None], self.levels)
        labels = torch.tensor(digits.target, dtype=torch.long)
        idx = split_indices(len(images), self.sizes, self.seed)
        return {k: (images[i], labels[i]) for k, i in zip(SPLITS, idx)}


class SyntheticDataModule(ImageDataModule):
    """Small random images with spatial structure, for tests: blurred noise quantized to ``levels``."""

    def __init__(self, sizes: Sequence[int] = (64, 16, 16), image_size: int = 8, channels: int = 1, levels: int = 17, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.sizes, self.image_size, self.channels, self.seed = tuple(sizes), image_size, channels, seed
        self.levels = levels

    def load(self) -> dict[str, tuple[Tensor, Tensor]]:
        g = torch.Generator().manual_seed(self.seed)
        n = sum(self.sizes)
        x = torch.randn(n, self.channels, self.image_size, self.image_size, generator=g)
        x = torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
        x = (x / x.abs().amax(dim=(1, 2, 3), keepdim=True)).clamp(-1, 1)
        images = to_unit_range(torch.round((x + 1) / 2 * (self.levels - 1)).long(), self.levels)
        labels = torch.zeros(n, dtype=torch.long)
        idx = split_indices(n, self.sizes, 0)
        return {k: (images[i], labels[i]) for k, i in zip(SPLITS, idx)}


def _require(path: Path, what: str) -> None:
    if not path.exists():
        raise ValueError(f"{what} not found at {str(path)!r}; {_HOW_TO_GET.get(what, 'put it there or set data.root')}")


_HOW_TO_GET = {
    "CIFAR-10": "download cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html and extract it there "
    "(the folder cifar-10-batches-py), or set data.root",
    "image folder": "point data.root at a folder of .png / .jpg images",
    ".npz array file": "point data.path at an .npz file (e.g. downsampled ImageNet 64x64 from image-net.org)",
}


class CIFAR10DataModule(ImageDataModule):
    """CIFAR-10 from the python pickles (``cifar-10-batches-py``): train 50,000 less ``val_size``, val, test 10,000."""

    def __init__(self, root: str = "data", val_size: int = 1000, seed: int = 0, **kwargs):
        kwargs.setdefault("random_flip", True)
        super().__init__(**kwargs)
        self.root, self.val_size, self.seed = Path(root), val_size, seed

    def load(self) -> dict[str, tuple[Tensor, Tensor]]:
        folder = self.root / "cifar-10-batches-py" if (self.root / "cifar-10-batches-py").exists() else self.root
        _require(folder / "data_batch_1", "CIFAR-10")

        def read(names: list[str]) -> tuple[Tensor, Tensor]:
            xs, ys = [], []
            for name in names:
                with open(folder / name, "rb") as f:
                    d = pickle.load(f, encoding="bytes")
                xs.append(torch.from_numpy(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)))
                ys.append(torch.tensor(d[b"labels"], dtype=torch.long))
            return to_unit_range(torch.cat(xs), 256), torch.cat(ys)

        train_x, train_y = read([f"data_batch_{i}" for i in range(1, 6)])
        test = read(["test_batch"])
        train_idx, val_idx = split_indices(len(train_x), [len(train_x) - self.val_size, self.val_size], self.seed)
        return {"train": (train_x[train_idx], train_y[train_idx]), "val": (train_x[val_idx], train_y[val_idx]), "test": test}


class ImageFolderDataModule(ImageDataModule):
    """Every .png / .jpg under ``root``, centre-cropped and resized to ``image_size``, split by a fixed permutation."""

    def __init__(self, root: str, image_size: int = 32, val_size: int = 1000, test_size: int = 1000, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.root, self.image_size, self.val_size, self.test_size, self.seed = Path(root), image_size, val_size, test_size, seed

    def load(self) -> dict[str, tuple[Tensor, Tensor]]:
        _require(self.root, "image folder")
        files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in {".png", ".jpg", ".jpeg"})
        if not files:
            raise ValueError(f"no .png / .jpg images under {str(self.root)!r}; point data.root at an image folder")
        arrays = []
        for path in files:
            img = Image.open(path).convert("RGB")
            side = min(img.size)
            left, top = (img.width - side) // 2, (img.height - side) // 2
            img = img.crop((left, top, left + side, top + side)).resize((self.image_size,) * 2, Image.BICUBIC)
            arrays.append(np.asarray(img, dtype=np.uint8))
        images = to_unit_range(torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2), 256)
        n_train = len(images) - self.val_size - self.test_size
        idx = split_indices(len(images), [n_train, self.val_size, self.test_size], self.seed)
        labels = torch.zeros(len(images), dtype=torch.long)
        return {k: (images[i], labels[i]) for k, i in zip(SPLITS, idx)}


class NpzDataModule(ImageDataModule):
    """uint8 images from an .npz file: [N, H, W, C], [N, C, H, W] or flattened [N, C*H*W] (downsampled ImageNet)."""

    def __init__(self, path: str, image_size: int = 64, key: str | None = None, val_size: int = 1000, test_path: str | None = None, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.path, self.image_size, self.key, self.val_size, self.seed = Path(path), image_size, key, val_size, seed
        self.test_path = Path(test_path) if test_path else None

    def _read(self, path: Path) -> tuple[Tensor, Tensor]:
        _require(path, ".npz array file")
        with np.load(path) as f:
            key = self.key or ("data" if "data" in f else "arr_0" if "arr_0" in f else f.files[0])
            if key not in f:
                raise ValueError(f"{str(path)!r} has no array {key!r}; it holds {f.files}; set data.key")
            arr = np.asarray(f[key])
            labels = torch.from_numpy(np.asarray(f["labels"], dtype=np.int64)) if "labels" in f else torch.zeros(len(arr), dtype=torch.long)
        s = self.image_size
        if arr.ndim == 2 and arr.shape[1] % (s * s) == 0:
            arr = arr.reshape(len(arr), -1, s, s)
        elif arr.ndim == 4 and arr.shape[-1] in (1, 3) and arr.shape[1] == s:
            arr = arr.transpose(0, 3, 1, 2)
        if arr.ndim != 4 or arr.shape[2:] != (s, s):
            raise ValueError(f"{str(path)!r} holds images of shape {arr.shape[1:]}, not {s}x{s}; set data.image_size to match")
        if arr.dtype != np.uint8:
            raise ValueError(f"{str(path)!r} holds {arr.dtype} values; expected uint8 pixels 0..255")
        return to_unit_range(torch.from_numpy(np.ascontiguousarray(arr)), 256), labels

    def load(self) -> dict[str, tuple[Tensor, Tensor]]:
        x, y = self._read(self.path)
        if self.test_path is not None:
            test = self._read(self.test_path)
            train_idx, val_idx = split_indices(len(x), [len(x) - self.val_size, self.val_size], self.seed)
        else:
            train_idx, val_idx, test_idx = split_indices(len(x), [len(x) - 2 * self.val_size, self.val_size, self.val_size], self.seed)
            test = (x[test_idx], y[test_idx])
        return {"train": (x[train_idx], y[train_idx]), "val": (x[val_idx], y[val_idx]), "test": test}
