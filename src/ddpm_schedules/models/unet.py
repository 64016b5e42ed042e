"""The improved-DDPM / ADM UNet (Nichol & Dhariwal 2021a, b), state-dict compatible with openai/improved-diffusion
and openai/guided-diffusion.

Module names, parameter shapes and numerics follow their ``UNetModel``s, so their checkpoints load
unchanged: GroupNorm(32) computed in float32, attention with q, k both scaled by ch^-1/4 and the
softmax in float32, zero-initialised output convolutions. guided-diffusion's options: heads of
``num_head_channels`` channels, ResBlocks that resample (``resblock_updown``), the new qkv head
order (``use_new_attention_order``, unet_attention.py) and a float16 torso on CUDA (``use_fp16``).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from ddpm_schedules.models.unet_attention import AttentionBlock
from ddpm_schedules.models.unet_blocks import (
    NORM_GROUPS,
    Downsample,
    ResBlock,
    TimestepSequential,
    Upsample,
    conv_nd,
    convert_convs,
    float32_state,
    normalization,
    timestep_embedding,
    zero_module,
)

NUM_CLASSES = (
    1000  # improved-diffusion's script_util.NUM_CLASSES (ImageNet): the label_emb rows of class_cond checkpoints
)
DEFAULT_CHANNEL_MULT = {256: (1, 1, 2, 2, 4, 4), 64: (1, 2, 3, 4), 32: (1, 2, 2, 2)}


class UNetModel(nn.Module):
    """improved-diffusion's / guided-diffusion's UNet: timestep (and class) embedding, ResBlocks, attention at the
    given ds rates.

    Level widths are int(mult * model_channels) (guided-diffusion's, so a first mult of 0.5 works);
    ``use_fp16``: the torso's convolutions (input, middle and output blocks) run in float16 whenever
    the model is on a CUDA device, as after guided-diffusion's ``convert_to_fp16``, and in float32
    elsewhere; the state dict holds float32 either way.
    """

    def __init__(
        self,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int,
        attention_resolutions: Sequence[int],
        dropout: float = 0,
        channel_mult: Sequence[float] = (1, 2, 4, 8),
        conv_resample: bool = True,
        dims: int = 2,
        num_classes: int | None = None,
        use_checkpoint: bool = False,  # gradient checkpointing is a training detail: accepted and ignored
        num_heads: int = 1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        num_head_channels: int = -1,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
        use_fp16: bool = False,
    ):
        super().__init__()
        if model_channels <= 0 or model_channels % NORM_GROUPS:
            raise ValueError(
                f"model_channels (num_channels) must be a positive multiple of {NORM_GROUPS} for GroupNorm(32), got "
                f"{model_channels}"
            )
        widths = [int(m * model_channels) for m in channel_mult]
        if any(w <= 0 or w % NORM_GROUPS for w in widths):
            raise ValueError(
                f"each level's width int(channel_mult * num_channels), {widths}, must be a positive multiple of "
                f"{NORM_GROUPS} for GroupNorm(32)"
            )
        if num_res_blocks < 1 or not channel_mult:
            raise ValueError(
                f"need num_res_blocks >= 1 and a non-empty channel_mult, got {num_res_blocks} and {tuple(channel_mult)}"
            )
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        self.in_channels, self.model_channels, self.out_channels = in_channels, model_channels, out_channels
        self.num_res_blocks, self.channel_mult = num_res_blocks, tuple(channel_mult)
        self.attention_resolutions = tuple(attention_resolutions)
        self.num_classes = num_classes
        self.dims = dims
        self.use_fp16, self.torso_fp16 = use_fp16, False

        emb_dim = 4 * model_channels
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, emb_dim)

        def res(ch_in: int, ch_out: int | None = None, **updown: bool) -> ResBlock:
            return ResBlock(ch_in, emb_dim, dropout, ch_out, use_scale_shift_norm, dims, **updown)

        def attention(ch: int, heads: int) -> AttentionBlock:
            return AttentionBlock(ch, heads, num_head_channels, use_new_attention_order)

        ch = widths[0]
        self.input_blocks = nn.ModuleList([TimestepSequential(conv_nd(dims, in_channels, ch, 3, padding=1))])
        skip_chans, ds = [ch], 1
        for level, width in enumerate(widths):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [res(ch, width)]
                ch = width
                if ds in self.attention_resolutions:
                    layers.append(attention(ch, num_heads))
                self.input_blocks.append(TimestepSequential(*layers))
                skip_chans.append(ch)
            if level != len(widths) - 1:
                down = res(ch, down=True) if resblock_updown else Downsample(ch, conv_resample, dims)
                self.input_blocks.append(TimestepSequential(down))
                skip_chans.append(ch)
                ds *= 2

        self.middle_block = TimestepSequential(res(ch), attention(ch, num_heads), res(ch))

        self.output_blocks = nn.ModuleList()
        for level, width in reversed(list(enumerate(widths))):
            for i in range(num_res_blocks + 1):
                layers = [res(ch + skip_chans.pop(), width)]
                ch = width
                if ds in self.attention_resolutions:
                    layers.append(attention(ch, num_heads_upsample))
                if level and i == num_res_blocks:
                    layers.append(res(ch, up=True) if resblock_updown else Upsample(ch, conv_resample, dims))
                    ds //= 2
                self.output_blocks.append(TimestepSequential(*layers))

        self.out = nn.Sequential(
            normalization(ch), nn.SiLU(), zero_module(conv_nd(dims, ch, out_channels, 3, padding=1))
        )
        self._register_state_dict_hook(float32_state)  # a float16 torso is saved as float32

    def convert_to_fp16(self) -> None:
        """guided-diffusion's ``convert_to_fp16``: the torso's float32 convolutions to float16 (norms, linear layers,
        embeddings and the output head stay float32). Done by moving a ``use_fp16`` model to CUDA."""
        self._convert_torso(torch.float32, torch.float16)
        self.torso_fp16 = True

    def convert_to_fp32(self) -> None:
        """Undo `convert_to_fp16` (done by moving a ``use_fp16`` model off CUDA)."""
        self._convert_torso(torch.float16, torch.float32)
        self.torso_fp16 = False

    def _convert_torso(self, src: torch.dtype, dst: torch.dtype) -> None:
        for blocks in (self.input_blocks, self.middle_block, self.output_blocks):
            convert_convs(blocks, src, dst)

    def _apply(self, *args, **kwargs):
        """Module.to / .cuda / .cpu / .float ...; then ``use_fp16``: a float16 torso on CUDA, float32 elsewhere."""
        super()._apply(*args, **kwargs)
        if self.use_fp16:
            if self.time_embed[0].weight.is_cuda:
                self.convert_to_fp16()
            elif self.torso_fp16:
                self.convert_to_fp32()
        return self

    @property
    def inner_dtype(self) -> torch.dtype:
        """The dtype of the UNet's torso (its input blocks)."""
        return next(self.input_blocks.parameters()).dtype

    def forward(self, x: Tensor, timesteps: Tensor, y: Tensor | None = None) -> Tensor:
        """[N, C, ...] noisy input and [N] timesteps (and [N] labels if class-conditional) -> [N, out_channels, ...]."""
        if (y is None) != (self.num_classes is None):
            raise ValueError(
                "this UNet is "
                + (
                    "class-conditional: pass labels y"
                    if self.num_classes is not None
                    else "unconditional: do not pass y"
                )
                + " (y must be given if and only if num_classes is set / class_cond=True)"
            )
        factor = 2 ** (len(self.channel_mult) - 1)
        if any(n % factor for n in x.shape[2 + (self.dims == 3) :]):
            raise ValueError(
                f"spatial size {tuple(x.shape[2:])} must be divisible by {factor} for {len(self.channel_mult)} UNet "
                "levels"
            )
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(self.time_embed[0].weight.dtype))
        if y is not None:
            if y.shape != (x.shape[0],):
                raise ValueError(f"labels y must have shape ({x.shape[0]},), got {tuple(y.shape)}")
            emb = emb + self.label_emb(y)
        hs, h = [], x.type(self.inner_dtype)
        for block in self.input_blocks:
            h = block(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h.type(x.dtype))


