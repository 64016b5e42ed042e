"""ScheduleMonitor: during training, the optimal schedules and their predicted bits/dim."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator, Sequence

import matplotlib.pyplot as plt
import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.utilities import rank_zero_warn
from pytorch_lightning.utilities.exceptions import SIGTERMException

from ddpm_schedules.costs.cost_matrix import estimate_cost_matrix
from ddpm_schedules.costs.grids import candidate_grid, full_grid
from ddpm_schedules.costs.matrix import OBJECTIVES, CostMatrix, check_objectives
from ddpm_schedules.costs.ode import estimate_ode_matrix
from ddpm_schedules.costs.options import EstimateOptions
from ddpm_schedules.models.conditioning import LabeledImages
from ddpm_schedules.models.noise import shard
from ddpm_schedules.reports.plots import figure_array, plot_cost_matrix, plot_schedules
from ddpm_schedules.schedules.dp_multistep import multistep_path_cost
from ddpm_schedules.schedules.schedule import Schedule, check_budgets
from ddpm_schedules.schedules.strategies import Strategy, build_schedules, parse_strategies
from ddpm_schedules.storage.errors import ParameterError, check_count
from ddpm_schedules.storage.files import atomic_write_json


class ScheduleMonitor(Callback):
    """Every ``every_n_validations`` validations: estimate the cost matrix on ``examples`` validation
    images on ``grid``, build the schedules of ``strategies`` for ``budgets`` and log their predicted bits/dim.

    Logged (through the LightningModule, so every logger gets them): ``schedules/<strategy>_bpd/K<K>``
    (baselines whose timesteps are all on the grid), ``schedules/full_bpd`` (the chain through every
    grid point) and ``schedules/dp_gap/K<K>``. W&B also gets the schedules as a table and the
    cost-matrix heatmap and schedules plot as images. Files in ``<run dir>/schedules/``:
    ``step_<global_step>.json`` (the same ``results`` entries as evaluate.py's results.json, without
    held-out numbers), the cost matrix ``cost_matrix_step_<global_step>.pt`` and the two figures. Bad arguments raise
    `ParameterError`s that name them (``grid``, ``budgets``, ...): train.py renames them to their config keys.

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
        strategies: Sequence[str] | None = None,
        objective: str = "elbo",
        var_type: str | None = None,
        seed: int = 0,
        batch_size: int = 64,
        out_dir: str | None = None,
        progress: bool = True,
    ):
        super().__init__()
        for name, value in (
            ("every_n_validations", every_n_validations),
            ("examples", examples),
            ("batch_size", batch_size),
        ):
            check_count(value, name)
        self.budgets = check_budgets(list(budgets), None)
        self.every_n_validations = every_n_validations
        self.examples, self.grid, self.seed, self.batch_size = examples, grid, seed, batch_size
        self.objective = check_objectives([objective], allowed=(*OBJECTIVES, "dpmpp"))[0]
        if var_type not in (None, "analytic"):
            raise ParameterError(
                "{var_type} = {value!r}; use null (the model's own variance) or analytic (Analytic-DPM)", value=var_type
            )
        self.var_type = var_type
        dp = "dp" if self.objective == "elbo" else f"dp_{self.objective}"
        self.strategy_names, self.strategies = list(strategies or (dp, "even", "quadratic")), list[Strategy]()
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
        """The candidate grid (`candidate_grid` of ``grid``) plus the timesteps of the baseline schedules, so
        that they can be priced on it (the DP, exact on any grid, may use them too)."""
        grid = candidate_grid(self.grid, T)
        if grid is None:
            return list(range(1, T + 1))
        stub = SimpleNamespace(T=T)  # baselines need only T
        extra = {
            t
            for s in self.strategies
            if s.objective is None
            for sch in s.build_all(stub, self.budgets)
            for t in sch.timesteps
        }
        return full_grid(sorted(set(grid) | extra), T)[1:].tolist()

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        T = pl_module.model.T
        self.strategies = parse_strategies(self.strategy_names, T, pl_module.model.schedule)
        other = [s.name for s in self.strategies if s.objective and s.objective != self.objective]
        if other:
            raise ParameterError(
                "{strategies} {other} need another matrix than the monitored objective {monitored!r}; "
                "set {objective} to theirs",
                other=other,
                monitored=self.objective,
            )
        grid = candidate_grid(self.grid, T)
        n = T if grid is None else len(set(grid))
        too_big = [k for k in self.budgets if k > n]
        if too_big:
            raise ParameterError(
                "{budgets} {too_big} exceed the {n} grid points; lower them or refine the grid", too_big=too_big, n=n
            )

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
        if model.num_classes is not None:  # the conditional ELBO: each validation image with its own label
            data = LabeledImages(data, trainer.datamodule.labels("val", self.examples))
        lo, hi = shard(len(data), trainer.global_rank, trainer.world_size)
        options = EstimateOptions(
            seed=self.seed,
            batch_size=self.batch_size,
            progress=self.progress and trainer.is_global_zero,
            start_index=lo,
        )
        grid = self.timesteps(model.T)
        if self.objective in ("ode", "dpmpp"):  # trajectories from noise: as many as the other objectives' examples
            cm = estimate_ode_matrix(model, hi - lo, grid, multistep=self.objective == "dpmpp", options=options)
        else:
            with variance_rule(model, self.var_type):
                cm = estimate_cost_matrix(model, data[lo:hi], grid, objective=self.objective, options=options)
        record = summarize(cm, self.budgets, trainer.global_step, self.strategies)
        record["var_type"] = self.var_type or model.var_type
        for key, value in record["metrics"].items():
            pl_module.log(key, value, rank_zero_only=True)
        if trainer.is_global_zero:
            self.write(trainer, cm, record)
        return record

    def run_dir(self, trainer: pl.Trainer) -> Path:
        return Path(self.out_dir) if self.out_dir else Path(trainer.default_root_dir) / "schedules"

    def write(self, trainer: pl.Trainer, cm: CostMatrix, record: dict[str, Any]) -> None:
        out = self.run_dir(trainer)
        step = record["global_step"]
        atomic_write_json(out / f"step_{step}.json", record)
        cm.save(out / f"cost_matrix_step_{step}.pt")
        schedules = [Schedule(tuple(r["schedule"]), cm.T, r["strategy"]) for r in record["results"]]
        grid = set(cm.grid.tolist())
        paths = [s for s in schedules if s.strategy == "dp" and s.K <= 64 and set(s.timesteps) <= grid]
        ab = trainer.lightning_module.model.schedule.ab
        figures = {"cost_matrix": plot_cost_matrix(cm, paths), "schedules": plot_schedules(schedules, ab)}
        for name, fig in figures.items():
            fig.savefig(out / f"{name}_step_{step}.png")
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                name = f"predicted_{record['unit']}"
                rows = [[r["strategy"], r["K"], r[name], list(r["schedule"])] for r in record["results"]]
                logger.log_table("schedules/table", columns=["strategy", "K", name, "timesteps"], data=rows, step=step)
                for name, fig in figures.items():
                    logger.log_image(f"schedules/{name}", images=[figure_array(fig)], step=step)
        for fig in figures.values():
            plt.close(fig)


