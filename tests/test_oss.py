"""dp_ode_oss (costs/oss.py): the DP over the sampler's own states against running the sampler along every partial
path."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import CountingNet, run_on_gloo_processes, tiny_model
from test_resume import stop_after  # SIGTERM 'arrives' at the n-th check: here, after the n-th level

from ddpm_schedules.costs.ode import estimate_ode_matrix, teacher_trajectory, trajectory_noise
from ddpm_schedules.costs.oss import check_oss_size, estimate_oss_paths
from ddpm_schedules.costs.oss_state import OssPaths
from ddpm_schedules.sampling.samplers import ddim_step, dpmpp_2m_coefficients, quantize, sample_ddim, sample_dpmpp
from ddpm_schedules.schedules.dp import optimal_paths
from ddpm_schedules.schedules.schedule import Schedule


def run_sampler(model, x_T, timesteps, propagate):
    """The sampler's own state after stepping from x_T along ``timesteps`` (descending, T first), unquantized."""
    x, prev = x_T.double(), None
    for t, s in zip(timesteps, timesteps[1:]):
        x0_hat = model.predict(x, t).x0_hat
        if propagate == "ddim":
            x = ddim_step(model, x, x0_hat, t, s)
        else:
            a, b, d = (
                float(v) for v in dpmpp_2m_coefficients(model.schedule.ab, None if prev is None else prev[0], t, s)
            )
            x = a * x + b * x0_hat + (d * prev[1] if prev is not None else 0.0)
            prev = (t, x0_hat)
    return x


def reference_oss(model, x_T, grid, K_max, propagate):
    """Every (k, i) without pruning: the best predecessor's path is re-run from x_T by the sampler itself."""
    g = grid.tolist()
    N = len(g) - 1
    teacher = teacher_trajectory(model, x_T, grid)[0]
    best = {(0, N): ([N], 0.0)}
    for k in range(1, K_max + 1):
        for i in range(N):
            options = []
            for j in range(i + 1, N + 1):
                if (k - 1, j) in best and (j > 0):
                    path = best[(k - 1, j)][0] + [i]
                    x = run_sampler(model, x_T, [g[p] for p in path], propagate)
                    options.append((float((x - teacher[i]).flatten(1).norm(dim=1).mean()), j, path))
            if options:
                d, _, path = min(options, key=lambda o: (o[0], o[1]))
                best[(k, i)] = (path, d)
    return {K: best[(K, 0)] for K in range(1, K_max + 1)}


@torch.no_grad()
@pytest.mark.parametrize("propagate", ["ddim", "dpmpp"])
@pytest.mark.parametrize("var_type,mean_type", [("learned_range", "eps"), ("fixed_small", "x0")])
def test_the_dp_equals_running_the_sampler_along_every_partial_path(propagate, var_type, mean_type):
    # no clipping for eps: this random net's x0_hat saturates at +-1, where every distance would be 0
    model = tiny_model(var_type, mean_type, T=12, clip=mean_type == "x0")
    grid = [2, 3, 5, 7, 9, 12]
    x_T = trajectory_noise(4, 0, 3, (1, 4, 4))
    out = estimate_oss_paths(model, 3, [1, 2, 3, 4, 5], grid, seed=4, propagate=propagate, batch_size=7, progress=False)
    ref = reference_oss(model, x_T, torch.tensor([0, *grid]), 5, propagate)
    assert min(out.distance.values()) > 1e-6
    for K in range(1, 6):
        assert list(out.paths[K]) == ref[K][0][::-1], K
        assert out.distance[K] == pytest.approx(ref[K][1], rel=1e-9), K
    # the schedule's final state is what the sampler gives from the same x_T (quantized by the sampler)
    sampler = {"ddim": sample_ddim, "dpmpp": sample_dpmpp}[propagate]
    sch = out.schedule(3)
    assert sch.K == 3 and sch.timesteps[-1] == 12
    final = run_sampler(model, x_T, [*sch.timesteps[::-1], 0], propagate)
    assert torch.equal(sampler(model, sch, x_T), quantize(final, model.levels).float())


