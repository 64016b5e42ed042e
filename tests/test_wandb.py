"""The W&B run of evaluate.py as its users see it, read back from the offline run's own transaction log
(wandb_records.py): the whole config with the overrides, a name, group, tags and job type from the Hydra job, each
stage logged as it ends, typed tables, plots, charts and artifacts; a run killed during the matrices keeps what it
had logged. Also which GPU a multirun job takes."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import DIGITS_FEATURES, ROOT, SMALL
from wandb_records import OfflineRun

ENV = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"}


def offline_run(run_dir) -> OfflineRun:
    (found,) = (run_dir / "wandb").glob("offline-run-*")
    return OfflineRun(found)


def _key(path, root) -> str:
    """The key a media file was logged under: its path without W&B's _<step>_<hash> suffix."""
    return path.relative_to(root).as_posix().split(".")[0].rsplit("_", 2)[0]


@pytest.mark.slow
def test_evaluate_logs_its_config_stages_tables_plots_and_artifacts(tmp_path, tiny_ckpt):
    overrides = [
        f"model.path={tiny_ckpt}",
        *SMALL,
        "eval.strategies=[dp,even,opt_ddim]",
        "eval.samplers=[ddim]",
        "cost.opt.steps=4",
        "cost.opt.check_every=2",
        "cost.opt.train_samples=4",
        "cost.opt.heldout_samples=4",
        "logger=wandb",
        f"fid.digits_weights={DIGITS_FEATURES}",
        f"cache_dir={tmp_path / 'cache'}",
    ]
    cmd = [sys.executable, str(ROOT / "evaluate.py"), *overrides, f"hydra.run.dir={tmp_path / 'run'}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=ENV)
    assert proc.returncode == 0, proc.stderr[-2000:]
    run = offline_run(tmp_path / "run")
    # the whole resolved config, the overrides, and where the result came from
    assert {"model", "cost", "eval", "data", "fid", "overrides", "git_commit", "package_version"} <= set(run.config)
    assert run.config["overrides"] == overrides
    assert run.config["model"]["path"] == str(tiny_ckpt) and run.config["eval"]["strategies"] == [
        "dp",
        "even",
        "opt_ddim",
    ]
    assert run.config["cost"]["examples"] == 16 and run.config["paths"]["output_dir"] == str(tmp_path / "run")
    assert run.run.job_type == "evaluate" and list(run.run.tags) == [o[:64] for o in overrides]
    assert run.run.display_name.startswith("batch_size=8,cache_dir=")  # Hydra's override_dirname (sorted keys)
    assert run.exit_code == 0
    # each stage as it ends, in order, with its numbers
    stages = [k for row in run.history for k in row if k.startswith("stage/")]
    assert stages == [
        "stage/cost_matrix_seconds",
        "stage/ode_matrix_seconds",  # opt_ddim's start: dp_ode
        "stage/schedules_seconds",
        "stage/held_out_bpd_seconds",
        "stage/opt_s1_seconds",
        "stage/sample_quality_s1_seconds",
    ]
    (held,) = [row for row in run.history if "stage/held_out_bpd_seconds" in row]
    doc = json.loads((tmp_path / "run" / "results.json").read_text())
    assert held["bpd/dp/K4"] == next(r["bpd"] for r in doc["results"] if (r["strategy"], r["K"]) == ("dp", 4))
    assert run.summary["bpd/even/K2"] == next(
        r["bpd"] for r in doc["results"] if (r["strategy"], r["K"]) == ("even", 2)
    )
    # typed tables: the schedule as a list of timesteps
    media = run.dir / "files" / "media"
    tables = {_key(p, media / "table"): json.loads(p.read_text()) for p in (media / "table").rglob("*.table.json")}
    results = tables["results"]
    assert results["columns"] == ["strategy", "K", "bpd", "bpd_sem", "predicted_bpd", "schedule"]
    assert [row[-1] for row in results["data"]] == [r["schedule"] for r in doc["results"]]
    assert tables["sample_quality"]["columns"][:4] == ["strategy", "K", "sampler", "guidance"]
    assert [tuple(row[:2]) for row in tables["schedules/schedules"]["data"]] == sorted(
        {(q["strategy"], q["K"]) for q in doc["sample_quality"]} | {(r["strategy"], r["K"]) for r in doc["results"]},
        key=lambda sk: (sk[1], sk[0]),
    )
    # the end-to-end optimiser like every other strategy: its stage, its table, its samples and schedule
    (opt,) = [row for row in run.history if "stage/opt_s1_seconds" in row]
    found = doc["cost_matrix"]["opt"]["opt_ddim/K2"]
    assert opt["opt/opt_ddim/K2/best"] == found["distances"]["best"]
    assert [row[:2] + row[4:5] for row in tables["opt_s1/opt"]["data"]] == [["opt_ddim", 2, found["timesteps"]]]
    assert ["opt_ddim", 2, "ddim"] in [row[:3] for row in tables["sample_quality"]["data"]]
    images = {_key(p, media / "images") for p in (media / "images").rglob("*.png")}
    assert {"plots/bpd_vs_K", "plots/cost_matrix", "plots/schedules", "plots/fd_vs_K_ddim"} <= images
    assert {"plots/teacher_distance_vs_K_ddim", "plots/opt_history", "opt_s1/history"} <= images
    assert "cost_matrix/cost_matrix" in images and any(i.startswith("sample_quality_s1/samples/") for i in images)
    assert {"charts/bpd_vs_K_table", "charts/fd_vs_K_ddim_table"} <= set(tables)  # the line plots' data
    # artifacts: the schedules and results, and the cached matrices, fetchable by name
    artifacts = {a["type"]: a for a in run.artifacts if a["type"] in ("schedules", "cost_matrix")}
    assert artifacts["schedules"]["name"] == "schedules-tiny-SyntheticDataModule"
    assert set(artifacts["schedules"]["files"]) == {"schedules/schedules.json", "results.json", "results.md"}
    assert sorted(artifacts["cost_matrix"]["files"]) == sorted(
        p.name for p in (tmp_path / "cache").glob("cost_matrix_*.pt")
    )


@pytest.mark.slow
@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM], ids=["kill -9", "SIGTERM"])
def test_a_run_stopped_during_the_matrices_keeps_what_it_had_logged(tmp_path, how):
    # the bundled digits model's ELBO matrix (1,000 columns) runs for about a minute: long enough to stop it inside
    cmd = [
        sys.executable,
        str(ROOT / "evaluate.py"),
        "logger=wandb",
        "eval.budgets=[8]",
        "fid.enabled=false",
        f"cache_dir={tmp_path / 'cache'}",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV, cwd=ROOT)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:  # until the first progress record is on disk
            time.sleep(2)
            runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
            if runs and list(runs[0].glob("*.wandb")) and OfflineRun(runs[0]).logged("progress/cost_matrix"):
                break
        else:
            pytest.fail("no progress was logged within 240 s")
        proc.send_signal(how)
        proc.wait(timeout=120)
    finally:
        proc.kill()
    run = offline_run(tmp_path / "run")
    assert {"model", "cost", "eval"} <= set(run.config) and run.config["eval"]["budgets"] == [8]
    progress = run.logged("progress/cost_matrix")
    assert progress and 0 < progress[0] < 1
    assert not any("stage/cost_matrix_seconds" in row for row in run.history)  # it never ended
    assert not (tmp_path / "run" / "results.json").exists()
    if how == signal.SIGTERM:  # stopped cleanly: the partial sums saved, the run marked failed
        assert run.exit_code == 1 and list((tmp_path / "cache").glob("*.partial.pt"))
    else:  # nothing ran after the kill: what was logged stays, and no exit was recorded
        assert run.exit_code is None


