"""Analytic-DPM's variance, terms, Gamma estimate and optimal trajectory, against its own code's numbers."""

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import FIXTURE

from ddpm_schedules import estimate_cost_matrix, load_improved_diffusion
from ddpm_schedules.costs.terms import terms
from ddpm_schedules.models import diffusion as dm
from ddpm_schedules.models.noise import example_noise
from ddpm_schedules.models.pairs import reverse_log_variance
from ddpm_schedules.schedules.analytic import analytic_ot_schedule, load_gamma, save_gamma

ADPM = Path(__file__).parent / "fixtures" / "analytic_dpm"


@pytest.fixture(scope="module")
def reference():
    return torch.load(ADPM / "reference.pt", weights_only=True)


def fixture_model(gamma=None):
    """The improved-diffusion fixture UNet in float64 with the analytic rule (its learned v is ignored)."""
    flags = json.loads((FIXTURE / "flags.json").read_text())
    model = load_improved_diffusion(FIXTURE / "model.pt", levels=256, flags=flags).double()
    return model.use_variance("analytic", gamma)


@pytest.mark.parametrize("key", [pytest.param("full", marks=pytest.mark.slow), "respaced"])
def test_variances_and_kl_terms_equal_analytic_dpm(reference, key):
    """Their nelbo_ms_eps_ddpm on a full chain and a respaced one: every var_p and every KL term to 1e-6."""
    model, ref = fixture_model(reference["ms_eps"]), reference[key]
    clipped = 0
    for i, (s, t) in enumerate(ref["pairs"]):
        var = torch.exp(reverse_log_variance(model, torch.tensor([s]), t))[0]
        assert var.item() == pytest.approx(ref["var_p"][i].item(), rel=1e-6)
        if s == 0:
            continue
        clipped += not 0 < ref["cov_x_0"][i] < 1
        ours = terms(model, reference["x0"], t, [s], noise=ref["noise"][t])[:, 0]
        torch.testing.assert_close(ours, ref["terms"][i], rtol=1e-6, atol=0)
    assert clipped > 0  # the clip of Cov[x_0 | x_t] to [0, 1] is exercised (Gamma > 1 and large t)


def test_decoder_uses_btil_1_2_whatever_gamma(reference):
    model = fixture_model(reference["ms_eps"])
    ns = model.schedule
    for t in (1, 12, 100):
        assert reverse_log_variance(model, torch.tensor([0]), t).item() == pytest.approx(
            math.log(dm.btil(ns.ab[1], ns.ab[2]).item()), rel=1e-12
        )


@pytest.mark.parametrize("K", [5, 10, 20])
def test_analytic_ot_equals_their_dp_seg(reference, K):
    """Their optimal trajectory (the DP on log(1 - beta Gamma / (1 - ab)) plus the split for Gamma > 1)."""
    model = fixture_model(reference["ms_eps"])
    assert list(analytic_ot_schedule(model.schedule, reference["ms_eps"], K, 768).timesteps) == list(
        reference["dp_seg"][K]
    )


def test_analytic_ot_costs_are_the_kl_of_the_optimal_variance():
    """D/2 log(sigma*^2 / btil) with sigma*^2 = btil + c0^2 (1 - ab_t) / ab_t (1 - Gamma_t), unclipped (the closed
    form)."""
    ns = dm.NoiseSchedule.named("cosine", 50)
    gamma = torch.cat([torch.zeros(1), torch.linspace(0.3, 0.95, 50, dtype=torch.float64)])
    costs = ns.analytic_ot_costs(gamma, 10)
    for s, t in [(1, 2), (3, 40), (10, 50)]:
        ab_s, ab_t = ns.ab[s], ns.ab[t]
        sigma2 = dm.btil(ab_s, ab_t) + dm.c0(ab_s, ab_t) ** 2 * (1 - ab_t) / ab_t * (1 - gamma[t])
        assert costs[s, t].item() == pytest.approx(5 * math.log(sigma2 / dm.btil(ab_s, ab_t)), rel=1e-10)
    assert math.isinf(costs[0, 5]) and math.isinf(costs[7, 3])


