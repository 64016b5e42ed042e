"""diffusers models: our pair terms against DDPMScheduler.step's own mean and variance; samplers agree."""

import json
import math

import pytest
import torch
from conftest import eval_cfg, quantized_data
from torch.distributions import Normal, kl_divergence

from ddpm_schedules import Schedule, load_diffusers

diffusers = pytest.importorskip("diffusers")
from diffusers import DDPMScheduler, UNet2DModel  # noqa: E402

from ddpm_schedules.costs.terms import terms
from ddpm_schedules.sampling.samplers import (
    diffusers_sample,  # noqa: E402
    sample_ancestral,
)

T = 50
PREDICTIONS = ["epsilon", "sample", "v_prediction"]
VARIANCES = ["fixed_small", "fixed_large", "learned_range"]


def save_tiny(path, prediction_type, variance_type, beta_schedule="squaredcos_cap_v2"):
    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=2 if variance_type == "learned_range" else 1,
        layers_per_block=1,
        block_out_channels=(32, 32),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    )
    unet.save_pretrained(path / "unet")
    DDPMScheduler(
        num_train_timesteps=T,
        beta_schedule=beta_schedule,
        prediction_type=prediction_type,
        variance_type=variance_type,
        clip_sample=True,
    ).save_pretrained(path / "scheduler")
    return path


def step_mean_and_std(scheduler, model_out, t0, x_t, monkeypatch):
    """DDPMScheduler.step's own Gaussian: its output with the noise set to 0, and to 1."""
    import diffusers.schedulers.scheduling_ddpm as ddpm

    outs = []
    for fill in (0.0, 1.0):
        monkeypatch.setattr(
            ddpm, "randn_tensor", lambda shape, fill=fill, **kw: torch.full(shape, fill, dtype=kw.get("dtype"))
        )
        outs.append(scheduler.step(model_out, t0, x_t).prev_sample.double())
    monkeypatch.undo()
    return outs[0], outs[1] - outs[0]


@pytest.mark.parametrize("variance_type", VARIANCES)
@pytest.mark.parametrize("prediction_type", PREDICTIONS)
def test_pair_terms_match_ddpm_scheduler_step(tmp_path, monkeypatch, prediction_type, variance_type):
    folder = save_tiny(tmp_path, prediction_type, variance_type)
    model = load_diffusers(folder, levels=17)
    assert (model.mean_type, model.var_type, model.T) == (
        {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}[prediction_type],
        variance_type,
        T,
    )
    unet = UNet2DModel.from_pretrained(folder / "unet").eval()
    scheduler = DDPMScheduler.from_pretrained(folder / "scheduler")
    x0 = quantized_data(4, (1, 8, 8), levels=17).double()
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for s, t in [(7, 31), (30, 31), (1, 50), (12, 20)]:
        ours = terms(model, x0, t, [s], noise)[:, 0]
        x_t = model.q_sample(x0, t, noise).float()
        scheduler.set_timesteps(timesteps=[t - 1, s - 1])  # diffusers' 0-based, descending: the jump t -> s
        with torch.no_grad():
            out = unet(x_t, t - 1).sample
        # float64 inputs make diffusers' step compute in float64 (its tables stay its own float32 values)
        mean_p, std_p = step_mean_and_std(scheduler, out.double(), t - 1, x_t.double(), monkeypatch)
        ab = scheduler.alphas_cumprod.double()
        ab_s, ab_t = ab[s - 1], ab[t - 1]
        c1 = (ab_t / ab_s).sqrt() * (1 - ab_s) / (1 - ab_t)
        c0 = ab_s.sqrt() - c1 * ab_t.sqrt()
        btil = (1 - ab_s) - ((ab_t / ab_s).sqrt() * (1 - ab_s)) ** 2 / (1 - ab_t)
        q = Normal(c0 * x0 + c1 * x_t.double(), btil.sqrt())
        ref = kl_divergence(q, Normal(mean_p, std_p)).flatten(1).sum(1)
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=0, msg=lambda m: f"pair ({s}, {t}): {m}")


@pytest.mark.parametrize("variance_type", VARIANCES)
@pytest.mark.parametrize("prediction_type", PREDICTIONS)
def test_sampler_matches_diffusers_scheduler(tmp_path, prediction_type, variance_type):
    folder = save_tiny(tmp_path, prediction_type, variance_type, beta_schedule="linear")
    model = load_diffusers(folder, levels=17)
    unet = UNet2DModel.from_pretrained(folder / "unet").eval()
    scheduler = DDPMScheduler.from_pretrained(folder / "scheduler")
    schedule = Schedule((3, 17, 35, 50), T)
    shape = (2, 1, 8, 8)
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    x0_theirs, points_theirs = diffusers_sample(
        unet, scheduler, schedule, x_T, generator=torch.Generator().manual_seed(9)
    )
    # diffusers draws its step noise from the generator in order; ours takes the same draws (not the last: we stop at
    # x0_hat)
    g = torch.Generator().manual_seed(9)
    draws = [torch.randn(shape, generator=g) for _ in range(schedule.K - 1)]
    trajectory = []
    sample_ancestral(model, schedule, x_T, noise=draws, trajectory=trajectory)
    assert len(trajectory) == len(points_theirs) + 1
    for ours, theirs in zip(trajectory, points_theirs):
        torch.testing.assert_close(ours.float(), theirs, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(trajectory[-1].float(), x0_theirs, rtol=1e-4, atol=1e-4)


def test_refuses_what_has_no_ddpm_elbo(tmp_path):
    save_tiny(tmp_path, "epsilon", "fixed_small")
    config = json.loads((tmp_path / "scheduler" / "scheduler_config.json").read_text())
    for change, message in [
        ({"_class_name": "ScoreSdeVeScheduler", "num_train_timesteps": None}, "no discrete beta schedule"),
        ({"thresholding": True}, "dynamic thresholding"),
        ({"variance_type": "learned"}, "variance_type='learned'"),
        ({"prediction_type": "flow"}, "predicts 'flow'"),
    ]:
        bad = {k: v for k, v in {**config, **change}.items() if v is not None}
        (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=message):
            load_diffusers(tmp_path)
    with pytest.raises(ValueError, match="not a diffusers folder"):
        load_diffusers(tmp_path / "unet")


@pytest.mark.slow
def test_evaluate_runs_on_a_diffusers_folder(tmp_path):

    from ddpm_schedules.app.evaluate import evaluate

    folder = save_tiny(tmp_path / "model", "epsilon", "learned_range")
    cfg = eval_cfg(tmp_path, folder, "logger=none", "model=diffusers", "model.levels=17", "eval.budgets=[2,4]")
    doc = evaluate(cfg)
    assert (tmp_path / "run" / "results.json").is_file()
    assert doc["model"]["source"] == "diffusers" and doc["model"]["T"] == T
    dp4 = next(r for r in doc["results"] if r["strategy"] == "dp" and r["K"] == 4)
    exported = json.loads((tmp_path / "run" / "schedules" / "dp_K4.json").read_text())
    assert exported["diffusers_timesteps"] == [t - 1 for t in reversed(dp4["schedule"])]
    assert math.isfinite(dp4["bpd"])
