"""improved-diffusion's flags -> a model, in one place (as its script_util.py): names, defaults, conventions."""

from __future__ import annotations

from typing import Any

from ddpm_schedules.models.diffusion import NoiseSchedule
from ddpm_schedules.models.model import DiffusionModel
from ddpm_schedules.models.unet import NUM_CLASSES, create_unet

# improved-diffusion's model_and_diffusion_defaults(), plus this package's channel_mult, in_channels, num_classes
# (improved-diffusion's NUM_CLASSES) and null_class (an extra "no label" class for label dropout: conditioning.py)
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
    num_classes=NUM_CLASSES,
    null_class=False,
)
UNET_FLAGS = (
    "image_size", "num_channels", "num_res_blocks", "channel_mult", "attention_resolutions", "num_heads",
    "num_heads_upsample", "use_scale_shift_norm", "dropout", "learn_sigma", "class_cond", "in_channels",
    "num_classes", "null_class",
)  # fmt: skip
GUIDED_UNET_FLAGS = ("num_head_channels", "resblock_updown", "use_new_attention_order", "use_fp16")  # guided_flags.py


def model_from_flags(flags: dict[str, Any], levels: int = 256) -> DiffusionModel:
    """A freshly initialised improved-DDPM model (UNet + conventions) from improved-diffusion's flags."""
    return model_from_resolved(resolve_flags(flags), levels)


def model_from_resolved(f: dict[str, Any], levels: int = 256) -> DiffusionModel:
    """The model of a complete flag set (`resolve_flags`; guided-diffusion's UNet flags used where present)."""
    return DiffusionModel(
        create_unet(**{k: f[k] for k in (*UNET_FLAGS, *GUIDED_UNET_FLAGS) if k in f}),
        NoiseSchedule.named(f["noise_schedule"], f["diffusion_steps"]),
        mean_type="x0" if f["predict_xstart"] else "eps",
        var_type="learned_range" if f["learn_sigma"] else ("fixed_small" if f["sigma_small"] else "fixed_large"),
        rescale_timesteps=f["rescale_timesteps"],
        clip_denoised=True,
        levels=levels,
        image_shape=(f["in_channels"], f["image_size"], f["image_size"]),
        num_classes=f["num_classes"] if f["class_cond"] else None,
        null_class=f["num_classes"] if f["class_cond"] and f["null_class"] else None,  # released ones have none
    )


def resolve_flags(
    flags: dict[str, Any], defaults: dict[str, Any] = IMPROVED_DIFFUSION_DEFAULTS, source: str = "improved-diffusion"
) -> dict[str, Any]:
    """Defaults + given flags, with unknown names rejected and shell-style strings ("True", "128") coerced."""
    unknown = sorted(set(flags) - set(defaults))
    if unknown:
        raise ValueError(
            f"unknown {source} flag(s) {', '.join(map(repr, unknown))}; valid flags: {', '.join(defaults)}"
        )
    f = {**defaults, **{k: _coerce(k, v, defaults[k]) for k, v in flags.items()}}
    if f["timestep_respacing"]:
        raise ValueError(
            f"timestep_respacing={f['timestep_respacing']!r} is not supported: load the full T-step model (leave it "
            "empty) and pass the schedule to this package instead, e.g. respaced_schedule(T, 'ddim50') or "
            "optimal_schedules(...)"
        )
    return f


def _coerce(name: str, value: Any, default: Any) -> Any:
    if name in ("attention_resolutions", "channel_mult") and not isinstance(value, str):
        try:  # a float channel_mult stays one (guided-diffusion's 512 model starts at 0.5)
            items = [value] if isinstance(value, (int, float)) else value
            return ",".join(str(v) if isinstance(v, float) and not v.is_integer() else str(int(v)) for v in items)
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