def test_gamma_from_the_cost_matrix_passes_equals_a_given_gamma():
    """Gamma estimated inside the column passes, and the KL moments filled in from ||x_0 - x0_hat||^2, equal
    the direct per-example terms with that Gamma given (mean and standard error)."""
    x0 = torch.randint(0, 256, (6, 3, 16, 16), generator=torch.Generator().manual_seed(0)).double() / 127.5 - 1
    grid = [3, 20, 50, 100]
    estimated = estimate_cost_matrix(fixture_model(), x0, grid=grid, batch_size=4, progress=False)
    eps_sq = []
    model = fixture_model()
    for t in grid:
        x_t = model.q_sample(x0, t, example_noise(0, 0, 6, t, (3, 16, 16)))
        eps_sq.append((model.predict(x_t, t).eps ** 2).mean().item())
    torch.testing.assert_close(estimated.gamma[grid], torch.tensor(eps_sq, dtype=torch.float64), rtol=1e-10, atol=0)
    assert torch.isnan(estimated.gamma[[1, 2, 99]]).all()
    direct = estimate_cost_matrix(fixture_model(estimated.gamma), x0, grid=grid, batch_size=3, progress=False)
    valid = torch.isfinite(direct.mean)
    torch.testing.assert_close(estimated.mean[valid], direct.mean[valid], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(estimated.sem[valid], direct.sem[valid], rtol=1e-7, atol=1e-9)


def test_gamma_file_round_trip_and_refusals(tmp_path):
    model = fixture_model()
    gamma = torch.full((101,), math.nan, dtype=torch.float64)
    gamma[[5, 50, 100]] = torch.tensor([0.5, 0.9, 1.01], dtype=torch.float64)
    save_gamma(tmp_path / "gamma.pt", gamma, model)
    torch.testing.assert_close(load_gamma(tmp_path / "gamma.pt", model), gamma, equal_nan=True)
    other = fixture_model()
    with torch.no_grad():
        next(other.net.parameters()).add_(1e-3)
    with pytest.raises(ValueError, match="other weights"):
        load_gamma(tmp_path / "gamma.pt", other)
    (tmp_path / "junk.pt").write_bytes(b"not a gamma file")
    with pytest.raises(ValueError, match="not a Gamma file"):
        load_gamma(tmp_path / "junk.pt", model)


@pytest.mark.parametrize(
    ("gamma", "match"),
    [
        (torch.ones(7), "T \\+ 1 = 101"),
        (torch.tensor([0.0] + [-0.5] * 100), "-0.5 is negative"),
        (torch.tensor([0.0] + [math.inf] * 100), "inf is negative or not finite"),
    ],
)
def test_bad_gamma_is_refused(gamma, match):
    with pytest.raises(ValueError, match=match):
        fixture_model(gamma)


def test_analytic_needs_gamma_where_it_is_used():
    model = fixture_model()
    with pytest.raises(ValueError, match="needs Gamma_t"):
        reverse_log_variance(model, torch.tensor([1]), 5)
    gamma = torch.full((101,), math.nan, dtype=torch.float64)
    gamma[10] = 0.7
    model.use_variance("analytic", gamma)
    with pytest.raises(ValueError, match="not known at t = 20"):
        reverse_log_variance(model, torch.tensor([3]), 20)


@pytest.mark.slow
def test_evaluate_with_the_analytic_override(tmp_path, tiny_ckpt):
    """A learned-variance checkpoint evaluated with model.var_type=analytic: reported as an override, Gamma saved
    and reusable, analytic_ot schedules built, and a different cache entry from the learned rule's."""
    from conftest import eval_cfg

    from ddpm_schedules.app.evaluate import evaluate

    out = evaluate(
        eval_cfg(tmp_path, tiny_ckpt, "model.var_type=analytic", "eval.strategies=[dp,analytic_ot,even]", "logger=none")
    )
    assert (
        out["model"]["var_type"] == "analytic"
        and out["model"]["trained_var_type"] == "learned_range"
        and out["model"]["var_type_override"]
    )
    strategies = {row["strategy"] for row in out["results"]}
    assert {"dp", "analytic_ot", "even"} <= strategies
    ot = [row for row in out["results"] if row["strategy"] == "analytic_ot"]
    assert all(row["schedule"][0] == 1 and math.isfinite(row["bpd"]) for row in ot)
    gamma_file = tmp_path / "run" / "gamma.pt"
    assert gamma_file.is_file()
    again = evaluate(
        eval_cfg(
            tmp_path / "b",
            tiny_ckpt,
            "model.var_type=analytic",
            f"model.gamma_file={gamma_file}",
            "eval.strategies=[dp,even]",
            "logger=none",
            "eval.samplers=[ddim]",
        )
    )

    def by_key(o):
        return {(r["strategy"], r["K"]): r["bpd"] for r in o["results"] if r["strategy"] in ("dp", "even")}

    assert by_key(again) == pytest.approx(by_key(out), rel=1e-9)  # the same Gamma, the same numbers
    learned = evaluate(eval_cfg(tmp_path, tiny_ckpt, "eval.strategies=[dp,even]", "logger=none"))
    assert learned["cost_matrix"]["file"] != out["cost_matrix"]["file"]


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["model.var_type=analytic", "cost.target_sem=0.1"], "without cost.target_sem"),
        (["model.gamma_file=g.pt"], "only used with model.var_type=analytic"),
        (["model.var_type=bogus"], "var_type = 'bogus'"),
        (["eval.strategies=[analytic_ot]"], "evaluate with model.var_type=analytic"),
        (
            ["model.var_type=analytic", "eval.strategies=[analytic_ot]", "cost.grid=5", "eval.full_chain=false"],
            "use cost.grid=null",
        ),
    ],
)
def test_analytic_bad_inputs(tmp_path, tiny_ckpt, overrides, match):
    from conftest import eval_cfg

    from ddpm_schedules.app.evaluate import evaluate

    with pytest.raises(ValueError, match=match):
        evaluate(eval_cfg(tmp_path, tiny_ckpt, "logger=none", *overrides))


