"""The mse and ode cost matrices against direct per-example computations, and the DP on them against brute force."""

import pytest
import torch
from conftest import CountingNet, quantized_data, run_on_gloo_processes, tiny_model
from references import brute_force_paths

from ddpm_schedules import CostMatrix, estimate_cost_matrix
from ddpm_schedules.costs.cost_matrix import estimate_cost_matrices
from ddpm_schedules.costs.ode import estimate_ode_matrix, trajectory_noise
from ddpm_schedules.models.noise import example_noise
from ddpm_schedules.schedules.dp import optimal_paths


def mean_sem(values):
    v = torch.stack(values)
    return v.mean(0), v.std(0, unbiased=True) / len(v) ** 0.5


@torch.no_grad()
def test_mse_matrix_is_the_reweighted_squared_error_of_each_example():
    model, data = tiny_model("fixed_small", T=9), quantized_data(5)
    cm = estimate_cost_matrix(model, data, seed=2, batch_size=2, progress=False, objective="mse")
    for t in (1, 4, 9):
        per_example = []
        for i in range(5):
            x0 = data[i : i + 1].double()
            x_t = model.q_sample(x0, t, example_noise(2, i, 1, t, (1, 4, 4)))
            err = ((x0 - model.predict(x_t, t).x0_hat) ** 2).sum()
            per_example.append(torch.tensor([(t - s) * err for s in range(t)], dtype=torch.float64))
        mean, sem = mean_sem(per_example)
        torch.testing.assert_close(cm.mean[:t, t], mean, rtol=1e-12, atol=0)
        torch.testing.assert_close(cm.sem[:t, t], sem, rtol=1e-9, atol=1e-15)
    assert cm.objective == "mse" and cm.prior == 0.0


def test_elbo_and_mse_share_one_forward_pass_per_column():
    model = tiny_model("learned_range", T=8)
    counting = CountingNet(model.net)
    model.net = counting
    both = estimate_cost_matrices(model, quantized_data(6), ["elbo", "mse"], seed=1, batch_size=4, progress=False)
    assert len(counting.calls) == 8 and set(counting.calls.values()) == {6}  # each of 6 examples once per column
    model.net = counting.net
    alone = {
        name: estimate_cost_matrix(model, quantized_data(6), seed=1, progress=False, objective=name)
        for name in ("elbo", "mse")
    }
    for name in ("elbo", "mse"):
        torch.testing.assert_close(both[name].mean, alone[name].mean, rtol=1e-12, atol=0)
    assert both["elbo"].prior == alone["elbo"].prior > 0


def plain_ddim_teacher(model, x_T, points):
    """DDIM with eta = 0 written out from the paper: x_s = sqrt(ab_s) x0 + sqrt(1 - ab_s) eps, eps from x_t and x0."""
    ab = model.schedule.ab
    xs, x0s, x = {points[-1]: x_T.double()}, {}, x_T.double()
    for t, s in zip(reversed(points[1:]), reversed(points[:-1])):
        x0 = model.predict(x, t).x0_hat
        eps = (x - ab[t].sqrt() * x0) / (1 - ab[t]).sqrt()
        x0s[t] = x0
        x = ab[s].sqrt() * x0 + (1 - ab[s]).sqrt() * eps
        xs[s] = x
    return xs, x0s


