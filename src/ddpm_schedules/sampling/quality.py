"""Sample quality per (schedule, sampler): samples, Fréchet distances with bootstrap errors, distance to a DDIM teacher.

Samples come in chunks: chunk c starts from x_T drawn by a generator seeded with (seed, c), the same
for every schedule and sampler (common random numbers make their differences precise), and
processes share the chunks round robin. Feature rows and distances are gathered in chunk order, so
every number is the one-process number.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor

from ddpm_schedules.models.conditioning import balanced_labels
from ddpm_schedules.models.model import DiffusionModel, call_groups
from ddpm_schedules.models.noise import Processes, mix
from ddpm_schedules.sampling.frechet import (
    feature_network,
    features_of,
    frechet_distance,
    gather_rows,
    reference_moments,
)
from ddpm_schedules.sampling.registry import DETERMINISTIC, SAMPLERS
from ddpm_schedules.sampling.samplers import sample_ddim
from ddpm_schedules.schedules.schedule import Schedule
from ddpm_schedules.storage.progress import tqdm


@dataclass(frozen=True)
class QualitySettings:
    samplers: tuple[str, ...] = ("ancestral", "ddim")
    ddim_eta: float = 0.0
    samples: int = 1000  # per (schedule, sampler)
    grid_size: int = 64  # samples shown per (schedule, sampler)
    chunk: int = 200  # samples per generator seeding: the unit shared out between processes
    seed: int = 0
    teacher_samples: int = 100  # DDIM samples compared with the teacher's from the same x_T (0: none)
    bootstrap: int = 50  # resamples for the Fréchet distance's standard error (0: none)


def chunk_noise(model: DiffusionModel, seed: int, c: int, m: int) -> tuple[Tensor, torch.Generator]:
    """x_T of chunk c (m samples) and the generator that then draws the chunk's step noise."""
    gen = torch.Generator().manual_seed(mix(seed, c))
    return torch.randn(m, *model.image_shape, generator=gen, dtype=torch.float64), gen


def chunk_draws(starts: list[tuple[Tensor, torch.Generator]]) -> Iterator[Tensor]:
    """Several chunks as one batch: every step draw after x_T, each chunk's from its own generator (as it alone
    draws)."""
    while True:
        yield torch.cat([torch.randn(x_T.shape, generator=gen, dtype=torch.float64) for x_T, gen in starts])


def draw_samples(
    model: DiffusionModel,
    sampler: str,
    schedule: Schedule,
    settings: QualitySettings,
    procs: Processes,
    batch_size: int,
) -> list[tuple[int, Tensor]]:
    """This process's chunks of ``settings.samples`` samples along ``schedule``: [(chunk index, samples)]; as many
    chunks share the network calls as ``batch_size`` holds (a larger chunk is split into calls of ``batch_size``).
    Each chunk gets the same noise and the same steps as on its own, so its samples equal its own call's up to the
    network's rounding (a network's float32 kernels may round other batch sizes differently in the last bits)."""
    extra = {"eta": settings.ddim_eta} if sampler == "ddim" else {}
    out = []
    for group in call_groups(procs.chunks(settings.samples, settings.chunk), settings.chunk, batch_size):
        starts = [
            chunk_noise(model, settings.seed, c, min(settings.chunk, settings.samples - c * settings.chunk))
            for c in group
        ]
        sizes = [len(x_T) for x_T, _ in starts]
        x_T = torch.cat([x for x, _ in starts])
        draws = chunk_draws(starts)
        y = chunk_labels(model, settings, group, sizes)
        samples = SAMPLERS[sampler](model, schedule, x_T, noise=draws, batch_size=batch_size, y=y, **extra).cpu()
        out += list(zip(group, samples.split(sizes)))
    return out


def teacher_samples(
    model: DiffusionModel, teacher: Schedule, settings: QualitySettings, procs: Processes
) -> dict[int, Tensor]:
    """DDIM (eta = 0) along the teacher's grid from the x_T of the first ``teacher_samples`` samples:
    {chunk: samples}."""
    out, n = {}, min(settings.teacher_samples, settings.samples)
    for c in procs.chunks(n, settings.chunk):
        m = min(settings.chunk, settings.samples - c * settings.chunk)
        k = min(m, n - c * settings.chunk)
        x_T = chunk_noise(model, settings.seed, c, m)[0][:k]
        out[c] = sample_ddim(model, teacher, x_T, y=chunk_labels(model, settings, [c], [k])).cpu()
    return out


