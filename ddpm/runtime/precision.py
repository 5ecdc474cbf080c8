"""Numeric precision in one place: the names users type, the dtypes they mean, autocast and the gradient scaler.

Two vocabularies exist because the tools they mirror use them: ``--mixed_precision no|fp16|bf16`` (accelerate's,
for training and sampling: float32 weights, autocast to the named dtype) and ``--dtype fp32|fp16|bf16`` (for weights
written or benchmarked in a dtype). Both map here.
"""

from __future__ import annotations

import warnings
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

# --mixed_precision: autocast dtype (None: float32 throughout)
MIXED_PRECISION: dict[str, torch.dtype | None] = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}
# what --mixed_precision accepts (train.py, sample.py): "auto" is one of MIXED_PRECISION once the device is known
MIXED_PRECISION_CHOICES = (*MIXED_PRECISION, "auto")
# --dtype: the dtype of weights (export) or of a benchmarked computation
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def computes_bf16_natively(device: torch.device) -> bool:
    """Whether ``device`` has bfloat16 arithmetic of its own, so that bf16 autocast pays: an NVIDIA GPU of compute
    capability 8.0 or later, or a CPU with AVX512-BF16 or AMX (Intel from Cooper Lake, AMD from Zen 4). Elsewhere
    PyTorch emulates bfloat16 with conversions, which may be slower than float32."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 8
    if device.type == "cpu":  # private probes of the CPU's features (the ones inductor uses), absent in old torch
        probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)
    return False


def resolve_mixed_precision(name: str, device: torch.device) -> str:
    """``--mixed_precision`` as a run on ``device`` uses it: ``auto`` is bf16 where the device computes bfloat16
    natively (:func:`computes_bf16_natively`) and no (float32) elsewhere; the other names stand for themselves."""
    if name != "auto":
        return name
    return "bf16" if computes_bf16_natively(device) else "no"


def check_precision_support(mixed_precision: str, device: torch.device) -> None:
    """ValueError naming ``--mixed_precision`` when it cannot run on ``device``."""
    dtype = MIXED_PRECISION[mixed_precision]
    if dtype is None:
        return
    if device.type == "cuda":
        if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            name = torch.cuda.get_device_name(device)
            raise ValueError(f"--mixed_precision=bf16: {name} does not support bfloat16; use fp16")
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.autocast(device.type, dtype=dtype):
            enabled = torch.is_autocast_enabled(device.type)
    if not enabled or any("not supported" in str(w.message) for w in caught):
        raise ValueError(f"--mixed_precision={mixed_precision}: this PyTorch cannot autocast to {dtype} on {device}")


@dataclass(frozen=True)
class Precision:
    """One run's precision: float32 weights and optimizer, the forward pass autocast to ``dtype`` (None: float32).

    fp16 needs loss scaling (:meth:`grad_scaler` is enabled only then); bf16 has float32's range and needs none.
    """

    name: str  # "no", "fp16" or "bf16"
    device: torch.device

    def __post_init__(self) -> None:
        if self.name not in MIXED_PRECISION:
            raise ValueError(f"--mixed_precision={self.name!r}: choose one of {', '.join(MIXED_PRECISION)}")

    @classmethod
    def resolved(cls, name: str, device: torch.device) -> Precision:
        """The precision ``--mixed_precision name`` gives on ``device`` (``auto`` resolved by
        :func:`resolve_mixed_precision`)."""
        return cls(resolve_mixed_precision(name, device), device)

    @property
    def dtype(self) -> torch.dtype | None:
        return MIXED_PRECISION[self.name]

    def check_supported(self) -> None:
        check_precision_support(self.name, self.device)

    def autocast(self) -> AbstractContextManager:
        """The forward pass's context (a fresh one per use: autocast objects are not re-entrant)."""
        return torch.autocast(self.device.type, dtype=self.dtype) if self.dtype is not None else nullcontext()

    def grad_scaler(self) -> torch.amp.GradScaler:
        return torch.amp.GradScaler(self.device.type, enabled=self.name == "fp16")
