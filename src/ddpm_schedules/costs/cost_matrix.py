"""Monte Carlo estimate of the cost matrix C[s, t] = E KL term (s, t), one forward pass per column.

Sums live in a torchmetrics Metric (float64 moments, merged across processes), so shards estimated by several
processes combine into the single-process matrix (equal up to float64 summation order and the network's rounding
of other batch sizes).
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import torch
from torch import Tensor

from ddpm_schedules.costs.grids import full_grid
from ddpm_schedules.costs.matrix import CostMatrix, CostMatrixMetric, check_objectives, from_moments
from ddpm_schedules.costs.moments import empty_moments
from ddpm_schedules.costs.options import EstimateOptions, estimate_options
from ddpm_schedules.costs.terms import pair_tables, pair_terms, prior_nats
from ddpm_schedules.models.diffusion import btil, c0, fixed_variance_kl
from ddpm_schedules.models.model import DiffusionModel, Prediction, call_groups
from ddpm_schedules.models.noise import example_noise, indexed_batches
from ddpm_schedules.storage.files import data_fingerprint, model_fingerprint
from ddpm_schedules.storage.progress import tqdm
from ddpm_schedules.storage.resume import resumable


def estimate_cost_matrix(
    model: DiffusionModel,
    data: Tensor | Iterable,
    grid: Sequence[int] | Tensor | None = None,
    *,
    objective: str = "elbo",
    options: EstimateOptions | None = None,
    **overrides: Any,
) -> CostMatrix:
    """Estimate C[s, t] of ``objective`` for every pair of ``[0] + grid`` on ``data`` (x_0 in [-1, 1]).

    ``options`` (`EstimateOptions`; ``overrides`` replace its fields: ``seed=``, ``batch_size=``, ...) say how it runs.
    Column t costs one forward pass per example, which serves every s < t on the grid:
    ``elbo`` is the KL term of the pair (Watson et al.; nats), ``mse`` the paper's reweighting
    (t - s) ||x_0 - x0_hat(x_t, t)||^2. Under torch.distributed each process passes its own shard (its
    ``start_index``), and the sums of all shards are combined into one matrix. With ``partial`` (a path: saved
    every 50 columns) the sums are saved as the columns are done, a rerun with the same model, data, grid, seed
    and batch size resumes from them, and SIGTERM saves and stops with `Preempted`. The file is removed once
    the matrix is complete. `estimate_cost_matrices` gives several objectives from the same passes.
    """
    return estimate_cost_matrices(model, data, [objective], grid, options=options, **overrides)[objective]


def estimate_cost_matrices(
    model: DiffusionModel,
    data: Tensor | Iterable,
    objectives: Sequence[str] = ("elbo",),
    grid: Sequence[int] | Tensor | None = None,
    *,
    options: EstimateOptions | None = None,
    **overrides: Any,
) -> dict[str, CostMatrix]:
    """`estimate_cost_matrix` of several data objectives (``elbo``, ``mse``) from one set of forward passes."""
    opts = estimate_options(options, **overrides)
    seed, batch_size = opts.seed, opts.batch_size
    if "ode" in objectives:
        raise ValueError(
            "the ode objective runs teacher trajectories from noise, not data: "
            "use ode.estimate_ode_matrix(model, trajectories)"
        )
    objectives = check_objectives(objectives, allowed=("elbo", "mse"))
    g = full_grid(grid, model.T)
    batches = indexed_batches(data, batch_size, model.levels, model.image_shape, opts.start_index, model.num_classes)
    shape = tuple(batches[0][1].shape[1:])
    device = model.device
    # analytic variance without a given Gamma: Gamma_t comes from the column's own passes, so the KL of s >= 1 is
    # filled in afterwards from the moments of ||x_0 - x0_hat||^2 (it is affine in it); the decoder does not need Gamma
    gamma_from_passes = "elbo" in objectives and model.var_type == "analytic" and model.gamma is None
    if "elbo" in objectives and model.var_type == "analytic" and not gamma_from_passes:
        model.gamma_at(g[1:])  # every grid t needs a given Gamma_t
    metric = CostMatrixMetric(g.numel(), len(objectives)).to(device)
    # batch_size shapes the network calls (columns per call): a resume replays the interrupted run's calls only with it
    config = {
        "what": "cost_matrix",
        "sums": "moments",
        "model": model_fingerprint(model),
        "data": data_fingerprint(batches),
        "grid": g.tolist(),
        "seed": seed,
        "batch_size": batch_size,
    }
    if objectives != ["elbo"]:
        config["objectives"] = objectives
    with resumable(model, metric, opts.partial_file(every=50), config) as (saver, done, stop_requested):
        bar = tqdm(desc="cost matrix", unit="col", disable=not opts.progress, initial=done, total=g.numel() - 1)
        for group in call_groups(range(done + 1, g.numel()), max(len(b.x0) for b in batches), batch_size):
            tables = (
                {j: pair_tables(model, int(g[j]), g[:1] if gamma_from_passes else g[:j], device) for j in group}
                if "elbo" in objectives
                else {}
            )
            for start, x0, y in batches:  # each column's updates in batch order, as one column at a time
                x0 = x0.to(device)
                x_ts = [
                    model.q_sample(x0, int(g[j]), example_noise(seed, start, x0.shape[0], int(g[j]), shape).to(device))
                    for j in group
                ]
                for j, x_t, pred in zip(
                    group, x_ts, model.predict_many(x_ts, [int(g[j]) for j in group], [y] * len(group))
                ):
                    t = int(g[j])
                    terms = [
                        elbo_terms(model, x0, x_t, t, g[:j], pred, tables[j], gamma_from_passes)
                        if name == "elbo"
                        else mse_terms(x0, pred.x0_hat, t, g[:j])
                        for name in objectives
                    ]
                    metric.update(
                        torch.stack(terms), j, prior_nats(model, x0) if j == 1 and "elbo" in objectives else None
                    )
                    if gamma_from_passes:
                        metric.update_columns(
                            j, ((x0.double() - pred.x0_hat) ** 2).flatten(1).sum(1), (pred.eps**2).flatten(1).mean(1)
                        )
            bar.update(len(group))
            saver.step(metric, group[-1], stop_requested(), units=len(group))
        bar.close()
    sums = metric.compute().cpu()
    moments, prior_moments = sums.moments, sums.prior_moments
    saver.remove()
    gamma = model.gamma if model.var_type == "analytic" else None
    if gamma_from_passes:
        k = objectives.index("elbo")
        moments[:, k], gamma = analytic_moments(model, g, moments[:, k], sums.column_moments, math.prod(shape))
    analytic = {"gamma": gamma, "betas": model.schedule.betas} if gamma is not None else {}
    none = empty_moments()
    return {
        name: from_moments(
            moments[:, k],
            prior_moments if name == "elbo" else none,
            g,
            math.prod(shape),
            name,
            **(analytic if name == "elbo" else {}),
        )
        for k, name in enumerate(objectives)
    }


def elbo_terms(
    model: DiffusionModel, x0: Tensor, x_t: Tensor, t: int, s: Tensor, pred: Prediction, tables, decoder_only: bool
) -> Tensor:
    """[B, S] ELBO terms of the pairs (s, t); with ``decoder_only`` only s = 0 is computed
    (the rest: zeros, filled later)."""
    if not decoder_only:
        return pair_terms(model, x0, x_t, t, s, pred, tables=tables)
    out = torch.zeros(x0.shape[0], s.numel(), dtype=torch.float64, device=x0.device)
    out[:, :1] = pair_terms(model, x0, x_t, t, s[:1], pred, tables=tables)
    return out


def analytic_moments(
    model: DiffusionModel, grid: Tensor, moments: Tensor, column_moments: Tensor, dims: int
) -> tuple[Tensor, Tensor]:
    """The KL moments of every pair s >= 1 under the analytic variance, and Gamma [T+1] (NaN off the grid).

    Gamma_t is the column's mean ||eps||^2 / D; with sigma2(s, t) then fixed, KL = a + b ||x_0 - x0_hat||^2
    (`diffusion.fixed_variance_kl`), so its mean is a + b mean and its M2 is b^2 M2 of the squared errors.
    """
    gamma = torch.full((model.T + 1,), math.nan, dtype=torch.float64)
    gamma[grid[1:]] = column_moments[1, 1, 1:]
    moments = moments.clone()
    ns = model.schedule
    for j in range(2, grid.numel()):
        t, s = int(grid[j]), grid[1:j]
        sigma2 = torch.exp(ns.analytic_log_variance(s, t, gamma[t]))
        a = fixed_variance_kl(
            torch.zeros(1, dtype=torch.float64), c0(ns.ab[s], ns.ab[t]), btil(ns.ab[s], ns.ab[t]), sigma2, dims
        )[0]
        b = c0(ns.ab[s], ns.ab[t]) ** 2 / (2 * sigma2)
        n, mean_sq, m2_sq = column_moments[:, 0, j]
        moments[0, 1:j, j], moments[1, 1:j, j], moments[2, 1:j, j] = n, a + b * mean_sq, b**2 * m2_sq
    return moments, gamma


def mse_terms(x0: Tensor, x0_hat: Tensor, t: int, s: Tensor) -> Tensor:
    """[B, S]: the paper's reweighted cost (t - s) ||x_0 - x0_hat(x_t, t)||^2, summed over dimensions."""
    sq_err = ((x0.double() - x0_hat.double()) ** 2).flatten(1).sum(1)
    return sq_err[:, None] * (t - s.to(x0.device, torch.float64))[None, :]
