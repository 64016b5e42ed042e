"""The constants of the pairs (s, t) of one column: coefficients and reverse variances under the model's rule.

One forward pass at t serves every s < t; these tables hold what does not depend on the pass (docs/design.md §1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from ddpm_schedules.models import diffusion as dm
from ddpm_schedules.models.model import DiffusionModel


@dataclass
class PairTables:
    """Constants of the pairs (s, t) of one column t on one device: the same for every batch."""

    t: int
    s: Tensor  # [S] long, on the CPU
    decoder: Tensor  # [S] bool: which s are 0
    kl: dict[str, Tensor]  # c0, c1, btil, min_log, max_log (+ log_var for fixed variances) of the s >= 1
    decoder_log_var: tuple[Tensor, Tensor]  # log-variance range of (0, t); both ends equal for fixed variances


def check_pairs(model: DiffusionModel, s: Tensor | Sequence[int], t: int) -> Tensor:
    """s as a [S] long tensor on the CPU, after checking 1 <= t <= T and 0 <= s < t."""
    s = torch.as_tensor(s, dtype=torch.long).cpu().reshape(-1)
    model.schedule.check_pairs(s, t)
    return s


def pair_tables(
    model: DiffusionModel, t: int, s: Tensor | Sequence[int], device: torch.device | str | None = None
) -> PairTables:
    """The constants of the pairs (s, t), once per column: reuse them for every batch."""
    s = check_pairs(model, s, t)
    device = torch.device(device) if device is not None else model.device
    decoder = s == 0
    sk = s[~decoder]
    ns = model.schedule
    ab_s, ab_t = ns.ab[sk], ns.ab[t]
    min_log, max_log = ns.log_variance_range(sk, t)
    kl = {
        "c0": dm.c0(ab_s, ab_t),
        "c1": dm.c1(ab_s, ab_t),
        "btil": dm.btil(ab_s, ab_t),
        "min_log": min_log,
        "max_log": max_log,
    }
    zero = torch.zeros(1, dtype=torch.long)
    if model.var_type == "learned_range":
        dec = ns.log_variance_range(zero, t)
    else:
        kl["log_var"] = reverse_log_variance(model, sk, t)
        dec = (reverse_log_variance(model, zero, t),) * 2
    return PairTables(
        t=int(t),
        s=s,
        decoder=decoder,
        kl={k: v.to(device) for k, v in kl.items()},
        decoder_log_var=tuple(v.to(device) for v in dec),
    )


def reverse_log_variance(model: DiffusionModel, s: Tensor, t: int | Tensor) -> Tensor:
    """log sigma2(s, t) of a per-pair (not learned) variance rule: fixed_small, fixed_large or analytic."""
    if model.var_type == "analytic":
        if not bool((torch.as_tensor(s) > 0).any()):  # the decoder's btil(1|2) needs no Gamma
            return model.schedule.decoder_log_variance_floor().expand(torch.as_tensor(s).shape)
        return model.schedule.analytic_log_variance(s, t, model.gamma_at(t))
    return model.schedule.fixed_log_variance(model.var_type, s, t)
