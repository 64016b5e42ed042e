"""evaluate.py end to end on a tiny model: files, schema, W&B offline run, cache, multirun, bad input."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import DIGITS_FEATURES, ROOT, SMALL, eval_cfg, evaluate_on_processes
from hydra import compose, initialize_config_dir

from ddpm_schedules import CostMatrix, Schedule
from ddpm_schedules.app.evaluate import evaluate
from ddpm_schedules.schedules.schedule import save_schedules


@pytest.mark.slow
def test_end_to_end_files_schema_wandb_and_cache(tmp_path, tiny_ckpt, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    save_schedules([Schedule((3, 11, 20), 20)], tmp_path / "mine.json")
    cfg = eval_cfg(
        tmp_path,
        tiny_ckpt,
        "logger=wandb",
        "eval.full_chain=true",
        f"eval.strategies=[dp,even,quadratic,respace:5,file:{tmp_path / 'mine.json'}]",
    )
    doc = evaluate(cfg)
    run = tmp_path / "run"
    saved = json.loads((run / "results.json").read_text())
    assert saved == json.loads(json.dumps(doc))
    assert set(saved) >= {"model", "data", "cost_matrix", "full_chain", "fid", "results"}
    assert set(saved["model"]) >= {"source", "path", "T", "mean_type", "var_type"}
    assert set(saved["data"]) >= {
        "name",
        "levels",
        "dims",
        "cost_split",
        "cost_examples",
        "eval_split",
        "eval_examples",
    }
    assert set(saved["cost_matrix"]) >= {"grid_size", "seconds", "file"} and set(saved["full_chain"]) == {
        "K",
        "bpd",
        "bpd_sem",
    }
    assert set(saved["fid"]) >= {
        "features",
        "reference_split",
        "reference_examples",
        "samples",
        "bootstrap",
        "samplers",
    }
    assert "not FID" in saved["fid"]["features"]
    rows = {(r["strategy"], r["K"]) for r in saved["results"]}
    assert rows == {
        ("dp", 2),
        ("dp", 4),
        ("even", 2),
        ("even", 4),
        ("quadratic", 2),
        ("quadratic", 4),
        ("respace:5", 5),
        ("file:mine", 3),
    }
    for r in saved["results"]:
        assert set(r) >= {"strategy", "K", "schedule", "bpd", "bpd_sem", "predicted_bpd", "fid", "terms_bpd"}
        assert len(r["terms_bpd"]) == r["K"] and (r["fid"] is None) == (
            r["K"] == 4
        )  # sampled at eval.sample_budgets = [2]
        assert sum(r["terms_bpd"]) < r["bpd"]  # plus the prior
    quality = {(q["strategy"], q["K"], q["sampler"]): q for q in saved["sample_quality"]}
    assert set(quality) == {
        (n, k, s) for n, k in rows - {("dp", 4), ("even", 4), ("quadratic", 4)} for s in ("ancestral", "ddim")
    }
    for (name, K, sampler), q in quality.items():
        assert q["fid"] > 0 and q["fid_sem"] > 0 and (q["teacher_distance"] is not None) == (sampler == "ddim")
    for name in (
        "results.md",
        "bpd_vs_K.png",
        "cost_matrix.png",
        "schedules.png",
        "fd_vs_K_ancestral.png",
        "fd_vs_K_ddim.png",
    ):
        assert (run / name).is_file(), name
    assert {p.stem for p in (run / "samples").glob("*.png")} == {
        f"{n}_{s}_K{k}".replace(":", "_") for n, k, s in quality
    }
    # schedule exports round-trip and carry the diffusers form
    dp4 = Schedule.from_json((run / "schedules" / "dp_K4.json").read_text())
    assert list(dp4.timesteps) == next(r["schedule"] for r in saved["results"] if r["strategy"] == "dp" and r["K"] == 4)
    assert json.loads((run / "schedules" / "dp_K4.json").read_text())["diffusers_timesteps"] == [
        t - 1 for t in reversed(dp4.timesteps)
    ]
    # the W&B offline run holds the results and sample-quality tables and the fid/<strategy>/<sampler>/K<K> keys
    tables = {t.name.split("_")[0]: t for t in (run / "wandb").glob("offline-run-*/files/media/table/*.table.json")}
    results_table = json.loads(next(t for n, t in tables.items() if n == "results").read_text())
    assert results_table["columns"][:3] == ["strategy", "K", "bpd"] and len(results_table["data"]) == len(
        saved["results"]
    )
    quality_table = json.loads(tables["sample"].read_text())
    assert quality_table["columns"][:5] == ["strategy", "K", "sampler", "guidance", "fid"] and len(
        quality_table["data"]
    ) == len(quality)
    # a rerun takes the cached matrix and the cached reference statistics: no forward pass for either
    import ddpm_schedules.app.stages as cost_stages
    import ddpm_schedules.sampling.frechet as frechet

    monkeypatch.setattr(
        cost_stages, "estimate_cost_matrices", lambda *a, **k: pytest.fail("the cost matrix was recomputed")
    )
    monkeypatch.setattr(frechet, "gather_rows", lambda *a, **k: pytest.fail("the reference statistics were recomputed"))
    again = evaluate(
        eval_cfg(
            tmp_path,
            tiny_ckpt,
            "logger=none",
            f"eval.strategies=[dp,even,quadratic,respace:5,file:{tmp_path / 'mine.json'}]",
        )
    )
    assert again["cost_matrix"]["cached"] is True
    assert [q["fid"] for q in again["sample_quality"]] == pytest.approx(
        [q["fid"] for q in saved["sample_quality"]], rel=1e-9
    )
    assert [r["schedule"] for r in again["results"] if r["strategy"] == "dp"] == [
        r["schedule"] for r in saved["results"] if r["strategy"] == "dp"
    ]


@pytest.mark.slow  # end to end; the inner loop covers its parts
def test_dp_beats_baselines_on_the_cost_split(tmp_path, tiny_ckpt):
    """Held out on the very examples and noise of the matrix, the DP is never worse than a baseline."""
    doc = evaluate(eval_cfg(tmp_path, tiny_ckpt, "logger=none", "fid.enabled=false", "eval.split=val", "eval.seed=0"))
    by = {(r["strategy"], r["K"]): r for r in doc["results"]}
    for K in (2, 4):
        assert by[("dp", K)]["bpd"] == pytest.approx(by[("dp", K)]["predicted_bpd"], rel=1e-9)
        assert by[("dp", K)]["bpd"] <= min(by[("even", K)]["bpd"], by[("quadratic", K)]["bpd"]) + 1e-12


@pytest.mark.slow
def test_multirun_two_jobs(tmp_path, tiny_ckpt):
    env = {
        **os.environ,
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "DDPM_SCHEDULES_CACHE": str(tmp_path / "cache"),
    }
    cmd = [
        sys.executable,
        str(ROOT / "evaluate.py"),
        "-m",
        f"model.path={tiny_ckpt}",
        *SMALL[1:],
        "data=synthetic",
        "eval.budgets=[2],[4]",
        f"fid.digits_weights={DIGITS_FEATURES}",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    docs = sorted((tmp_path / "sweep").glob("*/results.json"))
    assert len(docs) == 2
    assert [{r["K"] for r in json.loads(d.read_text())["results"]} for d in docs] == [{2}, {4}]
    assert len(list((tmp_path / "sweep").glob("*/wandb/offline-run-*"))) == 2  # one W&B run per job


def _close(a: float | None, b: float | None, rel: float) -> bool:
    """Equal within rel, or both None (pytest.approx refuses None from pytest 9.2)."""
    return (a is None and b is None) or (a is not None and b is not None and a == pytest.approx(b, rel=rel))


@pytest.mark.slow
def test_two_process_ddp_evaluation_equals_one_process(tmp_path, tiny_ckpt):
    docs = evaluate_on_processes(tmp_path, tiny_ckpt)
    one, two = (CostMatrix.load(next((tmp_path / f"cache{d}").glob("cost_matrix_*.pt"))) for d in (1, 2))
    valid = torch.isfinite(one.mean)
    torch.testing.assert_close(two.mean[valid], one.mean[valid], rtol=1e-9, atol=0)
    assert one.count == two.count == 16
    for a, b in zip(docs[1]["results"], docs[2]["results"], strict=True):
        assert a["schedule"] == b["schedule"]
        assert a["bpd"] == pytest.approx(b["bpd"], rel=1e-9)
        assert _close(a["fid"], b["fid"], rel=1e-6)  # None: K not sampled
    for a, b in zip(docs[1]["sample_quality"], docs[2]["sample_quality"], strict=True):  # chunks gathered in order
        assert (a["strategy"], a["K"], a["sampler"]) == (b["strategy"], b["K"], b["sampler"])
        for key in ("fid", "fid_sem", "teacher_distance"):
            assert _close(a[key], b[key], rel=1e-6), (key, a[key], b[key])  # None: not defined for that sampler


@pytest.mark.slow
def test_submitit_local_multirun_two_jobs(tmp_path, tiny_ckpt):
    env = {**os.environ, "WANDB_MODE": "offline", "DDPM_SCHEDULES_CACHE": str(tmp_path / "cache")}
    cmd = [
        sys.executable,
        str(ROOT / "evaluate.py"),
        "-m",
        "hydra/launcher=submitit_local",
        f"model.path={tiny_ckpt}",
        *SMALL[1:],
        "data=synthetic",
        "eval.budgets=[2],[4]",
        "logger=none",
        f"fid.digits_weights={DIGITS_FEATURES}",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    docs = sorted((tmp_path / "sweep").glob("*/results.json"))
    assert [{r["K"] for r in json.loads(d.read_text())["results"]} for d in docs] == [{2}, {4}]


@pytest.mark.parametrize("launcher", ["local_parallel", "slurm", "slurm_ddp", "submitit_local"])
def test_launcher_configs_compose(launcher):
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        cfg = compose(
            "evaluate", overrides=[f"hydra/launcher={launcher}", "fabric.devices=4"], return_hydra_config=True
        )
    assert "_target_" in cfg.hydra.launcher
    if launcher == "slurm_ddp":
        assert cfg.hydra.launcher.tasks_per_node == cfg.hydra.launcher.gpus_per_node == 4


@pytest.mark.slow  # end to end; the inner loop covers its parts
def test_csv_logger_gets_the_per_sampler_keys(tmp_path, tiny_ckpt):
    evaluate(eval_cfg(tmp_path, tiny_ckpt, "logger=csv", "eval.strategies=[dp,dp_mse,dp_ode,even]"))
    header = next((tmp_path / "run" / "csv").glob("*/metrics.csv")).read_text().splitlines()[0].split(",")
    for key in (
        "bpd/dp_ode/K4",
        "fid/dp_mse/ancestral/K2",
        "fid/dp_ode/ddim/K2",
        "fid_sem/even/ddim/K2",
        "teacher_distance/dp_ode/ddim/K2",
    ):
        assert key in header, key


@pytest.mark.slow  # end to end; the inner loop covers its parts
def test_target_sem_reports_its_rounds_and_the_examples_used(tmp_path, tiny_ckpt):
    doc = evaluate(
        eval_cfg(
            tmp_path,
            tiny_ckpt,
            "logger=none",
            "fid.enabled=false",
            "cost.target_sem=1000.0",
            "cost.first_round=4",
            "eval.strategies=[dp,dp_mse,even]",
            "cost.grid=log:10",
        )
    )
    rounds = doc["cost_matrix"]["rounds"]
    assert doc["cost_matrix"]["target_sem"] == 1000.0 and [r["examples"] for r in rounds] == [
        4
    ]  # one round is precise enough
    assert doc["cost_matrix"]["target_met"] is True and rounds[0]["met"]
    assert doc["cost_matrix"]["objectives"]["elbo"]["count"] == doc["cost_matrix"]["objectives"]["mse"]["count"] == 4
    assert doc["cost_matrix"]["grid_size"] == 10


# the tiny model refined from a 6-point grid, without a logger or FID
REFINED = ("logger=none", "fid.enabled=false", "cost.refine.enabled=true", "cost.refine.coarse=log:6")


@pytest.mark.slow  # end to end; the inner loop covers its parts
def test_refinement_and_target_sem_together(tmp_path, tiny_ckpt):
    """The grid is refined on the first round's examples, then rounds of examples are added on it."""
    doc = evaluate(
        eval_cfg(
            tmp_path,
            tiny_ckpt,
            *REFINED,
            "cost.target_sem=1e-9",
            "cost.first_round=4",
            "eval.strategies=[dp,dp_mse,even]",
        )
    )
    cm = doc["cost_matrix"]
    assert cm["refine_rounds"][-1]["passes"] == 4 * cm["grid_size"]  # refinement saw the first round only
    assert (
        [r["examples"] for r in cm["rounds"]] == [4, 8, 16]
        and cm["target_met"] is False
        and doc["data"]["cost_examples"] == 16
    )
    assert cm["objectives"]["elbo"]["count"] == cm["objectives"]["mse"]["count"] == 16
    assert cm["objectives"]["mse"]["grid_size"] == cm["grid_size"] < 20


