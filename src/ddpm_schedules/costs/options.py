"""How an estimation runs, as opposed to what it estimates: one options object that every estimator of costs/ takes."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from ddpm_schedules.models.noise import Processes
from ddpm_schedules.storage.resume import PartialFile


@dataclass(frozen=True)
class EstimateOptions:
    """The run settings of `estimate_cost_matrices`, `estimate_ode_matrix`, `estimate_oss_paths`, `evaluate_schedules`,
    `refine_cost_matrices` and `estimate_to_precision`; none of them changes what is estimated beyond its noise draws.

    - ``seed``: the noise rule's seed (docs/design.md §5).
    - ``batch_size``: examples per network call; when a batch of data holds fewer, several columns or timesteps
      share a call. It is part of a partial file's configuration, so a resume replays the same calls.
    - ``progress``: show a progress bar.
    - ``start_index``: the global index of the first example (or trajectory) this process passes, under
      torch.distributed; the sums of all processes' shards are combined into one result.
    - ``partial``: where the partial sums are kept so that a rerun resumes (a `PartialFile`, or a path saved at the
      estimator's own interval); None keeps none.
    - ``procs``: this process among all (precision rounds shard each round's examples themselves).
    """

    seed: int = 0
    batch_size: int = 64
    progress: bool = True
    start_index: int = 0
    partial: PartialFile | str | Path | None = None
    procs: Processes = Processes()

    def partial_file(self, every: int) -> PartialFile | None:
        """``partial`` as a `PartialFile` (a bare path saves every ``every`` units)."""
        return PartialFile.of(self.partial, every)


OPTION_NAMES = tuple(f.name for f in fields(EstimateOptions))


def estimate_options(options: EstimateOptions | None = None, **overrides: Any) -> EstimateOptions:
    """``options`` (default `EstimateOptions()`) with the fields named in ``overrides`` replaced."""
    unknown = sorted(set(overrides) - set(OPTION_NAMES))
    if unknown:
        raise TypeError(f"unknown estimation option {unknown[0]!r}; the options are {', '.join(OPTION_NAMES)}")
    options = options if options is not None else EstimateOptions()
    return replace(options, **overrides) if overrides else options
