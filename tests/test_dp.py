"""The exact DP against brute-force enumeration and the classic numpy loop."""

import math

import numpy as np
import pytest
import torch
from references import brute_force_paths, classic_paths

from ddpm_schedules import CostMatrix, optimal_paths, optimal_schedules


def random_costs(n, seed, integer=False):
    rng = np.random.default_rng(seed)
    C = rng.integers(0, 4, (n, n)).astype(float) if integer else rng.exponential(1.0, (n, n))
    return C


@pytest.mark.parametrize("size", range(2, 13))
@pytest.mark.parametrize("integer", [False, True], ids=["real", "ties"])
def test_dp_equals_brute_force_every_budget(size, integer):
    for seed in range(3):
        C = random_costs(size, seed + 10 * size, integer)
        budgets = list(range(1, size))
        dp, bf = optimal_paths(C, budgets), brute_force_paths(C, budgets)
        assert dp == bf  # same paths (tie rule included) and bit-identical totals
        for K, (path, total) in dp.items():
            assert len(path) == K + 1 and path[0] == 0 and path[-1] == size - 1
            assert math.isclose(total, sum(C[a, b] for a, b in zip(path, path[1:])), rel_tol=0, abs_tol=0)


def test_ties_go_to_the_smallest_path_from_the_end():
    C = np.zeros((5, 5))  # every path of K steps costs 0
    paths = optimal_paths(C, [1, 2, 3, 4])
    assert paths[2][0] == [0, 1, 4] and paths[3][0] == [0, 1, 2, 4] and paths[4][0] == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("size", [6, 9, 12])
def test_at_most_budget(size):
    C = random_costs(size, size, integer=True)
    C[0, size - 1] = 100.0  # one step is expensive, more steps help then stop helping
    budgets = list(range(1, size))
    dp = optimal_paths(C, budgets, at_most=True)
    assert dp == brute_force_paths(C, budgets, at_most=True)
    totals = [dp[K][1] for K in budgets]
    assert totals == sorted(totals, reverse=True)  # monotone non-increasing in K


def test_classic_loop_equals_brute_force():
    for seed in range(3):
        C = random_costs(9, seed, integer=True)
        assert classic_paths(C, 8) == brute_force_paths(C, range(1, 9))


def test_dp_matches_classic_numpy_loop_on_a_large_matrix():
    n = 300
    rng = np.random.default_rng(0)
    # a cost-matrix-like shape: jumps cost more the longer they are, plus noise
    s, t = np.meshgrid(np.arange(n + 1), np.arange(n + 1), indexing="ij")
    C = np.abs(t - s) ** 1.5 / n + rng.exponential(0.1, (n + 1, n + 1))
    assert optimal_paths(C, range(1, n + 1)) == classic_paths(C, n)


def cost_matrix_from(C, grid):
    n = len(grid)
    mean = torch.as_tensor(C, dtype=torch.float64).clone()
    mean[~torch.ones(n, n, dtype=torch.bool).triu(1)] = math.inf
    return CostMatrix(
        mean=mean,
        sem=torch.zeros(n, n, dtype=torch.float64),
        grid=torch.tensor(grid),
        prior=0.5,
        prior_sem=0.0,
        count=1,
        dims=4,
    )


@pytest.mark.parametrize("seed", range(4))
def test_candidate_grid_is_exact_on_that_grid(seed):
    grid = [0, 1, 2, 3, 5, 8, 10, 11, 13, 15, 17, 20]
    C = random_costs(len(grid), seed, integer=seed % 2 == 1)
    cm = cost_matrix_from(C, grid)
    cand = [2, 5, 10, 13, 17, 20]
    idx = [0] + [grid.index(t) for t in cand]
    sub = C[np.ix_(idx, idx)]
    ref = brute_force_paths(sub, range(1, len(cand) + 1))
    got = optimal_schedules(cm, range(1, len(cand) + 1), grid=cand)
    for K, sch in got.items():
        assert list(sch.timesteps) == [([0] + cand)[i] for i in ref[K][0][1:]]
        assert sch.predicted_nats == ref[K][1] + 0.5
        assert sch.strategy == "dp" and sch.T == 20 and sch.K == K
        assert math.isclose(cm.schedule_nats(sch), sch.predicted_nats)


def test_bad_input():
    C = random_costs(5, 0)
    with pytest.raises(ValueError, match="budgets has 0; every budget must be an integer in 1..4"):
        optimal_paths(C, [0])
    with pytest.raises(ValueError, match="budgets has 5; every budget must be an integer in 1..4"):
        optimal_paths(C, [2, 5])
    with pytest.raises(ValueError, match="square"):
        optimal_paths(C[:, :4], [1])
    with pytest.raises(ValueError, match="budgets is empty"):
        optimal_paths(C, [])
    bad = C.copy()
    bad[1, 3] = np.nan
    with pytest.raises(ValueError, match=r"costs\[1, 3\] is NaN"):
        optimal_paths(bad, [2])
    cm = cost_matrix_from(C, [0, 2, 4, 6, 8])
    with pytest.raises(ValueError, match="must contain T = 8"):
        optimal_schedules(cm, [1], grid=[2, 4])
    with pytest.raises(ValueError, match="timestep 3 is not on the cost matrix grid"):
        optimal_schedules(cm, [1], grid=[3, 8])
    inf = np.full((4, 4), np.inf)
    inf[0, 3] = 1.0
    with pytest.raises(ValueError, match="no path of 2 steps has a finite cost"):
        optimal_paths(inf, [2])


@pytest.mark.parametrize("size", [17, 40, 70])
def test_ties_across_tiles_match_the_classic_loop(size):
    """Matrices wider than the DP's column tiles, full of ties: the same first-minimum rule everywhere."""
    for seed in range(3):
        C = random_costs(size, seed, integer=True)
        assert optimal_paths(C, range(1, size)) == classic_paths(C, size - 1)
