"""Loaders for pre-trained models: improved-diffusion `.pt` checkpoints with their flags, and our Lightning
checkpoints."""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from omegaconf import DictConfig, OmegaConf

from ddpm_schedules.models.flags import GUIDED_UNET_FLAGS, UNET_FLAGS, model_from_flags, resolve_flags
from ddpm_schedules.models.model import DiffusionModel
from ddpm_schedules.models.unet import NUM_CLASSES, UNetModel
from ddpm_schedules.storage.errors import ParameterError
from ddpm_schedules.storage.files import atomic_torch_save

MAX_LISTED = 4


def load_improved_diffusion(
    path: str | Path, levels: int = 256, flags: Mapping[str, Any] | None = None, **more_flags
) -> DiffusionModel:
    """Load an improved-diffusion checkpoint with its training flags (image_size, num_channels, ...).

    Flags use improved-diffusion's names and defaults (``model_and_diffusion_defaults()``), plus
    ``channel_mult`` ("1,2,2,2"; empty = derived from image_size) and ``in_channels``; pass them as
    keywords, as one mapping ``flags`` (what a Hydra config holds), or both (keywords win).
    Training-only flags are accepted and ignored. num_heads cannot be checked against the weights:
    pass the value the model was trained with. ``levels`` is the data's number of pixel values (256
    for 8-bit images). The file is read as data (``weights_only=True``): a released checkpoint is a
    plain state dict. Returns the model in eval mode on the CPU.
    """
    flags = {**plain_flags(flags), **more_flags}
    model = model_from_flags(flags, levels=int(levels))
    load_weights(model.net, Path(path), resolve_flags(flags))
    return model.eval()


class UntrustedCheckpointError(ParameterError):
    """The file holds more than tensors and plain containers: only full unpickling (which can run code) reads it."""


def read_checkpoint(path: str | Path, trust_checkpoint: bool = False, trust_hint: str | None = None) -> Any:
    """``torch.load`` a checkpoint file onto the CPU as data: ``weights_only=True`` unless ``trust_checkpoint``.

    A file whose pickle references anything but tensors and plain containers raises
    `UntrustedCheckpointError` (a one-line ValueError naming the file and ``trust_hint``, the
    caller's spelling of the opt-in; None: ``trust_checkpoint=true``, a parameter name that callers may rename).
    Other read errors propagate as torch raises them.
    """
    path = Path(path)
    if trust_checkpoint:
        return torch.load(path, map_location="cpu", weights_only=False)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        text = " ".join(str(e).split())
        if not re.search(
            r"unsupported global|trying to call reduce|can only (create new object|build)", text, re.IGNORECASE
        ):
            raise
        what = re.search(r"GLOBAL (\S+)", text)
        opt_in = "{trust_checkpoint}=true" if trust_hint is None else "{hint}"
        raise UntrustedCheckpointError(
            "{path!r} needs full unpickling{what}, which can run code hidden in the file; if you trust where it came "
            "from, load it with " + opt_in,
            path=str(path),
            what=f" (it references {what.group(1)})" if what else "",
            hint=trust_hint,
        ) from None


