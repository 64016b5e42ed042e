"""Partial sums of long estimations on disk: saved atomically with a checksum, resumed on a rerun.

A file holds a Metric's states, how far the loop got and the configuration it belongs to. A file
that is corrupt or belongs to another configuration is reported and ignored (the work is redone),
never silently used. SIGTERM (what SLURM sends before pre-emption) lets the current unit of work
finish, saves, and stops with `Preempted`.
"""

from __future__ import annotations

import json
import logging
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torchmetrics import Metric

from ddpm_schedules.storage.files import load_checked, save_checked

log = logging.getLogger(__name__)


class Preempted(SystemExit):
    """Stopped by SIGTERM after saving partial sums; rerunning the same command resumes."""

    def __init__(self, message: str):
        super().__init__(143)  # 128 + SIGTERM, as a shell reports it
        self.message = message

    def __str__(self) -> str:
        return self.message


class PartialSums:
    """Atomic save / checked load of a Metric's states plus a progress counter, for one configuration."""

    def __init__(
        self, path: str | Path | None, config: dict[str, Any], every_units: int = 50, every_seconds: float = 600.0
    ):
        self.path = Path(path) if path is not None else None
        self.config = json.loads(json.dumps(config, sort_keys=True, default=str))
        self.every_units, self.every_seconds = max(1, every_units), every_seconds
        self._last_save, self._unsaved = time.monotonic(), 0

    def _read(self) -> dict[str, Any]:
        return load_checked(self.path)

    def load_progress(self) -> int:
        """Units done according to the file, whatever its configuration (for monitoring a run)."""
        return int(self._read()["done"])

    def load_state(self) -> dict[str, Any] | None:
        """The saved dict of this configuration (with its ``done``), or None: no file, or (reported) a damaged file
        or one of another configuration."""
        if self.path is None or not self.path.is_file():
            return None
        try:
            saved = self._read()
        except Exception as e:  # truncated, garbage, or tampered with
            log.warning("partial sums %s are unreadable (%s); starting afresh", self.path, e)
            return None
        if not isinstance(saved, dict) or saved.get("config") != json.dumps(self.config, sort_keys=True):
            log.warning("partial sums %s belong to another configuration; starting afresh", self.path)
            return None
        return saved

    def save_state(self, state: dict[str, Any], done: int) -> None:
        """Write ``state`` (tensors and plain values), the progress and the configuration atomically."""
        if self.path is None:
            return
        save_checked({**state, "done": done, "config": json.dumps(self.config, sort_keys=True)}, self.path)
        self._last_save, self._unsaved = time.monotonic(), 0

    def load(self, metric: Metric) -> int:
        """Restore ``metric`` and return the number of units already done (0 when starting afresh)."""
        saved = self.load_state()
        if saved is None:
            return 0
        if set(saved.get("states", ())) != set(metric.metric_state):
            log.warning("partial sums %s belong to another configuration; starting afresh", self.path)
            return 0
        for name, value in saved["states"].items():
            current = getattr(metric, name)
            setattr(metric, name, value.to(device=current.device, dtype=current.dtype))
        log.info("resuming from %s: %d units done", self.path, saved["done"])
        return int(saved["done"])

    def save(self, metric: Metric, done: int) -> None:
        """Write the states and progress to a temporary file, then rename it over the old one."""
        if self.path is not None:
            self.save_state(
                {"states": {name: value.detach().cpu() for name, value in metric.metric_state.items()}}, done
            )

    def step(self, metric: Metric, done: int, stop_requested: bool = False, units: int = 1) -> None:
        """After each unit (or run of ``units``): save when due; on a stop request save and raise `Preempted`."""
        self.tick(lambda: self.save(metric, done), done, stop_requested, units=units)

    def tick(
        self, save: Callable[[], None], done: int, stop_requested: bool = False, force: bool = False, units: int = 1
    ) -> None:
        """After each unit (or run of ``units``): call ``save`` when due (or ``force``); on a stop request save and
        raise `Preempted`."""
        self._unsaved += units
        due = self._unsaved >= self.every_units or time.monotonic() - self._last_save >= self.every_seconds
        if due or force or stop_requested:
            save()
        if stop_requested:
            where = f"; partial sums saved to {self.path}, rerun the same command to resume" if self.path else ""
            message = f"stopped by SIGTERM after {done} units{where}"
            log.warning(message)
            raise Preempted(message)

    def remove(self) -> None:
        if self.path is not None and self.path.is_file():
            self.path.unlink()


@dataclass(frozen=True)
class PartialFile:
    """Where a long estimation keeps its partial sums, saved every ``every`` units of work (columns of
    a cost matrix, batches of a held-out pass) or ``seconds``, whichever comes first."""

    path: str | Path
    every: int = 50
    seconds: float = 600.0

    @classmethod
    def of(cls, partial: "PartialFile | str | Path | None", every: int) -> "PartialFile | None":
        """A PartialFile from a PartialFile or a bare path (saved every ``every`` units)."""
        return partial if partial is None or isinstance(partial, PartialFile) else cls(partial, every)


@contextmanager
def resumable(
    model: torch.nn.Module, metric: Metric, partial: PartialFile | None, config: dict[str, Any]
) -> Iterator[tuple[PartialSums, int, Callable[[], bool]]]:
    """The frame of an estimation loop: ``metric`` restored from ``partial``, the model in eval and inference
    mode, SIGTERM turned into a flag. Yields (saver, units already done, stop requested?)."""
    saver = PartialSums(
        partial.path if partial else None, config, partial.every if partial else 1, partial.seconds if partial else 0
    )
    done = saver.load(metric)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), sigterm_requests(enabled=partial is not None) as stop_requested:
            yield saver, done, stop_requested
    finally:
        model.train(was_training)


def agreed(value: Any) -> bool:
    """Whether every process (torch.distributed) resumes from the same ``value``; True in one process. Processes
    that sync at every round must all start from the same round, or their collectives would not pair up."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return True
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return all(v == values[0] for v in values)


@contextmanager
def sigterm_requests(enabled: bool = True) -> Iterator[Callable[[], bool]]:
    """Within the block, SIGTERM only sets a flag that the returned function reports.

    Disabled (nothing to save), the current handler stays: inside a Lightning run that is
    Lightning's, which stops training between two batches.
    """
    flag = {"set": False}

    def handler(signum, frame):  # noqa: ARG001
        flag["set"] = True

    if not enabled:
        yield lambda: False
        return
    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield lambda: False
        return
    try:
        yield lambda: flag["set"]
    finally:
        signal.signal(signal.SIGTERM, previous)