@pytest.mark.slow
def test_schedule_monitor_with_the_analytic_rule(tmp_path):
    """During training the monitor prices schedules with the analytic variance and leaves the model's own rule in
    place."""
    from conftest import train_cfg

    from ddpm_schedules.app.train import train

    train(
        train_cfg(
            tmp_path,
            "logger=none",
            "callbacks.schedule_monitor.var_type=analytic",
            "callbacks.schedule_monitor.grid=null",
            "callbacks.schedule_monitor.strategies=[dp,analytic_ot,even]",
            "trainer.max_steps=3",
        )
    )
    record = json.loads((tmp_path / "schedules" / "step_3.json").read_text())
    assert record["var_type"] == "analytic"
    assert {r["strategy"] for r in record["results"]} == {"dp", "analytic_ot", "even"}
    from ddpm_schedules.costs.matrix import CostMatrix
    from ddpm_schedules.models.checkpoints import load_checkpoint

    gamma = CostMatrix.load(tmp_path / "schedules" / "cost_matrix_step_3.pt").gamma
    assert gamma is not None and bool(torch.isfinite(gamma[1:]).all())

    assert load_checkpoint(tmp_path / "checkpoints" / "last.ckpt").var_type == "learned_range"


def test_analytic_ot_with_gamma_above_one_at_small_t():
    """A model that overshoots at small t (Gamma_1 > 1) still gets a K-step trajectory; their rule would drop every
    step."""
    ns = dm.NoiseSchedule.named("linear", 100)
    gamma = torch.cat([torch.zeros(1), torch.linspace(0.3, 0.99, 100, dtype=torch.float64)])
    gamma[1:3] = 1.2
    for K in (2, 5, 10):
        sch = analytic_ot_schedule(ns, gamma, K, 64)
        assert sch.K == K and sch.timesteps[0] == 1 and sch.timesteps[-1] == 100
