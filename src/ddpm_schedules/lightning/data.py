"""DataModules: integer images (uint8; memory-mapped when large) with their number of `levels` and splits.

Images stay integers until a batch reaches the model: `to_unit_range` maps them to [-1, 1] per batch (in
`DiffusionModule`, on the device), and `ImageDataModule.tensor` per requested subset, reading only the
examples it returns. Nothing is downloaded: digits ship with scikit-learn, a synthetic set is made here,
and the modules read from local files (CIFAR-10, image folders, arrays, ImageNet) are in data_files.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ddpm_schedules.storage.errors import ParameterError, check_count

SPLITS = ("train", "val", "test")


@dataclass
class Split:
    """The rows ``index`` of an integer image array [N, C, H, W] (in memory or memory-mapped) and its labels [N]
    (None: a data set without labels, read as zeros; ``labeled`` says which)."""

    images: np.ndarray
    labels: np.ndarray | None
    index: np.ndarray
    labeled: bool = True

    def __post_init__(self) -> None:
        if self.labels is None:
            self.labels, self.labeled = np.zeros(len(self.images), dtype=np.int64), False

    def __len__(self) -> int:
        return len(self.index)

    def read(self, rows: slice | np.ndarray) -> tuple[Tensor, Tensor]:
        """(images [n, C, H, W] as stored, labels [n]) of the split's ``rows``: only those rows are read."""
        idx = np.asarray(self.index[rows])
        order = np.argsort(idx, kind="stable")  # sequential reads from a memory map, then back to the split's order
        images = np.empty((len(idx), *self.images.shape[1:]), dtype=self.images.dtype)
        images[order] = self.images[idx[order]]
        return torch.from_numpy(images), torch.from_numpy(np.asarray(self.labels[idx], dtype=np.int64))


def whole(images: np.ndarray, labels: np.ndarray | None = None, index: np.ndarray | None = None) -> Split:
    return Split(images, labels, np.arange(len(images)) if index is None else np.asarray(index))


class ImageDataset(Dataset):
    """(integer image, label) pairs of a split, with optional random horizontal flips."""

    def __init__(self, split: Split, random_flip: bool = False):
        self.split = split
        self.random_flip = random_flip

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        row = int(self.split.index[i])
        x = torch.from_numpy(np.array(self.split.images[row]))
        if self.random_flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x, torch.tensor(int(self.split.labels[row]))


def to_unit_range(images: Tensor, levels: int) -> Tensor:
    """Integer pixel values 0..levels-1 -> floats in [-1, 1] (floats are returned as they are)."""
    if images.is_floating_point():
        return images
    return images.float() / (levels - 1) * 2 - 1


