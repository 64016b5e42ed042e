"""Checkpoints are data, never code: a crafted file is refused by every entry point unless the user opts in.

The crafted checkpoint's pickle creates a marker file when it is unpickled in full; every refusal
must leave that file absent (nothing ran) and write nothing.
"""

import json
import pathlib
import subprocess
import sys

import pytest
import torch
from conftest import FIXTURE, ROOT, TINY, eval_cfg, train_cfg
from omegaconf import OmegaConf

from ddpm_schedules.app.evaluate import evaluate
from ddpm_schedules.app.train import train
from ddpm_schedules.models.checkpoints import (
    export_checkpoint,
    load_checkpoint,
    load_improved_diffusion,
)


class Touch:
    """Unpickled in full, creates ``marker`` (what any code hidden in a pickle could do instead)."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


@pytest.fixture
def evil(tmp_path):
    """A checkpoint shaped like ours (flags, levels, weights) with a payload hidden in its hyper-parameters."""
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"hyper_parameters": {"flags": dict(TINY), "levels": 17, "note": Touch(marker)}, "state_dict": {}}, path)
    assert not marker.exists()
    return path, marker


def test_load_checkpoint_refuses_and_runs_nothing(evil):
    path, marker = evil
    with pytest.raises(ValueError, match="load it with trust_checkpoint=true$") as info:
        load_checkpoint(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and "run code" in message
    assert not marker.exists()
    # the caller names its own opt-in
    with pytest.raises(ValueError, match="--my-flag"):
        load_checkpoint(path, trust_hint="--my-flag")
    assert not marker.exists()
    # opting in unpickles in full: the hidden code runs (then the empty weights are refused)
    with pytest.raises(ValueError, match="does not match its own flags"):
        load_checkpoint(path, trust_checkpoint=True)
    assert marker.exists()


def test_improved_diffusion_loader_refuses_and_runs_nothing(tmp_path, evil):
    path, marker = evil
    with pytest.raises(ValueError, match="weights_only=True"):
        load_improved_diffusion(path, levels=17, **TINY)
    assert not marker.exists()


@pytest.mark.slow
def test_export_command_refuses_and_writes_nothing(tmp_path, evil):
    path, marker = evil
    out = tmp_path / "exported" / "out.ckpt"
    proc = subprocess.run(
        [sys.executable, "-m", "ddpm_schedules.app.export", str(path), str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--trust-checkpoint" in lines[0] and str(path) in lines[0], proc.stderr
    assert not marker.exists() and not out.exists()
    assert not out.parent.exists() or not list(out.parent.iterdir())


def test_train_resume_refuses_and_runs_nothing(tmp_path, evil):
    path, marker = evil
    with pytest.raises(ValueError, match="trust_checkpoint=true") as info:
        train(train_cfg(tmp_path / "run", "logger=none", f"ckpt_path={path}"))
    assert "\n" not in str(info.value) and "model.trust_checkpoint" not in str(info.value)
    assert not marker.exists() and not (tmp_path / "run" / "checkpoints").exists()


def test_lightning_resume_itself_loads_as_data(tmp_path, evil, monkeypatch):
    """Past the up-front check, Lightning's own load in trainer.fit is restricted to data too."""
    import pickle

    import ddpm_schedules.app.train as pipeline

    path, marker = evil
    monkeypatch.setattr(pipeline, "check_resume_checkpoint", lambda *args, **kwargs: None)
    with pytest.raises(pickle.UnpicklingError):
        train(train_cfg(tmp_path / "run", "logger=none", f"ckpt_path={path}"))
    assert not marker.exists()


@pytest.mark.skipif(
    "_target_" not in OmegaConf.load(ROOT / "conf" / "model" / "checkpoint.yaml"),
    reason="needs conf/model/checkpoint.yaml as `_target_: ddpm_schedules.models.checkpoints.load_checkpoint` "
    "with trust_checkpoint",
)
def test_evaluate_refuses_and_runs_nothing(tmp_path, evil):
    path, marker = evil
    with pytest.raises(ValueError, match="model.trust_checkpoint=true"):
        evaluate(eval_cfg(tmp_path, path, "logger=none"))
    assert not marker.exists()
    assert not (tmp_path / "run" / "results.json").exists() and not (tmp_path / "cache").exists()


def test_bundled_checkpoints_are_plain_data():
    state = torch.load(ROOT / "checkpoints" / "digits.ckpt", map_location="cpu", weights_only=True)
    model = load_checkpoint(ROOT / "checkpoints" / "digits.ckpt")
    for k, v in model.net.state_dict().items():
        assert torch.equal(v, state["state_dict"][f"model.net.{k}"]), k
    torch.load(ROOT / "checkpoints" / "digits_features.pt", map_location="cpu", weights_only=True)
    torch.load(FIXTURE / "model.pt", map_location="cpu", weights_only=True)


def test_improved_diffusion_loader_takes_levels_and_a_flags_mapping(tmp_path):
    flags = json.loads((FIXTURE / "flags.json").read_text())
    plain = load_improved_diffusion(FIXTURE / "model.pt", **flags)
    assert plain.levels == 256
    mapped = load_improved_diffusion(FIXTURE / "model.pt", levels=17, flags=OmegaConf.create(flags))
    assert mapped.levels == 17
    for (k, a), b in zip(plain.net.state_dict().items(), mapped.net.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    first = next(iter(flags))
    with pytest.raises(ValueError, match="unknown improved-diffusion flag"):
        load_improved_diffusion(FIXTURE / "model.pt", flags={first: flags[first]}, not_a_flag=1)


@pytest.mark.slow
def test_a_fresh_training_checkpoint_loads_as_data_resumes_and_exports(tmp_path):
    run = tmp_path / "run"
    train(train_cfg(run, "logger=none", "data=digits", "data.batch_size=16"))
    last = run / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 6
    train(
        train_cfg(run, "logger=none", "data=digits", "data.batch_size=16", "trainer.max_steps=9", f"ckpt_path={last}")
    )
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 9
    # the export command keeps flags, levels and the (EMA) weights, as plain data
    out = tmp_path / "exported.ckpt"
    proc = subprocess.run(
        [sys.executable, "-m", "ddpm_schedules.app.export", str(last), str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    exported = torch.load(out, map_location="cpu", weights_only=True)
    source = torch.load(last, map_location="cpu", weights_only=True)
    assert exported["global_step"] == 9 and exported["hyper_parameters"]["levels"] == 17
    assert set(exported["state_dict"]) == {k for k in source["state_dict"] if k.startswith("model.net.")}
    for k, v in exported["state_dict"].items():
        assert torch.equal(v, source["state_dict"][k]), k
    a, b = load_checkpoint(last), load_checkpoint(out)
    for (k, x), y in zip(a.net.state_dict().items(), b.net.state_dict().values(), strict=True):
        assert torch.equal(x, y), k
    assert export_checkpoint(out, tmp_path / "again.ckpt") == tmp_path / "again.ckpt"  # an export exports again
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
