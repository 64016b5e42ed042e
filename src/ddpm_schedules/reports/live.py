"""What a live run (W&B, CSV) shows while evaluate.py works: each stage's numbers as it ends, and how far a long
stage has got."""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from typing import Any, Iterator, Mapping, Sequence

import matplotlib.pyplot as plt
from pytorch_lightning.loggers import WandbLogger

from ddpm_schedules.reports.plots import figure_array
from ddpm_schedules.storage.progress import listening


class LiveLog:
    """One logger's live view of the stages: ``stage/<name>_seconds`` and the stage's numbers as it ends,
    ``progress/<bar>`` (0..1) during it. A logger of False logs nothing."""

    def __init__(self, logger: Any = None) -> None:
        self.logger = logger or None
        self.start = time.perf_counter()

    @property
    def wandb(self) -> bool:
        return isinstance(self.logger, WandbLogger)

    def metrics(self, values: Mapping[str, float]) -> None:
        if self.logger:
            finite = {k: float(v) for k, v in values.items() if v is not None and math.isfinite(float(v))}
            self.logger.log_metrics({**finite, "elapsed_seconds": time.perf_counter() - self.start})

    def stage(
        self,
        name: str,
        seconds: float,
        values: Mapping[str, float] | None = None,
        figures: Mapping[str, Any] | None = None,
        tables: Mapping[str, tuple[Sequence[str], list[list]]] | None = None,
        images: Mapping[str, Any] | None = None,
    ) -> None:
        """The end of a stage: its time and numbers, and (W&B) its figures (closed here), tables and images."""
        if not self.logger:
            for fig in (figures or {}).values():
                plt.close(fig)
            return
        self.metrics({f"stage/{name}_seconds": seconds, **(values or {})})
        if self.wandb:
            for key, fig in (figures or {}).items():
                self.logger.log_image(f"{name}/{key}", images=[figure_array(fig)])
            for key, (columns, rows) in (tables or {}).items():
                self.logger.log_table(f"{name}/{key}", columns=list(columns), data=rows)
            for key, image in (images or {}).items():
                self.logger.log_image(f"{name}/{key}", images=[image])
        for fig in (figures or {}).values():
            plt.close(fig)

    def progress(self, desc: str, n: float, total: float | None) -> None:
        if total:
            self.metrics({f"progress/{desc.replace(' ', '_')}": n / total})

    @contextmanager
    def watching(self) -> Iterator["LiveLog"]:
        """Log the progress bars' fractions while the block runs."""
        if not self.logger:
            yield self
            return
        with listening(self.progress):
            yield self
