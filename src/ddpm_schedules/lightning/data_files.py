"""DataModules read from local files: CIFAR-10, image folders, .npy / .npz arrays, the downsampled ImageNet.

Nothing is downloaded: a missing path is an error that says what to get and where to put it. Large
arrays are memory-mapped, and conversions are cached once beside their sources (storage/arrays.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from ddpm_schedules.lightning.data import SPLITS, ImageDataModule, Split, split_indices, whole
from ddpm_schedules.storage.arrays import decompress_npz_member, load_pickle, map_npy, map_npz_member, npz_keys
from ddpm_schedules.storage.errors import ParameterError
from ddpm_schedules.storage.imagenet import imagenet_batches


def _require(path: Path, what: str) -> None:
    """A `ParameterError` naming the DataModule's own arguments (``root``, ``path``) where ``path`` does not exist."""
    if not path.exists():
        how = _HOW_TO_GET.get(what, "put it there or set {root}")
        raise ParameterError("{what} not found at {location!r}; " + how, what=what, location=str(path))


_HOW_TO_GET = {
    "CIFAR-10": "download cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html and extract it there "
    "(the folder cifar-10-batches-py), or set {root}",
    "image folder": "point {root} at a folder of .png / .jpg images",
    "array file": "point {path} at an .npy or .npz file of uint8 images",
}


class CIFAR10DataModule(ImageDataModule):
    """CIFAR-10 from the python pickles (``cifar-10-batches-py``): train 50,000 less ``val_size``, val, test 10,000."""

    def __init__(self, root: str = "data", val_size: int = 1000, seed: int = 0, **kwargs):
        kwargs.setdefault("random_flip", True)
        super().__init__(**kwargs)
        self.root, self.val_size, self.seed = Path(root), val_size, seed

    def load(self) -> dict[str, Split]:
        folder = self.root / "cifar-10-batches-py" if (self.root / "cifar-10-batches-py").exists() else self.root
        _require(folder / "data_batch_1", "CIFAR-10")

        def read(names: list[str]) -> tuple[np.ndarray, np.ndarray]:
            batches = [load_pickle(folder / name) for name in names]
            x = np.concatenate([np.asarray(_key(d, "data"), dtype=np.uint8).reshape(-1, 3, 32, 32) for d in batches])
            return x, np.concatenate([np.asarray(_key(d, "labels"), dtype=np.int64) for d in batches])

        train_x, train_y = read([f"data_batch_{i}" for i in range(1, 6)])
        test_x, test_y = read(["test_batch"])
        train_idx, val_idx = split_indices(len(train_x), [len(train_x) - self.val_size, self.val_size], self.seed)
        return {
            "train": Split(train_x, train_y, train_idx),
            "val": Split(train_x, train_y, val_idx),
            "test": whole(test_x, test_y),
        }


def _key(d: dict, name: str):
    """CIFAR-10's pickles have bytes keys (python 2)."""
    return d[name] if name in d else d[name.encode()]


class ImageFolderDataModule(ImageDataModule):
    """Every .png / .jpg under ``root``, centre-cropped and resized to ``image_size``, split by a fixed permutation."""

    def __init__(
        self, root: str, image_size: int = 32, val_size: int = 1000, test_size: int = 1000, seed: int = 0, **kwargs
    ):
        super().__init__(**kwargs)
        self.root, self.image_size, self.val_size, self.test_size, self.seed = (
            Path(root),
            image_size,
            val_size,
            test_size,
            seed,
        )

    def load(self) -> dict[str, Split]:
        _require(self.root, "image folder")
        files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in {".png", ".jpg", ".jpeg"})
        if not files:
            raise ParameterError(
                "no .png / .jpg images under {location!r}; point {root} at an image folder", location=str(self.root)
            )
        arrays = []
        for path in files:
            img = Image.open(path).convert("RGB")
            side = min(img.size)
            left, top = (img.width - side) // 2, (img.height - side) // 2
            img = img.crop((left, top, left + side, top + side)).resize((self.image_size,) * 2, Image.BICUBIC)
            arrays.append(np.asarray(img, dtype=np.uint8))
        images = np.ascontiguousarray(np.stack(arrays).transpose(0, 3, 1, 2))
        n_train = len(images) - self.val_size - self.test_size
        idx = split_indices(len(images), [n_train, self.val_size, self.test_size], self.seed)
        return {k: whole(images, index=i) for k, i in zip(SPLITS, idx)}