def chunk_labels(
    model: DiffusionModel, settings: QualitySettings, chunks: list[int], sizes: list[int]
) -> Tensor | None:
    """The labels of the samples of ``chunks`` (``sizes`` each): class-balanced by the sample's global index, so a
    sample has the same (x_T, y) for every schedule, sampler and process count (None: unconditional)."""
    if model.num_classes is None:
        return None
    index = torch.cat([torch.arange(c * settings.chunk, c * settings.chunk + n) for c, n in zip(chunks, sizes)])
    return balanced_labels(index, model.num_classes)


def gather_chunks(parts: list[tuple[int, Tensor]], width: int) -> Tensor:
    """Rows of every process's chunks, in chunk order ([0, width] when there are none)."""
    rows = (
        torch.cat(
            [
                torch.cat([torch.full((len(x), 1), float(c), dtype=torch.float64), x.double().flatten(1)], 1)
                for c, x in parts
            ]
        )
        if parts
        else torch.empty(0, width + 1, dtype=torch.float64)
    )
    rows = gather_rows(rows)
    order = torch.argsort(rows[:, 0], stable=True)  # within a chunk the rows keep their order
    return rows[order, 1:]


def quality_stage(
    model: DiffusionModel,
    schedules: Sequence[Schedule],
    settings: QualitySettings,
    procs: Processes,
    batch_size: int,
    fid: Any = None,
    reference: Tensor | tuple[Tensor, Tensor] | None = None,
    reference_cache: str | None = None,
    teacher: Schedule | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Tensor], Any]:
    """For every sampler and schedule: the Fréchet distance (with its bootstrap error) of ``settings.samples``
    samples to ``reference`` (images, or their feature statistics (mu, sigma)), and for DDIM and DPM-Solver++ the
    mean L2 distance of its first samples to the teacher's.

    Returns the entries (strategy, K, sampler, schedule, fid, fid_sem, teacher_distance), sample grids
    ``<strategy>_<sampler>_K<K>`` of this process's first samples, and the reference statistics (None without fid).
    """
    network = feature_network(fid.features, fid.digits_weights, fid.inception_weights, fid.antialias) if fid else None
    ref = None
    if fid:
        ref = reference if isinstance(reference, tuple) else reference_moments(network, reference, reference_cache)
    targets = (
        teacher_samples(model, teacher, settings, procs) if teacher is not None and settings.teacher_samples else {}
    )
    entries, grids = [], {}
    work = [(sampler, sch) for sampler in settings.samplers for sch in schedules]
    for sampler, sch in tqdm(work, desc="samples", unit="set", disable=procs.rank != 0):
        parts = draw_samples(model, sampler, sch, settings, procs, batch_size)
        entry = {
            "strategy": sch.strategy,
            "K": sch.K,
            "sampler": sampler,
            "schedule": list(sch.timesteps),
            "fid": None,
            "fid_sem": None,
            "teacher_distance": None,
            "teacher_distance_sem": None,
        }
        if network is not None:
            feats = gather_chunks([(c, features_of(network, x)) for c, x in parts], ref[0].numel())
            # resamples keyed by the schedule, not its place in the list: a row's SE does not depend on what else runs
            boot_seed = mix(settings.seed, zlib.crc32(sch.strategy.encode()), sch.K)
            entry["fid"], entry["fid_sem"] = frechet_distance(ref, feats, settings.bootstrap, seed=boot_seed)
        if (
            sampler in DETERMINISTIC and teacher is not None and settings.teacher_samples
        ):  # the same on every process: a collective
            dist = [
                (c, (x[: len(targets[c])] - targets[c]).flatten(1).norm(dim=1, keepdim=True))
                for c, x in parts
                if c in targets
            ]
            d = gather_chunks(dist, 1)[:, 0]  # one distance per sample
            entry["teacher_distance"] = float(d.mean())
            entry["teacher_distance_sem"] = float(d.std() / len(d) ** 0.5) if len(d) > 1 else None
        entries.append(entry)
        if parts:
            grids[f"{sch.strategy}_{sampler}_K{sch.K}"] = torch.cat([x for _, x in parts])[: settings.grid_size]
    return entries, grids, ref
