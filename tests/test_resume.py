"""Long estimations survive kill -9 and SIGTERM: partial sums on disk, identical results after a rerun."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import CountingNet, quantized_data, tiny_model
from estimate_script import make_cond_data, make_cond_model, make_data, make_model

from ddpm_schedules import (
    Schedule,
    estimate_cost_matrix,
    evaluate_schedules,
    even_schedule,
)
from ddpm_schedules.costs.matrix import CostMatrixMetric
from ddpm_schedules.storage import files as storage
from ddpm_schedules.storage.resume import PartialFile, PartialSums, Preempted

HERE = Path(__file__).parent


def done_in(path: Path) -> int:
    try:
        return PartialSums(path, {}).load_progress()
    except Exception:
        return 0


def stop_after(units: int):
    """A stand-in for sigterm_requests whose SIGTERM 'arrives' after the given number of units."""
    calls = {"n": 0}

    class StopAfter:
        def __init__(self, enabled=True):
            pass

        def __enter__(self):
            def stop():
                calls["n"] += 1
                return calls["n"] >= units

            return stop

        def __exit__(self, *exc):
            return False

    return StopAfter


def assert_same_matrix(a, b):
    """Bit for bit: a resume replays the same network calls (the batch size is part of the partial file's
    configuration)."""
    valid = torch.isfinite(a.mean)
    assert torch.equal(a.mean[valid], b.mean[valid]) and a.prior == b.prior and a.count == b.count


def counted_model():
    model = make_model()
    counter = CountingNet(model.net)
    model.net = counter
    return model, counter


def interrupt(partial: Path, how: int, *args: str, columns: int) -> tuple[int, subprocess.CompletedProcess]:
    """Run estimate_script.py (``args`` after the partial path), send ``how`` once 4 columns are saved: the columns
    saved and the stopped process."""
    env = {**os.environ, "PYTHONPATH": f"{HERE}{os.pathsep}{HERE.parent / 'src'}", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "estimate_script.py"), str(partial), *args],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while done_in(partial) < 4 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, how)
    _, stderr = proc.communicate(timeout=60)
    saved = done_in(partial)
    assert 4 <= saved < columns, f"the run should be stopped mid-way, saved {saved}: {stderr[-500:]}"
    return saved, subprocess.CompletedProcess(proc.args, proc.returncode, "", stderr)


@pytest.mark.slow
@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "sigterm"])
def test_interrupted_estimation_resumes_to_the_same_matrix(tmp_path, how):
    partial = tmp_path / "cm.partial.pt"
    saved, proc = interrupt(partial, how, columns=12)
    if how == signal.SIGTERM:
        assert proc.returncode == 143 and "partial sums saved" in proc.stderr and "Traceback" not in proc.stderr
    else:
        assert proc.returncode == -signal.SIGKILL
    model, counter = counted_model()
    resumed = estimate_cost_matrix(
        model, make_data(), seed=3, batch_size=4, progress=False, partial=PartialFile(partial, every=1)
    )
    # only the columns after the saved ones ran: one pass per example per remaining column
    assert sorted(counter.calls) == list(range(saved, 12)) and set(counter.calls.values()) == {10}
    assert not partial.exists()
    fresh = estimate_cost_matrix(make_model(), make_data(), seed=3, batch_size=4, progress=False)
    assert_same_matrix(resumed, fresh)


@pytest.mark.slow
def test_kill_9_during_a_conditional_estimate_resumes_to_the_same_matrix(tmp_path, caplog):
    """The conditional ELBO (each example with its own label): a rerun after kill -9 replays only the columns after
    the saved ones and equals the uninterrupted run bit for bit; the labels are part of the partial file's
    configuration, so a rerun with other labels starts afresh."""
    partial = tmp_path / "cond.partial.pt"
    saved, proc = interrupt(partial, signal.SIGKILL, "cond", columns=20)
    assert proc.returncode == -signal.SIGKILL
    shuffled = tmp_path / "shuffled.partial.pt"
    shuffled.write_bytes(partial.read_bytes())
    model = make_cond_model()
    model.net = counter = CountingNet(model.net)
    resumed = estimate_cost_matrix(
        model, make_cond_data(), seed=3, batch_size=4, progress=False, partial=PartialFile(partial, every=1)
    )
    assert sum(counter.calls.values()) == (20 - saved) * 10 and not partial.exists()
    fresh = estimate_cost_matrix(make_cond_model(), make_cond_data(), seed=3, batch_size=4, progress=False)
    assert_same_matrix(resumed, fresh)
    counter.calls.clear()
    with caplog.at_level("WARNING", logger="ddpm_schedules.storage.resume"):
        other = estimate_cost_matrix(
            model, make_cond_data(seed=1), seed=3, batch_size=4, progress=False, partial=PartialFile(shuffled, every=1)
        )
    assert "another configuration" in caplog.text and sum(counter.calls.values()) == 20 * 10  # every column again
    assert not torch.equal(other.mean[torch.isfinite(other.mean)], fresh.mean[torch.isfinite(fresh.mean)])


@pytest.mark.parametrize("batch_size,stops,units", [(9, 3, 3), (27, 2, 6)])  # one column per network call, or three
def test_sigterm_in_process_then_resume(tmp_path, monkeypatch, batch_size, stops, units):
    """The rerun replays the uninterrupted run's network calls (the same columns per call), so on any CPU its
    matrix is that run's bit for bit; a rerun with another batch_size would batch the columns differently, so
    the partial file is of another configuration and is not used."""
    model, data = tiny_model("fixed_large", T=10), quantized_data(9)
    partial = tmp_path / "p.pt"
    monkeypatch.setattr("ddpm_schedules.storage.resume.sigterm_requests", stop_after(stops))
    with pytest.raises(Preempted, match=f"after {units} units; partial sums saved"):
        estimate_cost_matrix(
            model, data, seed=1, progress=False, partial=PartialFile(partial, every=100), batch_size=batch_size
        )
    monkeypatch.undo()
    model.net = counter = CountingNet(model.net)
    resumed = estimate_cost_matrix(model, data, seed=1, progress=False, partial=partial, batch_size=batch_size)
    assert sum(counter.calls.values()) == (10 - units) * 9  # only the columns after the saved ones
    model.net = counter.net
    assert_same_matrix(resumed, estimate_cost_matrix(model, data, seed=1, progress=False, batch_size=batch_size))


def test_a_partial_file_of_another_batch_size_is_not_resumed(tmp_path, monkeypatch, caplog):
    model, data = tiny_model("fixed_large", T=10), quantized_data(9)
    partial = tmp_path / "p.pt"
    monkeypatch.setattr("ddpm_schedules.storage.resume.sigterm_requests", stop_after(3))
    with pytest.raises(Preempted):
        estimate_cost_matrix(model, data, seed=1, progress=False, partial=PartialFile(partial, every=100), batch_size=9)
    monkeypatch.undo()
    model.net = counter = CountingNet(model.net)
    with caplog.at_level("WARNING", logger="ddpm_schedules.storage.resume"):
        estimate_cost_matrix(model, data, seed=1, progress=False, partial=partial, batch_size=27)
    assert "another configuration" in caplog.text and sum(counter.calls.values()) == 10 * 9  # every column again


def test_held_out_evaluation_resumes(tmp_path, monkeypatch):
    model, data = tiny_model("learned_range", T=12), quantized_data(11)
    schedules = [even_schedule(12, 3), Schedule((2, 7, 12), 12)]
    ref = evaluate_schedules(model, data, schedules, seed=2, batch_size=3, progress=False)
    partial = tmp_path / "h.pt"
    monkeypatch.setattr("ddpm_schedules.storage.resume.sigterm_requests", stop_after(2))
    with pytest.raises(Preempted):
        evaluate_schedules(model, data, schedules, seed=2, batch_size=3, progress=False, partial=partial)
    monkeypatch.undo()
    counter = CountingNet(model.net)
    model.net = counter
    again = evaluate_schedules(model, data, schedules, seed=2, batch_size=3, progress=False, partial=partial)
    assert sum(counter.calls.values()) == (11 - 6) * 4  # batches 3 and 4 only, at the 4 distinct timesteps
    for a, b in zip(ref, again):
        assert a.bpd == b.bpd and a.bpd_sem == b.bpd_sem and a.terms_bpd == b.terms_bpd


@pytest.mark.parametrize("damage", ["truncate", "flip", "other_config"])
def test_corrupt_or_mismatched_partial_sums_are_reported_and_recomputed(tmp_path, caplog, damage):
    model, data = tiny_model("fixed_small", T=8), quantized_data(6)
    partial = tmp_path / "p.pt"
    metric = CostMatrixMetric(9)
    metric.moments[1] += 1e6  # would poison the result if it were used
    config_seed = 99 if damage == "other_config" else 0
    saver = PartialSums(
        partial,
        {
            "what": "cost_matrix",
            "model": storage.model_fingerprint(model),
            "data": storage.data_fingerprint([(0, data)]),
            "grid": list(range(9)),
            "seed": config_seed,
        },
    )
    saver.save(metric, 5)
    raw = bytearray(partial.read_bytes())
    if damage == "truncate":
        partial.write_bytes(raw[: len(raw) // 2])
    elif damage == "flip":
        raw[len(raw) // 2] ^= 0xFF
        partial.write_bytes(bytes(raw))
    with caplog.at_level("WARNING", logger="ddpm_schedules.storage.resume"):
        cm = estimate_cost_matrix(model, data, seed=0, batch_size=64, progress=False, partial=partial)
    assert "starting afresh" in caplog.text
    assert_same_matrix(cm, estimate_cost_matrix(model, data, seed=0, batch_size=64, progress=False))
