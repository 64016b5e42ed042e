"""DPM-Solver++(2M)'s step costs from the teacher's Gram matrices, against stepping the update itself."""

import math

import pytest
import torch
from conftest import tiny_model

from ddpm_schedules.costs.grids import full_grid
from ddpm_schedules.costs.multistep import multistep_distance_sums, step_sq_distances, trajectory_gram
from ddpm_schedules.costs.ode import estimate_ode_matrix, teacher_trajectory, trajectory_noise


def step_2m(model, xs, x0s, grid, p, c, n):
    """DPM-Solver++(2M) from the teacher's point c with x0_hat at c and p, written out (Lu et al. 2022, midpoint
    form)."""
    ab = model.schedule.ab
    alpha, sigma = (lambda t: ab[t].sqrt()), (lambda t: (1 - ab[t]).sqrt())
    lam = lambda t: math.log(alpha(t) / sigma(t))
    tp, tc, tn = (int(grid[i]) for i in (p, c, n))
    h = lam(tn) - lam(tc)
    r = (lam(tc) - lam(tp)) / h
    D = (1 + 1 / (2 * r)) * x0s[c] - 1 / (2 * r) * x0s[p]
    return sigma(tn) / sigma(tc) * xs[c] - alpha(tn) * math.expm1(-h) * D


@pytest.mark.parametrize(
    "var_type,mean_type,clip",
    [("fixed_large", "x0", False), ("learned_range", "x0", False), ("learned_range", "eps", True)],
)
def test_the_gram_identity_equals_the_distance_of_the_stepped_update(var_type, mean_type, clip):
    """x0 prediction unclipped keeps every point of the random network's trajectories near unit scale (an eps network's
    unclipped x0_hat reaches 1e3 there, and the identity's rounding, 1e-16 max G, with it); clipped, some steps land
    exactly on the teacher, where only the squared distance is exact."""
    model = tiny_model(var_type, mean_type=mean_type, T=40, clip=clip)
    grid = full_grid([2, 5, 9, 16, 24, 31, 40], 40)
    xs, x0s = teacher_trajectory(model, trajectory_noise(0, 0, 6, model.image_shape), grid)
    G = trajectory_gram(xs, x0s)
    sums = multistep_distance_sums(model.schedule.ab, grid, G)
    N, checked = grid.numel() - 1, 0
    for c in range(2, N):
        sq = step_sq_distances(model.schedule.ab, grid, G, c)  # [B, P, M]
        for p in range(c + 1, N + 1):
            for n in range(1, c):
                dist = (step_2m(model, xs, x0s, grid, p, c, n) - xs[n]).flatten(1).norm(dim=1)
                torch.testing.assert_close(
                    sq[:, p - c - 1, n - 1], dist**2, rtol=1e-8, atol=1e-13
                )  # the identity itself
                if not clip:  # no step lands exactly on the teacher: the summed distances agree to 1e-8 as well
                    assert float(sums[p, c, n]) == pytest.approx(float(dist.sum()), rel=1e-8), (p, c, n)
                checked += 1
    assert checked == math.comb(N - 1, 3) + math.comb(N - 1, 2)  # every p > c > n >= 1 with c >= 2
    assert float(sums[1:, 1:, 0].abs().sum()) == 0  # n = 0 is the first-order matrix's


def test_the_two_step_costs_do_not_depend_on_the_chunk_size():
    model = tiny_model("learned_range", T=30)
    a = estimate_ode_matrix(model, 7, grid=list(range(3, 31, 3)), seed=2, batch_size=7, progress=False, multistep=True)
    b = estimate_ode_matrix(model, 7, grid=list(range(3, 31, 3)), seed=2, batch_size=2, progress=False, multistep=True)
    # Chunks of 7 and 2 are other network calls (float64 here; a CPU may round them differently in the last bits,
    # u = 1.1e-16) along a 10-step teacher. The pair distances are norms of differences: rtol 1e-10. A two-step cost
    # is sqrt(w^T G w) of a Gram form that cancels, so a small distance keeps only about half its digits: its
    # absolute error is at most ~sqrt(u) times the largest distance (measured 2e-13 against 4e-10).
    torch.testing.assert_close(
        a.two_step, b.two_step, rtol=1e-10, atol=1.5e-8 * float(a.two_step.nan_to_num(0, 0, 0).max())
    )
    torch.testing.assert_close(a.mean, b.mean, rtol=1e-10, atol=1e-15)
    plain = estimate_ode_matrix(model, 7, grid=list(range(3, 31, 3)), seed=2, progress=False)
    assert plain.two_step is None and torch.equal(plain.mean, a.mean)  # the pair matrix is the same with or without


def test_dp_dpmpp_strategy_and_the_monitor_price_two_step_paths():
    from references import brute_force_multistep_paths

    from ddpm_schedules.lightning.callbacks import summarize
    from ddpm_schedules.schedules.dp_multistep import multistep_path_cost
    from ddpm_schedules.schedules.strategies import build_schedules, parse_strategies

    model = tiny_model("learned_range", T=12)
    cm = estimate_ode_matrix(model, 5, seed=1, progress=False, multistep=True)
    strategies = parse_strategies(["dp_dpmpp", "dp_ode", "even"], 12)
    schedules = build_schedules(strategies, {"ode": cm, "dpmpp": cm}, [3, 5])
    by = {(s.strategy, s.K): s for s in schedules}
    for K in (3, 5):
        brute_path, brute_total = brute_force_multistep_paths(cm.mean, cm.two_step, [K])[K]
        assert list(by["dp_dpmpp", K].timesteps) == brute_path[1:]  # grid index = t on the full grid
        assert multistep_path_cost(cm, by["dp_dpmpp", K].timesteps) == pytest.approx(brute_total, rel=1e-12)
        assert (
            multistep_path_cost(cm, by["dp_dpmpp", K].timesteps)
            <= multistep_path_cost(cm, by["dp_ode", K].timesteps) + 1e-12
        )
    record = summarize(cm, [3, 5], 7, parse_strategies(["dp_dpmpp", "even"], 12))
    assert record["objective"] == record["unit"] == "dpmpp" and "schedules/dp_dpmpp_gap/K3" in record["metrics"]
    with pytest.raises(ValueError, match="dp_dpmpp needs DPM-Solver\\+\\+\\(2M\\)'s step costs"):
        build_schedules(
            parse_strategies(["dp_dpmpp"], 12), {"dpmpp": estimate_ode_matrix(model, 2, progress=False)}, [3]
        )


def test_a_grid_too_large_for_the_two_step_costs_is_refused_before_any_pass():
    model = tiny_model("fixed_large", T=400)
    message = r"^grid has 400 points: DPM-Solver\+\+\(2M\)'s step costs need 0.5 GB, more than memory_gb = 0.1"
    with pytest.raises(ValueError, match=message):
        estimate_ode_matrix(model, 2, progress=False, multistep=True, memory_gb=0.1)
