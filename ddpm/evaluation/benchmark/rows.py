"""A benchmark row: which UNet (ours, or diffusers' UNet2DModel) with which speed levers, built from the weights
and inputs every row shares, and the two steps it is timed on.

ddpm never imports diffusers (tests/test_layers.py): the UNet of the ``diffusers`` rows is handed in as a
:class:`ReferenceUNet` by scripts/benchmark.py. It is the yardstick of this benchmark, not a dependency of the package.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...models.unet import UNet, UNetConfig
from ...runtime.precision import Precision

IMPLS = ("diffusers", "ours")
LEVERS = ("fused", "foreach", "channels_last", "compile", "cudagraphs", "gc")  # also the order in row names
# train_unconditional.py's optimizer settings.
ADAMW = {"lr": 1e-4, "betas": (0.95, 0.999), "weight_decay": 1e-6, "eps": 1e-8}
PHASES = ("train", "sample")


@dataclass(frozen=True)
class Variant:
    """A row of the benchmark: which UNet, and which levers are on."""

    impl: str
    levers: frozenset[str] = frozenset()

    @property
    def name(self) -> str:
        return "+".join([self.impl, *(lever for lever in LEVERS if lever in self.levers)])

    @classmethod
    def parse(cls, spec: str) -> Variant:
        """``"ours+fused+channels_last"`` -> Variant; ValueError naming the spec when it is not one."""
        impl, *levers = spec.strip().split("+")
        if impl not in IMPLS:
            raise ValueError(f"variant {spec!r}: starts with one of {list(IMPLS)}, not {impl!r}")
        unknown = [lever for lever in levers if lever not in LEVERS]
        if unknown:
            raise ValueError(f"variant {spec!r}: unknown lever(s) {unknown}; levers: {list(LEVERS)}")
        chosen = frozenset(levers)
        if {"fused", "foreach"} <= chosen:
            raise ValueError(f"variant {spec!r}: choose one of fused and foreach")
        if "cudagraphs" in chosen:
            chosen |= {"compile"}
        return cls(impl, chosen)


def default_variants(
    have_diffusers: bool, *, channels_last: bool, compile: bool, cudagraphs: bool, gradient_checkpointing: bool
) -> list[Variant]:
    """diffusers (when installed), ours, ours+fused, then one row per lever flag given."""
    specs = (["diffusers"] if have_diffusers else []) + ["ours", "ours+fused"]
    best = "ours+fused" + ("+channels_last" if channels_last else "")
    if channels_last:
        specs.append(best)
    if compile:
        specs.append(best + "+compile")
    if cudagraphs:
        specs.append(best + "+cudagraphs")
    if gradient_checkpointing:
        specs += (["diffusers+gc"] if have_diffusers else []) + [best + "+gc"]
    return [Variant.parse(spec) for spec in specs]


@dataclass(frozen=True)
class ReferenceUNet:
    """The UNet of the ``diffusers`` rows (diffusers' UNet2DModel, built by scripts/benchmark.py)."""

    version: str  # the package's version, for the record
    build: Callable[[dict[str, Any], bool], nn.Module]  # (diffusers config, gradient checkpointing) -> random model
    prediction: Callable[[Any], torch.Tensor]  # the model's output -> the predicted tensor


def mixed_precision(dtype: str) -> str:
    """The ``--mixed_precision`` name of a benchmarked ``--dtype`` (float32 weights, autocast to ``dtype``)."""
    return {"fp32": "no"}.get(dtype, dtype)


def make_inputs(config: dict[str, Any], batch: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Fixed noisy images, timesteps and target noise, from a fixed seed."""
    gen = torch.Generator().manual_seed(0)
    shape = (batch, config["in_channels"], config["sample_size"], config["sample_size"])
    x = torch.randn(shape, generator=gen)
    t = torch.randint(0, 1000, (batch,), generator=gen)
    noise = torch.randn(shape, generator=gen)
    return x.to(device), t.to(device), noise.to(device)


def initial_weights(config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The same weights for every row (and every memory subprocess): our UNet's initialisation under seed 0."""
    torch.manual_seed(0)
    return UNet(UNetConfig.from_dict(config)).state_dict()


def _build_model(
    variant: Variant, config: dict[str, Any], weights: dict[str, torch.Tensor], reference: ReferenceUNet | None
) -> nn.Module:
    """The row's network with ``weights``, gradient checkpointing on for the ``gc`` lever (still on the CPU)."""
    if variant.impl == "diffusers":
        if reference is None:
            raise ValueError(f"variant {variant.name!r} needs diffusers, which is not installed")
        model = reference.build(config, "gc" in variant.levers)
        model.load_state_dict(weights)
        return model
    model = UNet(UNetConfig.from_dict(config))
    model.load_state_dict(weights)
    model.gradient_checkpointing = "gc" in variant.levers
    return model


def _forward(
    model: nn.Module, variant: Variant, reference: ReferenceUNet | None
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``(x, t) -> prediction``: compiled for the ``compile`` lever, unwrapped from diffusers' output class."""
    forward: Callable[..., Any] = model
    if "compile" in variant.levers:
        forward = torch.compile(model, mode="reduce-overhead" if "cudagraphs" in variant.levers else None)
    if variant.impl == "diffusers":
        compiled, prediction = forward, reference.prediction
        return lambda x, t: prediction(compiled(x, t))
    return forward


def _optimizer(model: nn.Module, levers: frozenset[str]) -> torch.optim.Optimizer:
    kwargs = dict(ADAMW, fused=True) if "fused" in levers else dict(ADAMW)
    if "foreach" in levers:
        kwargs["foreach"] = True
    return torch.optim.AdamW(model.parameters(), **kwargs)


class Runner:
    """One variant ready to run: model, optimizer, scaler and its inputs, with a train step and a sampling step."""

    def __init__(
        self,
        variant: Variant,
        config: dict[str, Any],
        weights: dict[str, torch.Tensor],
        inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        device: torch.device,
        dtype: str,
        max_grad_norm: float,
        reference: ReferenceUNet | None = None,
    ):
        self.variant = variant
        self.device = device
        self.max_grad_norm = max_grad_norm
        memory_format = torch.channels_last if "channels_last" in variant.levers else torch.contiguous_format
        self.model = _build_model(variant, config, weights, reference).to(device, memory_format=memory_format)
        x, t, noise = inputs
        self.x, self.t, self.noise = x.contiguous(memory_format=memory_format), t, noise
        self.forward = _forward(self.model, variant, reference)
        self.optimizer = _optimizer(self.model, variant.levers)
        self.precision = Precision(mixed_precision(dtype), device)
        self.scaler = self.precision.grad_scaler()

    def train_step(self) -> None:
        """train_unconditional.py's optimizer step, the same for every row (diffusers' too).

        It is the core of ``ddpm.training``'s step (autocast forward, float32 MSE loss, scaled backward, unscale and
        clip, scaler step, ``zero_grad``) without what that one adds: drawing noise and timesteps, accumulation,
        DDP, skipping non-finite steps, the LR schedule and EMA.
        """
        with self.precision.autocast():
            out = self.forward(self.x, self.t)
        loss = F.mse_loss(out.float(), self.noise)  # as train_unconditional: the loss in float32
        self.scaler.scale(loss).backward()
        if self.max_grad_norm > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def sample_step(self) -> torch.Tensor:
        with self.precision.autocast():
            return self.forward(self.x, self.t)

    def set_phase(self, phase: str) -> None:
        self.model.train(phase == "train")

    def step(self, phase: str) -> Callable[[], Any]:
        return self.train_step if phase == "train" else self.sample_step

    def resident_bytes(self) -> int:
        """What this row keeps between steps: weights and optimizer state (for CUDA memory accounting)."""
        tensors = list(self.model.parameters()) + [
            v for state in self.optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)
        ]
        return sum(t.numel() * t.element_size() for t in tensors if t.device.type == "cuda")