@pytest.mark.parametrize("mean_type", ["eps", "x0"])
@torch.no_grad()
def test_ode_matrix_is_the_mean_jump_distance_to_the_teacher(mean_type):
    model, grid = tiny_model("fixed_large", mean_type=mean_type, T=12), [2, 5, 9, 12]
    cm = estimate_ode_matrix(model, 5, grid=grid, seed=3, batch_size=2, progress=False)
    points, ab = [0] + grid, model.schedule.ab
    per_traj = []
    for i in range(5):
        xs, x0s = plain_ddim_teacher(model, trajectory_noise(3, i, 1, (1, 4, 4)), points)
        c = torch.full((5, 5), float("nan"), dtype=torch.float64)
        for j, t in enumerate(points[1:], start=1):
            eps = (xs[t] - ab[t].sqrt() * x0s[t]) / (1 - ab[t]).sqrt()
            for k, s in enumerate(points[:j]):
                jump = ab[s].sqrt() * x0s[t] + (1 - ab[s]).sqrt() * eps
                c[k, j] = (jump - xs[s]).norm()
        per_traj.append(c)
    mean, sem = mean_sem(per_traj)
    upper = torch.ones(5, 5, dtype=torch.bool).triu(1)
    torch.testing.assert_close(cm.mean[upper], mean[upper], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(cm.sem[upper], sem[upper], rtol=1e-8, atol=1e-12)
    assert cm.objective == "ode" and cm.count == 5 and cm.grid.tolist() == points


def test_ode_matrix_does_not_depend_on_chunking_or_shards():
    model = tiny_model("learned_range", T=10)
    one = estimate_ode_matrix(model, 7, seed=1, batch_size=7, progress=False)
    for batch_size, memory_gb in ((1, 2.0), (3, 2.0), (7, 1e-6)):  # the last forces one trajectory per chunk
        other = estimate_ode_matrix(model, 7, seed=1, batch_size=batch_size, progress=False, memory_gb=memory_gb)
        torch.testing.assert_close(other.mean, one.mean, rtol=1e-12, atol=0, equal_nan=True)
    a = estimate_ode_matrix(model, 3, seed=1, progress=False)
    b = estimate_ode_matrix(model, 4, seed=1, progress=False, start_index=3)
    merged = (a.mean * 3 + b.mean * 4) / 7
    upper = torch.ones_like(one.mean, dtype=torch.bool).triu(1)
    torch.testing.assert_close(merged[upper], one.mean[upper], rtol=1e-12, atol=0)


@pytest.mark.parametrize("objective", ["mse", "ode"])
def test_dp_on_each_objective_equals_brute_force(objective):
    model = tiny_model("fixed_large", T=9)
    if objective == "ode":
        cm = estimate_ode_matrix(model, 4, seed=0, progress=False)
    else:
        cm = estimate_cost_matrix(model, quantized_data(4), seed=0, progress=False, objective=objective)
    budgets = list(range(1, 10))
    fast, brute = optimal_paths(cm.mean, budgets), brute_force_paths(cm.mean, budgets)
    for K in budgets:
        assert fast[K][0] == brute[K][0] and fast[K][1] == pytest.approx(brute[K][1], rel=1e-12)


def test_bad_objective_input():
    model = tiny_model("fixed_large", T=6)
    with pytest.raises(ValueError, match="^unknown objective 'fid'; use one of elbo, mse"):
        estimate_cost_matrix(model, quantized_data(2), progress=False, objective="fid")
    with pytest.raises(ValueError, match="use ode.estimate_ode_matrix"):
        estimate_cost_matrix(model, quantized_data(2), progress=False, objective="ode")
    with pytest.raises(ValueError, match="trajectories = 0"):
        estimate_ode_matrix(model, 0, progress=False)


ODE_BODY = """
from ddpm_schedules.costs.ode import estimate_ode_matrix
lo, hi = shard(9, fabric.global_rank, fabric.world_size)
cm = estimate_ode_matrix(tiny_model("learned_range", T=10), hi - lo, seed=5, batch_size=2, progress=False,
                         start_index=lo, multistep=True)
if fabric.global_rank == 0:
    cm.save(out)
"""


@pytest.mark.slow
def test_two_gloo_processes_give_the_one_process_ode_matrix_and_two_step_costs(tmp_path):
    one, two = (CostMatrix.load(f) for f in run_on_gloo_processes(tmp_path, "ode", ODE_BODY, ".pt"))
    assert one.count == two.count == 9
    upper = torch.ones_like(one.mean, dtype=torch.bool).triu(1)
    torch.testing.assert_close(two.mean[upper], one.mean[upper], rtol=1e-6, atol=0)
    assert one.two_step is not None and float(one.two_step.abs().sum()) > 0  # DPM-Solver++(2M)'s [N+1]^3 costs
    torch.testing.assert_close(two.two_step, one.two_step, rtol=1e-6, atol=0)
