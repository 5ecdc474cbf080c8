"""The residual-attention UNet of DDPM, numerically identical to diffusers' ``UNet2DModel``.

Every parameter has exactly the name it has in a diffusers state dict (``down_blocks.1.attentions.0.to_q.weight``
...), so weights move between the two without a rename table. Only the configurations of ``UNet2DModel`` built from
``DownBlock2D``, ``AttnDownBlock2D``, ``UNetMidBlock2D``, ``UpBlock2D`` and ``AttnUpBlock2D`` with positional time
embeddings are implemented; anything else is refused with the offending key named (by :class:`UNetConfig`, or for
the ``UNet2DModel`` options it does not model, by ``ddpm.io.diffusers_format``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

DOWN_BLOCKS = ("DownBlock2D", "AttnDownBlock2D")
UP_BLOCKS = ("UpBlock2D", "AttnUpBlock2D")
ACTIVATIONS = {"silu": F.silu, "swish": F.silu, "mish": F.mish, "gelu": F.gelu, "relu": F.relu}


@dataclass
class UNetConfig:
    """Architecture of a :class:`UNet`; the field names and defaults are those of ``UNet2DModel``'s config."""

    sample_size: int = 64
    in_channels: int = 3
    out_channels: int = 3
    center_input_sample: bool = False
    time_embedding_dim: int | None = None
    freq_shift: int = 0
    flip_sin_to_cos: bool = True
    down_block_types: tuple[str, ...] = ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D")
    up_block_types: tuple[str, ...] = ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D")
    block_out_channels: tuple[int, ...] = (224, 448, 672, 896)
    layers_per_block: int = 2
    mid_block_scale_factor: float = 1
    downsample_padding: int = 1
    dropout: float = 0.0
    act_fn: str = "silu"
    attention_head_dim: int | None = 8
    norm_num_groups: int = 32
    attn_norm_num_groups: int | None = None
    norm_eps: float = 1e-5
    resnet_time_scale_shift: str = "default"
    add_attention: bool = True

    def __post_init__(self) -> None:
        self.down_block_types = tuple(self.down_block_types)
        self.up_block_types = tuple(self.up_block_types)
        self.block_out_channels = tuple(int(c) for c in self.block_out_channels)
        if isinstance(self.sample_size, (list, tuple)):
            if len(set(self.sample_size)) != 1:
                raise ValueError(f"UNetConfig.sample_size={list(self.sample_size)}: only square samples are supported")
            self.sample_size = int(self.sample_size[0])
        self._validate()

    def _validate(self) -> None:
        def bad(key: str, why: str) -> ValueError:
            return ValueError(f"UNetConfig.{key}={getattr(self, key)!r}: {why}")

        for key in ("sample_size", "in_channels", "out_channels", "layers_per_block", "norm_num_groups"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise bad(key, "must be a positive integer")
        n = len(self.block_out_channels)
        if n == 0 or any(c < 1 for c in self.block_out_channels):
            raise bad("block_out_channels", "must be a non-empty list of positive integers")
        for key, allowed in (("down_block_types", DOWN_BLOCKS), ("up_block_types", UP_BLOCKS)):
            types = getattr(self, key)
            if len(types) != n:
                raise bad(key, f"needs one entry per block_out_channels entry ({n})")
            unknown = [t for t in types if t not in allowed]
            if unknown:
                raise bad(key, f"unsupported block type(s) {unknown}; supported: {list(allowed)}")
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise bad("norm_num_groups", f"must divide every block_out_channels entry (not {c})")
        if self.attn_norm_num_groups is not None and self.block_out_channels[-1] % self.attn_norm_num_groups:
            raise bad("attn_norm_num_groups", f"must divide the mid-block width {self.block_out_channels[-1]}")
        if self.attention_head_dim is not None:
            if self.attention_head_dim < 1:
                raise bad("attention_head_dim", "must be a positive integer or None (one head)")
            for c in self.block_out_channels:
                if c % self.attention_head_dim:
                    raise bad("attention_head_dim", f"must divide every block_out_channels entry (not {c})")
        if self.time_embedding_dim is not None and self.time_embedding_dim < 1:
            raise bad("time_embedding_dim", "must be a positive integer or None")
        if self.downsample_padding < 0:
            raise bad("downsample_padding", "must be >= 0 (0 means the asymmetric right/bottom pad)")
        if not 0.0 <= self.dropout < 1.0:
            raise bad("dropout", "must be in [0, 1)")
        if self.act_fn not in ACTIVATIONS:
            raise bad("act_fn", f"supported: {sorted(ACTIVATIONS)}")
        if self.resnet_time_scale_shift not in ("default", "scale_shift"):
            raise bad("resnet_time_scale_shift", "supported: 'default', 'scale_shift'")
        if self.norm_eps <= 0:
            raise bad("norm_eps", "must be positive")
        if self.sample_size % self.downsampling_factor:
            raise bad(
                "sample_size",
                f"must be divisible by {self.downsampling_factor} (2 ** (number of blocks - 1)) "
                "so that every down-sampling halves an even size",
            )

    @property
    def downsampling_factor(self) -> int:
        """How much the spatial size shrinks from the input to the mid block."""
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def time_embed_dim(self) -> int:
        return self.time_embedding_dim or self.block_out_channels[0] * 4

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> UNetConfig:
        """Build from :meth:`to_dict`'s form; a key that is not a field is refused by name.

        A diffusers ``config.json`` (private ``_`` keys, options this UNet does not model) is read by
        ``ddpm.io.diffusers_format.unet_config_from_diffusers``.
        """
        names = {f.name for f in fields(cls)}
        for key, value in config.items():
            if key not in names:
                raise ValueError(f"unknown UNet config key {key!r} (value {value!r})")
        return cls(**config)

    def to_dict(self) -> dict[str, Any]:
        """Our fields as a JSON-friendly dict (lists, not tuples)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def timestep_embedding(
    timesteps: torch.Tensor, dim: int, flip_sin_to_cos: bool, freq_shift: float, max_period: int = 10000
) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, as diffusers' ``get_timestep_embedding``."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
    freqs = torch.exp(exponent / (half - freq_shift))
    args = timesteps[:, None].float() * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class TimestepEmbedding(nn.Module):
    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


def _activate(act_fn: str, x: torch.Tensor) -> torch.Tensor:
    """``act_fn(x)`` on a fresh tensor (a GroupNorm output), in place when autograd does not need ``x`` kept.

    In place saves an allocation and a pass over memory when sampling; under autograd an in-place SiLU would make
    autograd keep a copy of its input anyway, so it is not worth it there.
    """
    fn = ACTIVATIONS[act_fn]
    if act_fn != "gelu" and not (torch.is_grad_enabled() and x.requires_grad):  # F.gelu has no in-place form
        return fn(x, inplace=True)
    return fn(x)


def _add_into(fresh: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """``fresh + other``, written into ``fresh`` when that keeps the sum's dtype.

    ``fresh`` is an op output that nothing else reads, already of the sum's shape. Safe under autograd: the ops
    producing it here (convolutions) do not keep their output for the backward pass. Under autocast ``other`` may
    be float32 while ``fresh`` is bfloat16, and then the sum must promote, as diffusers' out-of-place sum does.
    """
    if torch.promote_types(fresh.dtype, other.dtype) == fresh.dtype:
        return fresh.add_(other)
    return fresh + other


class ResnetBlock(nn.Module):
    """GroupNorm-act-conv twice, with the time embedding added (or scale-shifted) in between.

    ``forward(x, temb, skip=None)`` takes the time embedding already passed through the activation (the same for
    every block, so :class:`UNet` computes it once); in the up path, ``skip`` is concatenated to ``x`` first.
    """

    def __init__(self, cin: int, cout: int, cfg: UNetConfig, output_scale_factor: float = 1.0):
        super().__init__()
        self.scale_shift = cfg.resnet_time_scale_shift == "scale_shift"
        self.output_scale_factor = output_scale_factor
        self.norm1 = nn.GroupNorm(cfg.norm_num_groups, cin, eps=cfg.norm_eps)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.time_emb_proj = nn.Linear(cfg.time_embed_dim, cout * 2 if self.scale_shift else cout)
        self.norm2 = nn.GroupNorm(cfg.norm_num_groups, cout, eps=cfg.norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.act_fn = cfg.act_fn
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        h = self.conv1(_activate(self.act_fn, self.norm1(x)))
        t = self.time_emb_proj(temb)[:, :, None, None]
        if self.scale_shift:
            scale, shift = t.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(_add_into(h, t))
        h = self.conv2(self.dropout(_activate(self.act_fn, h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        h = _add_into(h, x)  # x + h in diffusers: the same sum, IEEE addition commutes
        # Dividing by 1 (every config but the mid block's mid_block_scale_factor) would be an exact no-op pass.
        return h / self.output_scale_factor if self.output_scale_factor != 1 else h


class Attention(nn.Module):
    """Pre-norm multi-head self-attention over the pixels, with a residual connection."""

    def __init__(
        self, channels: int, head_dim: int | None, groups: int | None, eps: float, rescale_output: float = 1.0
    ):
        super().__init__()
        self.heads = channels // head_dim if head_dim else 1
        self.rescale_output = rescale_output
        # groups=None: no normalisation (diffusers' mid-block attention with scale_shift and no attn_norm_num_groups)
        self.group_norm = nn.GroupNorm(groups, channels, eps=eps) if groups else None
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        # A ModuleList so that the projection is named ``to_out.0`` as in diffusers (index 1 there is a Dropout).
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, height, width = x.shape
        h = self.group_norm(x) if self.group_norm is not None else x
        h = rearrange(h, "b c h w -> b (h w) c")
        q, k, v = (
            rearrange(proj(h), "b n (heads d) -> b heads n d", heads=self.heads)
            for proj in (self.to_q, self.to_k, self.to_v)
        )
        h = F.scaled_dot_product_attention(q, k, v)
        h = self.to_out[0](rearrange(h, "b heads n d -> b n (heads d)"))
        # x first: the sum takes x's memory format (h is a pixels-major view), so the layout stays the model's.
        h = x + rearrange(h, "b (h w) c -> b c h w", h=height, w=width)
        return h / self.rescale_output if self.rescale_output != 1 else h


class Downsample(nn.Module):
    def __init__(self, channels: int, padding: int):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding == 0:  # TF "SAME" padding of the original DDPM checkpoints: one pixel right and bottom
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


def _fold_taps(weight: torch.Tensor, dim: int) -> torch.Tensor:
    """A 3-tap kernel axis seen through a 2x nearest upsampling, as the 4 taps of a stride-2 transposed convolution.

    Output pixel 2m reads the upsampled pixels 2m-1, 2m, 2m+1, that is the inputs m-1, m, m: taps w0 and w1 + w2;
    pixel 2m+1 reads the inputs m, m, m+1: taps w0 + w1 and w2. In ``conv_transpose2d``'s order (stride 2, padding 1)
    those are the taps 3, 1 and 2, 0 of a 4-tap kernel.
    """
    w0, w1, w2 = weight.unbind(dim)
    return torch.stack([w2, w1 + w2, w0 + w1, w0], dim)


class Upsample(nn.Module):
    """Nearest 2x upsampling then a 3x3 convolution, computed as one stride-2 transposed convolution.

    ``conv(interpolate(x))`` convolves a 2x2 block of equal pixels with every 3x3 kernel, so each output pixel really
    reads a 2x2 patch of ``x`` through a kernel of summed taps (``_fold_taps``): 16 multiply-adds per input pixel and
    pair of channels instead of 36, the same result within float rounding (the taps are summed in the weights' own
    precision, outside autocast), and no upsampled copy of ``x`` in memory. The parameter is the 3x3 ``conv.weight``
    of diffusers' ``Upsample2D``, so checkpoints are unchanged.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = _fold_taps(_fold_taps(self.conv.weight, 2), 3).transpose(0, 1)  # (in, out, 4, 4)
        return F.conv_transpose2d(x, weight, self.conv.bias, stride=2, padding=1)


def _attention(cfg: UNetConfig, channels: int, groups: int | None, rescale: float = 1.0) -> Attention:
    return Attention(channels, cfg.attention_head_dim, groups, cfg.norm_eps, rescale)


# How a block calls its layers: directly, or through activation checkpointing (see UNet.forward).
LayerCall = Callable[..., torch.Tensor]


def _call(layer: nn.Module, *args: Any) -> torch.Tensor:
    return layer(*args)


def _checkpointed(layer: nn.Module, *args: Any) -> torch.Tensor:
    return checkpoint(layer, *args, use_reentrant=False)


class DownBlock(nn.Module):
    """``DownBlock2D`` / ``AttnDownBlock2D``: resnets (each followed by attention) then a stride-2 conv."""

    def __init__(self, cfg: UNetConfig, cin: int, cout: int, attention: bool, downsample: bool):
        super().__init__()
        n = cfg.layers_per_block
        if attention:  # registered before resnets, as in diffusers, so state-dict order matches too
            self.attentions = nn.ModuleList(_attention(cfg, cout, cfg.norm_num_groups) for _ in range(n))
        self.resnets = nn.ModuleList(ResnetBlock(cin if j == 0 else cout, cout, cfg) for j in range(n))
        self.downsamplers = nn.ModuleList([Downsample(cout, cfg.downsample_padding)]) if downsample else None

    def forward(
        self, x: torch.Tensor, temb: torch.Tensor, run: LayerCall = _call
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        skips = []
        for j, resnet in enumerate(self.resnets):
            x = run(resnet, x, temb)
            if hasattr(self, "attentions"):
                x = run(self.attentions[j], x)
            skips.append(x)
        if self.downsamplers is not None:
            x = run(self.downsamplers[0], x)
            skips.append(x)
        return x, skips


class UpBlock(nn.Module):
    """``UpBlock2D`` / ``AttnUpBlock2D``: layers_per_block + 1 resnets, each eating one skip, then upsampling."""

    def __init__(self, cfg: UNetConfig, prev: int, cout: int, skip_in: int, attention: bool, upsample: bool):
        super().__init__()
        n = cfg.layers_per_block + 1
        if attention:
            self.attentions = nn.ModuleList(_attention(cfg, cout, cfg.norm_num_groups) for _ in range(n))
        self.resnets = nn.ModuleList(
            ResnetBlock((prev if j == 0 else cout) + (skip_in if j == n - 1 else cout), cout, cfg) for j in range(n)
        )
        self.upsamplers = nn.ModuleList([Upsample(cout)]) if upsample else None

    def forward(
        self, x: torch.Tensor, skips: tuple[torch.Tensor, ...], temb: torch.Tensor, run: LayerCall = _call
    ) -> torch.Tensor:
        # ``skips`` are this block's down-path activations in down-path order; the last one is consumed first.
        for j, resnet in enumerate(self.resnets):
            x = run(resnet, x, temb, skips[-1 - j])
            if hasattr(self, "attentions"):
                x = run(self.attentions[j], x)
        if self.upsamplers is not None:
            x = run(self.upsamplers[0], x)
        return x


class MidBlock(nn.Module):
    """``UNetMidBlock2D``: resnet, optional attention, resnet, at the lowest resolution."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        c = cfg.block_out_channels[-1]
        scale = cfg.mid_block_scale_factor
        if cfg.add_attention:
            groups = cfg.attn_norm_num_groups
            if groups is None and cfg.resnet_time_scale_shift == "default":  # diffusers' rule for the mid block
                groups = cfg.norm_num_groups
            self.attentions = nn.ModuleList([_attention(cfg, c, groups, scale)])
        self.resnets = nn.ModuleList(ResnetBlock(c, c, cfg, output_scale_factor=scale) for _ in range(2))

    def forward(self, x: torch.Tensor, temb: torch.Tensor, run: LayerCall = _call) -> torch.Tensor:
        x = run(self.resnets[0], x, temb)
        if hasattr(self, "attentions"):
            x = run(self.attentions[0], x)
        return run(self.resnets[1], x, temb)


class UNet(nn.Module):
    """Predicts the noise (or x0, or v) of a noisy image batch at the given timesteps.

    ``unet(sample, timestep)`` takes ``sample`` of shape ``[B, in_channels, H, W]`` and ``timestep`` as an int, a 0-d
    tensor or a ``[B]`` tensor, and returns a ``[B, out_channels, H, W]`` tensor.
    """

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        self.gradient_checkpointing = False
        channels = config.block_out_channels
        n = len(channels)
        self.conv_in = nn.Conv2d(config.in_channels, channels[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(channels[0], config.time_embed_dim)
        self.down_blocks = nn.ModuleList(
            DownBlock(config, channels[max(i - 1, 0)], channels[i], kind == "AttnDownBlock2D", i < n - 1)
            for i, kind in enumerate(config.down_block_types)
        )
        rev = channels[::-1]
        self.up_blocks = nn.ModuleList(
            UpBlock(config, rev[max(i - 1, 0)], rev[i], rev[min(i + 1, n - 1)], kind == "AttnUpBlock2D", i < n - 1)
            for i, kind in enumerate(config.up_block_types)
        )
        self.mid_block = MidBlock(config)
        self.conv_norm_out = nn.GroupNorm(config.norm_num_groups, channels[0], eps=config.norm_eps)
        self.conv_out = nn.Conv2d(channels[0], config.out_channels, 3, padding=1)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | int | float) -> torch.Tensor:
        cfg = self.config
        if cfg.center_input_sample:
            sample = 2 * sample - 1.0
        t = torch.as_tensor(timestep, device=sample.device)
        if t.ndim == 0:
            t = t[None]
        t = t.expand(sample.shape[0])
        t_emb = timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        temb = self.time_embedding(t_emb.to(self.conv_in.weight.dtype))
        # Every resnet applies the activation to temb first (diffusers' ResnetBlock2D): do it once here.
        temb = _activate(cfg.act_fn, temb)

        # Checkpointing wraps each resnet, attention and resampling layer: only the layers' inputs are kept (most
        # are skip connections, kept anyway) and one layer's activations are rebuilt at a time in the backward pass.
        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        run = _checkpointed if checkpointing else _call
        x = self.conv_in(sample)
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = block(x, temb, run)
            skips += block_skips
        x = self.mid_block(x, temb, run)
        for block in self.up_blocks:
            n = len(block.resnets)
            x = block(x, tuple(skips[-n:]), temb, run)
            del skips[-n:]
        return self.conv_out(F.silu(self.conv_norm_out(x)))
