"""Every place a user types something: a one-line ValueError naming the value and the fix, nothing half-written."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from conftest import FIXTURE, TINY, eval_cfg, save_tiny_checkpoint, train_cfg

from ddpm_schedules.app.evaluate import evaluate
from ddpm_schedules.app.train import train


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    good = save_tiny_checkpoint(d / "tiny.ckpt")
    (d / "truncated.ckpt").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    state = torch.load(good, weights_only=True)["state_dict"]
    save_tiny_checkpoint(d / "arch.ckpt", flags={**TINY, "num_channels": 64}, state=state)
    save_tiny_checkpoint(
        d / "nan.ckpt", state={k: v.clone().fill_(math.nan) if "out.2" in k else v for k, v in state.items()}
    )
    (d / "decreasing.json").write_text(json.dumps({"timesteps": [9, 4, 20], "T": 20}))
    (d / "out_of_range.json").write_text(json.dumps({"timesteps": [4, 25], "T": 20}))
    (d / "broken.json").write_text("{not json")
    (d / "other_T.json").write_text(json.dumps({"timesteps": [5, 30], "T": 30}))
    (d / "no_timesteps.json").write_text(json.dumps({"T": 20}))
    return d


EVALUATE_CASES = [
    ("budget 0", ["eval.budgets=[0]"], "eval.budgets has 0"),
    ("budget above the grid", ["eval.budgets=[21]"], "eval.budgets has 21; every budget must be an integer in 1..20"),
    ("budget not a number", ["eval.budgets=[four]"], "eval.budgets has 'four'"),
    ("unknown strategy", ["eval.strategies=[dp,optimal]"], "unknown strategy 'optimal'"),
    ("bad respacing", ["eval.strategies=[respace:every7]"], "respacing 'every7'"),
    ("bad ddim respacing", ["eval.strategies=[respace:ddimx]"], "not of the form 'ddimN'"),
    ("schedule file for another T", ["eval.strategies=[file:{d}/other_T.json]"], "T = 30; the model has T = 20"),
    ("non-increasing schedule file", ["eval.strategies=[file:{d}/decreasing.json]"], "not strictly increasing"),
    ("schedule beyond T", ["eval.strategies=[file:{d}/out_of_range.json]"], "ends at 25, not at T = 20"),
    ("schedule file missing", ["eval.strategies=[file:{d}/nope.json]"], "does not exist"),
    ("schedule file not JSON", ["eval.strategies=[file:{d}/broken.json]"], "not valid JSON"),
    ("checkpoint missing", ["model.path={d}/missing.ckpt"], "is missing"),
    ("checkpoint truncated", ["model.path={d}/truncated.ckpt"], "is not a Lightning checkpoint"),
    ("checkpoint of another architecture", ["model.path={d}/arch.ckpt"], "does not match its own flags"),
    (
        "improved-diffusion flags wrong",
        [
            "model=improved_diffusion",
            f"model.path={FIXTURE}/model.pt",
            "+model.flags.image_size=16",
            "+model.flags.num_channels=32",
            "+model.flags.channel_mult='1,2'",
            "+model.flags.learn_sigma=false",
        ],
        "learn_sigma",
    ),
    (
        "unknown improved-diffusion flag",
        ["model=improved_diffusion", f"model.path={FIXTURE}/model.pt", "+model.flags.use_fp16=true"],
        "unknown improved-diffusion flag",
    ),
    (
        "Inception weights missing",
        ["fid.features=inception", "fid.inception_weights={d}/pt_inception.pth"],
        "^fid.inception_weights = .*pt_inception.pth' does not exist; install",
    ),
    ("unknown feature network", ["fid.features=dino"], "^fid.features = 'dino'; use one of digits, inception"),
    ("digits feature network missing", ["fid.digits_weights={d}/none.pt"], "digits feature network .* is missing"),
    ("image size differs", ["data.image_size=16"], "does not match the model"),
    ("levels differ", ["data.levels=256"], "levels=256\\) does not match the model"),
    (
        "unknown sampler",
        ["eval.samplers=[ancestral,euler]"],
        "unknown sampler 'euler' in eval.samplers; use ancestral, ddim, dpmpp",
    ),
    ("negative DDIM eta", ["eval.ddim_eta=-1"], "eval.ddim_eta = -1; DDIM's eta must be a number >= 0"),
    (
        "unknown objective",
        ["eval.strategies=[dp_fid]"],
        "unknown strategy 'dp_fid' in eval.strategies; use dp, dp_mse, dp_ode",
    ),
    (
        "sample budget above the grid",
        ["eval.sample_budgets=[30]"],
        "eval.sample_budgets has 30; every budget must be an integer in 1..20",
    ),
    (
        "ode grid smaller than a budget",
        ["eval.strategies=[dp_ode]", "cost.ode.grid=10"],
        "eval.budgets has 4; .* 1..2 \\(the size of cost.ode.grid\\)",
    ),
    (
        "more teacher samples than samples",
        ["eval.teacher_samples=40"],
        "eval.teacher_samples = 40 exceeds the 16 samples",
    ),
    ("target standard error 0", ["cost.target_sem=0"], "cost.target_sem = 0; it must be a positive number of bits/dim"),
    (
        "target standard error negative",
        ["cost.target_sem=-0.1"],
        "cost.target_sem = -0.1; it must be a positive number",
    ),
    ("grid spec unknown", ["cost.grid=cubic:3"], "cost.grid = 'cubic:3'; use null"),
    ("precision unknown", ["precision=8"], "precision = 8; use 32, bf16 or 16"),
    (
        "grid without T",
        ["cost.grid=[5,10]"],
        "^cost.grid = \\[5, 10\\] lacks T = 20; every schedule ends there: append 20$",
    ),
    (
        "grid with t = 0",
        ["cost.grid=[0,5,20]"],
        "^cost.grid = \\[0, 5, 20\\]; every timestep must be a positive integer \\(got 0\\)$",
    ),
    (
        "grid beyond T",
        ["cost.grid=[5,30]"],
        "^cost.grid = \\[5, 30\\]; every timestep must be an integer in 1..T = 20 \\(got 30\\)$",
    ),
    ("grid stride 0", ["cost.grid=0"], "^cost.grid = 0; .* \\(a stride is an integer >= 1\\)$"),
    (
        "schedule file without timesteps",
        ["eval.strategies=[dp,file:{d}/no_timesteps.json]"],
        (
            "^eval.strategies has 'file:.*no_timesteps.json': a schedule needs the keys 'timesteps' and 'T'; "
            "'timesteps' is missing$"
        ),
    ),
    ("more examples than the split", ["cost.examples=5000"], "cost.examples = 5000 asks for 5000 val examples"),
    ("unknown split", ["cost.split=training"], "unknown split 'training'"),
    ("NaN-producing model", ["model.path={d}/nan.ckpt"], "NaN or Inf at t = "),
    (
        "propagate with ancestral",
        ["eval.strategies=[dp_ode_oss]", "cost.ode.propagate=ancestral"],
        (
            "^cost.ode.propagate = 'ancestral'; dp_ode_oss carries a deterministic sampler's own states: use ddim "
            "or dpmpp$"
        ),
    ),
    # the checks below app/ name their own parameters; these messages name the config keys
    (
        "two-step costs over their memory",
        ["eval.strategies=[dp_dpmpp]", "cost.ode.memory_gb=1e-9"],
        "^cost.ode.grid has 20 points: .* more than cost.ode.memory_gb = 1e-09; use a coarser cost.ode.grid ",
    ),
    (
        "refinement over its memory",
        ["cost.refine.enabled=true", "cost.refine.coarse=log:6", "cost.refine.memory_gb=0"],
        "more than cost.refine.memory_gb = 0; raise it, use fewer cost.examples or a coarser grid$",
    ),
    ("data workers negative", ["+data.num_workers=-1"], "^data.num_workers = -1; it must be an integer >= 0"),
]


@pytest.mark.parametrize("name,overrides,message", EVALUATE_CASES, ids=[c[0] for c in EVALUATE_CASES])
def test_evaluate_bad_input(tmp_path, files, name, overrides, message, monkeypatch):
    overrides = [o.format(d=files) for o in overrides]
    if name in SETTINGS_ONLY:
        refuse_loading(monkeypatch)
    with pytest.raises(ValueError, match=message) as info:
        evaluate(eval_cfg(tmp_path, files / "tiny.ckpt", "logger=none", *overrides))
    assert "\n" not in str(info.value)  # one line
    assert not (tmp_path / "run" / "results.json").exists()
    if name in SETTINGS_ONLY:
        assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()
    assert not list(tmp_path.glob("cache/cost_matrix_*[0-9a-f].pt"))  # no finished-looking matrix either


# what needs no model is refused before the model or the data is loaded (the loaders are never called): the cases
# above whose message needs no model, and a few more
SETTINGS_ONLY = {
    "budget 0",
    "budget not a number",
    "unknown strategy",
    "schedule file missing",
    "schedule file not JSON",
    "Inception weights missing",
    "unknown feature network",
    "digits feature network missing",
    "unknown sampler",
    "negative DDIM eta",
    "unknown objective",
    "more teacher samples than samples",
    "target standard error 0",
    "target standard error negative",
    "grid spec unknown",
    "precision unknown",
    "grid with t = 0",
    "grid stride 0",
    "schedule file without timesteps",
    "propagate with ancestral",
}
SETTINGS_CASES = [
    ["cost.ode.grid=log:0"],
    ["compile=maybe"],
    ["model.gamma_file=g.pt"],
    ["model.var_type=learned"],
    ["cost.refine.enabled=true", "cost.refine.coarse=cubic"],
    ["eval.seed=-1"],
]


def refuse_loading(monkeypatch):
    import ddpm_schedules.app.evaluate as app

    monkeypatch.setattr(
        app,
        "build",
        lambda node, **kw: pytest.fail(f"{node.get('_target_')} was loaded before the settings were checked"),
    )


@pytest.mark.parametrize("overrides", SETTINGS_CASES, ids=[" ".join(c) for c in SETTINGS_CASES])
def test_settings_are_checked_before_the_model_or_the_data_is_loaded(tmp_path, files, overrides, monkeypatch):
    refuse_loading(monkeypatch)
    key = overrides[-1].split("=")[0]
    with pytest.raises(ValueError) as info:
        evaluate(eval_cfg(tmp_path, files / "tiny.ckpt", "logger=none", *[o.format(d=files) for o in overrides]))
    assert "\n" not in str(info.value) and key in str(info.value), str(info.value)  # one line, naming the key
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


# every count evaluate.py reads: 0, -1 and a non-integer are refused before any work, naming the key
COUNT_KEYS = [
    "cost.examples",
    "eval.examples",
    "fid.samples",
    "fid.reference_examples",
    "sample.grid_size",
    "sample.chunk",
    "batch_size",
    "data.batch_size",
    "resume.every_columns",
    "resume.every_batches",
    "resume.every_seconds",
]
# the inner loop refuses 0 for every key; the full suite adds -1 and a non-integer
COUNT_CASES = [
    pytest.param(key, value, marks=[pytest.mark.slow] if value != "0" else [], id=f"{key}={value}")
    for key in COUNT_KEYS
    for value in ("0", "-1", "2.5" if "seconds" not in key else "soon")
]


@pytest.mark.parametrize("key,value", COUNT_CASES)
def test_evaluate_refuses_counts_that_are_not_positive_integers(tmp_path, files, key, value, monkeypatch):
    refuse_loading(monkeypatch)
    with pytest.raises(ValueError, match=f"^{key} = {value if value != 'soon' else repr(value)};") as info:
        evaluate(eval_cfg(tmp_path, files / "tiny.ckpt", "logger=none", f"{key}={value}"))
    assert "\n" not in str(info.value)
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


TRAIN_CASES = [
    ("unknown loss", ["module.loss=l1"], "unknown loss 'l1'"),
    ("hybrid without learned sigmas", ["unet.learn_sigma=false"], "set learn_sigma=true"),
    ("image size differs", ["unet.image_size=16"], "built for \\(1, 16, 16\\)"),
    ("monitor budget above the grid", ["callbacks.schedule_monitor.budgets=[64]"], "exceed the 20 grid points"),
    ("resume file missing", ["ckpt_path={d}/gone.ckpt"], "does not exist"),
    ("resume from another architecture", ["ckpt_path={d}/arch.ckpt"], "was trained with num_channels=64"),
    ("CIFAR-10 folder missing", ["data=cifar10", "data.root={d}/cifar"], "CIFAR-10 not found"),
    ("batch size 0", ["data.batch_size=0"], "data.batch_size = 0; it must be a positive integer"),
    ("unknown noise schedule", ["diffusion.noise_schedule=sigmoid"], "unknown noise_schedule 'sigmoid'"),
    ("monitor grid unknown", ["callbacks.schedule_monitor.grid=log:0"], "^callbacks.schedule_monitor.grid = 'log:0'"),
    ("monitor count 0", ["callbacks.schedule_monitor.examples=0"], "^callbacks.schedule_monitor.examples = 0; it must"),
    ("loss not finite", ["module.lr=1e30"], "^the training loss is .* at step .*; lower module.lr or check the data$"),
]


@pytest.mark.parametrize("name,overrides,message", TRAIN_CASES, ids=[c[0] for c in TRAIN_CASES])
def test_train_bad_input(tmp_path, files, name, overrides, message):
    with pytest.raises(ValueError, match=message) as info:
        train(train_cfg(tmp_path, "logger=none", *[o.format(d=files) for o in overrides]))
    assert "\n" not in str(info.value)
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.slow
def test_corrupt_cached_cost_matrix_is_recomputed(tmp_path, files):
    first = evaluate(eval_cfg(tmp_path, files / "tiny.ckpt", "logger=none", "fid.enabled=false"))
    Path(first["cost_matrix"]["file"]).write_bytes(b"corrupted")
    again = evaluate(eval_cfg(tmp_path, files / "tiny.ckpt", "logger=none", "fid.enabled=false"))
    assert again["cost_matrix"]["cached"] is False
    assert [r["bpd"] for r in again["results"]] == [r["bpd"] for r in first["results"]]


def test_dpmpp_needs_no_diffusers(monkeypatch):
    from conftest import tiny_model

    from ddpm_schedules import even_schedule
    from ddpm_schedules.sampling.registry import check_samplers
    from ddpm_schedules.sampling.samplers import sample_dpmpp

    monkeypatch.setitem(sys.modules, "diffusers", None)  # as if it were not installed
    assert check_samplers(["ddim", "dpmpp"]) == ["ddim", "dpmpp"]
    assert sample_dpmpp(tiny_model("fixed_large", T=10), even_schedule(10, 3), 4).shape == (4, 1, 4, 4)


@pytest.mark.parametrize(
    "visible,overrides,message",
    [
        (1, ["fabric.devices=2"], "^fabric.devices = 2 but 1 GPU is visible; use fabric.devices=1 or fewer"),
        (
            4,
            ["fabric.devices=8", "fabric.accelerator=cuda"],
            "^fabric.devices = 8 but 4 GPUs are visible; use fabric.devices=4 or fewer",
        ),
        (
            0,
            ["fabric.accelerator=cuda"],
            "^fabric.accelerator = 'cuda' but no CUDA device is visible; use fabric.accelerator=cpu",
        ),
    ],
)
def test_more_devices_than_visible_gpus_is_refused_before_any_process_starts(
    tmp_path, files, monkeypatch, visible, overrides, message
):
    import ddpm_schedules.app.evaluate_config as settings

    monkeypatch.setattr(settings, "cuda_devices", lambda: visible)
    refuse_loading(monkeypatch)
    with pytest.raises(ValueError, match=message) as info:
        evaluate(eval_cfg(tmp_path, files / "tiny.ckpt", "logger=none", *overrides))
    assert "\n" not in str(info.value)


def test_two_cpu_processes_are_not_limited_by_the_gpus():
    from ddpm_schedules.app.keys import check_fabric

    assert check_fabric({"accelerator": "cpu", "devices": 2}, 0)["devices"] == 2
    assert check_fabric({"accelerator": "auto", "devices": 2}, 0)["devices"] == 2  # no GPU: auto is the CPU
