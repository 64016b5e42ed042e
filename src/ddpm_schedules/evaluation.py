"""Held-out negative ELBO of many schedules at once: one forward pass per example per distinct timestep."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch
from torch import Tensor
from torchmetrics import Metric
from tqdm.auto import tqdm

from .batches import example_noise, indexed_batches
from .model import DiffusionModel
from .resume import PartialSums, data_fingerprint, model_fingerprint, sigterm_requests
from .schedules import Schedule


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
        return None if nats is None else nats / (self.dims * math.log(2))


class ScheduleTermsMetric(Metric):
    """Per-step sums of every schedule (flattened), per-example totals' first two moments, the prior."""

    full_state_update = False
    is_differentiable = False
    higher_is_better = False

    def __init__(self, n_steps: int, n_schedules: int, **kwargs):
        super().__init__(**kwargs)
        f64 = torch.float64
        self.add_state("step_total", torch.zeros(n_steps, dtype=f64), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros(n_schedules, dtype=f64), dist_reduce_fx="sum")
        self.add_state("total_sq", torch.zeros(n_schedules, dtype=f64), dist_reduce_fx="sum")
        self.add_state("prior_total", torch.zeros((), dtype=f64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=f64), dist_reduce_fx="sum")

    def update(self, step_terms: Tensor, totals: Tensor, prior: Tensor) -> None:
        """``step_terms`` [B, n_steps], ``totals`` [B, n_schedules] (prior included), ``prior`` [B]."""
        self.step_total += step_terms.sum(0)
        self.total += totals.sum(0)
        self.total_sq += (totals**2).sum(0)
        self.prior_total += prior.sum()
        self.count += prior.numel()

    def compute(self) -> dict[str, Tensor]:
        n = self.count
        mean = self.total / n
        var = ((self.total_sq - n * mean**2) / (n - 1)).clamp(min=0)
        return {"steps": self.step_total / n, "mean": mean, "sem": (var / n).sqrt(), "prior": self.prior_total / n, "count": n}


def evaluate_schedules(
    model: DiffusionModel,
    data: Tensor | Iterable,
    schedules: Sequence[Schedule],
    seed: int = 0,
    batch_size: int = 64,
    progress: bool = True,
    start_index: int = 0,
    partial: str | Path | None = None,
    save_every_batches: int = 10,
    save_every_seconds: float = 600.0,
) -> list[ScheduleResult]:
    """Negative ELBO in bits/dim of each schedule on ``data``, in the order given.

    The network runs once per example at each timestep in the union of the schedules; that pass
    gives the terms of every (s, t) pair any schedule takes at t. The noise for (example, t) is
    shared by all schedules (common random numbers make their differences precise).
    ``partial`` makes the sums resumable as in `estimate_cost_matrix` (the unit is a batch).
    """
    schedules = list(schedules)
    if not schedules:
        raise ValueError("no schedules to evaluate; pass at least one Schedule")
    for sch in schedules:
        if not isinstance(sch, Schedule):
            raise ValueError(f"expected Schedule objects, got {type(sch).__name__}; build them with even_schedule() etc.")
        if sch.T != model.T:
            raise ValueError(f"schedule {sch.strategy!r} (K={sch.K}) ends at T = {sch.T} but the model has T = {model.T}")
    # flat step index of every (schedule, step); and at each t the distinct s it needs
    offsets = [0]
    for sch in schedules:
        offsets.append(offsets[-1] + sch.K)
    needs: dict[int, dict[int, list[tuple[int, int]]]] = {}
    for k, sch in enumerate(schedules):
        for step, (s, t) in enumerate(sch.pairs()):
            needs.setdefault(t, {}).setdefault(s, []).append((k, offsets[k] + step))
    batches = indexed_batches(data, batch_size, model.levels, model.image_shape, start_index)
    shape = tuple(batches[0][1].shape[1:])
    dims = math.prod(shape)
    device = model.device
    metric = ScheduleTermsMetric(offsets[-1], len(schedules)).to(device)
    was_training = model.training
    model.eval()
    tables = {t: model.pair_tables(t, sorted(by_s), device) for t, by_s in needs.items()}
    saver = PartialSums(
        partial,
        {"what": "held_out", "model": model_fingerprint(model), "data": data_fingerprint(batches), "seed": seed,
         "schedules": [list(s.timesteps) for s in schedules]},
        save_every_batches,
        save_every_seconds,
    )  # fmt: skip
    done = saver.load(metric)
    bar = tqdm(total=len(batches) * len(needs), initial=done * len(needs), desc="held-out terms", unit="pass", disable=not progress)
    try:
        with torch.inference_mode(), sigterm_requests(enabled=partial is not None) as stop_requested:
            for b, (start, x0) in enumerate(batches):
                if b < done:
                    continue
                x0 = x0.to(device)
                prior = model.prior_nats(x0)
                step_terms = torch.zeros(x0.shape[0], offsets[-1], dtype=torch.float64, device=device)
                for t, by_s in sorted(needs.items()):
                    noise = example_noise(seed, start, x0.shape[0], t, shape).to(device)
                    x_t = model.q_sample(x0, t, noise)
                    s = tables[t].s
                    terms = model.pair_terms(x0, x_t, t, s, model.predict(x_t, t), tables=tables[t])
                    for col, s_val in enumerate(s.tolist()):
                        for _, flat in by_s[s_val]:
                            step_terms[:, flat] = terms[:, col]
                    bar.update()
                totals = torch.stack([step_terms[:, offsets[k] : offsets[k + 1]].sum(1) for k in range(len(schedules))], 1)
                metric.update(step_terms, totals + prior[:, None], prior)
                saver.step(metric, b + 1, stop_requested())
    finally:
        bar.close()
        model.train(was_training)
    out = {k: v.cpu().reshape(-1) for k, v in metric.compute().items()}  # torchmetrics squeezes 1-element results
    saver.remove()
    to_bpd = 1 / (dims * math.log(2))
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


