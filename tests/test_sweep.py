"""The sweep table (app/sweep.py, reports/sweep.py): jobs found, grouped by the overrides that differ, averaged over
the seeds; means, standard errors, n and the best / tie marks against hand computations; a real multirun of
evaluate.py; the W&B summary run read back from its offline file; bad input as one line."""

import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import DIGITS_FEATURES, ROOT, SMALL
from PIL import Image
from wandb_records import OfflineRun

from ddpm_schedules.app.sweep import main
from ddpm_schedules.reports.sweep import aggregate

REL = 1e-12  # means and SEs of a few float64 values: only rounding separates the two computations

# a 2 seeds x 2 strategy-lists sweep, by hand: (seed, strategies) -> bits/dim rows (strategy, K, bpd, bpd_sem) and
# FD rows (strategy, K, fid, fid_sem) of the ancestral sampler
A, B = "[dp,even]", "[dp_mse,even]"
BPD = {
    (0, A): [("dp", 2, 3.00, 0.05), ("dp", 4, 2.00, 0.04), ("even", 2, 4.0, 0.1), ("even", 4, 2.5, 0.1)],
    (1, A): [("dp", 2, 3.10, 0.06), ("dp", 4, 2.10, 0.04), ("even", 2, 4.0, 0.1), ("even", 4, 2.5, 0.1)],
    (0, B): [("dp_mse", 2, 3.05, 0.05), ("dp_mse", 4, 2.30, 0.04), ("even", 2, 4.0, 0.1), ("even", 4, 2.5, 0.1)],
    (1, B): [("dp_mse", 2, 3.15, 0.05), ("even", 2, 4.0, 0.1), ("even", 4, 2.5, 0.1)],  # dp_mse K=4: only seed 0
}
FD = {
    (0, A): [("dp", 2, 10.0, 1.0), ("even", 2, 20.0, 2.0)],
    (1, A): [("dp", 2, 11.0, 1.0), ("even", 2, 21.0, 2.0)],
    (0, B): [("dp_mse", 2, 10.8, 1.0)],
    (1, B): [("dp_mse", 2, 12.0, 1.0)],
}


def write_job(folder: Path, overrides: list[str], doc: dict | None) -> None:
    """A job folder as Hydra and evaluate.py leave it: .hydra/overrides.yaml, and results.json once it finished."""
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if doc is not None:
        (folder / "results.json").write_text(json.dumps(doc))


def synthetic_sweep(root: Path) -> Path:
    """Jobs 0-3 from BPD and FD, and job 4 (seed 2) that has not finished."""
    for num, (seed, strategies) in enumerate(BPD):
        results = [
            {"strategy": s, "K": k, "bpd": v, "bpd_sem": e, "schedule": []} for s, k, v, e in BPD[seed, strategies]
        ]
        quality = [
            {"strategy": s, "K": k, "sampler": "ancestral", "guidance": 1.0, "fid": v, "fid_sem": e}
            | {"teacher_distance": None, "teacher_distance_sem": None}
            for s, k, v, e in FD[seed, strategies]
        ]
        overrides = ["model.path=m.ckpt", f"cost.seed={seed}", f"eval.strategies={strategies}"]
        write_job(root / str(num), overrides, {"results": results, "sample_quality": quality})
    write_job(root / "4", ["model.path=m.ckpt", "cost.seed=2", f"eval.strategies={A}"], None)
    return root


def expected_cells(table: dict) -> dict:
    """(strategies, strategy, K) -> (mean, SE, n) by hand: SE = stdev / sqrt(n), or the one job's own SE."""
    values: dict = {}
    for (_, strategies), rows in table.items():
        for s, k, v, e in rows:
            values.setdefault((strategies, s, k), []).append((v, e))
    return {
        key: (
            statistics.mean(v for v, _ in vs),
            statistics.stdev(v for v, _ in vs) / math.sqrt(len(vs)) if len(vs) > 1 else vs[0][1],
            len(vs),
        )
        for key, vs in values.items()
    }


def marks(cells: dict) -> dict:
    """(strategies, strategy, K) -> (best, tie): per K the lowest mean; a tie where mean - SE <= best + its SE."""
    out = {}
    for K in {k for _, _, k in cells}:
        column = {key: c for key, c in cells.items() if key[2] == K}
        best_mean, best_sem, _ = min(column.values())
        for key, (mean, sem, _) in column.items():
            out[key] = (mean == best_mean, mean != best_mean and mean - sem <= best_mean + best_sem)
    return out