def open_images(path: Path, image_size: int, key: str | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """uint8 images of an .npy or .npz file as a memory-mapped [N, C, S, S] view (never loaded whole), and labels
    (None without a ``labels`` member).

    Accepts [N, S, S, C], [N, C, S, S] or flattened [N, C*S*S] (downsampled ImageNet). A compressed .npz member
    is converted once into an .npy cache next to the file (`arrays.decompress_npz_member`).
    """
    _require(path, "array file")
    labels = None
    if path.suffix == ".npy":
        arr = map_npy(path)
    else:
        keys = npz_keys(path)
        name = key or ("data" if "data" in keys else "arr_0" if "arr_0" in keys else keys[0] if keys else None)
        if name not in keys:
            raise ParameterError(
                "{location!r} has no array {name!r}; it holds {keys}; set {key}",
                location=str(path),
                name=name,
                keys=keys,
            )
        arr = map_npz_member(path, name)
        arr = decompress_npz_member(path, name) if arr is None else arr
        if "labels" in keys:
            with np.load(path) as f:
                labels = np.asarray(f["labels"], dtype=np.int64)
    s = image_size
    if arr.ndim == 2 and arr.shape[1] % (s * s) == 0:
        arr = arr.reshape(len(arr), -1, s, s)
    elif arr.ndim == 4 and arr.shape[-1] in (1, 3) and arr.shape[1] == s:
        arr = arr.transpose(0, 3, 1, 2)  # a view: rows are read (and transposed) only when used
    if arr.ndim != 4 or arr.shape[2:] != (s, s):
        raise ParameterError(
            "{location!r} holds images of shape {shape}, not {s}x{s}; set {image_size} to match",
            location=str(path),
            shape=arr.shape[1:],
            s=s,
        )
    if arr.dtype != np.uint8:
        raise ValueError(f"{str(path)!r} holds {arr.dtype} values; expected uint8 pixels 0..255")
    return arr, labels


class NpzDataModule(ImageDataModule):
    """uint8 images from an .npy / .npz file ([N, H, W, C], [N, C, H, W] or flattened [N, C*H*W]), memory-mapped."""

    def __init__(
        self,
        path: str,
        image_size: int = 64,
        key: str | None = None,
        val_size: int = 1000,
        test_path: str | None = None,
        seed: int = 0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.path, self.image_size, self.key, self.val_size, self.seed = Path(path), image_size, key, val_size, seed
        self.test_path = Path(test_path) if test_path else None

    def prepare_data(self) -> None:
        """Once per node, before any process's setup (Lightning): a compressed .npz is converted here."""
        self.load()

    def load(self) -> dict[str, Split]:
        x, y = open_images(self.path, self.image_size, self.key)
        if self.test_path is not None:
            test = whole(*open_images(self.test_path, self.image_size, self.key))
            train_idx, val_idx = split_indices(len(x), [len(x) - self.val_size, self.val_size], self.seed)
        else:
            train_idx, val_idx, test_idx = split_indices(
                len(x), [len(x) - 2 * self.val_size, self.val_size, self.val_size], self.seed
            )
            test = Split(x, y, test_idx)
        return {"train": Split(x, y, train_idx), "val": Split(x, y, val_idx), "test": test}


class DownsampledImageNetDataModule(ImageDataModule):
    """The official downsampled ImageNet (Imagenet64 / Imagenet32 from image-net.org) read from its pickled batches in
    ``root``: converted once into memory-mapped uint8 caches there. train = the training batches less ``val_size``
    (a fixed subset), val = those, test = ``val_data`` (the official validation set); labels 0-based."""

    def __init__(self, root: str, image_size: int = 64, val_size: int = 10000, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        if image_size not in (32, 64):
            raise ParameterError(
                "{image_size} = {value!r}; the official downsampled ImageNet comes in 32 and 64", value=image_size
            )
        self.root, self.image_size, self.val_size, self.seed = Path(root), image_size, val_size, seed

    def prepare_data(self) -> None:
        """Once per node, before any process's setup (Lightning): the batches are converted here."""
        imagenet_batches(self.root, self.image_size)

    def load(self) -> dict[str, Split]:
        arrays = imagenet_batches(self.root, self.image_size)
        (x, y), (tx, ty) = arrays["train"], arrays["val"]
        train_idx, val_idx = split_indices(len(x), [len(x) - self.val_size, self.val_size], self.seed)
        return {"train": Split(x, y, train_idx), "val": Split(x, y, val_idx), "test": whole(tx, ty)}