@torch.no_grad()
def test_one_step_is_the_teacher_anchored_jump_and_passes_are_counted():
    model = tiny_model("learned_range", T=10)
    counting = CountingNet(model.net)
    model.net = counting
    grid = list(range(1, 11))
    out = estimate_oss_paths(model, 4, [1, 3], grid, seed=2, batch_size=100, progress=False)
    calls = sum(counting.calls.values())
    assert calls == 4 * out.passes  # every pass is one example per trajectory
    # the teacher's 10, then a pass at each state the next level steps from (level 1: x_T's pass is the teacher's):
    # after one step only t = 2..9 can still end a 3-step path, after two steps t = 1..8
    assert out.passes == 10 + 8 + 8
    # K = 1 is the jump from x_T to 0, which dp_ode prices the same way (from the teacher's own point)
    ode = estimate_ode_matrix(model, 4, grid, seed=2, progress=False)
    assert out.paths[1] == (0, 10)
    assert out.distance[1] == pytest.approx(float(ode.mean[0, 10]), rel=1e-9)
    # with a single level the sampler never leaves the teacher: dp_ode's two-step path is OSS's too
    assert optimal_paths(ode.mean, [1])[1][0] == list(out.paths[1])


def test_the_result_is_plain_json_and_bad_files_are_reported(tmp_path):
    out = OssPaths(torch.tensor([0, 3, 7, 10]), {1: (0, 3), 2: (0, 1, 3)}, {1: 0.5, 2: 0.25}, 12, 8, "dpmpp")
    out.save(tmp_path / "oss.json")
    back = OssPaths.load(tmp_path / "oss.json")
    assert (
        back.paths == out.paths
        and back.distance == out.distance
        and (back.passes, back.count, back.propagate) == (12, 8, "dpmpp")
    )
    assert back.schedule(2) == Schedule((3, 10), 10, "dp_ode_oss")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="bad.json is not a dp_ode_oss result"):
        OssPaths.load(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="no dp_ode_oss path for K = 5"):
        out.schedule(5)


def test_bad_input_is_refused_before_any_pass():
    model = tiny_model("learned_range", T=10)
    model.net = CountingNet(model.net)
    with pytest.raises(
        ValueError, match="^propagate = 'ancestral'; dp_ode_oss carries a deterministic sampler's own states"
    ):
        estimate_oss_paths(model, 2, [2], propagate="ancestral", progress=False)
    with pytest.raises(ValueError, match=r"budgets \[2, 11\] must lie in 1..10"):
        estimate_oss_paths(model, 2, [2, 11], progress=False)
    with pytest.raises(ValueError, match="more than memory_gb = 1.0; use fewer trajectories"):
        check_oss_size(201, 64, 12288, 1.0)
    assert model.net.calls == {}
    assert math.isfinite(estimate_oss_paths(model, 2, [2], progress=False).distance[2])


OSS_BODY = """
from ddpm_schedules.costs.oss import estimate_oss_paths
lo, hi = shard(7, fabric.global_rank, fabric.world_size)
res = estimate_oss_paths(tiny_model("learned_range", T=16, clip=False), hi - lo, [2, 4, 6],
                         [2, 4, 6, 8, 10, 12, 14, 16], seed=3, propagate="dpmpp", batch_size=5, progress=False,
                         start_index=lo)
if fabric.global_rank == 0:
    res.save(out)
"""


@pytest.mark.slow
def test_two_gloo_processes_choose_the_one_process_paths(tmp_path):
    one, two = (OssPaths.load(f) for f in run_on_gloo_processes(tmp_path, "oss", OSS_BODY, ".json"))
    assert one.count == two.count == 7 and one.paths == two.paths and min(one.distance.values()) > 1e-6
    for K in (2, 4, 6):
        assert two.distance[K] == pytest.approx(one.distance[K], rel=1e-6)


@pytest.mark.slow
def test_dp_ode_oss_runs_through_evaluate_and_is_cached(tmp_path, tiny_ckpt):
    from conftest import eval_cfg

    from ddpm_schedules.app.evaluate import evaluate

    overrides = [
        "logger=none",
        "eval.strategies=[dp_ode,dp_ode_oss]",
        "eval.samplers=[ddim]",
        "cost.ode.propagate=dpmpp",
    ]
    out = evaluate(eval_cfg(tmp_path, tiny_ckpt, *overrides))
    oss = out["cost_matrix"]["objectives"]["oss"]
    assert oss["propagate"] == "dpmpp" and oss["count"] == 4 and not oss["cached"]
    rows = {(r["strategy"], r["K"]): r for r in out["sample_quality"]}
    assert rows[("dp_ode_oss", 2)]["teacher_distance"] is not None
    paths = OssPaths.load(oss["file"])
    assert [r["schedule"] for r in out["results"] if r["strategy"] == "dp_ode_oss"] == [
        list(paths.schedule(K).timesteps) for K in (2, 4)
    ]
    again = evaluate(eval_cfg(tmp_path, tiny_ckpt, *overrides))
    assert again["cost_matrix"]["objectives"]["oss"]["cached"]


