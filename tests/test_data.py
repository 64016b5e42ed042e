"""Data at scale: uint8 storage, memory maps, the official downsampled-ImageNet batches, checked caches."""

import os
import pickle
import zipfile

import numpy as np
import pytest
import torch

from ddpm_schedules.lightning.data import DigitsDataModule, to_unit_range
from ddpm_schedules.lightning.data_files import DownsampledImageNetDataModule, NpzDataModule
from ddpm_schedules.storage.arrays import load_pickle


def write_batch(path, images, labels_1based, protocol=pickle.HIGHEST_PROTOCOL):
    """A pickled batch in image-net.org's layout: data [N, 3*S*S] uint8 in CHW planes, 1-based labels (a list)."""
    with open(path, "wb") as f:
        pickle.dump(
            {"data": images.reshape(len(images), -1), "labels": list(labels_1based), "mean": np.zeros(images[0].size)},
            f,
            protocol,
        )


@pytest.fixture
def imagenet32(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (10, 3, 32, 32), dtype=np.uint8)
    labels = rng.integers(1, 1001, 10)
    root = tmp_path / "imagenet32"
    root.mkdir()
    write_batch(root / "train_data_batch_1", images[:4], labels[:4])
    write_batch(root / "train_data_batch_2", images[4:7], labels[4:7], protocol=2)
    write_batch(root / "val_data", images[7:], labels[7:])
    return root, images, labels


def test_official_batches_images_labels_and_splits(imagenet32):
    root, images, labels = imagenet32
    dm = DownsampledImageNetDataModule(str(root), image_size=32, val_size=2)
    assert dm.split_sizes == {"train": 5, "val": 2, "test": 3} and dm.image_shape == (3, 32, 32)
    test_x, test_y = dm.splits["test"].read(slice(None))
    assert (
        torch.equal(test_x, torch.from_numpy(images[7:])) and test_y.tolist() == (labels[7:] - 1).tolist()
    )  # CHW planes, 0-based
    # train + val are the 7 training images, each once, with their own labels
    rows = {}
    for split in ("train", "val"):
        x, y = dm.splits[split].read(slice(None))
        for img, lab in zip(x, y):
            k = next(i for i in range(7) if torch.equal(img, torch.from_numpy(images[i])))
            rows[k] = int(lab)
    assert rows == {i: int(labels[i]) - 1 for i in range(7)}
    assert mapped(dm.splits["train"].images)  # mapped from the cache, not loaded
    assert torch.equal(dm.tensor("test"), to_unit_range(torch.from_numpy(images[7:]), 256))
    cache = root / "imagenet32_train.u8.npy"
    stamp = cache.stat().st_mtime_ns
    DownsampledImageNetDataModule(str(root), image_size=32, val_size=2).setup()
    assert cache.stat().st_mtime_ns == stamp  # converted once


def test_conversion_reads_each_batch_file_once(imagenet32, monkeypatch):
    import ddpm_schedules.storage.imagenet as imagenet

    root, images, _ = imagenet32
    reads = []
    real = imagenet.load_pickle
    monkeypatch.setattr(imagenet, "load_pickle", lambda path: reads.append(os.path.basename(path)) or real(path))
    DownsampledImageNetDataModule(str(root), image_size=32, val_size=2).setup()
    assert sorted(reads) == ["train_data_batch_1", "train_data_batch_2", "val_data"]
    reads.clear()
    DownsampledImageNetDataModule(str(root), image_size=32, val_size=2).setup()
    assert reads == []  # later opens map the checked cache
    assert np.array_equal(
        np.load(root / "imagenet32_train.u8.npy"), images[:7]
    )  # a plain .npy, its header completed at the end


def test_a_cache_that_does_not_match_its_source_is_refused(imagenet32):
    root, images, labels = imagenet32
    DownsampledImageNetDataModule(str(root), image_size=32, val_size=2).setup()
    write_batch(root / "train_data_batch_2", images[4:7] ^ 1, labels[4:7])  # the source changed after conversion
    with pytest.raises(ValueError, match="does not match its source files .*delete it"):
        DownsampledImageNetDataModule(str(root), image_size=32, val_size=2).setup()


def test_a_truncated_cache_is_refused(imagenet32):
    root, _, _ = imagenet32
    DownsampledImageNetDataModule(str(root), image_size=32, val_size=2).setup()
    cache = root / "imagenet32_val.u8.npy"
    with open(cache, "ab") as f:
        f.write(b"\0" * 10)
    with pytest.raises(ValueError, match="bytes, not the .* written; delete it"):
        DownsampledImageNetDataModule(str(root), image_size=32, val_size=2).setup()


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda root: (root / "val_data").unlink(), "has no val_data"),
        (lambda root: [p.unlink() for p in root.glob("train_data_batch_*")], "has no train_data_batch_1"),
        (
            lambda root: write_batch(root / "train_data_batch_1", np.zeros((2, 3, 16, 16), np.uint8), [1, 2]),
            "train_data_batch_1.*\\[N, 3072\\] uint8",
        ),
    ],
)
def test_bad_batch_folders(imagenet32, make, match):
    root, _, _ = imagenet32
    make(root)
    with pytest.raises(ValueError, match=match):
        DownsampledImageNetDataModule(str(root), image_size=32, val_size=2).setup()


