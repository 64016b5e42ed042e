"""Data at ImageNet size: a synthetic set in the official downsampled-ImageNet 64x64 format (pickled batches),
converted once, then training-loader throughput and the peak memory of 1- and 2-process CPU DDP training runs.

    python benchmarks/bench_data.py [--images 200000] [--workers 2] [--batch-size 16] [--folder /tmp/imagenet64_synthetic]

The images (uint8, 12,288 bytes each: 2.46 GB for 200,000) are written into ``--folder`` (a temporary folder
by default, removed at the end). Memory is sampled every 0.1 s over the whole process tree of ``train.py``
(the DDP processes and their loader workers): the sum of RSS counts pages shared between processes (the
memory-mapped images, torch's libraries) once per process; the sum of PSS splits each shared page between
its users, so it adds up to the memory the run really holds. Each run is repeated on a set of
``--baseline-images`` (4,000) images: the difference is what the data itself costs, the rest is torch,
Lightning and the model's activations, the same for any data set.
"""

from __future__ import annotations

import argparse
import json
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ddpm_schedules.lightning.data_files import DownsampledImageNetDataModule

ROOT = Path(__file__).resolve().parents[1]
SIZE = 64


def write_batches(folder: Path, images: int, per_batch: int = 20_000, val: int = 10_000) -> None:
    """train_data_batch_1.. and val_data in image-net.org's layout: {"data": [N, 12288] uint8, "labels": 1-based list}."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for k, start in enumerate(range(0, images, per_batch), 1):
        n = min(per_batch, images - start)
        with open(folder / f"train_data_batch_{k}", "wb") as f:
            pickle.dump(
                {
                    "data": rng.integers(0, 256, (n, 3 * SIZE * SIZE), dtype=np.uint8),
                    "labels": rng.integers(1, 1001, n).tolist(),
                },
                f,
                4,
            )
    with open(folder / "val_data", "wb") as f:
        pickle.dump(
            {
                "data": rng.integers(0, 256, (val, 3 * SIZE * SIZE), dtype=np.uint8),
                "labels": rng.integers(1, 1001, val).tolist(),
            },
            f,
            4,
        )


def loader_rate(folder: Path, workers: int, batches: int, batch_size: int = 128) -> float:
    """Images/s of the training loader (shuffled, uint8 batches as they leave the loader)."""
    dm = DownsampledImageNetDataModule(
        str(folder), image_size=SIZE, val_size=1000, batch_size=batch_size, num_workers=workers
    )
    it = iter(dm.train_dataloader())
    next(it)  # workers started
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * batch_size / (time.perf_counter() - start)


def tree(pid: int) -> list[int]:
    """pid and all its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def memory(pids: list[int]) -> tuple[int, int]:
    """(sum of RSS, sum of PSS) in bytes over ``pids``."""
    rss = pss = 0
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    rss += int(line.split()[1]) * 1024
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1]) * 1024
        except OSError:
            continue
    return rss, pss


def training_peak(folder: Path, processes: int, workers: int, steps: int, out: Path, batch_size: int = 16) -> dict:
    """Peak summed RSS / PSS of ``train.py`` on the set: a 64x64 UNet with 32 channels, CPU DDP, a few steps."""
    cmd = [sys.executable, str(ROOT / "train.py"), "data=imagenet64", f"data.root={folder}", "data.val_size=1000", f"data.batch_size={batch_size}",
           f"data.num_workers={workers}", "unet=tiny", "unet.image_size=64", "unet.in_channels=3", "diffusion.diffusion_steps=100",
           "trainer=cpu", f"trainer.devices={processes}", "+trainer.strategy=" + ("ddp" if processes > 1 else "auto"),
           f"trainer.max_steps={steps}", "+trainer.limit_val_batches=0", "trainer.val_check_interval=null", "logger=none",
           f"paths.output_dir={out}", "+trainer.enable_progress_bar=false"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak_rss = peak_pss = most = 0
    start = time.perf_counter()
    while proc.poll() is None:
        pids = tree(proc.pid)
        rss, pss = memory(pids)
        peak_rss, peak_pss, most = max(peak_rss, rss), max(peak_pss, pss), max(most, len(pids))
        time.sleep(0.1)
    log = proc.stdout.read()
    if proc.returncode:
        raise SystemExit(f"train.py failed ({proc.returncode}):\n{log[-3000:]}")
    return {"processes": processes, "workers_per_process": workers, "batch_size": batch_size, "steps": steps, "seconds": round(time.perf_counter() - start, 1),
            "peak_rss_sum_gb": round(peak_rss / 1e9, 3), "peak_pss_sum_gb": round(peak_pss / 1e9, 3), "most_processes_seen": most}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=200_000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batches", type=int, default=200, help="loader batches of 128 timed")
    p.add_argument("--steps", type=int, default=5, help="training steps per run")
    p.add_argument(
        "--batch-size", type=int, default=16, help="training batch per process (the model's activations grow with it)"
    )
    p.add_argument(
        "--baseline-images",
        type=int,
        default=4000,
        help="the same runs on a set this small give the cost of the software stack and the model alone (0: skip)",
    )
    p.add_argument("--folder", type=Path, default=None, help="keep the set here (default: a temporary folder, removed)")
    a = p.parse_args()
    tmp = None if a.folder else Path(tempfile.mkdtemp(prefix="imagenet64_synthetic_"))
    folder = a.folder or tmp
    try:
        start = time.perf_counter()
        if not (folder / "val_data").exists():
            write_batches(folder, a.images)
        written = time.perf_counter() - start
        start = time.perf_counter()
        dm = DownsampledImageNetDataModule(str(folder), image_size=SIZE, val_size=1000)
        dm.setup()
        converted = time.perf_counter() - start
        data_gb = (a.images * 3 * SIZE * SIZE) / 1e9
        result = {"images": a.images, "uint8_gb": round(data_gb, 3), "write_s": round(written, 1), "convert_s": round(converted, 1),
                  "loader_images_per_s": {w: round(loader_rate(folder, w, a.batches)) for w in sorted({0, a.workers})}}  # fmt: skip
        small = folder / "baseline"
        if a.baseline_images and not (small / "val_data").exists():
            write_batches(small, a.baseline_images, val=1000)
        runs = []
        for workers in sorted({0, a.workers}):
            for n in (1, 2):
                r = training_peak(folder, n, workers, a.steps, folder / f"run_{n}_{workers}", a.batch_size)
                r["rss_over_data"] = round(r["peak_rss_sum_gb"] / data_gb, 3)
                r["pss_over_data"] = round(r["peak_pss_sum_gb"] / data_gb, 3)
                if a.baseline_images:
                    base = training_peak(small, n, workers, a.steps, small / f"run_{n}_{workers}", a.batch_size)
                    r["baseline_rss_sum_gb"], r["baseline_pss_sum_gb"] = (
                        base["peak_rss_sum_gb"],
                        base["peak_pss_sum_gb"],
                    )
                    r["data_rss_over_data"] = round((r["peak_rss_sum_gb"] - base["peak_rss_sum_gb"]) / data_gb, 3)
                    r["data_pss_over_data"] = round((r["peak_pss_sum_gb"] - base["peak_pss_sum_gb"]) / data_gb, 3)
                runs.append(r)
        result["training"] = runs
        print(json.dumps(result, indent=1))
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
