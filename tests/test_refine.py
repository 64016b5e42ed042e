"""Coarse-to-fine refinement: passes only for new columns, the matrix of the final grid, a stop when the paths
settle."""

import pytest
import torch
from conftest import CountingNet, quantized_data, tiny_model

from ddpm_schedules import estimate_cost_matrix, optimal_schedules
from ddpm_schedules.costs.refine import RefineSettings, check_refine, refine_cost_matrices
from ddpm_schedules.costs.terms import column_stats, pair_tables, pair_terms, stats_terms
from ddpm_schedules.models.model import Prediction


def test_refinement_spends_one_pass_per_example_and_column_and_gives_the_final_grids_matrix():
    model, data = tiny_model("learned_range", T=60), quantized_data(6)
    counting = CountingNet(model.net)
    model.net = counting
    settings = RefineSettings(coarse="log:8", window=2, max_rounds=12)
    matrices, history = refine_cost_matrices(
        model, data, [2, 3, 5], settings, objectives=("elbo", "mse"), seed=4, batch_size=4, progress=False
    )
    model.net = counting.net
    cm = matrices["elbo"]
    grid = cm.grid[1:].tolist()
    assert len(counting.calls) == len(grid) and set(counting.calls.values()) == {
        6
    }  # one pass per example and column, ever
    assert history[-1]["passes"] == 6 * len(grid) and [h["grid_size"] for h in history] == sorted(
        h["grid_size"] for h in history
    )
    assert len(grid) < 60  # it did not need every column
    for name in ("elbo", "mse"):  # the same matrix as estimating the final grid directly
        direct = estimate_cost_matrix(model, data, grid=grid, seed=4, progress=False, objective=name)
        valid = torch.isfinite(direct.mean)
        torch.testing.assert_close(matrices[name].mean[valid], direct.mean[valid], rtol=1e-10, atol=0)
    # it stopped because the final paths of both objectives need no timestep it lacks
    for name in ("elbo", "mse"):
        paths = optimal_schedules(matrices[name], [2, 3, 5])
        near = {u for p in paths.values() for t in p.timesteps for u in range(t - 2, t + 3) if 1 <= u <= 60}
        assert near <= set(grid) and history[-1]["paths"][name] == {K: list(p.timesteps) for K, p in paths.items()}
    assert len(history) < 12  # stopped before the round limit


def test_a_pass_budget_stops_refinement():
    model, data = tiny_model("fixed_large", T=80), quantized_data(4)
    matrices, history = refine_cost_matrices(
        model, data, [3], RefineSettings(coarse=20, window=3, max_passes=4 * 6), progress=False
    )
    assert history[-1].get("stopped") == "max_passes" and matrices["elbo"].grid.numel() - 1 == 4  # the coarse grid only


@pytest.mark.parametrize(
    "settings,message",
    [
        (RefineSettings(window=-1), "^window = -1"),
        (RefineSettings(coarse=0), "^coarse = 0"),
        (RefineSettings(coarse=100), "^coarse = 100; an integer grid is a stride >= 1 and <= T = 50"),
        (RefineSettings(max_rounds=0), "^max_rounds = 0"),
        (RefineSettings(bisect="yes"), "^bisect = 'yes'"),
        (RefineSettings(coarse="log:10", max_passes=5), "below the 40 passes"),
    ],
)
def test_bad_refinement_settings(settings, message):
    with pytest.raises(ValueError, match=message):
        check_refine(settings, 50, 4)


@pytest.mark.parametrize("var_type", ["fixed_large", "fixed_small", "learned_range"])
def test_column_statistics_give_the_pairs_of_rows_chosen_after_the_pass(var_type):
    """A column's kept statistics reproduce the elementwise KL of every s < t (the reference), with adversarial
    ranges of f in one batch (one example beyond what the expansion takes: it is kept whole)."""
    T, t = 400, 300
    model = tiny_model(var_type, T=T, shape=(3, 8, 8))
    g = torch.Generator().manual_seed(0)
    x0 = quantized_data(5, shape=(3, 8, 8))
    x_t = model.q_sample(x0, t, torch.randn(x0.shape, generator=g, dtype=torch.float64))
    frac = None
    if var_type == "learned_range":
        frac = torch.rand(x0.shape, generator=g, dtype=torch.float64)
        frac[1, 0, 0, 0], frac[2, 0, 0, 0], frac[3, 0, 0, 0] = -3.0, 4.0, -60.0  # v = -7, v = 7, and an extreme one
    pred = Prediction(torch.rand(x0.shape, generator=g, dtype=torch.float64) * 2 - 1, frac)
    stats = column_stats(model, x0, pred, t)
    s = torch.tensor([0, 1, 2, 7, 150, 298, 299])
    got = stats_terms(model, stats, pair_tables(model, t, s))
    want = pair_terms(model, x0, x_t, t, s, pred, fast=False)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    assert (
        stats.nbytes < pred.x0_hat.numel() * 8 * (2 if frac is not None else 1) / 2
    )  # far smaller than the prediction
    if var_type == "learned_range":
        assert stats.direct.tolist() == [False, False, False, True, False] and stats.moments.shape[1] == 4


def test_bisection_adds_the_midpoints_to_each_used_timesteps_grid_neighbours():
    from ddpm_schedules.costs.refine import wanted_timesteps

    grid = [1, 2, 3, 10, 50, 200]
    assert wanted_timesteps(grid, [10], 1, False, 200) == {9, 10, 11}
    assert wanted_timesteps(grid, [10, 200], 0, True, 200) == {
        6,
        10,
        30,
        125,
        200,
    }  # halfway to 3 and 50; 200 has no right neighbour
    assert wanted_timesteps(grid, [2], 0, True, 200) == {2}  # neighbours 1 and 3 leave no room
    model, data = tiny_model("fixed_small", T=80), quantized_data(4)
    plain = refine_cost_matrices(
        model, data, [3], RefineSettings(coarse="log:10", window=0, bisect=False), progress=False
    )[0]["elbo"]
    bisected = refine_cost_matrices(
        model, data, [3], RefineSettings(coarse="log:10", window=0, bisect=True), progress=False
    )[0]["elbo"]
    assert set(plain.grid.tolist()) < set(
        bisected.grid.tolist()
    )  # window 0 stops at once; bisection keeps narrowing the gaps
