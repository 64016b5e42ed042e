"""The improved-DDPM UNet and the improved-diffusion loader against openai/improved-diffusion's own numbers."""

import copy
import json
import math

import pytest
import torch
from conftest import FIXTURE

from ddpm_schedules import DiffusionModel, load_improved_diffusion
from ddpm_schedules.costs.terms import terms
from ddpm_schedules.models.unet import NUM_CLASSES, UNetModel, create_unet

FLAGS = json.loads((FIXTURE / "flags.json").read_text())
CKPT = FIXTURE / "model.pt"
T = FLAGS["diffusion_steps"]
UNET_FLAGS = (
    "image_size", "num_channels", "num_res_blocks", "channel_mult", "attention_resolutions", "num_heads",
    "num_heads_upsample", "use_scale_shift_norm", "dropout", "learn_sigma", "class_cond", "in_channels",
)  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def loaded() -> DiffusionModel:
    return load_improved_diffusion(CKPT, **FLAGS)


def to_bits(nats, x0):
    return nats / (x0[0].numel() * math.log(2))


# --- (a), (b): numerics ------------------------------------------------------------------------


def test_loaded_model_conventions(loaded):
    assert isinstance(loaded.net, UNetModel) and not loaded.net.training and not loaded.training
    assert (loaded.mean_type, loaded.var_type, loaded.rescale_timesteps) == ("eps", "learned_range", True)
    assert loaded.T == T and loaded.image_shape == (3, 16, 16) and loaded.levels == 256 and loaded.clip_denoised


@torch.no_grad()
def test_network_reproduces_improved_diffusion_outputs(loaded, reference):
    """The reference is improved-diffusion's float32 output on another CPU. Our network in float64 is exact to ~1e-15,
    so it shows the reference's own float32 error (measured 6.7e-7 at outputs of about 1): 2e-6 = 34 float32 ulps. Our
    float32 output has its kernels' rounding on top (measured 3.0e-6 from float64 under avx2 and default kernels, 1 or
    2 threads, through about 20 layers): 1e-5. Together these bound our float32 output against the reference."""
    net64 = copy.deepcopy(loaded.net).double()
    for t in reference["t"].tolist():
        x_t = reference["x_t"][t]
        timesteps = loaded.net_timesteps(torch.full((x_t.shape[0],), t))
        torch.testing.assert_close(timesteps, torch.full_like(timesteps, (t - 1) * 1000 / T), rtol=0, atol=0)
        exact = net64(x_t.double(), timesteps)
        torch.testing.assert_close(exact, reference["model_out"][t].double(), rtol=0, atol=2e-6, msg=f"t = {t}")
        torch.testing.assert_close(
            loaded.net(x_t, timesteps).double(), exact, rtol=0, atol=1e-5, msg=f"t = {t} (float32)"
        )


@torch.no_grad()
def test_terms_through_the_unet_reproduce_vb_bits(loaded, reference):
    x0 = reference["x0"]
    for t in reference["t"].tolist():
        bits = to_bits(terms(loaded, x0, t, [t - 1], reference["noise"][t])[:, 0], x0)
        torch.testing.assert_close(
            bits, reference["vb_bits"][t].double(), rtol=1e-5 if t > 1 else 2e-3, atol=1e-7, msg=f"t = {t}"
        )


# --- (c): state-dict layout ----------------------------------------------------------------------


def test_state_dict_layout_equals_improved_diffusion():
    ours = create_unet(**{k: FLAGS[k] for k in UNET_FLAGS}).state_dict()
    theirs = torch.load(CKPT, map_location="cpu", weights_only=True)
    assert list(ours) == list(theirs)
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


