"""One table across a Hydra multirun: `python -m ddpm_schedules.app.sweep multirun/evaluate/<date>_<time>`.

Reads every job's results.json (a train sweep: the schedule monitor's last schedules/step_<step>.json), groups the
jobs by the overrides that differ, averages over the seed overrides, and writes sweep.md, sweep.json and the plots
into the sweep dir; ``--wandb`` (the default) also logs one summary run (offline unless WANDB_MODE or WANDB_API_KEY
says otherwise) under ``<sweep dir>/wandb``. A bad input ends in one line naming the value and the fix.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

import matplotlib.pyplot as plt

from ddpm_schedules.app.build import configure_wandb_mode
from ddpm_schedules.reports.sweep import SweepResult, aggregate, figures, group_label, sweep_markdown
from ddpm_schedules.storage.files import atomic_write_json, atomic_write_text

# the W&B table's columns after the group label and one column per grouping key, and their types
COLUMNS = {"strategy": str, "K": int, "metric": str, "sampler": str, "guidance": float, "mean": float, "sem": float}
COLUMNS |= {"n": int, "sem_source": str, "best": bool, "tie": bool}


def write_sweep(result: SweepResult) -> dict[str, Path]:
    """sweep.md, sweep.json and the plots into the sweep dir; the plots' files by name."""
    atomic_write_text(result.sweep_dir / "sweep.md", sweep_markdown(result))
    atomic_write_json(result.sweep_dir / "sweep.json", result.to_json())
    paths = {}
    for name, fig in figures(result).items():
        paths[name] = result.sweep_dir / f"{name}.png"
        fig.savefig(paths[name], bbox_inches="tight")  # "tight": the legend outside the axes stays in the file
        plt.close(fig)
    return paths


def log_wandb(result: SweepResult, plots: dict[str, Path], project: str) -> None:
    """One W&B run for the whole sweep: its description as config, the records as a table, the plots as images."""
    configure_wandb_mode()
    import wandb  # only a run that logs pays for the import

    name = result.sweep_dir.resolve().name
    run = wandb.init(
        project=project, dir=str(result.sweep_dir), job_type="sweep", name=name, group=name, config=result.config()
    )
    exit_code = 1  # a log that fails still closes the run, marked failed, with its files complete on disk
    try:
        columns = ["group", *result.grouping, *COLUMNS]
        data = [
            [group_label(r.group), *(r.group[k] for k in result.grouping), *(getattr(r, c) for c in COLUMNS)]
            for r in result.records
        ]
        table = wandb.Table(
            columns=columns, data=data, dtype=[str] * (1 + len(result.grouping)) + list(COLUMNS.values())
        )
        run.log({"sweep": table, **{f"plots/{k}": wandb.Image(str(p)) for k, p in plots.items()}})
        run.summary.update({"jobs": len(result.jobs), "missing_jobs": len(result.missing)})
        exit_code = 0
    finally:
        wandb.finish(exit_code=exit_code)


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; 0 on success, 2 on a bad input (one line on stderr)."""
    parser = argparse.ArgumentParser(prog="python -m ddpm_schedules.app.sweep", description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path, help="a Hydra multirun folder (multirun/evaluate/<date>_<time>)")
    parser.add_argument(
        "--wandb",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="log one summary W&B run (offline unless WANDB_MODE or WANDB_API_KEY says otherwise)",
    )
    parser.add_argument("--project", default="ddpm-schedules", help="the W&B project (conf/logger/wandb.yaml's)")
    args = parser.parse_args(argv)
    try:
        result = aggregate(args.sweep_dir)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    plots = write_sweep(result)
    print(sweep_markdown(result))
    print(f"wrote into {args.sweep_dir}: " + ", ".join(["sweep.md", "sweep.json", *(p.name for p in plots.values())]))
    if args.wandb:
        log_wandb(result, plots, args.project)
    return 0


if __name__ == "__main__":
    sys.exit(main())