def test_means_ses_n_and_marks_against_a_hand_computation(tmp_path):
    sweep = synthetic_sweep(tmp_path / "sweep")
    result = aggregate(sweep)
    assert result.grouping == ["eval.strategies"] and result.seed_keys == ["cost.seed"]
    assert result.common == {"model.path": "m.ckpt"}
    assert [(j.dir, j.kind) for j in result.missing] == [("4", None)]
    for metric, table in (("bpd", BPD), ("fid", FD)):
        cells = expected_cells(table)
        got = {(r.group["eval.strategies"], r.strategy, r.K): r for r in result.records if r.metric == metric}
        assert set(got) == set(cells)
        for key, (mean, sem, n) in cells.items():
            r = got[key]
            assert (r.mean, r.sem, r.n) == (pytest.approx(mean, rel=REL), pytest.approx(sem, rel=REL), n), key
            assert r.sem_source == ("seeds" if n > 1 else "within-run")
        assert {key: (r.best, r.tie) for key, r in got.items()} == marks(cells)
    by = {(r.metric, r.group["eval.strategies"], r.strategy, r.K): r for r in result.records}
    # what the hand-picked numbers were chosen to show: dp best at K = 2 with dp_mse's interval touching it, FD alike
    assert by["bpd", A, "dp", 2].best and by["bpd", B, "dp_mse", 2].tie and not by["bpd", A, "even", 2].tie
    assert by["bpd", B, "dp_mse", 4].n == 1 and not by["bpd", B, "dp_mse", 4].tie
    assert by["fid", A, "dp", 2].best and by["fid", B, "dp_mse", 2].tie and not by["fid", A, "even", 2].tie
    assert main([str(sweep), "--no-wandb"]) == 0
    md = (sweep / "sweep.md").read_text()
    assert "**3.050 ± 0.050 (2)**" in md and "3.100 ± 0.050 (2) ≈" in md and "2.300 ± 0.040 (1) |" in md
    assert "within-run standard error (bpd_sem)" in md and "one-SE intervals overlap" in md
    assert "`4` with `model.path=m.ckpt`, `cost.seed=2`, `eval.strategies=[dp,even]`" in md
    assert "| eval.strategies=[dp_mse,even] | even | 4.000 ± 0.000 (2) | 2.500 ± 0.000 (2) |" in md
    saved = json.loads((sweep / "sweep.json").read_text())
    assert saved == json.loads(json.dumps(result.to_json()))
    assert saved["jobs"][4] == {
        "dir": "4",
        "overrides": {"model.path": "m.ckpt", "cost.seed": "2", "eval.strategies": A},
        "kind": None,
        "step": None,
    }
    for name in ("sweep_bpd.png", "sweep_fd_ancestral.png"):
        assert Image.open(sweep / name).size[0] > 0


def test_a_train_sweep_reads_the_monitors_last_record(tmp_path):
    predicted = {(0, 3): 5.0, (0, 6): 4.0, (1, 3): 5.5, (1, 6): 4.4}  # (seed, global step) -> dp's K=2 bits/dim
    for seed in (0, 1):
        job = tmp_path / "sweep" / str(seed)
        write_job(job, [f"seed={seed}", "unet=tiny"], None)
        (job / "schedules").mkdir()
        for step in (3, 6):
            rows = [{"strategy": "dp", "K": 2, "schedule": [5, 20], "predicted_bpd": predicted[seed, step]}]
            record = {"global_step": step, "unit": "bpd", "results": rows}
            (job / "schedules" / f"step_{step}.json").write_text(json.dumps(record))
    result = aggregate(tmp_path / "sweep")
    (r,) = result.records
    assert result.seed_keys == ["seed"] and result.grouping == [] and [j.step for j in result.jobs] == [6, 6]
    assert (r.metric, r.group, r.n) == ("predicted_bpd", {}, 2)
    assert r.mean == pytest.approx(statistics.mean([4.0, 4.4]), rel=REL)
    assert r.sem == pytest.approx(statistics.stdev([4.0, 4.4]) / math.sqrt(2), rel=REL)


