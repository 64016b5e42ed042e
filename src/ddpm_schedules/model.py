"""DiffusionModel: a network ``net(x, timesteps)`` plus the conventions that turn its output into
p(x_s | x_t) for any pair, the per-pair ELBO terms and ancestral sampling along a schedule."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import torch
from torch import Tensor, nn

from . import diffusion as dm
from .diffusion import NoiseSchedule, VarType
from .schedules import Schedule

MeanType = Literal["eps", "x0", "v"]
MEAN_TYPES = ("eps", "x0", "v")


@dataclass
class PairTables:
    """Constants of the pairs (s, t) of one column t on one device: the same for every batch."""

    t: int
    s: Tensor  # [S] long, on the CPU
    decoder: Tensor  # [S] bool: which s are 0
    kl: dict[str, Tensor]  # c0, c1, btil, min_log, max_log (+ log_var for fixed variances) of the s >= 1
    decoder_log_var: tuple[Tensor, Tensor]  # log-variance range of (0, t); both ends equal for fixed variances


@dataclass
class Prediction:
    """What one forward pass at t says about x_0, in float64."""

    x0_hat: Tensor  # [B, C, H, W], clipped to [-1, 1] when clip_denoised
    frac: Tensor | None  # learned_range: f = (v + 1) / 2 per dimension, else None


def quantize(x: Tensor, levels: int) -> Tensor:
    """Round values in [-1, 1] to the nearest of ``levels`` evenly spaced values."""
    idx = torch.round((x.clamp(-1, 1) + 1) / 2 * (levels - 1))
    return idx / (levels - 1) * 2 - 1


class DiffusionModel(nn.Module):
    """A denoising network with its conventions made explicit in one place.

    - ``mean_type``: what the network predicts: ``eps``, ``x0`` or ``v``.
    - ``var_type``: ``fixed_small`` (btil), ``fixed_large`` (beta) or ``learned_range`` (the second
      half of the output channels interpolates log-variances, Nichol & Dhariwal eq. 15).
    - ``rescale_timesteps``: the network sees (t - 1) * 1000 / T instead of the index t - 1.
    - ``clip_denoised``: x0_hat is clipped to [-1, 1] before it forms a mean.
    - ``levels``: the number of values per dimension of the data (256 for 8-bit images).
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
        self.rescale_timesteps = rescale_timesteps
        self.clip_denoised = clip_denoised
        self.levels = levels
        self.image_shape = tuple(image_shape) if image_shape is not None else None

    @property
    def T(self) -> int:
        return self.schedule.T

    @property
    def device(self) -> torch.device:
        p = next(iter(self.parameters()), None) if isinstance(self.net, nn.Module) else None
        return p.device if p is not None else torch.device("cpu")

    @property
    def input_dtype(self) -> torch.dtype:
        p = next(iter(self.parameters()), None) if isinstance(self.net, nn.Module) else None
        return p.dtype if p is not None and p.is_floating_point() else torch.float32

    def extra_repr(self) -> str:
        return (
            f"T={self.T}, mean_type={self.mean_type}, var_type={self.var_type}, "
            f"rescale_timesteps={self.rescale_timesteps}, clip_denoised={self.clip_denoised}, levels={self.levels}"
        )

    # --- the network -------------------------------------------------------------------------

    def net_timesteps(self, t: Tensor) -> Tensor:
        """Paper t (1..T) -> what the network sees: the 0-based index, optionally scaled to 0..1000."""
        idx = t - 1
        return idx.float() * (1000.0 / self.T) if self.rescale_timesteps else idx

    def q_sample(self, x0: Tensor, t: int | Tensor, noise: Tensor) -> Tensor:
        """x_t = sqrt(ab_t) x_0 + sqrt(1 - ab_t) noise, formed in float64."""
        ab_t = self._ab(t, x0)
        return ab_t.sqrt() * x0.double() + (1 - ab_t).sqrt() * noise.double()

    def predict(self, x_t: Tensor, t: int | Tensor) -> Prediction:
        """One forward pass at t: x0_hat (and the variance fraction for learned_range)."""
        t_vec = self._t_vec(t, x_t)
        out = self.net(x_t.to(self.input_dtype), self.net_timesteps(t_vec))
        if not torch.isfinite(out).all():
            raise ValueError(
                f"the network produced NaN or Inf at t = {_describe(t)}; check the checkpoint, its flags and the input scaling"
            )
        return self.prediction(x_t, t_vec, out)

    def split_output(self, out: Tensor, channels: int) -> tuple[Tensor, Tensor | None]:
        """Raw network output -> (mean part, raw variance part v or None)."""
        want = 2 * channels if self.var_type == "learned_range" else channels
        if out.shape[1] != want:
            raise ValueError(
                f"the network returned {out.shape[1]} channels for {channels}-channel input; var_type={self.var_type!r} "
                f"needs {want} (learn_sigma / var_type mismatch?)"
            )
        return (out[:, :channels], out[:, channels:]) if self.var_type == "learned_range" else (out, None)

    def prediction(self, x_t: Tensor, t: int | Tensor, out: Tensor, clip: bool | None = None) -> Prediction:
        """Interpret a raw network output at t by the model's conventions, in float64.

        ``clip`` overrides ``clip_denoised`` (training losses do not clip, as improved-diffusion).
        """
        mean_out, v = self.split_output(out.double(), x_t.shape[1])
        ab_t = self._ab(self._t_vec(t, x_t), x_t)
        x_t = x_t.double()
        if self.mean_type == "eps":
            x0_hat = (x_t - (1 - ab_t).sqrt() * mean_out) / ab_t.sqrt()
        elif self.mean_type == "x0":
            x0_hat = mean_out
        else:
            x0_hat = ab_t.sqrt() * x_t - (1 - ab_t).sqrt() * mean_out
        if self.clip_denoised if clip is None else clip:
            x0_hat = x0_hat.clamp(-1, 1)
        return Prediction(x0_hat, None if v is None else (v + 1) / 2)

    def target(self, x0: Tensor, noise: Tensor, t: int | Tensor) -> Tensor:
        """What the mean part of the output regresses on (L_simple): eps, x_0 or v."""
        if self.mean_type == "eps":
            return noise
        if self.mean_type == "x0":
            return x0
        ab_t = self._ab(self._t_vec(t, x0), x0).to(x0.dtype)
        return ab_t.sqrt() * noise - (1 - ab_t).sqrt() * x0

    # --- the ELBO terms ----------------------------------------------------------------------

    def terms(self, x0: Tensor, t: int, s: Tensor | Sequence[int], noise: Tensor | None = None) -> Tensor:
        """[B, S] nats: KL(q(x_s|x_t,x_0) || p(x_s|x_t)) for s >= 1, -log p(x_0|x_t) for s = 0; one pass at t."""
        s = self._pairs(s, t)
        if noise is None:
            noise = torch.randn_like(x0)
        elif noise.shape != x0.shape:
            raise ValueError(f"noise has shape {tuple(noise.shape)} but x0 has {tuple(x0.shape)}; they must match")
        x_t = self.q_sample(x0, t, noise)
        return self.pair_terms(x0, x_t, t, s, self.predict(x_t, t))

    def pair_tables(self, t: int, s: Tensor | Sequence[int], device: torch.device | str | None = None) -> "PairTables":
        """The constants of the pairs (s, t), once per column: reuse them for every batch."""
        s = self._pairs(s, t)
        device = torch.device(device) if device is not None else self.device
        decoder = s == 0
        sk = s[~decoder]
        ns = self.schedule
        ab_s, ab_t = ns.ab[sk], ns.ab[t]
        min_log, max_log = ns.log_variance_range(sk, t)
        kl = {"c0": dm.c0(ab_s, ab_t), "c1": dm.c1(ab_s, ab_t), "btil": dm.btil(ab_s, ab_t), "min_log": min_log, "max_log": max_log}
        zero = torch.zeros(1, dtype=torch.long)
        if self.var_type == "learned_range":
            dec = ns.log_variance_range(zero, t)
        else:
            kl["log_var"] = ns.fixed_log_variance(self.var_type, sk, t)
            dec = (ns.fixed_log_variance(self.var_type, zero, t),) * 2
        return PairTables(
            t=int(t),
            s=s,
            decoder=decoder,
            kl={k: v.to(device) for k, v in kl.items()},
            decoder_log_var=tuple(v.to(device) for v in dec),
        )

    def pair_terms(
        self,
        x0: Tensor,
        x_t: Tensor,
        t: int,
        s: Tensor | Sequence[int],
        pred: Prediction,
        fast: bool = True,
        tables: "PairTables | None" = None,
    ) -> Tensor:
        """[B, S] nats of the pairs (s, t) from one prediction at t.

        ``fast`` uses the closed forms of diffusion.py (O(1) per pair for fixed variances); the
        elementwise path forms both Gaussians per dimension and is the reference for the fast one.
        """
        if tables is None:
            tables = self.pair_tables(t, s, x0.device)
        elif tables.t != int(t) or not torch.equal(tables.s, self._pairs(s, t)):
            raise ValueError(f"pair tables were made for t = {tables.t} and other s; call pair_tables(t, s) for this column")
        B = x0.shape[0]
        x0 = x0.double().flatten(1)
        x0_hat = pred.x0_hat.flatten(1)
        frac = pred.frac.flatten(1) if pred.frac is not None else None
        out = torch.empty(B, tables.s.numel(), dtype=torch.float64, device=x0.device)
        if tables.decoder.any():
            out[:, tables.decoder] = self._decoder_nll(x0, x0_hat, frac, tables.decoder_log_var)[:, None]
        if not tables.decoder.all():
            kl = self._kl_fast if fast else self._kl_elementwise
            out[:, ~tables.decoder] = kl(x0, x_t.double().flatten(1), x0_hat, frac, tables.kl)
        return out

    def prior_nats(self, x0: Tensor) -> Tensor:
        """[B] nats: KL(q(x_T | x_0) || N(0, I)), the same for every schedule."""
        return dm.prior_kl(x0, self.schedule.ab[-1].to(x0.device))

    def step_terms(self, x0: Tensor, x_t: Tensor, t: Tensor, pred: Prediction) -> Tensor:
        """[B] nats of the full chain's term at each example's own t: the pair (t - 1, t), differentiable.

        Elementwise per dimension (the training losses need gradients through the variance).
        """
        t = t.to(x0.device).long()
        s = t - 1
        shape = (-1,) + (1,) * (x0.ndim - 1)
        ns = self.schedule
        ab_s, ab_t = ns.ab[s.cpu()].to(x0.device).reshape(shape), ns.ab[t.cpu()].to(x0.device).reshape(shape)
        min_log, max_log = (v.to(x0.device).reshape(shape) for v in ns.log_variance_range(s.cpu(), t.cpu()))
        if pred.frac is None:
            log_var = ns.fixed_log_variance(self.var_type, s.cpu(), t.cpu()).to(x0.device).reshape(shape).expand_as(x0)
        else:
            log_var = pred.frac * max_log + (1 - pred.frac) * min_log
        x0, x_t = x0.double(), x_t.double()
        c0, c1 = dm.c0(ab_s, ab_t), dm.c1(ab_s, ab_t)
        kl = dm.normal_kl(c0 * x0 + c1 * x_t, min_log.expand_as(x0), c0 * pred.x0_hat + c1 * x_t, log_var)
        decoder = -dm.discretized_gaussian_log_likelihood(x0, pred.x0_hat, 0.5 * log_var, self.levels)
        first = (s == 0).reshape(shape)
        return torch.where(first, decoder, kl).flatten(1).sum(1)

    def _decoder_nll(self, x0: Tensor, x0_hat: Tensor, frac: Tensor | None, log_var_range: tuple[Tensor, Tensor]) -> Tensor:
        lo, hi = log_var_range
        log_var = (lo if frac is None else frac * hi + (1 - frac) * lo).expand_as(x0)
        return -dm.discretized_gaussian_log_likelihood(x0, x0_hat, 0.5 * log_var, self.levels).sum(1)

    def _kl_fast(self, x0, x_t, x0_hat, frac, p: dict[str, Tensor]) -> Tensor:
        if frac is None:
            sq_err = ((x0 - x0_hat) ** 2).sum(1)
            return dm.fixed_variance_kl(sq_err, p["c0"], p["btil"], torch.exp(p["log_var"]), x0.shape[1])
        return dm.learned_range_kl((x0 - x0_hat) ** 2, frac, p["c0"], torch.log(p["btil"]), p["max_log"])

    def _kl_elementwise(self, x0, x_t, x0_hat, frac, p: dict[str, Tensor], max_elements: int = 1 << 22) -> Tensor:
        B, D = x0.shape
        S = p["c0"].numel()
        out = torch.empty(B, S, dtype=torch.float64, device=x0.device)
        chunk = max(1, max_elements // (B * D))
        for lo in range(0, S, chunk):
            q = {k: v[lo : lo + chunk, None, None] for k, v in p.items()}  # [S', 1, 1]
            mean_q = q["c0"] * x0 + q["c1"] * x_t
            mean_p = q["c0"] * x0_hat + q["c1"] * x_t
            if frac is None:
                log_var_p = q["log_var"].expand_as(mean_p)
            else:
                log_var_p = frac * q["max_log"] + (1 - frac) * q["min_log"]
            kl = dm.normal_kl(mean_q, torch.log(q["btil"]).expand_as(mean_q), mean_p, log_var_p)
            out[:, lo : lo + chunk] = kl.sum(-1).T
        return out

    # --- sampling ----------------------------------------------------------------------------

    @torch.no_grad()
    def sample(
        self,
        schedule: Schedule | Sequence[int],
        n: int,
        generator: torch.Generator | None = None,
        batch_size: int | None = None,
        noise: Sequence[Tensor] | None = None,
        trajectory: list[Tensor] | None = None,
    ) -> Tensor:
        """Ancestral sampling x_T ~ N(0, I) -> ... -> x0_hat along ``schedule``, quantized to ``levels``: [n, C, H, W].

        ``noise`` replaces the generator's draws: x_T first, then one tensor per noisy step (K - 1 of
        them, from t = T down). ``trajectory``, if given, receives x at every schedule point
        (x_T first, x_{tau_1} last) and then the final unquantized x0_hat.
        """
        if self.image_shape is None:
            raise ValueError("this DiffusionModel has no image_shape; pass image_shape=(C, H, W) to sample from it")
        schedule = schedule if isinstance(schedule, Schedule) else Schedule(tuple(schedule), self.T)
        if schedule.T != self.T:
            raise ValueError(f"the schedule ends at T = {schedule.T} but the model has T = {self.T}")
        if noise is not None:
            if len(noise) != schedule.K or any(tuple(z.shape) != (n, *self.image_shape) for z in noise):
                raise ValueError(f"noise must be {schedule.K} tensors of shape {(n, *self.image_shape)}: x_T and one per noisy step")
            draws = iter(noise)
            return self._sample_batch(schedule, n, lambda: next(draws).to(self.device, torch.float64), trajectory)
        gen_device = generator.device if generator is not None else torch.device("cpu")
        batch_size = batch_size or n
        out = []
        for lo in range(0, n, batch_size):
            m = min(batch_size, n - lo)

            def randn(m: int = m) -> Tensor:
                return torch.randn(m, *self.image_shape, generator=generator, device=gen_device, dtype=torch.float64).to(self.device)

            out.append(self._sample_batch(schedule, m, randn, trajectory))
        return torch.cat(out)

    def _sample_batch(self, schedule: Schedule, n: int, randn: Callable[[], Tensor], trajectory: list[Tensor] | None) -> Tensor:
        x = randn()
        points = (0,) + schedule.timesteps
        for s, t in zip(reversed(points[:-1]), reversed(points[1:])):
            if trajectory is not None:
                trajectory.append(x)
            pred = self.predict(x, t)
            if s == 0:
                if trajectory is not None:
                    trajectory.append(pred.x0_hat)
                return quantize(pred.x0_hat, self.levels).float()
            p = self.pair_tables(t, [s], self.device).kl
            mean = p["c0"] * pred.x0_hat + p["c1"] * x
            log_var = p["log_var"] if pred.frac is None else pred.frac * p["max_log"] + (1 - pred.frac) * p["min_log"]
            x = mean + torch.exp(0.5 * log_var) * randn()
        raise AssertionError("unreachable: every schedule starts from s = 0")

    # --- helpers -----------------------------------------------------------------------------

    def _t_vec(self, t: int | Tensor, like: Tensor) -> Tensor:
        if torch.is_tensor(t) and t.ndim:
            return t.to(like.device).long()
        return torch.full((like.shape[0],), int(t), dtype=torch.long, device=like.device)

    def _ab(self, t: int | Tensor, like: Tensor) -> Tensor:
        ab = self.schedule.ab[torch.as_tensor(t).cpu()].to(like.device)
        return ab.reshape(-1, *([1] * (like.ndim - 1))) if ab.ndim else ab

    def _pairs(self, s: Tensor | Sequence[int], t: int) -> Tensor:
        s = torch.as_tensor(s, dtype=torch.long).cpu().reshape(-1)
        self.schedule.check_pairs(s, t)
        return s


def _describe(t: int | Tensor) -> str:
    if torch.is_tensor(t) and t.ndim:
        return ", ".join(str(v) for v in sorted(set(t.tolist())))
    return str(int(t))