INCEPTION_HINT = (
    "download torch-fidelity's FID Inception weights (pt_inception-2015-12-05-6726825d.pth, from the torch-fidelity "
    "GitHub releases) on a machine with internet access and pass fid.inception_weights=<path>"
)


def fid_feature_extractor(features: str, digits_weights: str | None = None, inception_weights: str | None = None):
    """The feature network for Fréchet distances, checked before any heavy work."""
    from .features import FEATURE_KINDS, load_digits_features

    if features == "digits":
        return load_digits_features(digits_weights or "")
    if features == "inception":
        if not inception_weights or not Path(inception_weights).is_file():
            raise ValueError(f"fid.inception_weights file {inception_weights!r} is missing; {INCEPTION_HINT}")
        import importlib.util

        if importlib.util.find_spec("torch_fidelity") is None:
            raise ValueError("fid.features=inception needs torch-fidelity: pip install 'ddpm-schedules[inception]'")
        return None
    raise ValueError(f"unknown fid.features {features!r}; use one of {FEATURE_KINDS}")


def frechet_distances(
    reference: Tensor,
    fakes: dict,
    features: str = "digits",
    digits_weights: str | None = None,
    inception_weights: str | None = None,
    antialias: bool = False,
    batch_size: int = 100,
    reference_cache: str | None = None,
) -> dict:
    """Fréchet distance of each set of samples (values in [-1, 1]) to ``reference``, with torchmetrics.

    ``features="inception"`` is FID proper (Inception-v3 pool3, uint8 RGB, ``antialias=False`` for
    numbers comparable with the literature); ``"digits"`` uses the digits classifier's features.
    Reference statistics are computed once and kept across the sets; with ``reference_cache`` (a
    file path) they are saved there and reused by later runs.
    """
    import os

    from torchmetrics.image.fid import FrechetInceptionDistance

    extractor = fid_feature_extractor(features, digits_weights, inception_weights)
    if extractor is not None:
        fid = FrechetInceptionDistance(feature=extractor, reset_real_features=False)
        prepare = lambda x: x.float()  # noqa: E731
    else:
        fid = FrechetInceptionDistance(feature=2048, reset_real_features=False, feature_extractor_weights_path=inception_weights, antialias=antialias)

        def prepare(x: Tensor) -> Tensor:
            x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
            return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x

    real_states = ("real_features_sum", "real_features_cov_sum", "real_features_num_samples")
    cache = Path(reference_cache) if reference_cache else None
    if cache is not None and cache.is_file():
        for name, value in torch.load(cache, weights_only=True).items():
            setattr(fid, name, value)
    else:
        for chunk in reference.split(batch_size):
            fid.update(prepare(chunk), real=True)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
            torch.save({name: getattr(fid, name) for name in real_states}, tmp)
            tmp.replace(cache)
    out = {}
    for key, samples in fakes.items():
        fid.reset()  # keeps the reference features (reset_real_features=False)
        for chunk in samples.split(batch_size):
            fid.update(prepare(chunk), real=False)
        out[key] = float(fid.compute())
    return out
