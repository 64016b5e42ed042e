"""The CUDA path: every stage on the GPU against the same stage on the CPU (``pytest -m gpu``).

Skipped, and reported as skipped, where CUDA is absent. ``DDPM_GPU_TESTS=cpu`` runs them with the CPU standing
in for the GPU, which checks the tests themselves on a machine without one (every comparison is then exact).

Tolerances, and why:
- float64 networks (the tiny test models): the GPU's float64 kernels sum in another order, so matrices agree to
  about 1e-12 relative; 1e-9 is asserted.
- float32 networks (the bundled digits model): cuDNN may use TF32 on Ampere and later, about 1e-3 relative per
  output. What users read is bits/dim, so the check is the one precision changes are held to: every schedule's
  bits/dim within 0.1 of its Monte Carlo standard error of the CPU figure, and the same DP schedules.
"""

import os
from pathlib import Path

import pytest
import torch
from conftest import DIGITS_FEATURES, ROOT, quantized_data, tiny_model

from ddpm_schedules import evaluate_schedules, load_checkpoint, optimal_schedules
from ddpm_schedules.costs.cost_matrix import estimate_cost_matrices
from ddpm_schedules.costs.ode import estimate_ode_matrix
from ddpm_schedules.costs.refine import RefineSettings, refine_cost_matrices
from ddpm_schedules.lightning.data import DigitsDataModule
from ddpm_schedules.sampling.registry import SAMPLERS
from ddpm_schedules.schedules.schedule import even_schedule

STAND_IN = os.environ.get("DDPM_GPU_TESTS") == "cpu"
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() and not STAND_IN, reason="needs CUDA: run pytest -m gpu on a GPU machine"
    ),
]
DEVICE = torch.device("cuda" if torch.cuda.is_available() and not STAND_IN else "cpu")


def both(make):
    """The same model on the CPU and on the GPU."""
    return make().to("cpu"), make().to(DEVICE)


def digits_model():
    return load_checkpoint(ROOT / "checkpoints" / "digits.ckpt")


