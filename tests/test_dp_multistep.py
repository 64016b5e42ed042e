"""The DP over DPM-Solver++(2M)'s steps (state: the last two points) against enumeration and the pair DP."""

import numpy as np
import pytest
from references import brute_force_multistep_paths

from ddpm_schedules.schedules.dp import optimal_paths
from ddpm_schedules.schedules.dp_multistep import optimal_multistep_paths


def random_costs(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.uniform(0.1, 2.0, (n + 1, n + 1)), rng.uniform(0.1, 2.0, (n + 1, n + 1, n + 1))


@pytest.mark.parametrize("n,seed", [(5, 0), (7, 1), (8, 2)])
def test_the_three_state_dp_equals_enumerating_every_path(n, seed):
    C1, C2 = random_costs(n, seed)
    budgets = list(range(1, n + 1))
    got, want = optimal_multistep_paths(C1, C2, budgets), brute_force_multistep_paths(C1, C2, budgets)
    for K in budgets:
        assert got[K][0] == want[K][0], K
        assert got[K][1] == pytest.approx(want[K][1], rel=1e-12)
        assert len(got[K][0]) == K + 1 and got[K][0][0] == 0 and got[K][0][-1] == n


def test_a_step_cost_that_ignores_the_previous_point_gives_the_pair_dps_paths():
    n = 9
    C1, _ = random_costs(n, 3)
    C2 = np.broadcast_to(C1.T[None], (n + 1, n + 1, n + 1)).copy()  # C2[p, c, m] = C1[m, c] for every p
    budgets = list(range(1, n + 1))
    pair, multi = optimal_paths(C1, budgets), optimal_multistep_paths(C1, C2, budgets)
    for K in budgets:
        assert multi[K][0] == pair[K][0] and multi[K][1] == pytest.approx(pair[K][1], rel=1e-12)


def test_the_dependence_on_the_previous_point_changes_the_path():
    """Punish the pair DP's one (p, c, n) triple: the three-state DP leaves that path for the best one without it."""
    n = 7
    C1, _ = random_costs(n, 4)
    C2 = np.broadcast_to(C1.T[None], (n + 1, n + 1, n + 1)).copy()
    pair_path = optimal_paths(C1, [3])[3][0]
    down = pair_path[::-1]
    C2[down[0], down[1], down[2]] += 5.0
    got = optimal_multistep_paths(C1, C2, [3])[3]
    assert got[0] != pair_path and got[0] == brute_force_multistep_paths(C1, C2, [3])[3][0]


def test_bad_costs_are_refused():
    C1, C2 = random_costs(4, 0)
    with pytest.raises(ValueError, match=r"must be \[N\+1, N\+1, N\+1\]"):
        optimal_multistep_paths(C1, C2[:, :, :3], [2])
    C2[4, 3, 1] = np.nan
    with pytest.raises(ValueError, match=r"C2\[p, c, n\], p > c > n > 0, is NaN"):
        optimal_multistep_paths(C1, C2, [2])
    with pytest.raises(ValueError, match="budgets"):
        optimal_multistep_paths(*random_costs(4, 0), [9])


def test_first_order_costs_are_checked_as_the_pair_dp_checks_them():
    C1, C2 = random_costs(4, 0)
    C1[1, 3] = np.nan
    with pytest.raises(ValueError, match=r"costs\[1, 3\] is NaN"):
        optimal_multistep_paths(C1, C2, [2])
