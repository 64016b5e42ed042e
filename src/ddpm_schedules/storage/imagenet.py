"""The official downsampled ImageNet (image-net.org's pickled Imagenet32 / Imagenet64 batches), each file read once
with the restricted unpickler of arrays.py and converted into a memory-mapped uint8 cache beside it."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Iterable

import numpy as np

from ddpm_schedules.storage.arrays import cached_rows, load_pickle
from ddpm_schedules.storage.errors import ParameterError


def imagenet_batches(root: Path, image_size: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The official downsampled-ImageNet pickled batches of ``root`` (``train_data_batch_1..`` and ``val_data``:
    ``data`` [N, 3 * S * S] uint8 in CHW planes, 1-based ``labels``), each converted once into a memory-mapped
    [N, 3, S, S] uint8 cache and 0-based int64 labels in ``root``: {"train": ..., "val": ...}."""
    if not root.is_dir():
        raise ParameterError(
            "{root} = {path!r} is not a folder; point it at the extracted Imagenet{size}_train / _val files",
            path=str(root),
            size=image_size,
        )
    train = sorted(
        root.glob("train_data_batch_*"),
        key=lambda p: int(p.name.rsplit("_", 1)[-1]) if p.name.rsplit("_", 1)[-1].isdigit() else 0,
    )
    train = [p for p in train if p.name.rsplit("_", 1)[-1].isdigit()]
    missing = [
        n
        for n, files in (
            ("train_data_batch_1", train),
            ("val_data", [root / "val_data"] if (root / "val_data").exists() else []),
        )
        if not files
    ]
    if missing:
        raise ParameterError(
            "{root} {path!r} has no {missing}; it needs the image-net.org Imagenet{size} files "
            "train_data_batch_1..10 and val_data (extracted, in one folder)",
            path=str(root),
            missing=missing[0],
            size=image_size,
        )
    return {
        "train": _converted(root, "train", train, image_size),
        "val": _converted(root, "val", [root / "val_data"], image_size),
    }


def _converted(root: Path, name: str, files: list[Path], size: int) -> tuple[np.ndarray, np.ndarray]:
    cache = root / f"imagenet{size}_{name}.u8.npy"
    labels_cache = root / f"imagenet{size}_{name}_labels.npy"
    collected: list[np.ndarray] = []

    def rows() -> Iterable[np.ndarray]:
        for f in files:  # each pickle read once
            data, labels = _batch(f, size)
            collected.append(labels)
            yield data

    images = cached_rows(cache, files, (3, size, size), np.uint8, rows)
    if collected:
        _atomic_npy(labels_cache, np.concatenate(collected))
    if not labels_cache.exists():
        raise ValueError(f"labels cache {str(labels_cache)!r} is missing; delete {str(cache)!r} to convert again")
    labels = np.load(labels_cache)
    if len(labels) != len(images):
        raise ValueError(
            f"labels cache {str(labels_cache)!r} holds {len(labels)} labels for {len(images)} images; delete both to "
            "convert again"
        )
    return images, labels


def _batch(path: Path, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One pickled batch: (data [N, 3*S*S] uint8, 0-based labels [N] int64), checked."""
    d = load_pickle(path)
    if not isinstance(d, dict) or "data" not in d or "labels" not in d:
        raise ValueError(
            f"{str(path)!r} is not a downsampled-ImageNet batch (a dict with 'data' and 'labels'); download it again"
        )
    data = np.asarray(d["data"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * size * size:
        raise ParameterError(
            "{path!r} holds data of shape {shape} ({dtype}), not [N, {dims}] uint8: is it "
            "Imagenet{size}? set {image_size} to match the files",
            path=str(path),
            shape=data.shape,
            dtype=data.dtype,
            dims=3 * size * size,
            size=size,
        )
    labels = np.asarray(d["labels"], dtype=np.int64) - 1
    if len(labels) != len(data) or (len(labels) and labels.min() < 0):
        raise ValueError(f"{str(path)!r} has {len(labels)} labels (1-based) for {len(data)} images; download it again")
    return data, labels


def _atomic_npy(path: Path, array: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, array)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, path)