def oss_run(partial=None, counting=False, propagate="dpmpp"):
    model = tiny_model(
        "learned_range", T=16, clip=False
    )  # unclipped: distinct distances (clipped, this net's are all 0)
    if counting:
        model.net = CountingNet(model.net)
    out = estimate_oss_paths(
        model,
        3,
        [2, 4, 6],
        [2, 4, 6, 8, 10, 12, 14, 16],
        seed=3,
        propagate=propagate,
        batch_size=5,
        progress=False,
        partial=partial,
    )
    return out, (sum(model.net.calls.values()) if counting else None)


@pytest.mark.parametrize("propagate", ["ddim", "dpmpp"])
def test_sigterm_saves_the_finished_levels_and_a_rerun_gives_the_uninterrupted_paths(tmp_path, monkeypatch, propagate):
    from ddpm_schedules.storage.resume import Preempted

    fresh, fresh_calls = oss_run(counting=True, propagate=propagate)
    monkeypatch.setattr("ddpm_schedules.costs.oss.sigterm_requests", stop_after(3))
    with pytest.raises(Preempted, match="after 3 units; partial sums saved"):
        oss_run(tmp_path / "oss.partial.pt", propagate=propagate)
    monkeypatch.undo()
    assert (tmp_path / "oss.partial.pt").is_file()
    resumed, resumed_calls = oss_run(tmp_path / "oss.partial.pt", counting=True, propagate=propagate)
    assert min(fresh.distance.values()) > 1e-6
    assert resumed.paths == fresh.paths and resumed.distance == fresh.distance  # bit for bit
    assert (resumed.passes, resumed.count) == (fresh.passes, fresh.count)
    assert resumed_calls < fresh_calls  # levels 1-3 were not run again (only the teacher was)
    assert not (tmp_path / "oss.partial.pt").exists()


def test_a_partial_file_of_another_configuration_or_damaged_is_ignored(tmp_path, monkeypatch, caplog):
    from ddpm_schedules.storage.resume import Preempted

    monkeypatch.setattr("ddpm_schedules.costs.oss.sigterm_requests", stop_after(2))
    with pytest.raises(Preempted):
        oss_run(tmp_path / "p.pt", propagate="ddim")
    monkeypatch.undo()
    fresh, _ = oss_run(propagate="dpmpp")
    assert oss_run(tmp_path / "p.pt", propagate="dpmpp")[0].paths == fresh.paths  # the ddim levels are not used
    assert "another configuration" in caplog.text
    (tmp_path / "q.pt").write_bytes(b"garbage")
    assert oss_run(tmp_path / "q.pt", propagate="dpmpp")[0].paths == fresh.paths
    assert "unreadable" in caplog.text


KILL_SCRIPT = """
import sys, time, torch
sys.path.insert(0, {tests!r})
from conftest import tiny_model
from ddpm_schedules.costs.oss import estimate_oss_paths
from ddpm_schedules.storage.resume import PartialFile
class Slow(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x, t):
        time.sleep(0.05)
        return self.net(x, t)

model = tiny_model("learned_range", T=16, clip=False)
model.net = Slow(model.net)
estimate_oss_paths(model, 3, [2, 4, 6], [2, 4, 6, 8, 10, 12, 14, 16], seed=3, propagate="dpmpp", batch_size=5,
                   progress=False, partial=PartialFile(sys.argv[1], every=1))
"""


@pytest.mark.slow
def test_kill_9_between_levels_then_a_rerun_resumes_to_the_uninterrupted_paths(tmp_path):
    import signal
    import time

    from ddpm_schedules.storage.resume import PartialSums

    script, partial = tmp_path / "kill.py", tmp_path / "oss.partial.pt"
    script.write_text(KILL_SCRIPT.format(tests=str(Path(__file__).parent)))
    env = {
        **os.environ,
        "PYTHONPATH": f"{Path(__file__).parent}{os.pathsep}{Path(__file__).parents[1] / 'src'}",
        "OMP_NUM_THREADS": "1",
    }
    proc = subprocess.Popen([sys.executable, str(script), str(partial)], env=env, stderr=subprocess.PIPE, text=True)

    def done() -> int:
        try:
            return PartialSums(partial, {}).load_progress()
        except Exception:
            return 0

    deadline = time.time() + 120
    while done() < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    _, stderr = proc.communicate(timeout=60)
    saved = done()
    assert proc.returncode == -signal.SIGKILL and 2 <= saved < 6, (
        f"the run should be killed mid-way, saved {saved}: {stderr[-500:]}"
    )
    fresh, fresh_calls = oss_run(counting=True)
    resumed, resumed_calls = oss_run(partial, counting=True)
    assert resumed.paths == fresh.paths and resumed.distance == fresh.distance and resumed.passes == fresh.passes
    assert resumed_calls < fresh_calls and not partial.exists()
