import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import nn

from ddpm_schedules import DiffusionModel, NoiseSchedule

pytest_plugins = ["optional_paths"]  # one summary line per optional path (tests/optional_paths.py)

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = Path(__file__).parent / "fixtures" / "improved_diffusion_tiny"
DIGITS_FEATURES = ROOT / "checkpoints" / "digits_features.pt"
# the smallest improved-DDPM model (conf/unet/tiny.yaml + 20 cosine steps), improved-diffusion's flag names
TINY = dict(
    image_size=8, in_channels=1, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="4",
    num_heads=2, num_heads_upsample=-1, use_scale_shift_norm=True, dropout=0.0, learn_sigma=True, class_cond=False,
    diffusion_steps=20, noise_schedule="cosine", sigma_small=False, predict_xstart=False, rescale_timesteps=True,
)  # fmt: skip
# evaluate.py sized for tests: synthetic 8x8 data, budgets 2 and 4, 16 examples everywhere
SMALL = ["data=synthetic", "eval.budgets=[2,4]", "cost.examples=16", "eval.examples=16", "fid.samples=16",
         "fid.reference_examples=16", "sample.grid_size=4", "sample.chunk=8", "batch_size=8", "eval.sample_budgets=[2]",
         "eval.teacher_samples=4", "fid.bootstrap=5", "cost.ode.trajectories=4", "cost.ode.grid=null"]  # fmt: skip


def save_tiny_checkpoint(path: Path, flags: dict | None = None, state: dict | None = None, seed: int = 0) -> Path:
    """A checkpoint as train.py's export writes it: flags, levels and the network's weights (random, seeded)."""
    from ddpm_schedules.lightning.module import DiffusionModule

    torch.manual_seed(seed)
    state = state if state is not None else DiffusionModule(TINY, loss="hybrid", levels=17).state_dict()
    torch.save({"hyper_parameters": {"flags": flags or TINY, "levels": 17}, "state_dict": state}, path)
    return path


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.ckpt")


def eval_cfg(tmp_path, ckpt, *overrides):
    """conf/evaluate.yaml composed for a test: outputs and caches in tmp_path, the SMALL sizes, then ``overrides``."""
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        return compose(
            "evaluate",
            overrides=[
                f"paths.output_dir={tmp_path / 'run'}",
                f"cache_dir={tmp_path / 'cache'}",
                f"model.path={ckpt}",
                f"fid.digits_weights={DIGITS_FEATURES}",
                *SMALL,
                *overrides,
            ],
        )


def train_cfg(tmp_path, *overrides):
    """conf/train.yaml composed for a test: the tiny UNet, 20 steps, 6 training steps, a small monitor."""
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        return compose(
            "train",
            overrides=[
                f"paths.output_dir={tmp_path}",
                "data=synthetic",
                "unet=tiny",
                "diffusion.diffusion_steps=20",
                "trainer.max_steps=6",
                "trainer.val_check_interval=3",
                "trainer.log_every_n_steps=1",
                "callbacks.schedule_monitor.examples=8",
                "callbacks.schedule_monitor.budgets=[2,4]",
                "callbacks.schedule_monitor.progress=false",
                "+trainer.enable_progress_bar=false",
                *overrides,
            ],
        )


class TinyNet(nn.Module):
    """A small conv net with a timestep embedding: enough to give t-dependent, non-trivial outputs."""

    def __init__(self, channels: int = 1, out_channels: int | None = None, width: int = 16, T: int = 1000):
        super().__init__()
        self.T = T
        self.inp = nn.Conv2d(channels, width, 3, padding=1)
        self.emb = nn.Linear(16, width)
        self.mid = nn.Conv2d(width, width, 3, padding=1)
        self.out = nn.Conv2d(width, out_channels or channels, 3, padding=1)

    def forward(self, x, timesteps):
        freqs = torch.exp(torch.arange(8, device=x.device) * -math.log(1000) / 8)
        ang = timesteps.to(x.dtype)[:, None] * freqs[None].to(x.dtype)
        e = self.emb(torch.cat([ang.sin(), ang.cos()], 1))
        h = torch.nn.functional.silu(self.inp(x) + e[:, :, None, None])
        h = torch.nn.functional.silu(self.mid(h))
        return self.out(h)