@pytest.mark.parametrize("size, mult", [(32, (1, 2, 2, 2)), (64, (1, 2, 3, 4))])
def test_channel_mult_derived_from_image_size(size, mult):
    net = create_unet(size, 32, 1, attention_resolutions="16,8")
    assert net.channel_mult == mult and net.attention_resolutions == (size // 16, size // 8)


def test_underived_image_size_needs_channel_mult():
    with pytest.raises(ValueError, match="image_size 128 pass channel_mult"):
        create_unet(128, 32, 1)


# --- (d): bad inputs -----------------------------------------------------------------------------


def _raises_one_line(match: str, path=CKPT, **changes):
    with pytest.raises(ValueError, match=match) as err:
        load_improved_diffusion(path, **{**FLAGS, **changes})
    assert "\n" not in str(err.value)


def test_wrong_learn_sigma_is_named():
    _raises_one_line(
        r"out\.2\.weight checkpoint \(6, 32, 3, 3\) vs model \(3, 32, 3, 3\).*probably differ: learn_sigma",
        learn_sigma=False,
    )


def test_wrong_num_channels_is_named():
    _raises_one_line(r"shape mismatches.*probably differ: num_channels \(the checkpoint has 32\)", num_channels=64)


def test_wrong_structure_is_named():
    _raises_one_line(r"missing keys.*unexpected keys.*probably differ: num_res_blocks/channel_mult", num_res_blocks=2)
    _raises_one_line(r"missing keys \(label_emb\.weight\).*class_cond", class_cond=True)


def test_truncated_file(tmp_path):
    half = tmp_path / "half.pt"
    data = CKPT.read_bytes()
    half.write_bytes(data[: len(data) // 2])
    _raises_one_line("half.pt.* is not a PyTorch checkpoint", path=half)


def test_missing_file(tmp_path):
    _raises_one_line("nothere.pt.* is missing", path=tmp_path / "nothere.pt")


def test_unknown_flag():
    with pytest.raises(
        ValueError, match=r"unknown improved-diffusion flag\(s\) 'num_chanels'; valid flags: image_size, num_channels"
    ):
        load_improved_diffusion(CKPT, **FLAGS, num_chanels=32)


def test_timestep_respacing_is_refused():
    with pytest.raises(ValueError, match="timestep_respacing='ddim25' is not supported.*respaced_schedule"):
        load_improved_diffusion(CKPT, **FLAGS, timestep_respacing="ddim25")


def test_training_flags_are_accepted_and_variance_flags_map(tmp_path):
    flags = {**FLAGS, "learn_sigma": False, "sigma_small": False}
    path = tmp_path / "fixed.pt"
    torch.save(create_unet(**{k: flags[k] for k in UNET_FLAGS}).state_dict(), path)
    training = dict(use_kl=True, use_checkpoint=True, rescale_learned_sigmas=False, timestep_respacing="")
    model = load_improved_diffusion(path, **{**flags, **training, "sigma_small": "True", "predict_xstart": True})
    assert (model.mean_type, model.var_type) == ("x0", "fixed_small")
    assert load_improved_diffusion(path, **flags).var_type == "fixed_large"


# --- (e): other configurations -------------------------------------------------------------------


def test_class_conditional_unet_needs_labels():
    torch.manual_seed(0)
    net = create_unet(8, 32, 1, channel_mult="1,2", attention_resolutions="4", num_heads=2, class_cond=True).eval()
    assert net.label_emb.num_embeddings == NUM_CLASSES
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([0.0, 500.0])
    assert net(x, t, y=torch.tensor([0, NUM_CLASSES - 1])).shape == (2, 3, 8, 8)
    with pytest.raises(ValueError, match="class-conditional: pass labels y"):
        net(x, t)


def test_small_one_channel_unet_with_learned_sigma():
    torch.manual_seed(0)
    net = create_unet(
        8, 32, 1, channel_mult="1,2", attention_resolutions="4", num_heads=1, learn_sigma=True, in_channels=1
    ).eval()
    assert net.attention_resolutions == (2,) and any(
        ".qkv." in k for k in net.state_dict() if k.startswith("input_blocks")
    )
    out = net(torch.randn(3, 1, 8, 8), torch.tensor([0.0, 10.0, 990.0]))
    assert out.shape == (3, 2, 8, 8)
    assert torch.equal(out, torch.zeros_like(out))  # zero-initialised output convolution
    with pytest.raises(ValueError, match="unconditional: do not pass y"):
        net(torch.randn(3, 1, 8, 8), torch.zeros(3), y=torch.zeros(3, dtype=torch.long))


@torch.no_grad()
def test_float64_unet_agrees_with_float32(loaded, reference):
    x_t, timesteps = reference["x_t"][50], loaded.net_timesteps(torch.full((4,), 50))
    net64 = create_unet(**{k: FLAGS[k] for k in UNET_FLAGS}).double().eval()
    net64.load_state_dict(loaded.net.state_dict())
    out64 = net64(x_t.double(), timesteps)
    assert out64.dtype == torch.float64  # GroupNorm and softmax stay in float64 for a float64 model
    torch.testing.assert_close(out64, reference["model_out"][50].double(), rtol=1e-5, atol=2e-6)