def load_checkpoint(path: str | Path, trust_checkpoint: bool = False, trust_hint: str | None = None) -> DiffusionModel:
    """A model trained by this package's `train.py`: a Lightning .ckpt (its EMA weights when EMA was on).

    The flags and levels come from the checkpoint's hyper-parameters; with `EMAWeightAveraging`
    Lightning stores the averaged weights under ``state_dict``. The file is read as data
    (``weights_only=True``); a file that needs full unpickling is refused with a ValueError naming
    ``trust_hint`` unless ``trust_checkpoint`` is set.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint file {str(path)!r} is missing (no such file); train one with `python train.py`")
    return _model_from_checkpoint(path, _read_ours(path, trust_checkpoint, trust_hint))


def plain_flags(flags: Mapping[str, Any] | None) -> dict[str, Any]:
    """A flags mapping (a dict or an OmegaConf node) as a plain dict."""
    if flags is None:
        return {}
    if isinstance(flags, DictConfig):
        return OmegaConf.to_container(flags, resolve=True)
    return dict(flags)


def _read_ours(path: Path, trust_checkpoint: bool, trust_hint: str | None) -> dict[str, Any]:
    """The checkpoint dict of one of our .ckpt files; a one-line ValueError for anything else."""
    try:
        ckpt = read_checkpoint(path, trust_checkpoint, trust_hint)
        if not (isinstance(ckpt.get("state_dict"), Mapping) and isinstance(ckpt["hyper_parameters"]["flags"], Mapping)):
            raise TypeError("no state_dict or flags")
        return ckpt
    except UntrustedCheckpointError:
        raise
    except Exception as e:
        raise ValueError(
            f"{str(path)!r} is not a Lightning checkpoint of this package ({type(e).__name__}); "
            "for an improved-diffusion .pt use load_improved_diffusion(path, **flags)"
        ) from None


def _model_from_checkpoint(path: Path, ckpt: dict[str, Any]) -> DiffusionModel:
    hp, state = ckpt["hyper_parameters"], ckpt["state_dict"]
    flags = plain_flags(hp["flags"])
    model = model_from_flags(flags, levels=int(hp.get("levels", 256)))
    net_state = {k[len("model.net.") :]: v for k, v in state.items() if k.startswith("model.net.")}
    problem = _mismatch(model.net.state_dict(), net_state, resolve_flags(flags))
    if problem:
        raise ValueError(f"checkpoint {str(path)!r} does not match its own flags: {problem}")
    model.net.load_state_dict(net_state)
    return model.eval()


def load_weights(net: UNetModel, path: Path, flags: dict[str, Any]) -> None:
    if not path.is_file():
        raise ValueError(f"checkpoint file {str(path)!r} is missing (no such file)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, pickle garbage, a text file, ...
        raise ValueError(
            f"{str(path)!r} is not a PyTorch checkpoint that torch.load(weights_only=True) can read "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); is the file complete?"
        ) from e
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"{str(path)!r} does not hold a state dict (a dict of tensors) as improved-diffusion saves it")
    problem = _mismatch(net.state_dict(), state, flags)
    if problem:
        raise ValueError(f"checkpoint {str(path)!r} does not match the flags: {problem}")
    net.load_state_dict(state)


def _mismatch(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor], flags: dict[str, Any]) -> str:
    """One line naming missing/unexpected keys, shape mismatches and the flags that probably differ; '' if none."""
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    shapes = {
        k: (tuple(got[k].shape), tuple(v.shape)) for k, v in expected.items() if k in got and got[k].shape != v.shape
    }
    if not (missing or unexpected or shapes):
        return ""

    hints: list[str] = []

    def hint(text: str) -> None:
        if text not in hints:
            hints.append(text)

    if any(k.startswith("label_emb.") for k in unexpected):
        hint("class_cond (the checkpoint has a label embedding: class_cond=True)")
    if any(k.startswith("label_emb.") for k in missing):
        hint("class_cond (the checkpoint has no label embedding: class_cond=False)")
    for k, (ck, ours) in shapes.items():
        if k == "out.2.weight" and ck[0] != ours[0]:
            if ck[0] == 2 * ours[0]:
                hint(f"learn_sigma (the checkpoint outputs {ck[0]} channels: learn_sigma=True)")
            elif 2 * ck[0] == ours[0]:
                hint(f"learn_sigma (the checkpoint outputs {ck[0]} channels: learn_sigma=False)")
            else:
                hint(f"in_channels/learn_sigma (the checkpoint outputs {ck[0]} channels)")
        elif k == "input_blocks.0.0.weight":
            if ck[0] != ours[0]:
                hint(f"num_channels (the checkpoint has {ck[0]})")
            if ck[1] != ours[1]:
                hint(f"in_channels (the checkpoint takes {ck[1]})")
        elif k.startswith("time_embed."):
            hint(
                f"num_channels (the checkpoint has {got['time_embed.0.weight'].shape[1]})"
                if "time_embed.0.weight" in got
                else "num_channels"
            )
        elif k == "label_emb.weight":
            hint(f"class_cond (the checkpoint has {ck[0]} classes, this package uses NUM_CLASSES = {NUM_CLASSES})")
    blocks = ("input_blocks.", "output_blocks.", "middle_block.")
    structural = [k for k in missing + unexpected if not k.startswith("label_emb.")]
    block_shapes = [k for k in shapes if k.startswith(blocks) and not k.startswith("input_blocks.0.0.")]
    ratios = {shapes[k][0][0] / shapes[k][1][0] for k in block_shapes}
    updown = _updown_hint(missing, unexpected, "resblock_updown" in flags)
    if updown and not block_shapes:
        hint(updown)
    elif (
        block_shapes
        and not structural
        and all(".emb_layers.1." in k for k in block_shapes)
        and ratios in ({2.0}, {0.5})
    ):
        hint(f"use_scale_shift_norm (the checkpoint {'uses' if ratios == {2.0} else 'does not use'} it)")
    elif (
        structural
        and not block_shapes
        and all(any(a in k for a in (".norm.", ".qkv.", ".proj_out.")) for k in structural)
    ):
        hint("attention_resolutions (or image_size, which turns resolutions into ds rates)")
    elif structural or (block_shapes and not any(h.startswith("num_channels") for h in hints)):
        hint("num_res_blocks/channel_mult/attention_resolutions (or image_size)")
    if not hints:
        hint("the model flags (image_size, num_channels, num_res_blocks, channel_mult, attention_resolutions)")

    parts = []
    for label, keys in (("missing keys", missing), ("unexpected keys", unexpected)):
        if keys:
            more = f", ... {len(keys) - MAX_LISTED} more" if len(keys) > MAX_LISTED else ""
            parts.append(f"{len(keys)} {label} ({', '.join(keys[:MAX_LISTED])}{more})")
    if shapes:
        listed = [f"{k} checkpoint {ck} vs model {ours}" for k, (ck, ours) in list(shapes.items())[:MAX_LISTED]]
        more = f", ... {len(shapes) - MAX_LISTED} more" if len(shapes) > MAX_LISTED else ""
        parts.append(f"{len(shapes)} shape mismatches ({', '.join(listed)}{more})")
    given = {k: flags[k] for k in (*UNET_FLAGS, *GUIDED_UNET_FLAGS) if k in flags}
    return f"{'; '.join(parts)}; flags that probably differ: {', '.join(hints)} (model flags used: {given})"


RESAMPLER = re.compile(r"((?:input|output)_blocks\.\d+\.\d+)\.(?:op|conv)\.(?:weight|bias)")


def _updown_hint(missing: list[str], unexpected: list[str], guided: bool) -> str:
    """The resblock_updown hint when the only differences are resamplers: convolutions vs ResBlocks; '' if not."""
    for convs, blocks, ckpt_uses in ((missing, unexpected, True), (unexpected, missing, False)):
        found = [RESAMPLER.fullmatch(k) for k in convs]
        prefixes = {m.group(1) for m in found if m}
        if not (found and all(found) and blocks and {k.rsplit(".", 3)[0] for k in blocks} <= prefixes):
            continue
        if guided:
            kind = "ResBlocks" if ckpt_uses else "convolutions"
            return f"resblock_updown (the checkpoint resamples with {kind}: resblock_updown={ckpt_uses})"
        if ckpt_uses:  # only guided-diffusion has the flag
            return (
                "resblock_updown (the checkpoint resamples with ResBlocks: load_guided_diffusion, resblock_updown=True)"
            )
    return ""


def export_checkpoint(
    src: str | Path, dst: str | Path, trust_checkpoint: bool = False, trust_hint: str = "trust_checkpoint=True"
) -> Path:
    """Keep only what `load_checkpoint` needs from a train.py .ckpt: flags, levels and the (EMA) weights.

        python -m ddpm_schedules.app.export outputs/<run>/checkpoints/last.ckpt checkpoints/digits.ckpt

    The source is read as data unless ``trust_checkpoint`` (see `load_checkpoint`); the output holds
    only tensors and plain Python values, so it always loads with ``weights_only=True``.
    """
    src = Path(src)
    if not src.is_file():
        raise ValueError(f"checkpoint file {str(src)!r} is missing (no such file)")
    ckpt = _read_ours(src, trust_checkpoint, trust_hint)
    _model_from_checkpoint(src, ckpt)  # fails clearly on anything that is not one of ours
    hp = {
        "flags": _plain(plain_flags(ckpt["hyper_parameters"]["flags"])),
        "levels": int(ckpt["hyper_parameters"].get("levels", 256)),
    }
    state = {
        str(k): v.detach().clone(memory_format=torch.contiguous_format)
        for k, v in ckpt["state_dict"].items()
        if k.startswith("model.net.")
    }
    step = ckpt.get("global_step")
    atomic_torch_save(
        {"hyper_parameters": hp, "state_dict": state, "global_step": None if step is None else int(step)}, dst
    )
    return Path(dst)


def _plain(value: Any) -> Any:
    """``value`` as str / int / float / bool / None and lists and dicts of them (what weights_only=True reads)."""
    if value is None:
        return None
    for kind in (bool, int, float, str):  # bool first: it is an int
        if isinstance(value, kind):
            return kind(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, Sequence):
        return [_plain(v) for v in value]
    raise ValueError(f"a checkpoint flag holds a {type(value).__name__} ({value!r}); flags must be plain values")