class CountingNet(nn.Module):
    """Wraps a network and counts examples per timestep it was called with."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.calls: dict[int, int] = {}

    def forward(self, x, timesteps, *labels):
        for t in timesteps.tolist():
            self.calls[int(t)] = self.calls.get(int(t), 0) + 1
        return self.net(x, timesteps, *labels)


def quantized_data(n: int, shape=(1, 4, 4), levels: int = 17, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, levels, (n, *shape), generator=g)
    # smooth-ish images: not all independent noise
    return (idx.float() / (levels - 1) * 2 - 1).clamp(-1, 1)


def tiny_model(
    var_type="learned_range",
    mean_type="eps",
    T=20,
    schedule="cosine",
    levels=17,
    shape=(1, 4, 4),
    seed=0,
    clip=True,
    dtype=torch.float64,
):
    torch.manual_seed(seed)
    C = shape[0]
    net = TinyNet(C, 2 * C if var_type == "learned_range" else C, T=T).to(dtype)
    return DiffusionModel(
        net,
        NoiseSchedule.named(schedule, T),
        mean_type=mean_type,
        var_type=var_type,
        rescale_timesteps=True,
        clip_denoised=clip,
        levels=levels,
        image_shape=shape,
    )


COND = {**TINY, "class_cond": True, "num_classes": 10, "null_class": True}  # 11 label rows, null label 10
SHAPE = (1, 8, 8)


def cond_model(flags: dict = COND, seed: int = 0, clip: bool = True, dtype=torch.float64) -> DiffusionModel:
    """The tiny conditional UNet with every parameter perturbed (a fresh UNet's zero output convs make it output 0,
    which would make every label, and guidance, look the same), in float64 unless told."""
    torch.manual_seed(seed)
    from ddpm_schedules.models.flags import model_from_flags

    model = model_from_flags(flags, levels=17)
    with torch.no_grad():
        for p in model.net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.clip_denoised = clip
    return model.to(dtype).eval()


@pytest.fixture(scope="session")
def reference():
    return torch.load(FIXTURE / "reference.pt", weights_only=True)


GLOO_PREAMBLE = """import sys, torch
from lightning_fabric import Fabric
sys.path.insert(0, {tests!r})
from conftest import tiny_model
from ddpm_schedules.models.noise import shard
devices, out = int(sys.argv[1]), sys.argv[2]
fabric = Fabric(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto")
fabric.launch()
"""


# gloo's threads can abort the interpreter at exit ("terminate called without an active exception") when a process
# leaves while its peer still holds the group: both meet at a barrier and close the group first
GLOO_END = """
if torch.distributed.is_initialized():
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
"""


def run_on_gloo_processes(tmp_path: Path, name: str, body: str, suffix: str, devices=(1, 2)) -> list[Path]:
    """Run ``body`` (it sees fabric, shard, tiny_model and writes to ``out``) under each number of CPU (gloo) processes;
    the files it wrote, one per number."""
    script = tmp_path / f"{name}_script.py"
    script.write_text(GLOO_PREAMBLE.format(tests=str(Path(__file__).parent)) + body + GLOO_END)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    outs = [tmp_path / f"{name}{d}{suffix}" for d in devices]
    for d, out in zip(devices, outs):
        subprocess.run([sys.executable, str(script), str(d), str(out)], check=True, env=env, timeout=300, cwd=tmp_path)
    return outs


def evaluate_on_processes(tmp_path: Path, ckpt: Path, *overrides: str, devices=(1, 2)) -> dict[int, dict]:
    """evaluate.py on CPU (gloo) processes, once per number of processes, each with its own cache and run dir:
    {devices: results.json}. The overrides follow the SMALL sizes."""
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"}
    docs = {}
    for d in devices:
        cmd = [
            sys.executable, str(ROOT / "evaluate.py"), f"model.path={ckpt}", *SMALL, "logger=none",
            "fabric.accelerator=cpu", f"fid.digits_weights={DIGITS_FEATURES}", *overrides, f"fabric.devices={d}",
            f"cache_dir={tmp_path / f'cache{d}'}", f"hydra.run.dir={tmp_path / f'run{d}'}",
        ]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
        assert proc.returncode == 0, proc.stdout[-1500:] + proc.stderr[-1500:]
        docs[d] = json.loads((tmp_path / f"run{d}" / "results.json").read_text())
    return docs


@pytest.fixture(scope="module")
def one_thread():
    """The tiny UNets' ops are too small to split: extra intra-op threads only add sync stalls on a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