@torch.no_grad()
def test_elbo_mse_and_ode_matrices_on_the_gpu_equal_the_cpu_ones():
    cpu, gpu = both(lambda: tiny_model("learned_range", T=12))
    data = quantized_data(10)
    ref = estimate_cost_matrices(cpu, data, ["elbo", "mse"], seed=1, batch_size=4, progress=False)
    out = estimate_cost_matrices(gpu, data.to(DEVICE), ["elbo", "mse"], seed=1, batch_size=4, progress=False)
    for o in ("elbo", "mse"):
        valid = torch.isfinite(ref[o].mean)
        torch.testing.assert_close(out[o].mean.cpu()[valid], ref[o].mean[valid], rtol=1e-9, atol=1e-12)
        assert out[o].prior == pytest.approx(ref[o].prior, rel=1e-9)
    ode_ref = estimate_ode_matrix(cpu, 5, seed=2, batch_size=3, progress=False, multistep=True)
    ode = estimate_ode_matrix(gpu, 5, seed=2, batch_size=3, progress=False, multistep=True)
    valid = torch.isfinite(ode_ref.mean)
    torch.testing.assert_close(ode.mean.cpu()[valid], ode_ref.mean[valid], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(
        ode.two_step.cpu(), ode_ref.two_step, rtol=1e-9, atol=1e-12
    )  # the Gram matrices on the GPU


@torch.no_grad()
@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_each_sampler_on_the_gpu_draws_the_cpu_samples(sampler):
    cpu, gpu = both(lambda: tiny_model("learned_range", T=20))
    sch = even_schedule(20, 5)
    draws = {
        name: SAMPLERS[sampler](m, sch, 16, generator=torch.Generator().manual_seed(3))
        for name, m in (("cpu", cpu), ("gpu", gpu))
    }
    assert draws["gpu"].device.type == DEVICE.type
    # float64 networks: a quantized value may flip only where the two runs straddle a rounding boundary
    assert (draws["gpu"].cpu() == draws["cpu"]).float().mean() > 0.99


def _bpd_within_a_tenth_of_the_sem(model_a, model_b, data):
    """bits/dim of every DP schedule from model_b's matrix against model_a's: the same schedules, within 0.1 SEM."""
    from ddpm_schedules import estimate_cost_matrix

    mats = [
        estimate_cost_matrix(m, data.to(m.device), grid=list(range(10, 1001, 10)), batch_size=200, progress=False)
        for m in (model_a, model_b)
    ]
    paths = [optimal_schedules(cm, [4, 8, 16]) for cm in mats]
    assert [s.timesteps for s in paths[0].values()] == [s.timesteps for s in paths[1].values()]
    results = [
        evaluate_schedules(m, data.to(m.device), list(p.values()), batch_size=200, progress=False)
        for m, p in zip((model_a, model_b), paths)
    ]
    for a, b in zip(*results):
        assert abs(b.bpd - a.bpd) < 0.1 * a.bpd_sem, (a.schedule.K, a.bpd, b.bpd, a.bpd_sem)


@torch.no_grad()
def test_the_digits_model_on_the_gpu_gives_the_cpu_schedules_and_bits_per_dim():
    cpu, gpu = both(digits_model)
    _bpd_within_a_tenth_of_the_sem(cpu, gpu, DigitsDataModule().tensor("val", 100))


@torch.no_grad()
@pytest.mark.parametrize("precision", ["bf16", "16"])
def test_reduced_precision_on_the_gpu_stays_within_a_tenth_of_the_sem(precision):
    fp32, low = digits_model().to(DEVICE), digits_model().to(DEVICE).set_precision(precision)
    _bpd_within_a_tenth_of_the_sem(fp32, low, DigitsDataModule().tensor("val", 100))


@torch.no_grad()
def test_the_compiled_network_predicts_what_the_eager_one_does():
    eager, compiled = digits_model().to(DEVICE), digits_model().to(DEVICE).compile_network(True)
    x = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    for t in (1, 100, 1000):  # the network's own output: x0_hat divides eps by sqrt(alpha_bar_t), 1e-4 at t = T
        t_net = eager.net_timesteps(torch.full((64,), t, device=DEVICE))
        torch.testing.assert_close(compiled.net(x, t_net), eager.net(x, t_net), rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_refinement_on_the_gpu_and_its_memory_guard():
    cpu, gpu = both(lambda: tiny_model("learned_range", T=40))
    data = quantized_data(12)
    settings = RefineSettings(coarse="log:12", window=1, max_rounds=4)
    ref, _ = refine_cost_matrices(cpu, data, [2, 4], settings, seed=1, batch_size=6, progress=False)
    out, _ = refine_cost_matrices(gpu, data.to(DEVICE), [2, 4], settings, seed=1, batch_size=6, progress=False)
    assert out["elbo"].grid.tolist() == ref["elbo"].grid.tolist()
    valid = torch.isfinite(ref["elbo"].mean)
    torch.testing.assert_close(out["elbo"].mean.cpu()[valid], ref["elbo"].mean[valid], rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="needs more than memory_gb = 1e-09"):
        refine_cost_matrices(
            gpu, data.to(DEVICE), [2, 4], RefineSettings(coarse="log:12", memory_gb=1e-9), progress=False
        )


def test_the_data_module_pins_its_batches_for_the_gpu():
    dm = DigitsDataModule(batch_size=32, num_workers=0)
    assert dm.pin_memory == (DEVICE.type == "cuda")  # null: on exactly when CUDA is there
    images, _ = next(iter(dm.train_dataloader()))
    assert images.dtype == torch.uint8 and images.is_pinned() == (DEVICE.type == "cuda")


def test_evaluate_end_to_end_on_the_gpu(tmp_path):
    from conftest import eval_cfg

    from ddpm_schedules.app.evaluate import evaluate

    out = evaluate(
        eval_cfg(
            tmp_path,
            ROOT / "checkpoints" / "digits.ckpt",
            "data=digits",
            "logger=none",
            "eval.budgets=[4,8]",
            "cost.examples=64",
            "eval.examples=64",
            "cost.grid=10",
            "eval.samplers=[ddim,dpmpp]",
            "eval.strategies=[dp,dp_ode,dp_dpmpp,even]",
            f"fid.digits_weights={DIGITS_FEATURES}",
        )
    )
    assert {r["strategy"] for r in out["results"]} == {"dp", "dp_ode", "dp_dpmpp", "even"}
    assert all(r["fid"] is not None for r in out["sample_quality"])
    assert Path(out["cost_matrix"]["file"]).is_file()
