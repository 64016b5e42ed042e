"""ScheduleMonitor: during training, the optimal schedules and their predicted bits/dim."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.utilities import rank_zero_warn

from ..cost_matrix import CostMatrix, estimate_cost_matrix
from ..dp import optimal_schedules
from ..schedules import Schedule, even_schedule, quadratic_schedule


class ScheduleMonitor(Callback):
    """Every ``every_n_validations`` validations: estimate the cost matrix on ``examples`` validation
    images on ``grid``, run the DP for ``budgets`` and log what the schedules are predicted to cost.

    Logged (through the LightningModule, so every logger gets them): ``schedules/<strategy>_bpd/K<K>``
    for dp, even and quadratic (baselines whose timesteps are all on the grid), ``schedules/full_bpd``
    (the chain through every grid point) and ``schedules/dp_gap/K<K>``. W&B also gets the schedules as
    a table and the cost-matrix heatmap and schedules plot as images. Files in ``<run dir>/schedules/``:
    ``step_<global_step>.json`` (budgets, schedules, predicted bits/dim), the cost matrix
    ``cost_matrix_step_<global_step>.pt`` and the two figures.

    Under DDP each process estimates a contiguous shard of the examples; the torchmetrics sums make the
    matrix equal to a single-process one. Keep this callback before `EMAWeightAveraging` in the list so
    that it sees the averaged weights.
    """

    def __init__(
        self,
        budgets: Sequence[int] = (8, 16, 32, 64),
        every_n_validations: int = 1,
        examples: int = 64,
        grid: Sequence[int] | int | None = None,
        seed: int = 0,
        batch_size: int = 64,
        out_dir: str | None = None,
        progress: bool = True,
    ):
        super().__init__()
        if every_n_validations < 1:
            raise ValueError(f"every_n_validations must be >= 1, got {every_n_validations}")
        self.budgets = sorted({int(k) for k in budgets})
        if not self.budgets or self.budgets[0] < 1:
            raise ValueError(f"budgets must be positive integers, got {list(budgets)}")
        self.every_n_validations = every_n_validations
        self.examples, self.grid, self.seed, self.batch_size = examples, grid, seed, batch_size
        self.out_dir, self.progress = out_dir, progress
        self.validations = 0
        self.history: list[dict[str, Any]] = []

    # --- state (restored on resume) ------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"validations": self.validations, "history": self.history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.validations, self.history = state["validations"], list(state["history"])

    # --- hooks --------------------------------------------------------------------------------

    def timesteps(self, T: int) -> list[int]:
        """The candidate grid: every step, every ``grid``-th step (plus T), or an explicit list."""
        if self.grid is None:
            return list(range(1, T + 1))
        if isinstance(self.grid, int):
            return sorted(set(range(self.grid, T + 1, self.grid)) | {T})
        return sorted(int(t) for t in self.grid)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        n = len(self.timesteps(pl_module.model.T))
        too_big = [k for k in self.budgets if k > n]
        if too_big:
            raise ValueError(f"ScheduleMonitor budgets {too_big} exceed the {n} grid points; lower them or refine the grid")

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.validations += 1
        if (self.validations - 1) % self.every_n_validations:
            return
        record = self.monitor(trainer, pl_module)
        self.history.append(record)

    def monitor(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        model = pl_module.model
        data = trainer.datamodule.tensor("val", self.examples)
        lo = trainer.global_rank * len(data) // trainer.world_size
        hi = (trainer.global_rank + 1) * len(data) // trainer.world_size
        cm = estimate_cost_matrix(
            model,
            data[lo:hi],
            grid=self.timesteps(model.T),
            seed=self.seed,
            batch_size=self.batch_size,
            progress=self.progress and trainer.is_global_zero,
            start_index=lo,
        )
        record = summarize(cm, self.budgets, trainer.global_step)
        for key, value in record["metrics"].items():
            pl_module.log(key, value, rank_zero_only=True)
        if trainer.is_global_zero:
            self.write(trainer, cm, record)
        return record

    def run_dir(self, trainer: pl.Trainer) -> Path:
        return Path(self.out_dir) if self.out_dir else Path(trainer.default_root_dir) / "schedules"

    def write(self, trainer: pl.Trainer, cm: CostMatrix, record: dict[str, Any]) -> None:
        from ..report import plot_cost_matrix, plot_schedules

        out = self.run_dir(trainer)
        out.mkdir(parents=True, exist_ok=True)
        step = record["global_step"]
        tmp = out / f".step_{step}.json.tmp"
        tmp.write_text(json.dumps(record, indent=2))
        tmp.replace(out / f"step_{step}.json")
        cm.save(out / f"cost_matrix_step_{step}.pt")
        figures = {"cost_matrix": plot_cost_matrix(cm), "schedules": plot_schedules([Schedule.from_dict(s) for s in record["schedules"]])}
        for name, fig in figures.items():
            fig.savefig(out / f"{name}_step_{step}.png")
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                rows = [[s["strategy"], s["K"], record["predicted_bpd"][s["strategy"]].get(str(s["K"])), json.dumps(s["timesteps"])]
                        for s in record["schedules"]]  # fmt: skip
                logger.log_table("schedules/table", columns=["strategy", "K", "predicted_bpd", "timesteps"], data=rows, step=step)
                for name, fig in figures.items():
                    logger.log_image(f"schedules/{name}", images=[_to_array(fig)], step=step)
        import matplotlib.pyplot as plt

        for fig in figures.values():
            plt.close(fig)


def summarize(cm: CostMatrix, budgets: Sequence[int], global_step: int = 0) -> dict[str, Any]:
    """DP schedules for ``budgets``, the even and quadratic baselines that lie on the grid, and predicted bits/dim."""
    grid = set(cm.grid.tolist())
    dp = optimal_schedules(cm, budgets)
    schedules = list(dp.values())
    skipped = []
    for K in budgets:
        for base in (even_schedule(cm.T, K), quadratic_schedule(cm.T, K)):
            if set(base.timesteps) <= grid:
                schedules.append(base)
            else:
                skipped.append(f"{base.strategy} K={K}")
    if skipped:
        rank_zero_warn(f"ScheduleMonitor: {', '.join(skipped)} not on the cost-matrix grid; use grid=null for baselines")
    chain = Schedule(tuple(cm.grid[1:].tolist()), cm.T, "full" if len(grid) == cm.T + 1 else "grid")
    predicted: dict[str, dict[str, float]] = {}
    for sch in schedules:
        predicted.setdefault(sch.strategy, {})[str(sch.K)] = cm.bpd(cm.schedule_nats(sch))
    full = cm.bpd(cm.schedule_nats(chain))
    metrics = {f"schedules/{name}_bpd/K{k}": v for name, by_k in predicted.items() for k, v in by_k.items()}
    metrics["schedules/full_bpd"] = full
    metrics.update({f"schedules/dp_gap/K{k}": v - full for k, v in predicted["dp"].items()})
    return {
        "global_step": int(global_step),
        "examples": cm.count,
        "grid_size": cm.grid.numel() - 1,
        "budgets": list(budgets),
        "full_chain": {"strategy": chain.strategy, "K": chain.K, "predicted_bpd": full},
        "predicted_bpd": predicted,
        "schedules": [s.to_dict() for s in schedules],
        "metrics": metrics,
    }


def _to_array(fig) -> np.ndarray:
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


class FinalCheckpoint(Callback):
    """Write ``last.ckpt`` at the final training step when no validation did, and on SIGTERM.

    Lightning's ModelCheckpoint saves after validations, and a run that stops at ``max_steps``
    between two of them would otherwise lose its last steps. On SIGTERM (SLURM's warning before
    pre-emption) Lightning stops between two batches; the state saved then resumes exactly. Keep it
    before `EMAWeightAveraging`: at train end that callback copies the averaged weights over the
    trained ones.
    """

    def save_last(self, trainer: pl.Trainer) -> None:
        from pytorch_lightning.callbacks import ModelCheckpoint

        ckpt = trainer.checkpoint_callback
        if not isinstance(ckpt, ModelCheckpoint) or not ckpt.save_last or not ckpt.dirpath:
            return
        last = Path(ckpt.dirpath) / f"{ckpt.CHECKPOINT_NAME_LAST}{ckpt.FILE_EXTENSION}"
        if trainer.global_step > 0 and (ckpt._last_global_step_saved != trainer.global_step or not last.is_file()):
            trainer.save_checkpoint(last)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.interrupted:
            self.save_last(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        from pytorch_lightning.utilities.exceptions import SIGTERMException

        if isinstance(exception, SIGTERMException):
            self.save_last(trainer)
