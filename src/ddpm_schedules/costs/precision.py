"""Sample size by precision (``cost.target_sem``): add examples in rounds until every requested DP path is precise.

A fixed ``cost.examples`` is either wasteful or too few. Here the ELBO matrix is estimated on a first
round of examples, the DP runs, and the standard error of each DP path's predicted bits/dim is
measured: the per-example totals of the path's pairs, on the same examples and noise as the matrix,
so their mean is exactly the prediction. While any is above the target, another round (as many
examples again) is estimated and merged; the noise rule makes the rounds one estimate. With a partial file the
rounds resume after SIGKILL or SIGTERM: the merged matrix after each round, each round's columns as they are done.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

from torch import Tensor

from ddpm_schedules.costs.cost_matrix import estimate_cost_matrix
from ddpm_schedules.costs.evaluation import evaluate_schedules
from ddpm_schedules.costs.grids import full_grid
from ddpm_schedules.costs.matrix import CostMatrix
from ddpm_schedules.costs.options import EstimateOptions, estimate_options
from ddpm_schedules.models.conditioning import LabeledImages
from ddpm_schedules.models.model import DiffusionModel
from ddpm_schedules.schedules.dp import optimal_schedules
from ddpm_schedules.storage.errors import ParameterError
from ddpm_schedules.storage.files import data_fingerprint, model_fingerprint
from ddpm_schedules.storage.resume import PartialSums, agreed, sigterm_requests

log = logging.getLogger(__name__)


def check_target_sem(target_sem: Any) -> float:
    if isinstance(target_sem, bool) or not isinstance(target_sem, (int, float)) or not target_sem > 0:
        raise ParameterError(
            "{target_sem} = {value!r}; it must be a positive number of bits/dim (e.g. 0.01)", value=target_sem
        )
    return float(target_sem)


def estimate_to_precision(
    model: DiffusionModel,
    data: Tensor,
    budgets: Sequence[int],
    target_sem: float,
    grid: Sequence[int] | None = None,
    *,
    first: int = 64,
    start: CostMatrix | None = None,
    options: EstimateOptions | None = None,
    **overrides: Any,
) -> tuple[CostMatrix, list[dict[str, Any]]]:
    """The ELBO matrix on the fewest rounds of ``data`` (``first`` examples, then doubling) for which the standard
    error of every budget's DP path is at most ``target_sem`` bits/dim; all of ``data`` if none is enough.

    ``start``: a matrix of the first ``start.count`` examples of ``data`` (e.g. refinement's, on its grid), taken
    as the first round; later rounds are estimated on its grid.

    ``options``: `EstimateOptions` (or its fields as keywords). Every process passes all of ``data``, and each
    round's examples are shared among the processes by ``procs``.

    With ``partial`` (a `PartialFile`, or a path: rounds' columns saved every 50) the merged matrix and the records
    are saved after each round, and each round's estimate keeps its own partial sums (``<partial>.round<r>``); a
    rerun of the same configuration resumes from the last finished round and within the current one, SIGTERM
    saves and stops with `Preempted`, and the files are removed once the target is met or the data is used up.

    Returns the matrix and one record per round: examples used, each budget's predicted bits/dim and its error,
    and whether the target was met (the last record's ``met`` is False when all of ``data`` was not enough).
    """
    opts = estimate_options(options, **overrides)
    seed, batch_size, procs = opts.seed, opts.batch_size, opts.procs
    target_sem = check_target_sem(target_sem)
    partial = opts.partial_file(every=50)
    g = full_grid(start.grid[1:] if start is not None else grid, model.T)
    started = None if start is None else hashlib.sha256(start.moments.cpu().numpy().tobytes()).hexdigest()
    config = (
        {
            "what": "precision",
            "model": model_fingerprint(model),
            "data": data_fingerprint([(0, data.images, data.labels) if isinstance(data, LabeledImages) else (0, data)]),
            "grid": g.tolist(),
            "seed": seed,
            "target_sem": target_sem,
            "first": first,
            "budgets": [int(K) for K in budgets],
            "batch_size": batch_size,
            "world": procs.world,
            "start": started,
        }
        if partial
        else {}
    )
    saver = PartialSums(partial.path if partial else None, config)
    cm, rounds, used = start, [], 0 if start is None else start.count
    saved = saver.load_state() if partial else None
    if not agreed(None if saved is None else (saved["used"], len(saved["rounds"]))):
        log.warning("the processes' partial precision rounds stand at different rounds; starting afresh")
        saved = None
    if saved is not None:
        cm, rounds, used = CostMatrix(**saved["matrix"]), list(saved["rounds"]), int(saved["used"])
        log.info("resuming the precision rounds from %s: %d examples done", saver.path, used)
    if cm is None:
        size = min(max(1, first), len(data))
    else:  # a round's examples after the last measured one (none when the last merged round is not measured yet)
        size = min(used, len(data) - used) if rounds and rounds[-1]["examples"] == used else 0
    with sigterm_requests(enabled=partial is not None) as stop_requested:
        while True:
            if size:
                lo, hi = procs.shard(size)
                within = None if partial is None else replace(partial, path=_round_file(partial.path, len(rounds)))
                part = estimate_cost_matrix(
                    model,
                    data[used + lo : used + hi],
                    g[1:],
                    options=replace(opts, start_index=used + lo, partial=within),
                )
                cm = part if cm is None else cm.merged(part)
                used += size
                _save(saver, cm, rounds, used, stop_requested())  # the round's passes are done: never redo them
            paths = optimal_schedules(cm, budgets)
            lo, hi = procs.shard(used)
            results = evaluate_schedules(
                model,
                data[lo:hi],
                list(paths.values()),
                options=replace(opts, progress=False, start_index=lo, partial=None),
            )
            sems = {
                int(K): r.bpd_sem for K, r in zip(paths, results)
            }  # int keys: the partial file holds plain values only
            met = max(sems.values()) <= target_sem
            rounds.append(
                {
                    "examples": used,
                    "predicted_bpd": {int(K): r.bpd for K, r in zip(paths, results)},
                    "sem_bpd": sems,
                    "met": met,
                }
            )
            if met or used >= len(data):
                saver.remove()
                return cm, rounds
            size = min(used, len(data) - used)
            _save(saver, cm, rounds, used, stop_requested())


def _save(saver: PartialSums, cm: CostMatrix, rounds: list[dict[str, Any]], used: int, stop_requested: bool) -> None:
    """The merged matrix and the records so far, on disk; on a stop request, then `Preempted`."""
    saver.tick(
        lambda: saver.save_state({"matrix": cm.__dict__, "rounds": rounds, "used": used}, used),
        used,
        stop_requested,
        force=True,
    )


def _round_file(path: str | Path, index: int) -> Path:
    """Round ``index``'s partial sums beside ``path``: ``x.partial.pt`` -> ``x.partial.round<index>.pt``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.round{index}{path.suffix}")
