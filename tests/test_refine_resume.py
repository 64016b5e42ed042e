"""Refinement and precision rounds survive kill -9 and SIGTERM: a rerun continues where the run stopped, estimates
only what is missing, and gives the uninterrupted run's results."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import CountingNet
from refine_script import PRECISION, REFINE, precision_case, refine_case, run_precision, run_refine

from ddpm_schedules.costs import precision
from ddpm_schedules.costs.refine import refine_cost_matrices
from ddpm_schedules.storage.files import load_checked
from ddpm_schedules.storage.resume import PartialFile, Preempted

HERE = Path(__file__).parent


@pytest.fixture(autouse=True)
def one_thread():
    """One thread, as the killed subprocess runs (and far faster for these tiny convolutions on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def saved(path: Path) -> dict:
    """What the partial file holds now ({} while there is none)."""
    try:
        return load_checked(path)
    except ValueError:
        return {}


def stop_after(units: int):
    """A stand-in for sigterm_requests whose SIGTERM 'arrives' at the given call of its flag (one per column or
    round)."""
    calls = {"n": 0}

    class StopAfter:
        def __init__(self, enabled=True):
            self.enabled = enabled  # disabled (nothing to save, e.g. the held-out passes): no SIGTERM is seen

        def __enter__(self):
            def stop():
                calls["n"] += 1
                return calls["n"] == units

            return stop if self.enabled else lambda: False

        def __exit__(self, *exc):
            return False

    return StopAfter


def counted(case):
    """A case's model and data with the network's passes counted (examples per timestep)."""
    model, data = case()
    model.net = counter = CountingNet(model.net)
    return model, data, counter


def assert_same_matrices(a: dict, b: dict):
    assert a.keys() == b.keys()
    for name, x in a.items():
        y = b[name]
        assert torch.equal(x.grid, y.grid) and x.count == y.count and x.prior == y.prior, name
        torch.testing.assert_close(x.mean, y.mean, rtol=0, atol=0, equal_nan=True)  # bit for bit
        torch.testing.assert_close(x.sem, y.sem, rtol=0, atol=0, equal_nan=True)


def kill_when(mode: str, partial: Path, log: Path, ready) -> None:
    """Start refine_script.py and SIGKILL it once ``ready()`` holds (waiting at most 120 s)."""
    env = {**os.environ, "PYTHONPATH": f"{HERE}{os.pathsep}{HERE.parent / 'src'}", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "refine_script.py"), mode, str(partial), str(log)],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while not ready() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, stderr[-1000:]


def round_columns_kept(state: dict) -> int:
    """How many columns of the round under way are kept (0 between rounds)."""
    return len(set(state["new"]) & set(state["kept"])) if state.get("new") else 0


@pytest.mark.slow
def test_a_killed_refinement_resumes_mid_round_to_the_same_matrices(tmp_path):
    partial, log = tmp_path / "refine.partial.pt", tmp_path / "passes.log"
    kill_when("refine", partial, log, lambda: (s := saved(partial)).get("round", 0) >= 1 and round_columns_kept(s) >= 3)
    state = saved(partial)
    kept, killed_columns = len(state["kept"]), len(set(log.read_text().split()))
    assert state["round"] >= 1 and 3 <= round_columns_kept(state) < len(state["new"]), (
        "the run should be stopped mid-round"
    )
    model, data, counter = counted(refine_case)
    resumed = run_refine(model, data, PartialFile(partial, every=1))
    model, data, fresh_counter = counted(refine_case)
    fresh = run_refine(model, data)
    assert_same_matrices(resumed[0], fresh[0])
    assert resumed[1] == fresh[1]  # the rounds' records: grid sizes, new columns, passes, paths
    # the rerun estimated only the columns the killed run had not saved, one pass per example each
    assert len(counter.calls) == len(fresh_counter.calls) - kept < len(fresh_counter.calls) and set(
        counter.calls.values()
    ) == {6}
    assert not partial.exists()
    print(
        f"\nrefine columns: killed run {killed_columns} ({kept} saved), rerun {len(counter.calls)}, uninterrupted "
        f"{len(fresh_counter.calls)}"
    )


