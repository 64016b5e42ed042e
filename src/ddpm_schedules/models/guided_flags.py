"""guided-diffusion's (ADM, Dhariwal & Nichol 2021) flags -> a model, and its checkpoint loader.

Its names and defaults are those of guided-diffusion's ``model_and_diffusion_defaults()`` (script_util.py),
which differ from improved-diffusion's: ``rescale_timesteps`` is False (the network sees the 0-based
index t - 1), ``rescale_learned_sigmas`` False, and the UNet has ``num_head_channels``,
``resblock_updown``, ``use_new_attention_order`` and ``use_fp16``. The network itself is unet.py's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from ddpm_schedules.models.checkpoints import load_weights, plain_flags
from ddpm_schedules.models.flags import model_from_resolved, resolve_flags
from ddpm_schedules.models.model import DiffusionModel
from ddpm_schedules.models.unet import NUM_CLASSES

# guided-diffusion's model_and_diffusion_defaults(), in its order, plus create_gaussian_diffusion's sigma_small and
# this package's in_channels, num_classes (guided-diffusion's NUM_CLASSES) and null_class (conditioning.py)
GUIDED_DIFFUSION_DEFAULTS: dict[str, Any] = dict(
    image_size=64,
    num_channels=128,
    num_res_blocks=2,
    num_heads=4,
    num_heads_upsample=-1,
    num_head_channels=-1,
    attention_resolutions="16,8",
    channel_mult="",
    dropout=0.0,
    class_cond=False,
    use_checkpoint=False,
    use_scale_shift_norm=True,
    resblock_updown=False,
    use_fp16=False,
    use_new_attention_order=False,
    learn_sigma=False,
    diffusion_steps=1000,
    noise_schedule="linear",
    timestep_respacing="",
    use_kl=False,
    predict_xstart=False,
    rescale_timesteps=False,
    rescale_learned_sigmas=False,
    sigma_small=False,
    in_channels=3,
    num_classes=NUM_CLASSES,
    null_class=False,
)
# guided-diffusion's create_model: channel_mult from image_size when the flag is empty
GUIDED_CHANNEL_MULT = {512: "0.5,1,1,2,2,4,4", 256: "1,1,2,2,4,4", 128: "1,1,2,3,4", 64: "1,2,3,4"}


def resolve_guided_flags(flags: Mapping[str, Any]) -> dict[str, Any]:
    """guided-diffusion's defaults + the given flags (unknown names refused), channel_mult derived from image_size."""
    f = resolve_flags(dict(flags), GUIDED_DIFFUSION_DEFAULTS, "guided-diffusion")
    if f["channel_mult"] == "":
        if f["image_size"] not in GUIDED_CHANNEL_MULT:
            raise ValueError(
                f"guided-diffusion derives channel_mult only for image_size {sorted(GUIDED_CHANNEL_MULT)}; for "
                f"image_size {f['image_size']} pass channel_mult explicitly, e.g. channel_mult='1,2,2'"
            )
        f["channel_mult"] = GUIDED_CHANNEL_MULT[f["image_size"]]
    return f


def guided_model_from_flags(flags: Mapping[str, Any], levels: int = 256) -> DiffusionModel:
    """A freshly initialised ADM model (UNet + conventions) from guided-diffusion's flags."""
    return model_from_resolved(resolve_guided_flags(flags), levels)


def load_guided_diffusion(
    path: str | Path, levels: int = 256, flags: Mapping[str, Any] | None = None, **more_flags
) -> DiffusionModel:
    """Load a guided-diffusion (ADM) checkpoint with its flags (guided-diffusion's README MODEL_FLAGS).

    Flags use guided-diffusion's names and defaults (``model_and_diffusion_defaults()``, e.g.
    ``rescale_timesteps=False``, ``num_heads=4``, ``num_head_channels=-1``), plus ``in_channels``;
    pass them as keywords, as one mapping ``flags`` (a Hydra config's), or both (keywords win).
    Training-only flags are accepted and ignored; ``use_fp16`` runs the torso in float16 once the
    model is on CUDA (float32 on the CPU; the weights stay float32 in the state dict). The number
    of heads (num_heads / num_head_channels) and use_new_attention_order cannot be checked against
    the weights: pass the values the model was trained with. A class-conditional model takes labels
    ``y`` (``predict(x_t, t, y)``, ``terms(..., y=y)``). The file is read as data
    (``weights_only=True``). Returns the model in eval mode on the CPU.
    """
    f = resolve_guided_flags({**plain_flags(flags), **more_flags})
    model = model_from_resolved(f, levels=int(levels))
    load_weights(model.net, Path(path), f)
    return model.eval()
