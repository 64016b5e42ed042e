"""What OSS's DP (oss.py) returns and where it stands: `OssPaths`, the result as plain JSON, and `OssLevels`, the
finished levels (the DP's tables and every trajectory's states) that a partial file keeps so that a rerun after
SIGKILL or SIGTERM goes on from the last one."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor

from ddpm_schedules.schedules.schedule import Schedule
from ddpm_schedules.storage.files import atomic_write_json
from ddpm_schedules.storage.resume import PartialSums, agreed

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OssPaths:
    """The DP's result: per budget K the grid indices of the best path (0 first, N last) and its final distance."""

    grid: Tensor  # [0] + the candidate timesteps
    paths: dict[int, tuple[int, ...]]
    distance: dict[int, float]  # E || x_0 of the sampler along the path - x_0 of the teacher ||
    passes: int  # network passes per trajectory, the teacher's included
    count: int  # trajectories
    propagate: str = "ddim"
    objective: ClassVar[str] = "oss"

    @property
    def T(self) -> int:
        return int(self.grid[-1])

    def schedule(self, K: int, strategy: str = "dp_ode_oss") -> Schedule:
        if K not in self.paths:
            raise ValueError(f"no {strategy} path for K = {K}: the DP ran for K in {sorted(self.paths)}")
        return Schedule(tuple(int(self.grid[i]) for i in self.paths[K][1:]), self.T, strategy)

    def save(self, path: str | Path) -> None:
        """Plain JSON (atomic): the grid, the paths and what they cost."""
        atomic_write_json(
            Path(path),
            {
                "what": "oss",
                "grid": self.grid.tolist(),
                "paths": {str(k): list(p) for k, p in self.paths.items()},
                "distance": {str(k): d for k, d in self.distance.items()},
                "passes": self.passes,
                "count": self.count,
                "propagate": self.propagate,
            },
        )

    @classmethod
    def load(cls, path: str | Path) -> "OssPaths":
        try:
            doc = json.loads(Path(path).read_text())
            return cls(
                torch.tensor(doc["grid"]),
                {int(k): tuple(p) for k, p in doc["paths"].items()},
                {int(k): float(d) for k, d in doc["distance"].items()},
                int(doc["passes"]),
                int(doc["count"]),
                str(doc["propagate"]),
            )
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path} is not a dp_ode_oss result ({type(e).__name__}: {e})") from None


States = dict[
    int, tuple[Tensor, "tuple[Tensor, int] | None"]
]  # grid index -> (x, the previous (x0_hat, grid index) for dpmpp)


@dataclass
class OssLevels:
    """The DP after ``done`` levels: its tables, every trajectory's states, the passes per trajectory and the
    trajectories."""

    back: Tensor
    value: Tensor
    states: States
    passes: int
    count: Tensor
    done: int = 0

    @classmethod
    def start(cls, N: int, levels: int, x_T: Tensor, trajectories: int) -> "OssLevels":
        back = torch.full((levels + 1, N + 1), -1, dtype=torch.long)
        value = torch.full((levels + 1, N + 1), math.inf, dtype=torch.float64)
        return cls(back, value, {N: (x_T, None)}, N, torch.tensor(float(trajectories)))

    def pack(self) -> dict:
        """Plain tensors and numbers for a partial file."""
        index = sorted(self.states)
        prev = [self.states[i][1] for i in index]
        two = bool(prev) and prev[0] is not None
        return {
            "back": self.back,
            "value": self.value,
            "passes": self.passes,
            "count": self.count,
            "index": torch.tensor(index, dtype=torch.long),
            "x": torch.stack([self.states[i][0].cpu() for i in index]) if index else torch.zeros(0),
            "prev_x0": torch.stack([q[0].cpu() for q in prev]) if two else None,
            "prev_index": torch.tensor([q[1] for q in prev], dtype=torch.long) if two else None,
        }

    @classmethod
    def unpack(cls, saved: dict, device: torch.device) -> "OssLevels":
        prev = saved["prev_x0"]
        states = {
            int(i): (
                saved["x"][n].to(device),
                None if prev is None else (prev[n].to(device), int(saved["prev_index"][n])),
            )
            for n, i in enumerate(saved["index"].tolist())
        }
        return cls(saved["back"], saved["value"], states, int(saved["passes"]), saved["count"], int(saved["done"]))


def resume_levels(saver: PartialSums, device: torch.device) -> OssLevels | None:
    """The saved levels of this configuration, if every process stands at the same level; else None (start afresh)."""
    saved = saver.load_state()
    try:
        levels = None if saved is None else OssLevels.unpack(saved, device)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
        log.warning("partial file %s is not a dp_ode_oss state (%s); starting afresh", saver.path, type(e).__name__)
        levels = None
    if not agreed(None if levels is None else levels.done):
        log.warning("the processes' partial dp_ode_oss levels differ; starting afresh")
        levels = None
    return levels
