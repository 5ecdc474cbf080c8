"""How fast, and how fast it could be: the clocks, the device's name, backend flags and dense peak, the model's
FLOPs per image (for MFU) and the machine's load."""

from __future__ import annotations

import contextlib
import os
import platform
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from ...models.unet import UNet, UNetConfig

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
# Dense (no sparsity) peak TFLOP/s by device-name fragment, first match wins; "tf32" is float32 on tensor cores.
PEAK_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H200 NVL", {"bf16": 835.0, "fp16": 835.0, "tf32": 417.5, "fp32": 60.0}),
    ("H200", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    ("H100 NVL", {"bf16": 835.0, "fp16": 835.0, "tf32": 417.5, "fp32": 60.0}),
    ("H100 PCIe", {"bf16": 756.5, "fp16": 756.5, "tf32": 378.0, "fp32": 51.2}),
    ("H100", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),  # SXM
    ("A100", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),
)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], iters: int, device: torch.device, clock: str = "wall") -> float:
    """Seconds per call of ``fn`` over ``iters`` calls, the device synchronised at both ends.

    ``clock="cpu"`` counts this process's CPU time instead of wall time: on a CPU shared with other processes
    it does not count the time the scheduler gave to them (exact with one thread; with more, threads waiting
    for a descheduled sibling may spin and count).
    """
    now = CLOCKS[clock]
    synchronize(device)
    start = now()
    for _ in range(iters):
        fn()
    synchronize(device)
    return (now() - start) / iters


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{model} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages: other processes' load makes timings noisy (None where unknown)."""
    with contextlib.suppress(OSError, AttributeError):
        return [round(x, 2) for x in os.getloadavg()]
    return None


@contextlib.contextmanager
def backend_flags(device: torch.device, tf32: bool) -> Iterator[None]:
    """cuDNN autotuning on (every row, diffusers' too: its gain goes to both) and optional TF32, restored after."""
    saved = (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        if tf32:
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def peak_tflops(device: torch.device, dtype: str, override: float | None) -> tuple[float | None, str | None]:
    """The device's dense peak TFLOP/s for ``dtype`` and the table key used (None on CPU / unknown GPUs)."""
    if override is not None:
        return override, "--peak_tflops"
    if device.type != "cuda":
        return None, None
    name = torch.cuda.get_device_name(device)
    key = dtype
    if dtype == "fp32" and torch.backends.cudnn.allow_tf32:  # convolutions (most of the FLOPs) run on TF32 cores
        key = "tf32"
    for fragment, peaks in PEAK_TFLOPS:
        if fragment in name:
            return peaks[key], f"{fragment} {key}"
    return None, None


def model_flops(config: dict[str, Any]) -> dict[str, float]:
    """FLOPs per image of a training step (forward + backward) and of a forward pass, counted on the meta device.

    SDPA is pinned to the math backend, whose matmuls the counter sees (the fused CPU kernel is not counted).
    """
    with torch.device("meta"):
        model = UNet(UNetConfig.from_dict(config))
        x = torch.zeros(1, model.config.in_channels, model.config.sample_size, model.config.sample_size)
        t = torch.zeros(1, dtype=torch.long)
    flops = {}
    with sdpa_kernel(SDPBackend.MATH):
        with FlopCounterMode(display=False) as counter:
            model(x, t).sum().backward()
        flops["train"] = float(counter.get_total_flops())
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(x, t)
        flops["sample"] = float(counter.get_total_flops())
    return flops