@pytest.mark.parametrize("world,rank,job,expected", [(1, 0, 3, 1), (1, 0, None, 0), (2, 1, 4, 1), (4, 3, 0, 1)])
def test_multirun_job_n_takes_gpu_n_mod_devices(monkeypatch, world, rank, job, expected):
    from ddpm_schedules.app import evaluate
    from ddpm_schedules.models.noise import Processes

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(evaluate, "hydra_job", lambda: {} if job is None else {"num": job})
    assert evaluate.device_for(Processes(rank, world)) == torch.device("cuda", expected)  # DDP: the rank decides


def test_a_train_job_of_a_multirun_takes_gpu_n_mod_devices(monkeypatch):
    from omegaconf import OmegaConf

    from ddpm_schedules.app import train

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(train, "hydra_job", lambda: {"num": 6})
    assert train.job_devices(OmegaConf.create({"accelerator": "gpu", "devices": 1})) == {"devices": [2]}
    assert train.job_devices(OmegaConf.create({"accelerator": "gpu", "devices": 4})) == {}  # DDP: Lightning's
    assert train.job_devices(OmegaConf.create({"accelerator": "cpu", "devices": 1})) == {}
    monkeypatch.setattr(train, "hydra_job", lambda: {})
    assert train.job_devices(OmegaConf.create({"accelerator": "gpu", "devices": 1})) == {}  # not a multirun