@contextmanager
def variance_rule(model, var_type: str | None) -> Iterator[None]:
    """The model evaluated with ``var_type`` (analytic: Gamma from the estimate's own passes) inside,
    its own rule after."""
    if var_type is None:
        yield
        return
    saved = model.var_type, model.gamma
    model.use_variance(var_type)
    try:
        yield
    finally:
        model.var_type, model.gamma = saved


def summarize(
    cm: CostMatrix, budgets: Sequence[int], global_step: int = 0, strategies: Sequence[Strategy] | None = None
) -> dict[str, Any]:
    """The strategies' schedules that lie on the grid with their predicted cost, as results.json-shaped entries.

    The unit is bits/dim on the ELBO matrix (keys ``schedules/<strategy>_bpd/K<K>``) and the objective's
    own cost otherwise (``schedules/<strategy>_mse/K<K>``, ``..._ode``); the same keys for the full grid
    chain (``schedules/full_<unit>``) and the DP's gap to it (``schedules/<dp strategy>_gap/K<K>``).
    """
    elbo, multistep = cm.objective == "elbo", cm.two_step is not None
    objective = (
        "dpmpp" if multistep else cm.objective
    )  # an ode matrix with two-step costs prices DPM-Solver++(2M) paths
    dp = "dp" if elbo else f"dp_{objective}"
    strategies = strategies or parse_strategies([dp, "even", "quadratic"], cm.T)
    unit = "bpd" if elbo else objective
    if multistep:
        cost = lambda s: multistep_path_cost(cm, s.timesteps)  # noqa: E731
    else:
        cost = (lambda s: cm.bpd(cm.schedule_nats(s))) if elbo else cm.schedule_nats  # noqa: E731
    grid = set(cm.grid.tolist())
    schedules, skipped = [], []
    for sch in build_schedules(strategies, {objective: cm}, budgets):
        (schedules if set(sch.timesteps) <= grid else skipped).append(sch)
    if skipped:
        rank_zero_warn(
            f"ScheduleMonitor: {', '.join(f'{s.strategy} K={s.K}' for s in skipped)} "
            "not on the cost-matrix grid; use grid=null"
        )
    chain = Schedule(tuple(cm.grid[1:].tolist()), cm.T, "full" if len(grid) == cm.T + 1 else "grid")
    full = cost(chain)
    key = f"predicted_{unit}"
    results = [{"strategy": s.strategy, "K": s.K, "schedule": list(s.timesteps), key: cost(s)} for s in schedules]
    metrics = {f"schedules/{r['strategy']}_{unit}/K{r['K']}": r[key] for r in results}
    metrics[f"schedules/full_{unit}"] = full
    metrics.update({f"schedules/{dp}_gap/K{r['K']}": r[key] - full for r in results if r["strategy"] == dp})
    return {
        "global_step": int(global_step),
        "objective": objective,
        "unit": unit,
        "examples": cm.count,
        "grid_size": cm.grid.numel() - 1,
        "budgets": list(budgets),
        "full_chain": {"strategy": chain.strategy, "K": chain.K, key: full},
        "results": results,
        "metrics": metrics,
    }


class FinalCheckpoint(Callback):
    """Write ``last.ckpt`` at the final training step when no validation did, and on SIGTERM.

    Lightning's ModelCheckpoint saves after validations, and a run that stops at ``max_steps``
    between two of them would otherwise lose its last steps. On SIGTERM (SLURM's warning before
    pre-emption) Lightning stops between two batches; the state saved then resumes exactly. Keep it
    before `EMAWeightAveraging`: at train end that callback copies the averaged weights over the
    trained ones.
    """

    def __init__(self) -> None:
        super().__init__()
        self.saved_step = -1  # the global step of the latest checkpoint any callback saved

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self.saved_step = trainer.global_step

    def save_last(self, trainer: pl.Trainer) -> None:
        ckpt = trainer.checkpoint_callback
        if not isinstance(ckpt, ModelCheckpoint) or not ckpt.save_last or not ckpt.dirpath:
            return
        last = Path(ckpt.dirpath) / f"{ckpt.CHECKPOINT_NAME_LAST}{ckpt.FILE_EXTENSION}"
        if trainer.global_step > 0 and (self.saved_step != trainer.global_step or not last.is_file()):
            trainer.save_checkpoint(last)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.interrupted:
            self.save_last(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):
            self.save_last(trainer)