def split_indices(n: int, sizes: Sequence[int], seed: int = 0) -> list[np.ndarray]:
    """Consecutive slices of one fixed random permutation of range(n)."""
    if sum(sizes) > n:
        raise ValueError(f"split sizes {list(sizes)} need {sum(sizes)} examples but the dataset has {n}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()
    out, start = [], 0
    for size in sizes:
        out.append(perm[start : start + size])
        start += size
    return out


class ImageDataModule(pl.LightningDataModule):
    """Holds train / val / test `Split`s of integer images; subclasses only load them.

    ``num_workers`` null = 4 when CUDA is available, else 0 (on a CPU run, batches of uint8 images sliced from memory
    load faster in the training process itself than through workers, and forked workers add their own memory);
    ``pin_memory`` null = on when CUDA is available; ``persistent_workers`` null = on when ``num_workers`` > 0.
    Under DDP, Lightning gives the training loader a DistributedSampler; evaluation shards its fixed subsets itself.
    """

    levels: int = 256

    def __init__(
        self,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int | None = 0,
        random_flip: bool = False,
        pin_memory: bool | None = None,
        persistent_workers: bool | None = None,
    ):
        super().__init__()
        check_count(batch_size, "batch_size")
        if num_workers is None:
            num_workers = 4 if torch.cuda.is_available() else 0
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ParameterError(
                "{num_workers} = {value!r}; it must be an integer >= 0 (0 = load in the main process) or null",
                value=num_workers,
            )
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.random_flip = random_flip
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.persistent_workers = (
            num_workers > 0 if persistent_workers is None else persistent_workers and num_workers > 0
        )
        self.splits: dict[str, Split] = {}

    def load(self) -> dict[str, Split]:
        """{split: Split of integer images 0..levels-1}."""
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if not self.splits:
            self.splits = self.load()

    @property
    def image_shape(self) -> tuple[int, int, int]:
        self.setup()
        return tuple(self.splits["train"].images.shape[1:])

    @property
    def split_sizes(self) -> dict[str, int]:
        self.setup()
        return {k: len(v) for k, v in self.splits.items()}

    def tensor(self, split: str, examples: int | None = None) -> Tensor:
        """The first ``examples`` images of a split (all if None) in [-1, 1]: a fixed subset; only it is read."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; use one of {SPLITS}")
        self.setup()
        part = self.splits[split]
        if examples is not None and examples > len(part):
            raise ValueError(f"asked for {examples} {split} examples but the split has {len(part)}; lower the number")
        return to_unit_range(part.read(slice(0, len(part) if examples is None else examples))[0], self.levels)

    def labels(self, split: str, examples: int | None = None) -> Tensor | None:
        """The labels of `tensor`'s images (None when the data set has none)."""
        self.setup()
        part = self.splits[split]
        rows = part.index[: len(part) if examples is None else examples]
        return torch.from_numpy(np.asarray(part.labels[rows], dtype=np.int64)) if part.labeled else None

    def _loader(self, split: str, shuffle: bool, batch_size: int) -> DataLoader:
        self.setup()
        ds = ImageDataset(self.splits[split], random_flip=self.random_flip and split == "train")
        return DataLoader(
            ds,
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            drop_last=shuffle,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
        )

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

    def load(self) -> dict[str, Split]:
        from sklearn.datasets import load_digits  # 1.8 s to import: paid only by runs that use the digits

        digits = load_digits()
        images = np.asarray(digits.images, dtype=np.uint8)[:, None]
        labels = np.asarray(digits.target, dtype=np.int64)
        idx = split_indices(len(images), self.sizes, self.seed)
        return {k: Split(images, labels, i) for k, i in zip(SPLITS, idx)}


class PhotoPatchesDataModule(ImageDataModule):
    """8-bit RGB patches of scikit-learn's two bundled photos (china, flower; no download). Each split crops its own
    region of both photos: train the left three quarters, val and test the top and bottom of the right quarter, so
    no test patch shares a pixel with a training patch."""

    levels = 256

    def __init__(self, image_size: int = 16, sizes: Sequence[int] = (20000, 1000, 1000), seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.image_size, self.sizes, self.seed = image_size, tuple(sizes), seed

    def load(self) -> dict[str, Split]:
        from sklearn.datasets import load_sample_images

        photos = load_sample_images().images  # two [427, 640, 3] uint8 arrays
        h, w, s = *photos[0].shape[:2], self.image_size
        if s < 1 or s > min(h // 2, w // 4):
            raise ParameterError(
                "{image_size} = {value}; photo patches must be 1..{most} pixels", value=s, most=min(h // 2, w // 4)
            )
        regions = {
            "train": (0, h, 0, 3 * w // 4),
            "val": (0, h // 2, 3 * w // 4, w),
            "test": (h // 2, h, 3 * w // 4, w),
        }
        rng = np.random.default_rng(self.seed)
        out = {}
        for split, n in zip(SPLITS, self.sizes):
            y0, y1, x0, x1 = regions[split]
            ys, xs = rng.integers(y0, y1 - s + 1, n), rng.integers(x0, x1 - s + 1, n)
            images = np.stack([photos[k % 2][y : y + s, x : x + s] for k, (y, x) in enumerate(zip(ys, xs))]).transpose(
                0, 3, 1, 2
            )
            out[split] = whole(np.ascontiguousarray(images), np.arange(n) % 2)  # label: which photo
        return out


class SyntheticDataModule(ImageDataModule):
    """Small random images with spatial structure, for tests: blurred noise quantized to ``levels``."""

    def __init__(
        self,
        sizes: Sequence[int] = (64, 16, 16),
        image_size: int = 8,
        channels: int = 1,
        levels: int = 17,
        seed: int = 0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.sizes, self.image_size, self.channels, self.seed = tuple(sizes), image_size, channels, seed
        self.levels = levels

    def load(self) -> dict[str, Split]:
        g = torch.Generator().manual_seed(self.seed)
        n = sum(self.sizes)
        x = torch.randn(n, self.channels, self.image_size, self.image_size, generator=g)
        x = torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
        x = (x / x.abs().amax(dim=(1, 2, 3), keepdim=True)).clamp(-1, 1)
        images = (
            torch.round((x + 1) / 2 * (self.levels - 1)).to(torch.uint8 if self.levels <= 256 else torch.int32).numpy()
        )
        idx = split_indices(n, self.sizes, 0)
        return {k: whole(images, index=i) for k, i in zip(SPLITS, idx)}
