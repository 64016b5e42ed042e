"""Training the improved-DDPM model (Nichol & Dhariwal 2021) with Lightning: L_simple, L_hybrid, L_vlb."""

from __future__ import annotations

import math
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor

from ddpm_schedules.costs.moments import MeanSem
from ddpm_schedules.costs.terms import full_chain_estimate, step_terms
from ddpm_schedules.lightning.data import to_unit_range
from ddpm_schedules.models.conditioning import check_labels
from ddpm_schedules.models.diffusion import nats_to_bpd
from ddpm_schedules.models.flags import model_from_flags
from ddpm_schedules.models.model import DiffusionModel
from ddpm_schedules.storage.errors import ParameterError

LOSSES = ("simple", "hybrid", "vlb")


class LossSecondMomentSampler:
    """Importance sampling of t for L_vlb: p(t) proportional to sqrt(E[L_t^2]) over each t's last losses.

    Uniform until every t has ``history`` losses; then mixed with ``uniform_prob`` of uniform (as
    improved-diffusion's LossSecondMomentResampler). ``sample`` returns t in 1..T and the weights
    1 / (T p(t)) that keep the loss an unbiased estimate of the uniform-t objective.
    """

    def __init__(self, T: int, history: int = 10, uniform_prob: float = 0.001):
        self.T, self.history_len, self.uniform_prob = T, history, uniform_prob
        self.history = torch.zeros(T, history, dtype=torch.float64)
        self.counts = torch.zeros(T, dtype=torch.long)

    @property
    def warmed_up(self) -> bool:
        return bool((self.counts >= self.history_len).all())

    def weights(self) -> Tensor:
        """p(t) for t = 1..T."""
        if not self.warmed_up:
            return torch.full((self.T,), 1.0 / self.T, dtype=torch.float64)
        w = (self.history**2).mean(1).sqrt()
        w = w / w.sum()
        return w * (1 - self.uniform_prob) + self.uniform_prob / self.T

    def sample(self, batch_size: int, device: torch.device) -> tuple[Tensor, Tensor]:
        p = self.weights()
        idx = torch.multinomial(p, batch_size, replacement=True)
        return (idx + 1).to(device), (1.0 / (self.T * p[idx])).float().to(device)

    def update(self, t: Tensor, losses: Tensor) -> None:
        """Record per-example losses at their t (from every process)."""
        for ti, loss in zip(t.reshape(-1).tolist(), losses.detach().double().reshape(-1).cpu().tolist()):
            i = ti - 1
            if self.counts[i] >= self.history_len:
                self.history[i, :-1] = self.history[i, 1:].clone()
                self.history[i, -1] = loss
            else:
                self.history[i, self.counts[i]] = loss
            self.counts[i] += 1

    def state_dict(self) -> dict[str, Tensor]:
        return {"history": self.history.clone(), "counts": self.counts.clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.history, self.counts = state["history"].clone(), state["counts"].clone()


class DiffusionModule(pl.LightningModule):
    """An improved-DDPM model described by improved-diffusion's flags, trained with one of its losses.

    - ``simple``: ||target - output||^2 (eps, x_0 or v by the mean type), Ho et al.'s L_simple.
    - ``hybrid``: L_simple + lambda L_vlb with the mean stopped; L_vlb = T E_t[L_t] in bits/dim and
      lambda = 0.001, i.e. the vb term times T / 1000 (improved-diffusion's RESCALED_MSE). Needs learn_sigma.
    - ``vlb``: T E_t[L_t], t drawn by `LossSecondMomentSampler` (improved-diffusion's RESCALED_KL).

    Validation logs ``val/bpd``, an unbiased estimate of the full-chain negative ELBO per example
    (`full_chain_estimate`: the terms of t <= ``val_exact_below`` exactly, ``val_strata`` stratified
    draws above, the prior), with the same t and noise at every validation, and ``val/bpd_sem``, its
    standard error over the validation examples.
    Keep an EMA of the weights with Lightning's `EMAWeightAveraging` callback: it validates and
    checkpoints with the averaged weights.

    A class-conditional model (``class_cond``) trains on the batches' labels; with ``label_dropout`` p > 0 (which
    needs the ``null_class`` flag) each label is replaced by the null class with probability p, so the one network
    is also the unconditional model that classifier-free guidance needs (Ho & Salimans 2021; p = 0.1 to 0.2 there).
    Validation's ``val/bpd`` is the conditional ELBO, each example with its own label.
    """

    def __init__(
        self,
        flags: dict[str, Any],
        loss: str = "hybrid",
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        levels: int = 256,
        sampler_history: int = 10,
        uniform_prob: float = 0.001,
        val_seed: int = 0,
        val_exact_below: int = 10,
        val_strata: int = 8,
        label_dropout: float = 0.0,
    ):
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; use one of {LOSSES}")
        self.save_hyperparameters()
        self.model: DiffusionModel = model_from_flags(dict(flags), levels=levels)
        if loss == "hybrid" and self.model.var_type != "learned_range":
            raise ValueError("loss 'hybrid' trains the variances: set learn_sigma=true, or use loss=simple")
        if not 0 <= label_dropout < 1:
            raise ParameterError("{label_dropout} = {value!r} must be in [0, 1)", value=label_dropout)
        if label_dropout and self.model.null_class is None:
            raise ParameterError(
                "{label_dropout} = {value!r} needs a class-conditional UNet with a null class: set "
                "{unet.class_cond}=true and {unet.null_class}=true",
                value=label_dropout,
            )
        self.loss_name = loss
        self.sampler = LossSecondMomentSampler(self.model.T, sampler_history, uniform_prob) if loss == "vlb" else None
        self.val_bpd = MeanSem()

    @property
    def dims(self) -> int:
        return math.prod(self.model.image_shape)

    def forward(self, x_t: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        args = (x_t, self.model.net_timesteps(t))
        return self.model.net(*args) if y is None else self.model.net(*args, y)

    def losses(self, x0: Tensor, t: Tensor, noise: Tensor, y: Tensor | None = None) -> dict[str, Tensor]:
        """Per-example loss terms at the given t (1..T) (and labels y): 'loss', and 'mse' / 'vb' (bits/dim)."""
        m = self.model
        x_t = m.q_sample(x0, t, noise).to(x0.dtype)
        out = self(x_t, t, y)
        mean_out, v = m.split_output(out, x0.shape[1])
        terms: dict[str, Tensor] = {}
        if self.loss_name in ("simple", "hybrid"):
            terms["mse"] = ((m.target(x0, noise, t) - mean_out.float()) ** 2).flatten(1).mean(1)
        if self.loss_name in ("hybrid", "vlb"):
            # the vb term only trains the variance under 'hybrid': the mean is stopped there
            frozen = out if self.loss_name == "vlb" else torch.cat([mean_out.detach(), v], 1)
            pred = m.prediction(x_t, t, frozen, clip=False)
            terms["vb"] = nats_to_bpd(step_terms(m, x0, x_t, t, pred), self.dims).float()
        if self.loss_name == "simple":
            terms["loss"] = terms["mse"]
        elif self.loss_name == "hybrid":
            terms["loss"] = terms["mse"] + terms["vb"] * (m.T / 1000.0)
        else:
            terms["loss"] = terms["vb"] * m.T
        return terms

    def images(self, batch: Any) -> Tensor:
        """The batch's images in [-1, 1]: integer pixels are converted here, on the batch's device
        (data stays uint8 until then)."""
        x0 = batch[0] if isinstance(batch, (list, tuple)) else batch
        return to_unit_range(x0, self.model.levels)

    def labels(self, batch: Any, dropout: float = 0.0) -> Tensor | None:
        """A conditional model's labels (checked), each replaced by the null class with probability ``dropout``."""
        if self.model.num_classes is None:
            return None
        y = batch[1] if isinstance(batch, (list, tuple)) and len(batch) > 1 else None
        y = check_labels(y, self.images(batch).shape[0] if y is None else y.shape[0], self.model.num_classes)
        if dropout:
            y = torch.where(torch.rand(y.shape, device=y.device) < dropout, self.model.null_class, y)
        return y

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x0 = self.images(batch)
        B = x0.shape[0]
        if self.sampler is not None:
            t, weights = self.sampler.sample(B, x0.device)
        else:
            t, weights = torch.randint(1, self.model.T + 1, (B,), device=x0.device), torch.ones(B, device=x0.device)
        terms = self.losses(x0, t, torch.randn_like(x0), self.labels(batch, self.hparams.label_dropout))
        if self.sampler is not None:
            gathered_t, gathered_loss = self.all_gather(t), self.all_gather(terms["loss"].detach())
            self.sampler.update(gathered_t.reshape(-1).cpu(), gathered_loss.reshape(-1).cpu())
        loss = (terms["loss"] * weights).mean()
        if not torch.isfinite(loss):
            # stop before a checkpoint of broken weights can replace the last good one
            raise ParameterError(
                "the training loss is {loss} at step {step}; lower {lr} or check the data",
                loss=loss.item(),
                step=self.global_step,
            )
        self.log("train/loss", loss, prog_bar=True)
        for name in ("mse", "vb"):
            if name in terms:
                self.log(f"train/{name}", terms[name].mean())
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x0 = self.images(batch)
        g = torch.Generator().manual_seed(self.hparams.val_seed * 1_000_003 + batch_idx + 1_000_000 * self.global_rank)
        nats = full_chain_estimate(
            self.model, x0, g, self.hparams.val_exact_below, self.hparams.val_strata, y=self.labels(batch)
        )
        self.val_bpd.update(nats_to_bpd(nats, self.dims))

    def on_validation_epoch_end(self) -> None:
        mean, sem = self.val_bpd.compute()  # every process's examples (torchmetrics syncs)
        self.log_dict({"val/bpd": mean, "val/bpd_sem": sem}, prog_bar=True)  # already the same on every process
        self.val_bpd.reset()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.model.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.sampler is not None:
            checkpoint["loss_sampler"] = self.sampler.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.sampler is not None and "loss_sampler" in checkpoint:
            self.sampler.load_state_dict(checkpoint["loss_sampler"])
