"""DiffusionModel: a network ``net(x, timesteps)`` plus the conventions that turn its output into x0_hat
and the variance of p(x_s | x_t) for any pair. The pair tables are in models/pairs.py, the terms in costs/terms.py,
the samplers in sampling/."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import torch
from torch import Tensor, nn

from ddpm_schedules.models import diffusion as dm
from ddpm_schedules.models.conditioning import check_guidance, check_labels, guided_output
from ddpm_schedules.models.diffusion import NoiseSchedule, VarType
from ddpm_schedules.storage.errors import ParameterError

MeanType = Literal["eps", "x0", "v"]
MEAN_TYPES = ("eps", "x0", "v")
AUTOCAST = {"32": torch.float32, "bf16": torch.bfloat16, "16": torch.float16}  # the network pass only (``precision``)


@dataclass
class Prediction:
    """What one forward pass at t says about x_0, in float64."""

    x0_hat: Tensor  # [B, C, H, W], clipped to [-1, 1] when clip_denoised
    frac: Tensor | None  # learned_range: f = (v + 1) / 2 per dimension, else None
    eps: Tensor | None = None  # the network's eps (from the unclipped x0_hat): Gamma_t = E||eps||^2 / D (analytic)


class DiffusionModel(nn.Module):
    """A denoising network with its conventions made explicit in one place.

    - ``mean_type``: what the network predicts: ``eps``, ``x0`` or ``v``.
    - ``var_type``: ``fixed_small`` (btil), ``fixed_large`` (beta), ``learned_range`` (the second
      half of the output channels interpolates log-variances, Nichol & Dhariwal eq. 15) or ``analytic``
      (Analytic-DPM: a per-pair variance from Gamma_t = E||eps||^2 / D; `use_variance`).
    - ``learn_sigma``: whether the network outputs the variance channels (its layout, whatever rule is used).
    - ``rescale_timesteps``: the network sees (t - 1) * 1000 / T instead of the index t - 1.
    - ``clip_denoised``: x0_hat is clipped to [-1, 1] before it forms a mean.
    - ``levels``: the number of values per dimension of the data (256 for 8-bit images).
    - ``precision``: ``"32"``, ``"bf16"`` or ``"16"``: autocast around the network pass only; everything
      after it (x0_hat, variances, terms) is float64 whatever the network computed in.
    - ``num_classes``: a class-conditional network ``net(x, timesteps, y)`` with labels 0..num_classes-1;
      ``null_class``: the label it was trained to read as "no label" (label dropout), which guidance needs.
      ``guidance``: the classifier-free guidance scale s of every prediction (`set_guidance`; 1: none).
      models/conditioning.py states the conventions.
    """

    def __init__(
        self,
        net: nn.Module | Callable[[Tensor, Tensor], Tensor],
        schedule: NoiseSchedule,
        *,
        mean_type: MeanType = "eps",
        var_type: VarType = "fixed_large",
        rescale_timesteps: bool = False,
        clip_denoised: bool = True,
        levels: int = 256,
        image_shape: Sequence[int] | None = None,
        learn_sigma: bool | None = None,
        num_classes: int | None = None,
        null_class: int | None = None,
    ):
        super().__init__()
        if mean_type not in MEAN_TYPES:
            raise ValueError(f"unknown mean_type {mean_type!r}; use one of {MEAN_TYPES}")
        if var_type not in dm.VAR_TYPES:
            raise ValueError(f"unknown var_type {var_type!r}; use one of {dm.VAR_TYPES}")
        if not isinstance(levels, int) or levels < 2:
            raise ValueError(f"levels must be an integer >= 2, got {levels!r} (256 for 8-bit data)")
        self.net = net
        self.schedule = schedule
        self.mean_type = mean_type
        self.var_type = var_type
        self.learn_sigma = var_type == "learned_range" if learn_sigma is None else bool(learn_sigma)
        self.trained_var_type = var_type  # what the checkpoint's own rule is; var_type may be overridden
        self.gamma: Tensor | None = None  # [T+1] float64, NaN where unknown: Gamma_t of the analytic rule
        self.rescale_timesteps = rescale_timesteps
        self.clip_denoised = clip_denoised
        self.levels = levels
        self.image_shape = tuple(image_shape) if image_shape is not None else None
        self.precision = "32"
        if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
            raise ValueError(f"num_classes must be a positive integer or None, got {num_classes!r}")
        if null_class is not None and (num_classes is None or not 0 <= null_class <= num_classes):
            raise ValueError(f"null_class = {null_class!r} needs a conditional model, 0 <= null_class <= num_classes")
        self.num_classes, self.null_class = num_classes, null_class
        self.guidance = 1.0
        self.timestep_input = "continuous"  # "index": a lookup embedding, which refuses fractional timesteps

    def set_guidance(self, scale: float) -> "DiffusionModel":
        """Classifier-free guidance scale s of every prediction from now on (1: the conditional model unguided)."""
        self.guidance = check_guidance(scale, self.num_classes, self.null_class)
        return self

    def set_precision(self, precision: str | int) -> "DiffusionModel":
        """The network pass's precision: 32, bf16 or 16 (autocast; the terms stay float64)."""
        if str(precision) not in AUTOCAST:
            raise ParameterError(
                "{precision} = {value!r}; use 32, bf16 or 16 (autocast around the network pass)", value=precision
            )
        self.precision = str(precision)
        return self

    def use_variance(self, var_type: VarType, gamma: Tensor | None = None) -> "DiffusionModel":
        """Evaluate with another reverse-variance rule than the checkpoint's (e.g. ``analytic``); the
        network's output layout stays. ``gamma`` [T+1] (NaN where unknown) for analytic, else estimated
        by the cost matrix from its own forward passes."""
        if var_type not in dm.VAR_TYPES:
            raise ValueError(
                f"var_type = {var_type!r}; use one of {dm.VAR_TYPES} (or null for the checkpoint's own rule)"
            )
        if var_type == "learned_range" and not self.learn_sigma:
            raise ValueError(
                "var_type = 'learned_range' needs a network that outputs variance channels (learn_sigma); this one "
                "does not"
            )
        self.var_type = var_type
        self.gamma = None if gamma is None else dm.check_gamma(gamma, self.T)
        return self

    def gamma_at(self, t: int | Tensor) -> Tensor:
        """Gamma_t of the analytic rule at t (a scalar or [B]); a clear error where it was not estimated."""
        if self.gamma is None:
            raise ParameterError(
                "var_type = 'analytic' needs Gamma_t = E||eps||^2 / D: estimate a cost matrix first "
                "or pass {gamma_file}"
            )
        g = self.gamma[torch.as_tensor(t).cpu()]
        if torch.isnan(g).any():
            missing = torch.as_tensor(t).reshape(-1)[torch.isnan(g.reshape(-1))][0].item()
            raise ParameterError(
                "Gamma_t is not known at t = {t} (estimated on other timesteps); use {grid}=null or a "
                "{gamma_file} that has it",
                t=missing,
            )
        return g

    def compile_network(self, enabled: bool = True) -> "DiffusionModel":
        """``torch.compile`` the network in place (state-dict keys unchanged): fused kernels, a one-off compile cost."""
        if enabled:
            self.net.compile()
        return self

    @property
    def T(self) -> int:
        return self.schedule.T

    @property
    def device(self) -> torch.device:
        return next(self.parameters(), torch.empty(0)).device

    @property
    def input_dtype(self) -> torch.dtype:
        p = next(self.parameters(), None)
        return p.dtype if p is not None and p.is_floating_point() else torch.float32

    def extra_repr(self) -> str:
        return (
            (
                f"T={self.T}, mean_type={self.mean_type}, var_type={self.var_type}, "
                f"rescale_timesteps={self.rescale_timesteps}, clip_denoised={self.clip_denoised}, levels={self.levels}"
            )
            + (f", precision={self.precision}" if self.precision != "32" else "")
            + (  # in cache keys: 32 keeps the old ones
                f", learn_sigma={self.learn_sigma}" if self.learn_sigma != (self.var_type == "learned_range") else ""
            )
            + (f", num_classes={self.num_classes}, null_class={self.null_class}" if self.num_classes else "")
            + (f", guidance={self.guidance}" if self.guidance != 1 else "")
        )

    def net_timesteps(self, t: Tensor) -> Tensor:
        """Paper t (1..T) -> what the network sees: the 0-based index, optionally scaled to 0..1000."""
        idx = t - 1
        return idx.float() * (1000.0 / self.T) if self.rescale_timesteps else idx

    def q_sample(self, x0: Tensor, t: int | Tensor, noise: Tensor) -> Tensor:
        """x_t = sqrt(ab_t) x_0 + sqrt(1 - ab_t) noise, formed in float64."""
        ab_t = self._ab(t, x0)
        return ab_t.sqrt() * x0.double() + (1 - ab_t).sqrt() * noise.double()

    def predict(self, x_t: Tensor, t: int | Tensor, y: Tensor | None = None) -> Prediction:
        """One forward pass at t: x0_hat (and the variance fraction for learned_range); ``y``: the examples' labels
        (class-conditional models), guided by ``guidance`` (one call of twice the batch: with y and with null)."""
        t_vec = self._t_vec(t, x_t)
        return self.prediction(x_t, t_vec, self._forward(x_t, t_vec, self.net_timesteps(t_vec), y))

    def _forward(self, x_t: Tensor, t_vec: Tensor, t_net: Tensor, y: Tensor | None) -> Tensor:
        """The raw network output at network timesteps ``t_net`` (``t_vec``: the examples' t, for errors), guided."""
        y = check_labels(y, x_t.shape[0], self.num_classes)
        guided = y is not None and self.guidance != 1
        if guided:
            x_in, y = torch.cat([x_t, x_t]), torch.cat([y, torch.full_like(y, self.null_class)])
        else:
            x_in = x_t
        with torch.autocast(self.device.type, dtype=AUTOCAST[self.precision], enabled=self.precision != "32"):
            args = (x_in.to(self.input_dtype), torch.cat([t_net, t_net]) if guided else t_net)
            out = self.net(*args) if y is None else self.net(*args, y.to(x_t.device))  # read in float64 by `prediction`
        if guided:
            out = guided_output(*out.double().chunk(2), self.guidance, x_t.shape[1])
        if not torch.isfinite(out).all():
            bad = t_vec[
                ~torch.isfinite(out).flatten(1).all(1)
            ]  # the examples' own t when several timesteps share the call
            raise ValueError(
                f"the network produced NaN or Inf at t = {_describe(bad)}; check the checkpoint, its flags and the "
                "input scaling"
            )
        return out

    def predict_many(
        self, x_ts: Sequence[Tensor], ts: Sequence[int], ys: Sequence[Tensor | None] | None = None
    ) -> list[Prediction]:
        """`predict` of several (x_t, t) (with labels ``ys``) in one network call. Examples do not interact in the
        network, so each part equals its own call's up to float rounding; one large call keeps a CPU's cores busier
        than several small ones on small images."""
        ys = [None] * len(x_ts) if ys is None else list(ys)
        if len(x_ts) == 1:
            return [self.predict(x_ts[0], ts[0], ys[0])]
        sizes = [x.shape[0] for x in x_ts]
        t_vec = torch.cat([torch.full((n,), int(t), dtype=torch.long) for n, t in zip(sizes, ts)])
        y = None if ys[0] is None else torch.cat(list(ys))
        pred = self.predict(torch.cat(list(x_ts)), t_vec.to(x_ts[0].device), y)
        parts = [v.split(sizes) if v is not None else [None] * len(sizes) for v in (pred.x0_hat, pred.frac, pred.eps)]
        return [Prediction(*p) for p in zip(*parts)]

    def split_output(self, out: Tensor, channels: int) -> tuple[Tensor, Tensor | None]:
        """Raw network output -> (mean part, raw variance part v or None)."""
        want = 2 * channels if self.learn_sigma else channels
        if out.shape[1] != want:
            raise ValueError(
                f"the network returned {out.shape[1]} channels for {channels}-channel input; "
                f"var_type={self.var_type!r} needs {want} (learn_sigma / var_type mismatch?)"
            )
        if not self.learn_sigma:
            return out, None
        return out[:, :channels], out[:, channels:] if self.var_type == "learned_range" else None

    def prediction(self, x_t: Tensor, t: int | Tensor, out: Tensor, clip: bool | None = None) -> Prediction:
        """Interpret a raw network output at t by the model's conventions, in float64.

        ``clip`` overrides ``clip_denoised`` (training losses do not clip, as improved-diffusion).
        """
        return self._interpret(x_t, self._ab(self._t_vec(t, x_t), x_t), out, clip)

    def _interpret(self, x_t: Tensor, ab_t: Tensor, out: Tensor, clip: bool | None = None) -> Prediction:
        """`prediction` with alpha_bar given ([B, 1, ...]: integer or continuous t)."""
        mean_out, v = self.split_output(out.double(), x_t.shape[1])
        x_t = x_t.double()
        if self.mean_type == "eps":
            x0_hat = (x_t - (1 - ab_t).sqrt() * mean_out) / ab_t.sqrt()
        elif self.mean_type == "x0":
            x0_hat = mean_out
        else:
            x0_hat = ab_t.sqrt() * x_t - (1 - ab_t).sqrt() * mean_out
        eps = mean_out if self.mean_type == "eps" else (x_t - ab_t.sqrt() * x0_hat) / (1 - ab_t).sqrt()
        if self.clip_denoised if clip is None else clip:
            x0_hat = x0_hat.clamp(-1, 1)
        return Prediction(x0_hat, None if v is None else (v + 1) / 2, eps)

    def target(self, x0: Tensor, noise: Tensor, t: int | Tensor) -> Tensor:
        """What the mean part of the output regresses on (L_simple): eps, x_0 or v."""
        if self.mean_type == "eps":
            return noise
        if self.mean_type == "x0":
            return x0
        ab_t = self._ab(self._t_vec(t, x0), x0).to(x0.dtype)
        return ab_t.sqrt() * noise - (1 - ab_t).sqrt() * x0

    def _t_vec(self, t: int | Tensor, like: Tensor) -> Tensor:
        if torch.is_tensor(t) and t.ndim:
            return t.to(like.device).long()
        return torch.full((like.shape[0],), int(t), dtype=torch.long, device=like.device)

    def _ab(self, t: int | Tensor, like: Tensor) -> Tensor:
        ab = self.schedule.ab[torch.as_tensor(t).cpu()].to(like.device)
        return ab.reshape(-1, *([1] * (like.ndim - 1))) if ab.ndim else ab


def _describe(t: int | Tensor) -> str:
    if torch.is_tensor(t) and t.ndim:
        return ", ".join(str(v) for v in sorted(set(t.tolist())))
    return str(int(t))


def call_groups(items: Sequence[int], examples: int, batch_size: int) -> list[list[int]]:
    """``items`` (timesteps, columns) in runs that share a network call: as many as fit ``batch_size`` with
    ``examples`` each (at least one)."""
    per_call = max(1, batch_size // max(1, examples))
    return [list(items[i : i + per_call]) for i in range(0, len(items), per_call)]
