"""train.py's pipeline: configs compose, training runs, checkpoints resume, the monitor logs."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, TINY, train_cfg
from hydra import compose, initialize_config_dir

from ddpm_schedules import CostMatrix, load_checkpoint
from ddpm_schedules.app.train import train
from ddpm_schedules.lightning.data import SyntheticDataModule
from ddpm_schedules.lightning.module import DiffusionModule, LossSecondMomentSampler


@pytest.mark.parametrize("experiment", ["digits", "cifar10_hybrid", "imagenet64_hybrid"])
def test_experiment_configs_compose(tmp_path, experiment):
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        cfg = compose("train", overrides=[f"experiment={experiment}", f"paths.output_dir={tmp_path}"])
    assert cfg.module.loss == "hybrid" and cfg.unet.learn_sigma
    if experiment != "digits":  # improved-diffusion's published flags
        assert (cfg.diffusion.diffusion_steps, cfg.diffusion.noise_schedule) == (4000, "cosine")
        assert (cfg.unet.num_channels, cfg.unet.num_res_blocks) == (128, 3)
    assert list(cfg.callbacks)[0] == "schedule_monitor"


@pytest.mark.slow
def test_train_resume_and_monitor_with_wandb_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    metrics = train(train_cfg(tmp_path, "logger=wandb", "data=digits", "data.batch_size=16"))
    assert math.isfinite(metrics["val/bpd"]) and "schedules/dp_bpd/K2" in metrics
    assert metrics["schedules/dp_bpd/K4"] <= metrics["schedules/even_bpd/K4"] + 1e-9  # the DP is optimal on its data
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    record = json.loads((tmp_path / "schedules" / "step_6.json").read_text())
    assert record["budgets"] == [2, 4] and {r["strategy"] for r in record["results"]} == {"dp", "even", "quadratic"}
    assert (tmp_path / "schedules" / "cost_matrix_step_6.pt").is_file()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    state = torch.load(ckpt, weights_only=True)  # our checkpoints are plain data
    assert state["global_step"] == 6 and "current_model_state" in state  # EMA weights under state_dict
    # EMA weights are what load_checkpoint returns
    model = load_checkpoint(ckpt)
    w = model.net.state_dict()["out.2.weight"]
    assert torch.equal(w, state["state_dict"]["model.net.out.2.weight"])
    assert not torch.equal(w, state["current_model_state"]["model.net.out.2.weight"])
    # resume: continues from step 6 to 12 and keeps the monitor's history
    train(
        train_cfg(
            tmp_path, "logger=wandb", "data=digits", "data.batch_size=16", "trainer.max_steps=12", f"ckpt_path={ckpt}"
        )
    )
    resumed = torch.load(ckpt, weights_only=True)
    assert resumed["global_step"] == 12
    history = next(v for k, v in resumed["callbacks"].items() if "ScheduleMonitor" in k)["history"]
    assert [h["global_step"] for h in history] == [3, 6, 9, 12]
    # a resume with another architecture is refused before anything runs
    with pytest.raises(ValueError, match="was trained with num_channels=32 \\(config: 64\\)"):
        train(train_cfg(tmp_path, "logger=none", "data=digits", "unet.num_channels=64", f"ckpt_path={ckpt}"))
    # a run whose loss turns NaN stops without replacing the last good checkpoint
    good = ckpt.read_bytes()
    monkeypatch.setattr(
        DiffusionModule, "losses", lambda self, x0, t, noise, y=None: {"loss": torch.full((len(x0),), math.nan)}
    )
    with pytest.raises(ValueError, match="the training loss is nan at step 12"):
        train(
            train_cfg(
                tmp_path,
                "logger=none",
                "data=digits",
                "data.batch_size=16",
                "trainer.max_steps=18",
                f"ckpt_path={ckpt}",
            )
        )
    assert ckpt.read_bytes() == good


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["simple", "hybrid", "vlb"])
def test_each_loss_decreases_when_overfitting(loss):
    torch.manual_seed(0)
    module = DiffusionModule(TINY, loss=loss, lr=2e-3, levels=17)
    x0 = SyntheticDataModule(sizes=(8, 1, 1)).tensor("train")
    g = torch.Generator().manual_seed(1)
    t_eval = torch.randint(1, 21, (64,), generator=g)
    noise_eval = torch.randn(64, *x0.shape[1:], generator=g)

    def held_loss():
        with torch.no_grad():
            return module.losses(x0.repeat(8, 1, 1, 1), t_eval, noise_eval)["loss"].mean().item()

    import pytorch_lightning as pl

    before = held_loss()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x0), batch_size=8)
    trainer = pl.Trainer(
        max_steps=250, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.fit(module, loader)
    after = held_loss()
    assert after < 0.7 * before, (before, after)
    if loss == "vlb":
        assert module.sampler.warmed_up  # 250 steps x 8 examples > 20 t x 10 losses
        p = module.sampler.weights()
        assert p.max() / p.min() > 2  # importance sampling is in use, not uniform


def test_loss_second_moment_sampler():
    s = LossSecondMomentSampler(T=4, history=3, uniform_prob=0.1)
    t, w = s.sample(5, torch.device("cpu"))
    assert torch.equal(w, torch.ones(5)) and t.min() >= 1 and t.max() <= 4  # uniform before warm-up
    for _ in range(3):
        s.update(torch.tensor([1, 2, 3, 4]), torch.tensor([1.0, 1.0, 2.0, 4.0]))
    p = s.weights()
    expected = torch.tensor([1.0, 1.0, 2.0, 4.0]) / 8 * 0.9 + 0.1 / 4
    torch.testing.assert_close(p, expected.double())
    torch.manual_seed(0)
    t, w = s.sample(20000, torch.device("cpu"))
    freq = torch.bincount(t - 1, minlength=4).double() / 20000
    torch.testing.assert_close(freq, expected.double(), atol=0.01, rtol=0)
    torch.testing.assert_close(w.double(), 1 / (4 * expected.double()[t - 1]), rtol=1e-6, atol=0)  # unbiased weights
    s2 = LossSecondMomentSampler(T=4, history=3, uniform_prob=0.1)
    s2.load_state_dict(s.state_dict())
    torch.testing.assert_close(s2.weights(), p)  # what a resumed run samples from


@pytest.mark.slow
def test_ddp_monitor_equals_single_process(tmp_path):
    """A 2-process gloo run of the ScheduleMonitor writes the same cost matrix as 1 process."""
    script = ROOT / "tests" / "ddp_monitor_script.py"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    for devices in (1, 2):
        out = tmp_path / f"dev{devices}"
        subprocess.run(
            [sys.executable, str(script), str(out), str(devices)], check=True, env=env, timeout=300, cwd=tmp_path
        )
    one, two = (CostMatrix.load(tmp_path / d / "cost_matrix_step_0.pt") for d in ("dev1", "dev2"))
    assert one.count == two.count == 12
    valid = torch.isfinite(one.mean)
    torch.testing.assert_close(two.mean[valid], one.mean[valid], rtol=1e-6, atol=0)
    s1, s2 = (json.loads((tmp_path / d / "step_0.json").read_text())["results"] for d in ("dev1", "dev2"))
    assert [r["schedule"] for r in s1] == [r["schedule"] for r in s2]
    for a, b in zip(s1, s2):
        assert a["predicted_bpd"] == pytest.approx(b["predicted_bpd"], rel=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize(
    "override,message",
    [("experiment=nope", "Could not find 'experiment/nope'"), ("data=mnist", "Could not find 'data/mnist'")],
)
def test_unknown_config_names_list_the_options(tmp_path, override, message):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), override, f"hydra.run.dir={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0 and message in proc.stderr and "Available options" in proc.stderr


@pytest.mark.slow
def test_cli_error_is_one_line(tmp_path):
    env = {**os.environ, "WANDB_MODE": "offline"}
    env.pop("HYDRA_FULL_ERROR", None)
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            "data=synthetic",
            "unet=tiny",
            "module.loss=l1",
            "logger=none",
            f"hydra.run.dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: unknown loss 'l1'")
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_sigterm_saves_and_resume_continues_with_the_same_ema(tmp_path, monkeypatch):
    import signal
    import time

    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import EMAWeightAveraging

    import ddpm_schedules.app.train as pipeline

    run = tmp_path / "run"
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        "data=digits",
        "data.batch_size=16",
        "unet=tiny",
        "diffusion.diffusion_steps=20",
        "trainer.max_steps=100000",
        "trainer.val_check_interval=5",
        "callbacks.schedule_monitor.examples=8",
        "callbacks.schedule_monitor.budgets=[2,4]",
        "callbacks.schedule_monitor.progress=false",
        "logger=none",
        "+trainer.enable_progress_bar=false",
        f"hydra.run.dir={run}",
    ]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    last = run / "checkpoints" / "last.ckpt"
    deadline = time.time() + 180
    while not last.is_file() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    time.sleep(1.0)  # a few steps past the last validation
    proc.send_signal(signal.SIGTERM)
    stderr, _ = proc.communicate(timeout=120)  # stdout and stderr together
    assert proc.returncode == 143, stderr[-1500:]
    assert "stopped by SIGTERM at step" in stderr and "Traceback" not in stderr
    state = torch.load(last, weights_only=True)
    step = state["global_step"]
    assert step > 5 and f"at step {step};" in stderr  # saved at the SIGTERM
    assert not list(last.parent.glob(".*.tmp"))  # written atomically, nothing left behind

    seen = {}

    class Probe(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            ema = next(c for c in trainer.callbacks if isinstance(c, EMAWeightAveraging))
            seen["step"] = trainer.global_step
            seen["ema"] = {
                k[len("module.") :]: v.clone()
                for k, v in ema._average_model.state_dict().items()
                if k.startswith("module.")
            }

    original = pipeline.build_callbacks
    monkeypatch.setattr(pipeline, "build_callbacks", lambda cfg: [Probe(), *original(cfg)])
    cfg = train_cfg(
        run, "data=digits", "data.batch_size=16", "logger=none", f"trainer.max_steps={step + 2}", f"ckpt_path={last}"
    )
    train(cfg)
    assert seen["step"] == step
    for k, v in state["state_dict"].items():
        assert torch.equal(seen["ema"][k], v), k
    assert torch.load(last, weights_only=True)["global_step"] == step + 2


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["mse", "ode"])
def test_monitor_logs_the_same_keys_for_any_objective(tmp_path, objective):
    metrics = train(
        train_cfg(tmp_path, "logger=none", f"callbacks.schedule_monitor.objective={objective}", "trainer.max_steps=3")
    )
    dp = f"dp_{objective}"
    for K in (2, 4):
        assert (
            metrics[f"schedules/{dp}_{objective}/K{K}"] <= metrics[f"schedules/even_{objective}/K{K}"] + 1e-9
        )  # optimal on its matrix
        assert math.isfinite(metrics[f"schedules/{dp}_gap/K{K}"])
    if objective == "ode":  # the teacher's own steps jump exactly onto the teacher: the full grid chain costs 0
        assert metrics["schedules/full_ode"] == 0.0
    record = json.loads((tmp_path / "schedules" / "step_3.json").read_text())
    assert record["objective"] == objective and {r["strategy"] for r in record["results"]} == {dp, "even", "quadratic"}
    assert all(f"predicted_{objective}" in r for r in record["results"])


def test_monitor_refuses_strategies_of_another_objective(tmp_path):
    with pytest.raises(ValueError, match="^callbacks.schedule_monitor.strategies \\['dp_ode'\\] need another matrix"):
        train(train_cfg(tmp_path, "logger=none", "callbacks.schedule_monitor.strategies=[dp,dp_ode]"))
    with pytest.raises(ValueError, match="unknown callbacks.schedule_monitor.objective 'fid'"):
        train(train_cfg(tmp_path, "logger=none", "callbacks.schedule_monitor.objective=fid"))


@pytest.mark.slow
@torch.no_grad()
def test_val_bpd_estimator_is_unbiased_and_far_less_noisy_than_one_uniform_t():
    from conftest import quantized_data, tiny_model

    from ddpm_schedules import evaluate_schedules, full_schedule
    from ddpm_schedules.costs.moments import MeanSem
    from ddpm_schedules.costs.terms import full_chain_estimate, prior_nats, step_terms

    model, data = tiny_model("learned_range", T=30, levels=17), quantized_data(8, levels=17).double()
    exact = [evaluate_schedules(model, data, [full_schedule(30)], seed=s, progress=False)[0] for s in range(30)]
    exact_mean = sum(r.bpd for r in exact) / len(exact)
    exact_se = (sum(r.bpd_sem**2 for r in exact) / len(exact)) ** 0.5 / len(exact) ** 0.5
    ours, one_t = MeanSem(), MeanSem()
    to_bpd = 1 / (16 * math.log(2))
    for seed in range(30):
        g = torch.Generator().manual_seed(seed)
        ours.update(full_chain_estimate(model, data, g, exact_below=5, strata=4) * to_bpd)
        t = torch.randint(1, 31, (8,), generator=g)
        x_t = model.q_sample(data, t, torch.randn(data.shape, generator=g, dtype=torch.float64))
        one_t.update((30 * step_terms(model, data, x_t, t, model.predict(x_t, t)) + prior_nats(model, data)) * to_bpd)
    (mean, sem), (_, sem_one_t) = ours.compute(), one_t.compute()
    assert abs(float(mean) - exact_mean) < 3 * (float(sem) ** 2 + exact_se**2) ** 0.5
    assert sem < sem_one_t / 2  # the exact small-t terms and the strata remove most of the t-sampling noise


@pytest.mark.parametrize(
    "start,T,strata", [(10, 4000, 8), (10, 1000, 8), (0, 30, 4), (5, 30, 4), (10, 12, 8), (1, 2, 3)]
)
def test_val_bpd_strata_cover_every_t_once_and_grow_geometrically(start, T, strata):
    from ddpm_schedules.costs.terms import stratum_edges

    edges = stratum_edges(start, T, strata)
    assert edges[0] == start and edges[-1] == T and len(edges) - 1 <= strata
    assert all(a < b for a, b in zip(edges, edges[1:]))  # the ranges (e_i, e_i+1] partition start+1..T
    widths = [b - a for a, b in zip(edges, edges[1:])]
    assert widths == sorted(widths) or T - start <= strata  # later ranges are wider (the terms are smaller there)


def test_val_bpd_strata_are_the_geometric_sequence():
    from ddpm_schedules.costs.terms import stratum_edges

    assert stratum_edges(10, 1000, 8) == [round(10 * 10 ** (k / 4)) for k in range(9)]  # 10, 18, 32, ..., 562, 1000