def estimates_counted(monkeypatch, counter) -> list[int]:
    """Passes (examples x columns) of each round's `estimate_cost_matrix` call, as a list filled as they run."""
    passes, real = [], precision.estimate_cost_matrix

    def estimate(*args, **kwargs):
        before = sum(counter.calls.values())
        out = real(*args, **kwargs)
        passes.append(sum(counter.calls.values()) - before)
        return out

    monkeypatch.setattr(precision, "estimate_cost_matrix", estimate)
    return passes


def assert_same_rounds(a, b):
    assert_same_matrices({"elbo": a[0]}, {"elbo": b[0]})
    assert a[1] == b[1]  # examples, predicted bits/dim and errors of every round


@pytest.mark.slow
def test_killed_precision_rounds_resume_within_the_later_round_to_the_same_matrix(tmp_path, monkeypatch):
    partial, log = tmp_path / "precision.partial.pt", tmp_path / "passes.log"
    round3 = tmp_path / "precision.partial.round3.pt"  # the fourth round: 16 examples on 12 columns
    kill_when("precision", partial, log, lambda: saved(round3).get("done", 0) >= 3)
    done = saved(round3)["done"]
    assert saved(partial)["used"] == 16 and 3 <= done < 12, "the run should be stopped within the fourth round"
    model, data, counter = counted(precision_case)
    estimated = estimates_counted(monkeypatch, counter)
    resumed = run_precision(model, data, PartialFile(partial, every=1))
    monkeypatch.undo()
    model, data, fresh_counter = counted(precision_case)
    fresh_estimated = estimates_counted(monkeypatch, fresh_counter)
    fresh = run_precision(model, data)
    assert_same_rounds(resumed, fresh)
    assert [r["examples"] for r in fresh[1]] == [4, 8, 16, 32] and fresh_estimated == [4 * 12, 4 * 12, 8 * 12, 16 * 12]
    assert estimated == [16 * (12 - done)]  # the finished rounds were not redone, nor the saved columns of the fourth
    assert sum(counter.calls.values()) < sum(fresh_counter.calls.values())
    assert not partial.exists() and not round3.exists()
    calls = len(log.read_text().split())  # the killed run's forward calls (batches), estimates and held-out passes
    print(
        f"\nprecision columns: killed run {36 + done} saved (3 rounds + {done} of the fourth; {calls} forward calls), "
        f"rerun {12 - done}, uninterrupted 48; passes: rerun {sum(counter.calls.values())}, uninterrupted "
        f"{sum(fresh_counter.calls.values())}"
    )


def preempted_refinement(tmp_path, monkeypatch, units: int = 12) -> Path:
    """A refinement stopped by a (simulated) SIGTERM at its ``units``-th column or round end; its partial file."""
    partial = tmp_path / "refine.partial.pt"
    monkeypatch.setattr("ddpm_schedules.costs.refine.sigterm_requests", stop_after(units))
    with pytest.raises(Preempted, match="partial sums saved"):
        run_refine(*refine_case(), PartialFile(partial, every=100))
    monkeypatch.undo()
    return partial


@pytest.mark.slow  # the inner loop resumes a damaged refinement file
def test_sigterm_saves_the_refinement_and_a_rerun_finishes_it_and_removes_the_file(tmp_path, monkeypatch):
    partial = preempted_refinement(tmp_path, monkeypatch)  # round 0: 8 columns and its end, then 3 columns of round 1
    state = saved(partial)
    assert (
        state["round"] == 1
        and round_columns_kept(state) == 3
        and len(state["kept"]) == 11
        and len(state["history"]) == 1
    )
    model, data, counter = counted(refine_case)
    resumed = run_refine(model, data, partial)
    fresh = run_refine(*refine_case())
    assert_same_matrices(resumed[0], fresh[0])
    assert resumed[1] == fresh[1]
    assert len(counter.calls) == fresh[1][-1]["passes"] // 6 - 11
    assert not partial.exists()


