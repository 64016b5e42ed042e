"""Candidate grid specs: strides, small-t-dense grids (log, dense), lists, and their errors."""

import pytest

from ddpm_schedules.costs.grids import candidate_grid, dense_grid, grid_size, log_grid


@pytest.mark.parametrize("n,T", [(2, 1000), (10, 1000), (100, 1000), (200, 4000), (50, 50), (7, 4000)])
def test_log_grid_has_n_points_from_1_to_T_spaced_geometrically(n, T):
    g = log_grid(n, T)
    assert len(g) == n and g[0] == 1 and g[-1] == T and all(b > a for a, b in zip(g, g[1:]))
    # a point differs from the rounded geometric one only in the dense prefix, where points are forced one apart
    off = [i for i, t in enumerate(g) if t != round(T ** (i / (n - 1)))]
    assert all(g[i] == i + 1 for i in off)


def test_log_grid_keeps_small_t_dense():
    g = log_grid(100, 1000)
    assert g[:10] == list(range(1, 11))  # the decoder and the first steps are all there
    assert sum(t > 500 for t in g) < 15  # and the large t are sparse
    assert log_grid(5000, 1000) == list(range(1, 1001))  # n >= T: every step


def test_dense_grid():
    assert dense_grid(5, 10, 40) == [1, 2, 3, 4, 5, 10, 20, 30, 40]
    assert dense_grid(10, 10, 35) == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 20, 30, 35]
    assert dense_grid(0, 250, 1000) == [250, 500, 750, 1000]


def test_specs():
    assert candidate_grid(None, 10) is None and candidate_grid(4, 10) == [4, 8, 10]
    assert candidate_grid("log:4", 1000) == log_grid(4, 1000) == [1, 10, 100, 1000]
    assert candidate_grid("dense:3,4", 10) == [1, 2, 3, 4, 8, 10] and candidate_grid([9, 3, 10], 10) == [3, 9, 10]
    assert grid_size(None, 1000) == 1000 and grid_size("dense:10,10", 1000) == 109 and grid_size("log:100", 1000) == 100
    assert len(candidate_grid(10, 1000)) == 100


@pytest.mark.parametrize("spec", ["log:0", "log:x", "dense:5", "dense:5,0", "cubic:3", "", 0, 1001, True, 2.5])
def test_bad_specs_name_the_parameter(spec):
    with pytest.raises(ValueError, match="^grid = "):
        candidate_grid(spec, 1000)
