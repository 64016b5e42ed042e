"""Held-out negative ELBO of many schedules at once: one forward pass per example per distinct timestep."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
from torch import Tensor
from torchmetrics import Metric

from ddpm_schedules.costs.moments import batch_moments, empty_moments, mean_sem, merge_moments
from ddpm_schedules.costs.options import EstimateOptions, estimate_options
from ddpm_schedules.costs.terms import pair_tables, pair_terms, prior_nats
from ddpm_schedules.models.diffusion import nats_to_bpd
from ddpm_schedules.models.model import DiffusionModel, call_groups
from ddpm_schedules.models.noise import example_noise, indexed_batches
from ddpm_schedules.schedules.schedule import Schedule
from ddpm_schedules.storage.files import data_fingerprint, model_fingerprint
from ddpm_schedules.storage.progress import tqdm
from ddpm_schedules.storage.resume import resumable


@dataclass
class ScheduleResult:
    """Bits/dim of one schedule on held-out data (mean over examples, with its standard error)."""

    schedule: Schedule
    bpd: float
    bpd_sem: float
    terms_bpd: list[float]  # mean term of each step, tau_1 (the decoder) first
    prior_bpd: float
    count: int  # examples
    dims: int  # D = C * H * W

    @property
    def predicted_bpd(self) -> float | None:
        """What the cost matrix predicted for a DP schedule (None for other schedules)."""
        nats = self.schedule.predicted_nats
        return None if nats is None else nats_to_bpd(nats, self.dims)


class ScheduleTermsMetric(Metric):
    """Per-step sums of every schedule (flattened), the moments of each schedule's per-example totals, the prior."""

    full_state_update = False
    is_differentiable = False
    higher_is_better = False

    def __init__(self, n_steps: int, n_schedules: int, **kwargs):
        super().__init__(**kwargs)
        f64 = torch.float64
        self.add_state("step_total", torch.zeros(n_steps, dtype=f64), dist_reduce_fx="sum")
        self.add_state("moments", empty_moments(n_schedules), dist_reduce_fx=merge_moments)
        self.add_state("prior_total", torch.zeros((), dtype=f64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=f64), dist_reduce_fx="sum")

    def update(self, step_terms: Tensor, totals: Tensor, prior: Tensor) -> None:
        """``step_terms`` [B, n_steps], ``totals`` [B, n_schedules] (prior included), ``prior`` [B]."""
        self.step_total += step_terms.sum(0)
        self.moments = merge_moments(torch.stack([self.moments, batch_moments(totals)]))
        self.prior_total += prior.sum()
        self.count += prior.numel()

    def compute(self) -> dict[str, Tensor]:
        n = self.count
        mean, sem = mean_sem(self.moments)
        return {"steps": self.step_total / n, "mean": mean, "sem": sem, "prior": self.prior_total / n, "count": n}


def evaluate_schedules(
    model: DiffusionModel,
    data: Tensor | Iterable,
    schedules: Sequence[Schedule],
    *,
    options: EstimateOptions | None = None,
    **overrides: Any,
) -> list[ScheduleResult]:
    """Negative ELBO in bits/dim of each schedule on ``data``, in the order given.

    The network runs once per example at each timestep in the union of the schedules; that pass
    gives the terms of every (s, t) pair any schedule takes at t. The noise for (example, t) is
    shared by all schedules (common random numbers make their differences precise).
    ``options``: `EstimateOptions` (or its fields as keywords); ``partial`` makes the sums resumable as in
    `estimate_cost_matrix` (the unit is a batch; a bare path saves every 10 batches). ``batch_size`` is the
    examples per network call: a smaller batch of data shares its calls between several timesteps.
    """
    opts = estimate_options(options, **overrides)
    seed, batch_size = opts.seed, opts.batch_size
    schedules = list(schedules)
    if not schedules:
        raise ValueError("no schedules to evaluate; pass at least one Schedule")
    for sch in schedules:
        if not isinstance(sch, Schedule):
            raise ValueError(
                f"expected Schedule objects, got {type(sch).__name__}; build them with even_schedule() etc."
            )
        if sch.T != model.T:
            raise ValueError(
                f"schedule {sch.strategy!r} (K={sch.K}) ends at T = {sch.T} but the model has T = {model.T}"
            )
    # flat step index of every (schedule, step); and at each t the distinct s it needs
    offsets = [0]
    for sch in schedules:
        offsets.append(offsets[-1] + sch.K)
    needs: dict[int, dict[int, list[tuple[int, int]]]] = {}
    for k, sch in enumerate(schedules):
        for step, (s, t) in enumerate(sch.pairs()):
            needs.setdefault(t, {}).setdefault(s, []).append((k, offsets[k] + step))
    batches = indexed_batches(data, batch_size, model.levels, model.image_shape, opts.start_index, model.num_classes)
    shape = tuple(batches[0][1].shape[1:])
    dims = math.prod(shape)
    device = model.device
    metric = ScheduleTermsMetric(offsets[-1], len(schedules)).to(device)
    tables = {t: pair_tables(model, t, sorted(by_s), device) for t, by_s in needs.items()}
    config = {
        "what": "held_out",
        "sums": "moments",
        "model": model_fingerprint(model),
        "data": data_fingerprint(batches),
        "seed": seed,
        "schedules": [list(s.timesteps) for s in schedules],
        "batch_size": batch_size,
    }
    with (
        resumable(model, metric, opts.partial_file(every=10), config) as (saver, done, stop_requested),
        tqdm(
            total=len(batches) * len(needs),
            initial=done * len(needs),
            desc="held-out terms",
            unit="pass",
            disable=not opts.progress,
        ) as bar,
    ):
        for b, (start, x0, y) in enumerate(batches[done:], start=done):
            x0 = x0.to(device)
            prior = prior_nats(model, x0)
            step_terms = torch.zeros(x0.shape[0], offsets[-1], dtype=torch.float64, device=device)
            for group in call_groups(sorted(needs), x0.shape[0], batch_size):  # several timesteps per network call
                x_ts = [
                    model.q_sample(x0, t, example_noise(seed, start, x0.shape[0], t, shape).to(device)) for t in group
                ]
                for t, x_t, pred in zip(group, x_ts, model.predict_many(x_ts, group, [y] * len(group))):
                    terms = pair_terms(model, x0, x_t, t, tables[t].s, pred, tables=tables[t])
                    for col, s_val in enumerate(tables[t].s.tolist()):
                        for _, flat in needs[t][s_val]:
                            step_terms[:, flat] = terms[:, col]
                bar.update(len(group))
            totals = torch.stack([step_terms[:, offsets[k] : offsets[k + 1]].sum(1) for k in range(len(schedules))], 1)
            metric.update(step_terms, totals + prior[:, None], prior)
            saver.step(metric, b + 1, stop_requested())
    out = {k: v.cpu().reshape(-1) for k, v in metric.compute().items()}  # torchmetrics squeezes 1-element results
    saver.remove()
    to_bpd = nats_to_bpd(1.0, dims)
    return [
        ScheduleResult(
            schedule=sch,
            bpd=float(out["mean"][k]) * to_bpd,
            bpd_sem=float(out["sem"][k]) * to_bpd,
            terms_bpd=(out["steps"][offsets[k] : offsets[k + 1]] * to_bpd).tolist(),
            prior_bpd=float(out["prior"][0]) * to_bpd,
            count=int(out["count"][0]),
            dims=dims,
        )
        for k, sch in enumerate(schedules)
    ]
