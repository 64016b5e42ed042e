"""run_evaluation: the evaluate.py pipeline as a function of objects (no Hydra), and its results.json schema."""

import json
from dataclasses import replace

import pytest
import torch
from conftest import quantized_data, tiny_model

from ddpm_schedules import estimate_cost_matrix, evaluate_schedules, optimal_schedules
from ddpm_schedules.app.run import EvaluationResult, run_evaluation
from ddpm_schedules.app.settings import CostSettings, EvaluateSettings, HeldOutSettings, Labels
from ddpm_schedules.sampling.quality import QualitySettings


def test_stages_compose_into_the_results_of_the_library_calls(tmp_path):
    model = tiny_model("learned_range", T=12)
    cost_data, eval_data = quantized_data(10, seed=1), quantized_data(8, seed=2)
    settings = EvaluateSettings(
        tmp_path / "out",
        tmp_path / "cache",
        batch_size=4,
        cost=CostSettings(seed=3),
        held_out=HeldOutSettings(budgets=(2, 4), sample_budgets=(2,), strategies=("dp", "even"), seed=4),
        quality=QualitySettings(samples=4, grid_size=4, chunk=2),
        labels=Labels("python", "", "quantized", "val", "test"),
    )
    result = run_evaluation(model, cost_data, eval_data, settings)
    assert isinstance(result, EvaluationResult) and result.full_chain is None
    cm = estimate_cost_matrix(model, cost_data, seed=3, progress=False)
    dp = optimal_schedules(cm, [2, 4])
    assert result.schedules[:2] == [dp[2], dp[4]]
    direct = evaluate_schedules(model, eval_data, result.schedules, seed=4, batch_size=4, progress=False)
    assert [r["bpd"] for r in result.results] == [r.bpd for r in direct]
    # the path's entries summed in another order than the DP's: equal to rounding
    assert [r["predicted_bpd"] for r in result.results[:2]] == pytest.approx(
        [cm.bpd(s.predicted_nats) for s in dp.values()], rel=1e-13
    )
    doc = json.loads((tmp_path / "out" / "results.json").read_text())
    assert doc == json.loads(json.dumps(result.to_json()))
    assert set(doc) == {
        "run",
        "model",
        "data",
        "cost_matrix",
        "full_chain",
        "fid",
        "results",
        "sample_quality",
        "timings",
    }
    assert doc["fid"]["features"] is None and [q["fid"] for q in doc["sample_quality"]] == [None] * 4
    assert [(q["strategy"], q["sampler"]) for q in doc["sample_quality"]] == [
        ("dp", "ancestral"),
        ("even", "ancestral"),
        ("dp", "ddim"),
        ("even", "ddim"),
    ]
    assert [tuple(g.shape) for g in result.grids.values()] == [(4, 1, 4, 4)] * 4
    again = run_evaluation(
        model,
        cost_data,
        eval_data,
        replace(settings, out_dir=tmp_path / "out2", held_out=replace(settings.held_out, full_chain=True)),
    )
    assert again.cost_matrix["cached"] and [r["schedule"] for r in again.results] == [
        r["schedule"] for r in result.results
    ]
    # the full chain joins the one union pass; the schedules' numbers stay those of the library call
    assert again.full_chain["K"] == 12 and [r["bpd"] for r in again.results] == pytest.approx(
        [r["bpd"] for r in result.results], rel=1e-12
    )


