"""The (seed, example index, t) noise rule (docs/design.md §5) and the indexed batches it is applied to.

The noise for (example, t) is a function of (seed, global example index, t) alone, so estimates do
not depend on batch size, on how examples are split across processes, or on a resume.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Iterator, NamedTuple

import torch
from torch import Tensor

from ddpm_schedules.models.conditioning import LabeledImages, check_labels
from ddpm_schedules.storage.errors import ParameterError

_MASK = (1 << 64) - 1
_NOISE_BLOCK_VALUES = 1 << 12  # normals drawn per generator seeding


def mix(*values: int) -> int:
    """A splitmix64-style hash of integers, used as a generator seed."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = ((h ^ (int(v) & _MASK)) * 0xBF58476D1CE4E5B9) & _MASK
        h ^= h >> 31
        h = (h * 0x94D049BB133111EB) & _MASK
        h ^= h >> 29
    return h >> 1  # manual_seed takes a non-negative 63-bit value


def example_noise(seed: int, start: int, count: int, t: int, shape: tuple[int, ...]) -> Tensor:
    """Standard normal noise [count, *shape] for the examples start..start+count-1 at timestep t.

    Examples are grouped in fixed blocks (a deterministic function of ``shape``); each block's
    generator is seeded from (seed, block, t), and an example takes its own slice of it.
    """
    dims = 1
    for d in shape:
        dims *= d
    block = max(1, _NOISE_BLOCK_VALUES // dims)
    first, last = start // block, (start + count - 1) // block
    gen = torch.Generator()
    parts = []
    for b in range(first, last + 1):
        gen.manual_seed(mix(seed, b, t))
        parts.append(torch.randn(block, *shape, generator=gen))
    noise = torch.cat(parts) if len(parts) > 1 else parts[0]
    offset = start - first * block
    return noise[offset : offset + count]


def shard(n: int, rank: int, world: int) -> tuple[int, int]:
    """The contiguous slice [lo, hi) of n examples that process ``rank`` of ``world`` takes; its lo is its
    start_index."""
    return rank * n // world, (rank + 1) * n // world


@dataclass(frozen=True)
class Processes:
    """This process's place among ``world`` processes (one by default): how it shares examples and chunks."""

    rank: int = 0
    world: int = 1

    def shard(self, n: int) -> tuple[int, int]:
        return shard(n, self.rank, self.world)

    def chunks(self, n: int, chunk: int) -> list[int]:
        """The chunks of n samples this process draws (round robin over processes)."""
        return list(range(self.rank, math.ceil(n / chunk), self.world))

    @property
    def partial_suffix(self) -> str:
        return f".rank{self.rank}.partial.pt" if self.world > 1 else ".partial.pt"


class IndexedBatch(NamedTuple):
    """A batch of data: the global index of its first example, x0 [B, C, H, W] and (conditional models) labels."""

    start: int
    x0: Tensor
    y: Tensor | None = None


def indexed_batches(
    data: Tensor | LabeledImages | Iterable,
    batch_size: int = 64,
    levels: int | None = None,
    image_shape: tuple[int, ...] | None = None,
    start_index: int = 0,
    num_classes: int | None = None,
) -> list[IndexedBatch]:
    """[IndexedBatch(global index of the first example, x0, labels)] from a tensor, `LabeledImages` or an iterable
    of batches (tensors or (tensor, labels) pairs).

    ``start_index`` is the global index of the first example (a process's shard starts there). Every batch is
    checked: 4-D, finite, within [-1, 1], on the grid of ``levels`` values and of ``image_shape``. With
    ``num_classes`` (a class-conditional model) every batch must carry labels in 0..num_classes-1; without it
    labels are dropped (an unconditional model ignores them).
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if isinstance(data, LabeledImages):
        source: Iterator = iter(data.split(batch_size))
    elif torch.is_tensor(data):
        source = iter(data.split(batch_size)) if data.ndim else iter([data])
    else:
        source = iter(data)
    out, start = [], start_index
    for batch in source:
        pair = isinstance(batch, (tuple, list))
        x0 = batch[0] if pair else batch
        _check_batch(x0, levels, image_shape)
        y = None
        if num_classes is not None:
            if not (pair and len(batch) > 1 and torch.is_tensor(batch[1])):
                raise ParameterError(
                    "this model is class-conditional ({num_classes} classes) but the data has no labels: pass "
                    "LabeledImages(images, labels) or batches of (images, labels)",
                    num_classes=num_classes,
                )
            y = check_labels(batch[1], x0.shape[0], num_classes)
        out.append(IndexedBatch(start, x0, y))
        start += x0.shape[0]
    if not out:
        raise ValueError("the data holds no examples; pass a tensor [N, C, H, W] or an iterable of batches")
    return out


def _check_batch(x0: object, levels: int | None, image_shape: tuple[int, ...] | None) -> None:
    if not torch.is_tensor(x0) or x0.ndim != 4 or not x0.is_floating_point():
        what = f"a {x0.ndim}-D {x0.dtype} tensor" if torch.is_tensor(x0) else type(x0).__name__
        raise ValueError(f"data batches must be float tensors [B, C, H, W] in [-1, 1], got {what}")
    if image_shape is not None and tuple(x0.shape[1:]) != tuple(image_shape):
        raise ValueError(
            f"data examples have shape {tuple(x0.shape[1:])} but the model expects {tuple(image_shape)}; "
            "use data of the model's image size and channels"
        )
    if not torch.isfinite(x0).all():
        raise ValueError("the data contains NaN or Inf; clean it before estimating")
    lo, hi = x0.min().item(), x0.max().item()
    if lo < -1 - 1e-6 or hi > 1 + 1e-6:
        raise ValueError(f"data values span [{lo:.4g}, {hi:.4g}]; scale images to [-1, 1] (x / 127.5 - 1 for 8-bit)")
    if levels is not None:
        steps = (x0.double() + 1) * (levels - 1) / 2
        off = (steps - steps.round()).abs().max().item()
        if off > 1e-3:
            raise ValueError(
                f"data values are not on the grid of levels = {levels} values in [-1, 1] (off by {off:.3g} steps); "
                "set the model's levels to the data's number of values (256 for 8-bit images)"
            )
