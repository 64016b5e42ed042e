"""improved-diffusion's flags -> a model, in one place (as its script_util.py): names, defaults, conventions."""

from __future__ import annotations

from typing import Any

from ddpm_schedules.models.diffusion import NoiseSchedule
from ddpm_schedules.models.model import DiffusionModel
from ddpm_schedules.models.unet import create_unet

# improved-diffusion's model_and_diffusion_defaults(), plus this package's channel_mult and in_channels
IMPROVED_DIFFUSION_DEFAULTS: dict[str, Any] = dict(
    image_size=64,
    num_channels=128,
    num_res_blocks=2,
    num_heads=4,
    num_heads_upsample=-1,
    attention_resolutions="16,8",
    dropout=0.0,
    learn_sigma=False,
    sigma_small=False,
    class_cond=False,
    diffusion_steps=1000,
    noise_schedule="linear",
    timestep_respacing="",
    use_kl=False,
    predict_xstart=False,
    rescale_timesteps=True,
    rescale_learned_sigmas=True,
    use_checkpoint=False,
    use_scale_shift_norm=True,
    channel_mult="",
    in_channels=3,
)
UNET_FLAGS = (
    "image_size", "num_channels", "num_res_blocks", "channel_mult", "attention_resolutions", "num_heads",
    "num_heads_upsample", "use_scale_shift_norm", "dropout", "learn_sigma", "class_cond", "in_channels",
)  # fmt: skip


def model_from_flags(flags: dict[str, Any], levels: int = 256) -> DiffusionModel:
    """A freshly initialised improved-DDPM model (UNet + conventions) from improved-diffusion's flags."""
    f = resolve_flags(flags)
    return DiffusionModel(
        create_unet(**{k: f[k] for k in UNET_FLAGS}),
        NoiseSchedule.named(f["noise_schedule"], f["diffusion_steps"]),
        mean_type="x0" if f["predict_xstart"] else "eps",
        var_type="learned_range" if f["learn_sigma"] else ("fixed_small" if f["sigma_small"] else "fixed_large"),
        rescale_timesteps=f["rescale_timesteps"],
        clip_denoised=True,
        levels=levels,
        image_shape=(f["in_channels"], f["image_size"], f["image_size"]),
    )


def resolve_flags(flags: dict[str, Any]) -> dict[str, Any]:
    """Defaults + given flags, with unknown names rejected and shell-style strings ("True", "128") coerced."""
    unknown = sorted(set(flags) - set(IMPROVED_DIFFUSION_DEFAULTS))
    if unknown:
        raise ValueError(
            f"unknown improved-diffusion flag(s) {', '.join(map(repr, unknown))}; valid flags: "
            f"{', '.join(IMPROVED_DIFFUSION_DEFAULTS)}"
        )
    f = {**IMPROVED_DIFFUSION_DEFAULTS, **{k: _coerce(k, v) for k, v in flags.items()}}
    if f["timestep_respacing"]:
        raise ValueError(
            f"timestep_respacing={f['timestep_respacing']!r} is not supported: load the full T-step model (leave it "
            "empty) and pass the schedule to this package instead, e.g. respaced_schedule(T, 'ddim50') or "
            "optimal_schedules(...)"
        )
    return f


def _coerce(name: str, value: Any) -> Any:
    default = IMPROVED_DIFFUSION_DEFAULTS[name]
    if name in ("attention_resolutions", "channel_mult") and not isinstance(value, str):
        try:
            return ",".join(str(int(v)) for v in ([value] if isinstance(value, int) else value))
        except (TypeError, ValueError):
            raise ValueError(f"flag {name} must be comma-separated integers like '16,8', got {value!r}") from None
    if isinstance(default, bool):
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "t", "f", "y", "n", "1", "0"):
            return value.lower() in ("true", "yes", "t", "y", "1")
        if isinstance(value, (bool, int)) and value in (0, 1):
            return bool(value)
        raise ValueError(f"flag {name} must be a boolean, got {value!r}")
    if isinstance(default, (int, float)):
        try:
            out = type(default)(value)
        except (TypeError, ValueError):
            raise ValueError(f"flag {name} must be a number, got {value!r}") from None
        if isinstance(default, int) and out != float(value):
            raise ValueError(f"flag {name} must be an integer, got {value!r}")
        return out
    return value