def refine_cost(model, data, seed, partial=None):
    return refine_cost_matrices(model, data, progress=False, partial=partial, **{**REFINE, "seed": seed})


@pytest.mark.parametrize(
    "damage", ["truncate", *(pytest.param(d, marks=pytest.mark.slow) for d in ("flip", "other_config"))]
)
def test_a_damaged_or_foreign_refinement_file_is_reported_and_ignored(tmp_path, monkeypatch, caplog, damage):
    partial = preempted_refinement(tmp_path, monkeypatch)
    raw = bytearray(partial.read_bytes())
    if damage == "truncate":
        partial.write_bytes(raw[: len(raw) // 2])
    elif damage == "flip":
        raw[len(raw) // 2] ^= 0xFF
        partial.write_bytes(bytes(raw))
    seed = 5 if damage == "other_config" else 4  # another seed: the saved statistics would poison its matrices
    model, data, counter = counted(refine_case)
    caplog.clear()  # the SIGTERM's own warning
    with caplog.at_level("WARNING"):
        got = refine_cost(model, data, seed, partial)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "starting afresh" in warnings[0], warnings
    assert ("another configuration" if damage == "other_config" else "unreadable") in warnings[0]
    assert_same_matrices(got[0], refine_cost(*refine_case(), seed)[0])
    assert len(counter.calls) == got[1][-1]["passes"] // 6  # every column estimated again
    assert not partial.exists()


def preempted_precision(tmp_path, monkeypatch) -> tuple[Path, Path]:
    """Precision rounds stopped by a (simulated) SIGTERM at the 3rd column of the third round (8 examples)."""
    partial = tmp_path / "precision.partial.pt"
    monkeypatch.setattr("ddpm_schedules.storage.resume.sigterm_requests", stop_after(12 + 12 + 3))
    with pytest.raises(Preempted, match="partial sums saved"):
        run_precision(*precision_case(), PartialFile(partial, every=100))
    monkeypatch.undo()
    return partial, tmp_path / "precision.partial.round2.pt"


def test_sigterm_saves_the_precision_rounds_and_a_rerun_finishes_them(tmp_path, monkeypatch):
    partial, round2 = preempted_precision(tmp_path, monkeypatch)
    assert saved(partial)["used"] == 8 and len(saved(partial)["rounds"]) == 2 and saved(round2)["done"] == 3
    model, data, counter = counted(precision_case)
    estimated = estimates_counted(monkeypatch, counter)
    resumed = run_precision(model, data, partial)
    monkeypatch.undo()
    assert_same_rounds(resumed, run_precision(*precision_case()))
    assert estimated == [8 * (12 - 3), 16 * 12]  # the third round's last 9 columns, then the fourth round
    assert not partial.exists() and not round2.exists()


@pytest.mark.parametrize("damage", ["flip", pytest.param("other_config", marks=pytest.mark.slow)])
def test_a_damaged_or_foreign_precision_file_is_reported_and_ignored(tmp_path, monkeypatch, caplog, damage):
    partial, round2 = preempted_precision(tmp_path, monkeypatch)
    round2.unlink()  # the outer file alone decides here
    raw = bytearray(partial.read_bytes())
    if damage == "flip":
        raw[len(raw) // 2] ^= 0xFF
        partial.write_bytes(bytes(raw))
    model, data = precision_case()
    options = {"seed": 2} if damage == "other_config" else {}  # another seed: the saved matrix would poison its rounds
    caplog.clear()
    with caplog.at_level("WARNING"):
        got = precision.estimate_to_precision(model, data, progress=False, partial=partial, **{**PRECISION, **options})
    warnings = [
        r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "starting afresh" in r.getMessage()
    ]
    assert (
        len(warnings) == 1 and ("another configuration" if damage == "other_config" else "unreadable") in warnings[0]
    ), warnings
    want = precision.estimate_to_precision(*precision_case(), progress=False, **{**PRECISION, **options})
    assert_same_rounds(got, want)
    assert not partial.exists()