def test_pickles_are_read_as_data(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    with open(tmp_path / "train_data_batch_1", "wb") as f:
        pickle.dump({"data": Evil(), "labels": [1]}, f)
    with pytest.raises(ValueError, match="refusing to load .*system"):
        load_pickle(tmp_path / "train_data_batch_1")
    assert not (tmp_path / "pwned").exists()


def mapped(array) -> bool:
    """Whether an array is a view of a memory map (its data is not in the process's own memory)."""
    while array is not None:
        if isinstance(array, np.memmap) or type(array).__name__ == "mmap":
            return True
        array = getattr(array, "base", None)
    return False


def test_npy_and_npz_are_memory_mapped(tmp_path):
    rng = np.random.default_rng(1)
    nhwc = rng.integers(0, 256, (12, 16, 16, 3), dtype=np.uint8)
    np.save(tmp_path / "x.npy", nhwc)
    want = torch.from_numpy(nhwc).permute(0, 3, 1, 2)
    np.savez(tmp_path / "stored.npz", data=want.reshape(12, -1).numpy(), labels=np.arange(12))  # flattened CHW planes
    np.savez_compressed(tmp_path / "packed.npz", data=nhwc)
    for name in ("x.npy", "stored.npz", "packed.npz"):
        dm = NpzDataModule(str(tmp_path / name), image_size=16, val_size=2)
        dm.setup()
        x, _ = dm.splits["train"].read(slice(None))
        assert len(x) == 8 and all(any(torch.equal(img, w) for w in want) for img in x)
        assert mapped(dm.splits["train"].images), name
    flat = NpzDataModule(str(tmp_path / "stored.npz"), image_size=16, val_size=2)
    flat.setup()
    assert sorted(flat.splits["train"].labels.tolist()) == list(range(12))
    with zipfile.ZipFile(tmp_path / "stored.npz") as zf:
        assert zf.getinfo("data.npy").compress_type == zipfile.ZIP_STORED
    assert not (tmp_path / "stored.data.npy").exists()  # mapped in place
    assert (tmp_path / "packed.data.npy").exists() and (
        tmp_path / "packed.data.json"
    ).exists()  # converted once, next to it


def test_loaders_yield_integers_and_the_module_converts_them():
    from ddpm_schedules.lightning.module import DiffusionModule

    dm = DigitsDataModule(batch_size=8)
    x, y = next(iter(dm.train_dataloader()))
    assert x.dtype == torch.uint8 and x.shape == (8, 1, 8, 8) and y.dtype == torch.long
    module = DiffusionModule(
        {
            "image_size": 8,
            "in_channels": 1,
            "num_channels": 32,
            "num_res_blocks": 1,
            "channel_mult": "1,2",
            "attention_resolutions": "4",
            "diffusion_steps": 20,
        },
        loss="simple",
        levels=17,
    )
    torch.testing.assert_close(module.images((x, y)), x.float() / 16 * 2 - 1)


@pytest.mark.parametrize("workers", [-1, 1.5])
def test_num_workers_must_be_a_count(workers):
    with pytest.raises(ValueError, match=f"^num_workers = {workers}"):
        DigitsDataModule(num_workers=workers)


def test_null_workers_mean_four_with_cuda_and_none_on_cpu(monkeypatch):
    assert DigitsDataModule(num_workers=None).num_workers == (4 if torch.cuda.is_available() else 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    dm = DigitsDataModule(num_workers=None)
    assert dm.num_workers == 4 and dm.pin_memory and dm.persistent_workers


def test_photo_patches_are_rgb_uint8_from_disjoint_regions_of_the_two_photos():
    from sklearn.datasets import load_sample_images

    from ddpm_schedules.lightning.data import PhotoPatchesDataModule

    dm = PhotoPatchesDataModule(image_size=8, sizes=(60, 20, 20), batch_size=4)
    splits = dm.load()
    photos = load_sample_images().images
    h, w = photos[0].shape[:2]
    for name, (y0, y1, x0, x1) in {
        "train": (0, h, 0, 3 * w // 4),
        "val": (0, h // 2, 3 * w // 4, w),
        "test": (h // 2, h, 3 * w // 4, w),
    }.items():
        images, labels = splits[name].read(slice(None))
        assert images.dtype == torch.uint8 and images.shape[1:] == (3, 8, 8) and set(labels.tolist()) == {0, 1}
        for img, k in zip(
            images.numpy(), labels.tolist()
        ):  # each patch is found inside its split's region of its photo
            region = photos[k][y0:y1, x0:x1]
            patch = img.transpose(1, 2, 0)
            hits = np.argwhere((region[: region.shape[0] - 7, : region.shape[1] - 7] == patch[0, 0]).all(-1))
            assert any((region[y : y + 8, x : x + 8] == patch).all() for y, x in hits), name
    assert PhotoPatchesDataModule.levels == 256
    with pytest.raises(ValueError, match="^image_size = 300; photo patches must be 1..160 pixels"):
        PhotoPatchesDataModule(image_size=300, sizes=(1, 1, 1)).load()