def _int_tuple(value: str | int | Sequence[int], name: str) -> tuple[int, ...]:
    """'1,2,2' / 16 / (16, 8) -> a tuple of ints; a clear ValueError otherwise."""
    try:
        if isinstance(value, str):
            return tuple(int(v) for v in value.replace(" ", "").split(",") if v)
        if isinstance(value, int):
            return (value,)
        return tuple(int(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be comma-separated integers like '16,8', got {value!r}") from None


def channel_mults(value: str | float | Sequence[float]) -> tuple[float, ...]:
    """'1,2,2' / '0.5,1,1' / (1, 2) -> a tuple of numbers (ints where whole: guided-diffusion's 512 model has 0.5)."""
    items = value.replace(" ", "").split(",") if isinstance(value, str) else value
    try:
        nums = [float(v) for v in (items if isinstance(items, Sequence) else [items]) if v != ""]
    except (TypeError, ValueError):
        nums = [0.0]
    if not all(0 < n < float("inf") for n in nums):
        raise ValueError(f"channel_mult must be comma-separated positive numbers like '1,2,2', got {value!r}")
    return tuple(int(n) if n.is_integer() else n for n in nums)


def create_unet(
    image_size: int,
    num_channels: int,
    num_res_blocks: int,
    channel_mult: str | Sequence[float] = "",
    attention_resolutions: str | Sequence[int] = "16,8",
    num_heads: int = 4,
    num_heads_upsample: int = -1,
    use_scale_shift_norm: bool = True,
    dropout: float = 0.0,
    learn_sigma: bool = False,
    class_cond: bool = False,
    in_channels: int = 3,
    num_classes: int = NUM_CLASSES,
    null_class: bool = False,
    num_head_channels: int = -1,
    resblock_updown: bool = False,
    use_new_attention_order: bool = False,
    use_fp16: bool = False,
) -> UNetModel:
    """improved-diffusion's ``create_model``: flags -> UNetModel (plus explicit channel_mult and in_channels, and
    ``num_classes`` labels, with ``null_class`` one more row, label num_classes, for "no label"); guided-diffusion's
    ``num_head_channels``, ``resblock_updown``, ``use_new_attention_order`` and ``use_fp16`` (models/guided_flags.py
    derives its own channel_mult defaults before calling this)."""
    mult = channel_mults(channel_mult) if channel_mult != "" else ()
    if not mult:
        if image_size not in DEFAULT_CHANNEL_MULT:
            raise ValueError(
                f"improved-diffusion derives channel_mult only for image_size {sorted(DEFAULT_CHANNEL_MULT)}; "
                f"for image_size {image_size} pass channel_mult explicitly, e.g. channel_mult='1,2,2'"
            )
        mult = DEFAULT_CHANNEL_MULT[image_size]
    factor = 2 ** (len(mult) - 1)
    if image_size % factor:
        raise ValueError(
            f"image_size {image_size} must be divisible by {factor} for channel_mult {','.join(map(str, mult))}"
        )
    resolutions = _int_tuple(attention_resolutions, "attention_resolutions")
    if any(r <= 0 for r in resolutions):
        raise ValueError(
            f"attention_resolutions must be positive resolutions like '16,8', got {attention_resolutions!r}"
        )
    return UNetModel(
        in_channels=in_channels,
        model_channels=num_channels,
        out_channels=2 * in_channels if learn_sigma else in_channels,
        num_res_blocks=num_res_blocks,
        attention_resolutions=tuple(image_size // r for r in resolutions),
        dropout=dropout,
        channel_mult=mult,
        num_classes=num_classes + null_class if class_cond else None,  # the null class: the last row
        num_heads=num_heads,
        num_heads_upsample=num_heads_upsample,
        use_scale_shift_norm=use_scale_shift_norm,
        num_head_channels=num_head_channels,
        resblock_updown=resblock_updown,
        use_new_attention_order=use_new_attention_order,
        use_fp16=use_fp16,
    )