def test_target_sem_adds_rounds_until_every_dp_path_is_that_precise():
    from ddpm_schedules.costs.evaluation import evaluate_schedules
    from ddpm_schedules.costs.precision import estimate_to_precision

    model, data = tiny_model("learned_range", T=12), quantized_data(40, seed=3)
    loose, loose_rounds = estimate_to_precision(model, data, [2, 4], target_sem=10.0, seed=1, first=8, progress=False)
    assert [r["examples"] for r in loose_rounds] == [8] and loose.count == 8
    cm, rounds = estimate_to_precision(model, data, [2, 4], target_sem=0.05, seed=1, first=8, progress=False)
    used = [r["examples"] for r in rounds]
    assert used == sorted(used) and used[0] == 8 and all(b == min(2 * a, 40) for a, b in zip(used, used[1:]))
    final = rounds[-1]
    assert max(final["sem_bpd"].values()) <= 0.05 or used[-1] == 40
    assert [r["met"] for r in rounds] == [max(r["sem_bpd"].values()) <= 0.05 for r in rounds]
    assert all(max(r["sem_bpd"].values()) > 0.05 for r in rounds[:-1])  # it stopped at the first precise round
    # the merged rounds are the matrix of all the examples used, estimated at once (the noise rule composes them)
    whole = estimate_cost_matrix(model, data[: used[-1]], seed=1, progress=False)
    valid = torch.isfinite(whole.mean)
    torch.testing.assert_close(cm.mean[valid], whole.mean[valid], rtol=1e-10, atol=0)
    torch.testing.assert_close(cm.sem[valid], whole.sem[valid], rtol=1e-8, atol=0)
    # the reported errors are those of the DP paths' per-example totals, measured afresh
    paths = optimal_schedules(cm, [2, 4])
    measured = evaluate_schedules(model, data[: used[-1]], list(paths.values()), seed=1, progress=False)
    assert [final["sem_bpd"][K] for K in (2, 4)] == pytest.approx([r.bpd_sem for r in measured], rel=1e-9)
    assert [final["predicted_bpd"][K] for K in (2, 4)] == pytest.approx(
        [cm.bpd(p.predicted_nats) for p in paths.values()], rel=1e-9
    )


def test_an_unreachable_target_sem_uses_every_example_and_says_so(tmp_path, caplog):
    from ddpm_schedules.app.settings import PrecisionSettings
    from ddpm_schedules.app.stages import Context, precision_stage
    from ddpm_schedules.costs.precision import estimate_to_precision

    model, data = tiny_model("fixed_large", T=12), quantized_data(12, seed=3)
    cm, rounds = estimate_to_precision(model, data, [2, 4], target_sem=1e-9, seed=1, first=4, progress=False)
    assert [r["examples"] for r in rounds] == [4, 8, 12] and cm.count == 12 and not rounds[-1]["met"]
    # evaluate.py's stage says so, naming the config keys
    with caplog.at_level("WARNING", logger="ddpm_schedules.app.stages"):
        precision_stage(Context(model, tmp_path), data, None, 1, Labels(), [2, 4], PrecisionSettings(1e-9, first=4))
    assert "cost.target_sem = 1e-09 bits/dim is not reached with all 12 examples" in caplog.text
    assert "raise cost.examples" in caplog.text


def test_target_sem_continues_from_a_refined_first_round_on_its_grid():
    from ddpm_schedules.costs.precision import estimate_to_precision
    from ddpm_schedules.costs.refine import RefineSettings, refine_cost_matrices

    model, data = tiny_model("learned_range", T=40), quantized_data(24, seed=5)
    refined = refine_cost_matrices(
        model, data[:6], [2, 4], RefineSettings(coarse="log:8", window=1), seed=2, progress=False
    )[0]["elbo"]
    cm, rounds = estimate_to_precision(model, data, [2, 4], target_sem=1e-9, seed=2, progress=False, start=refined)
    assert [r["examples"] for r in rounds] == [6, 12, 24] and torch.equal(cm.grid, refined.grid) and cm.count == 24
    # the first round's refined columns and the later rounds are one estimate on the refined grid
    whole = estimate_cost_matrix(model, data, grid=refined.grid[1:].tolist(), seed=2, progress=False)
    valid = torch.isfinite(whole.mean)
    torch.testing.assert_close(cm.mean[valid], whole.mean[valid], rtol=1e-10, atol=0)
    torch.testing.assert_close(cm.sem[valid], whole.sem[valid], rtol=1e-8, atol=0)


def test_batch_size_null_gives_about_a_million_input_values_per_network_call():
    from ddpm_schedules.app.settings import EvaluateSettings, auto_batch_size

    assert [auto_batch_size(s) for s in ((1, 8, 8), (3, 32, 32), (3, 64, 64), (3, 512, 512))] == [1000, 341, 85, 1]
    model = tiny_model("fixed_large", T=200)  # 1x4x4 images, T above the default budgets
    assert (
        EvaluateSettings().resolve(model).batch_size == 1000
        and EvaluateSettings(batch_size=7).resolve(model).batch_size == 7
    )
