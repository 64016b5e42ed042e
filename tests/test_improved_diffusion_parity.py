"""Pair terms against numbers produced by openai/improved-diffusion itself (tests/fixtures)."""

import json
import math

import pytest
import torch
from conftest import FIXTURE
from references import tanh_cdf_decoder_bits
from torch import nn

from ddpm_schedules import DiffusionModel, NoiseSchedule
from ddpm_schedules.costs.terms import prior_nats, terms

FLAGS = json.loads((FIXTURE / "flags.json").read_text())
T = FLAGS["diffusion_steps"]


class StoredOutputs(nn.Module):
    """Plays back the network outputs improved-diffusion recorded, keyed by the timestep it is shown."""

    def __init__(self, outputs: dict, inputs: dict):
        super().__init__()
        self.outputs, self.inputs = outputs, inputs

    def forward(self, x, timesteps):
        # the rescaled 0-based index must come back to exactly one recorded t
        t = round(timesteps[0].item() * T / 1000) + 1
        assert torch.allclose(timesteps, torch.full_like(timesteps, (t - 1) * 1000 / T))
        torch.testing.assert_close(x, self.inputs[t].to(x.dtype), rtol=0, atol=1e-5)
        return self.outputs[t]


def fixture_model(outputs, inputs) -> DiffusionModel:
    assert FLAGS["learn_sigma"] and not FLAGS["predict_xstart"] and FLAGS["rescale_timesteps"]
    return DiffusionModel(
        StoredOutputs(outputs, inputs),
        NoiseSchedule.named(FLAGS["noise_schedule"], T),
        mean_type="eps",
        var_type="learned_range",
        rescale_timesteps=True,
        clip_denoised=True,
        levels=256,
    )


def to_bits(nats, x0):
    return nats / (x0[0].numel() * math.log(2))


def assert_bits_close(ours, theirs, rtol):
    # improved-diffusion computes in float32: its smallest terms carry ~1e-8 bits of rounding
    torch.testing.assert_close(ours, theirs.double(), rtol=rtol, atol=1e-7)


def test_full_chain_terms_match_vb_bits(reference):
    model = fixture_model(reference["model_out"], reference["x_t"])
    x0 = reference["x0"]
    for t in reference["t"].tolist():
        bits = to_bits(terms(model, x0, t, [t - 1], reference["noise"][t])[:, 0], x0)
        assert_bits_close(bits, reference["vb_bits"][t], rtol=1e-5 if t > 1 else 2e-3)


def test_decoder_inputs_match_improved_diffusion_exactly(reference):
    """The decoder term at t = 1 differs from improved-diffusion only by its tanh CDF: with that CDF
    put back, our x0_hat and decoder variance reproduce its vb_bits to float32 rounding."""
    model = fixture_model(reference["model_out"], reference["x_t"])
    x0, x_t = reference["x0"].double(), reference["x_t"][1]
    bits = tanh_cdf_decoder_bits(model, x0, x_t)
    assert_bits_close(bits, reference["vb_bits"][1], rtol=1e-5)
    ours = to_bits(terms(model, reference["x0"], 1, [0], reference["noise"][1])[:, 0], reference["x0"])
    assert not torch.allclose(ours, bits, rtol=1e-6, atol=0)  # our exact CDF is a different number


def test_respaced_pair_terms_match(reference):
    path = reference["respaced_path"].tolist()
    steps = reference["respaced"]
    model = fixture_model({t: steps[t]["model_out"] for t in path}, {t: steps[t]["x_t"] for t in path})
    x0 = reference["x0"]
    assert path[0] == 1, "the first respaced step is the decoder with the full-chain clip only when tau_1 = 1"
    for t in path:
        s = int(steps[t]["s"])
        assert s == ([0] + path)[path.index(t)]
        bits = to_bits(terms(model, x0, t, [s], steps[t]["noise"])[:, 0], x0)
        assert_bits_close(bits, steps[t]["vb_bits"], rtol=1e-5 if s > 0 else 2e-3)


def test_prior_matches(reference):
    model = fixture_model(reference["model_out"], reference["x_t"])
    x0 = reference["x0"]
    for key in ("prior_bits", "respaced_prior_bits"):
        torch.testing.assert_close(to_bits(prior_nats(model, x0), x0), reference[key].double(), rtol=1e-5, atol=0)


def test_x_t_matches(reference):
    model = fixture_model(reference["model_out"], reference["x_t"])
    for t in reference["t"].tolist():
        x_t = model.q_sample(reference["x0"], t, reference["noise"][t])
        torch.testing.assert_close(x_t.float(), reference["x_t"][t], rtol=0, atol=2e-6)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_beta_schedules_match_improved_diffusion_formulas(name):
    """Independent re-derivation of improved-diffusion's betas for T = 4000."""
    T4 = 4000
    ns = NoiseSchedule.named(name, T4)
    if name == "linear":
        expected = torch.linspace(0.0001 * 1000 / T4, 0.02 * 1000 / T4, T4, dtype=torch.float64)
        torch.testing.assert_close(ns.betas, expected, rtol=1e-12, atol=0)
    else:
        f = lambda u: torch.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        u = torch.arange(T4 + 1, dtype=torch.float64) / T4
        ab = f(u) / f(torch.zeros(1, dtype=torch.float64))
        unclipped = ns.betas < 0.999
        assert unclipped[:-1].all() and not unclipped[-1]  # only the last beta is clipped
        torch.testing.assert_close(ns.ab[:-1], ab[:-1], rtol=1e-10, atol=0)
    assert ns.ab[0] == 1 and ns.ab.dtype == torch.float64