@pytest.mark.slow  # end to end; the inner loop covers its parts
def test_refinement_through_evaluate_reports_its_rounds(tmp_path, tiny_ckpt):
    doc = evaluate(
        eval_cfg(
            tmp_path,
            tiny_ckpt,
            *REFINED,
            "eval.strategies=[dp,dp_mse,even]",
        )
    )
    rounds = doc["cost_matrix"]["rounds"]
    assert (
        rounds
        and rounds[-1]["passes"] == 16 * doc["cost_matrix"]["grid_size"]
        and doc["cost_matrix"]["refine"]["coarse"] == "log:6"
    )
    assert doc["cost_matrix"]["objectives"]["mse"]["grid_size"] == doc["cost_matrix"]["grid_size"] < 20
    with pytest.raises(ValueError, match="cost.refine.window = -2"):
        evaluate(eval_cfg(tmp_path, tiny_ckpt, "logger=none", "cost.refine.enabled=true", "cost.refine.window=-2"))
    with pytest.raises(ValueError, match="cost.refine.coarse has 3 timesteps but the largest budget is K = 4"):
        evaluate(eval_cfg(tmp_path, tiny_ckpt, "logger=none", "cost.refine.enabled=true", "cost.refine.coarse=log:3"))


@pytest.mark.slow  # end to end; the inner loop covers its parts
def test_dp_dpmpp_runs_through_evaluate_with_dpm_solver_samples_against_the_teacher(tmp_path, tiny_ckpt):
    doc = evaluate(
        eval_cfg(tmp_path, tiny_ckpt, "logger=none", "eval.strategies=[dp_dpmpp,dp_ode,even]", "eval.samplers=[dpmpp]")
    )
    assert {r["strategy"] for r in doc["results"]} == {"dp_dpmpp", "dp_ode", "even"}
    assert doc["sample_quality"] and all(
        q["sampler"] == "dpmpp" and q["teacher_distance"] is not None for q in doc["sample_quality"]
    )
    ode = CostMatrix.load(doc["cost_matrix"]["objectives"]["ode"]["file"])
    assert ode.two_step is not None  # the teacher's step costs are cached with the ode matrix
