"""Continuous timesteps for a model trained on T discrete steps: alpha_bar between the integer steps by linear
interpolation of the log-SNR (`NoiseSchedule.alpha_bar_at`), the network's timestep input fractional
(improved-diffusion's, ADM's and diffusers' sinusoidal embeddings take floats)."""

from __future__ import annotations

import torch
from torch import Tensor

from ddpm_schedules.models.model import DiffusionModel, Prediction
from ddpm_schedules.storage.errors import ParameterError


def predict_continuous(model: DiffusionModel, x_t: Tensor, t: float | Tensor, y: Tensor | None = None) -> Prediction:
    """`DiffusionModel.predict` at continuous t in [1, T] (a scalar or [B]; differentiable in t and x_t). At an
    integer t it equals `predict`. A network whose timestep input is an index (``model.timestep_input = "index"``,
    a lookup embedding) is refused."""
    if model.timestep_input != "continuous":
        raise ParameterError(
            "a fractional timestep needs a network whose timestep input is continuous; this one's is an index "
            "(a lookup embedding): use integer timesteps (round the schedule)"
        )
    t_vec = torch.as_tensor(t, dtype=torch.float64, device=x_t.device)
    t_vec = t_vec.expand(x_t.shape[0]) if t_vec.ndim == 0 else t_vec
    ab_t = model.schedule.alpha_bar_at(t_vec.cpu()).to(x_t.device)
    scale = 1000.0 / model.T if model.rescale_timesteps else 1.0
    whole = t_vec.detach().floor()
    # the integer part as `net_timesteps` forms it (float32), the fraction in the network's own precision: an integer
    # t gives exactly `predict`'s input, and a float64 network sees small changes of t
    base = model.net_timesteps(whole.long()).float().to(model.input_dtype)
    t_net = base + ((t_vec - whole) * scale).to(model.input_dtype)
    out = model._forward(x_t, t_vec.detach().round().long(), t_net, y)
    return model._interpret(x_t, ab_t.reshape(-1, *([1] * (x_t.ndim - 1))), out)