def test_the_wandb_summary_run_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    sweep = synthetic_sweep(tmp_path / "2026-12-08_10-00-00")
    assert main([str(sweep)]) == 0
    (run_dir,) = (sweep / "wandb").glob("offline-run-*")
    offline = OfflineRun(run_dir)
    run, config = offline.run, offline.config
    assert (run.display_name, run.run_group, run.job_type) == (sweep.name, sweep.name, "sweep")
    assert config["grouping"] == ["eval.strategies"] and config["seed_keys"] == ["cost.seed"]
    assert config["common"] == {"model.path": "m.ckpt"} and config["sweep_dir"] == str(sweep)
    (table,) = run_dir.glob("files/media/table/sweep_*.table.json")
    table = json.loads(table.read_text())
    records = json.loads((sweep / "sweep.json").read_text())["records"]
    assert table["columns"] == ["group", "eval.strategies", "strategy", "K", "metric", "sampler", "guidance"] + [
        "mean", "sem", "n", "sem_source", "best", "tie"
    ]  # fmt: skip
    assert [[row[2], row[3], row[4], row[7], row[9]] for row in table["data"]] == [
        [r["strategy"], r["K"], r["metric"], r["mean"], r["n"]] for r in records
    ]
    assert len(list(run_dir.glob("files/media/images/plots/*.png"))) == 2  # sweep_bpd and sweep_fd_ancestral


def test_bad_input_is_one_line_naming_the_value(tmp_path, capsys):
    (tmp_path / "empty" / "0" / "wandb").mkdir(parents=True)
    broken = synthetic_sweep(tmp_path / "broken")
    (broken / "2" / "results.json").write_text('{"results": [')
    for path, says in (
        (tmp_path / "nowhere", "does not exist; pass the folder of a Hydra multirun"),
        (tmp_path / "empty", "no results.json"),
        (broken, f"{broken / '2' / 'results.json'} is not valid JSON"),
    ):
        assert main([str(path), "--no-wandb"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and says in err and str(path) in err, err


@pytest.mark.slow  # four evaluate.py jobs on the tiny model, then the sweep command
def test_a_real_multirun_of_evaluate(tmp_path, tiny_ckpt):
    env = {**os.environ, "DDPM_SCHEDULES_CACHE": str(tmp_path / "cache"), "WANDB_MODE": "offline"}
    cmd = [sys.executable, str(ROOT / "evaluate.py"), "-m", f"model.path={tiny_ckpt}", *SMALL[1:], "data=synthetic"]
    cmd += ["fid.enabled=false", "logger=none", f"fid.digits_weights={DIGITS_FEATURES}", "cost.seed=0,1"]
    cmd += [f"eval.strategies={A},{B}", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = subprocess.run(
        [sys.executable, "-m", "ddpm_schedules.app.sweep", str(tmp_path / "sweep"), "--no-wandb"],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    # the reference: each job's own results.json, grouped by the strategies override its .hydra/overrides.yaml holds
    values: dict = {}
    for doc in sorted((tmp_path / "sweep").glob("*/results.json")):
        overrides = dict(
            o.split("=", 1) for o in yaml.safe_load((doc.parent / ".hydra" / "overrides.yaml").read_text())
        )
        for r in json.loads(doc.read_text())["results"]:
            values.setdefault((overrides["eval.strategies"], r["strategy"], r["K"]), []).append(r["bpd"])
    assert len(values) == 8 and all(len(v) == 2 for v in values.values())  # 2 groups x 2 strategies x K = 2, 4
    saved = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert saved["grouping"] == ["eval.strategies"] and saved["seed_keys"] == ["cost.seed"]
    got = {(r["group"]["eval.strategies"], r["strategy"], r["K"]): r for r in saved["records"] if r["metric"] == "bpd"}
    assert set(got) == set(values)
    for key, v in values.items():
        assert got[key]["n"] == 2 and got[key]["mean"] == pytest.approx(statistics.mean(v), rel=REL)
        assert got[key]["sem"] == pytest.approx(statistics.stdev(v) / math.sqrt(2), rel=REL, abs=1e-15), key
    assert (tmp_path / "sweep" / "sweep_bpd.png").is_file() and "| group | strategy | K=2 | K=4 |" in proc.stdout
