"""Side-by-side speed benchmark: this project's UNet against diffusers' UNet2DModel, same weights, same process.

    python scripts/benchmark.py --quick                                   # seconds, CPU: the CI smoke run
    python scripts/benchmark.py --config all --device cpu --json bench.json
    python scripts/benchmark.py --config ddpm-cifar10-32 --device cuda --dtype bf16 --batch_size 128 \\
        --channels_last --compile --gradient_checkpointing --samplers --e2e --json h100.json

Rows ("variants") are a model plus levers: ``diffusers`` is UNet2DModel run the way train_unconditional.py runs it
(float32 weights, ``torch.autocast`` for bf16/fp16 with a GradScaler for fp16, eager, ``torch.optim.AdamW`` with
its default implementation, betas 0.95/0.999, weight decay 1e-6, gradient clipping at 1.0); ``ours`` is this
project's UNet with exactly that treatment; ``+fused`` uses fused AdamW (what scripts/train.py uses),
``+channels_last``, ``+compile`` (``torch.compile``), ``+cudagraphs`` (compile mode ``reduce-overhead``),
``+gc`` (gradient checkpointing), ``+foreach`` (foreach AdamW). All rows of a run get the same weights, inputs,
device, dtype and batch; their timings are interleaved (each repeat runs every row once, in rotating order) so that
load from other processes hits all rows alike. Figures are medians over the repeats.

- train img/s: forward + loss + backward + clipping + optimizer step (+ zero_grad), ``batch / seconds``.
- sample img/s: one forward pass without autograd (``torch.no_grad``, eval mode), ``batch / seconds``.
- peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` during the phase minus what other rows hold; on CPU,
  each row runs alone in a fresh subprocess (peak RSS only grows within a process), which reports its peak
  resident memory above the RSS it had before building the model (the peak is reset after the model is built,
  via /proc/self/clear_refs, so transient construction memory is not counted); the sampling phase runs first,
  then the training phase, whose figure is the process peak after both (training holds strictly more).
- MFU (CUDA): model FLOPs (``torch.utils.flop_counter``; matmuls, convolutions and attention of the plain model,
  so recomputation by gradient checkpointing does not count) per second over the device's dense peak for the
  dtype (float32 counts against the TF32 peak when cuDNN may use TF32, PyTorch's default for convolutions).

``--samplers`` times DDIM (50 steps) against DDPM (1000 steps) per image; ``--e2e`` runs scripts/train.py on a
generated image folder and compares its logged img/s with the raw step throughput of the same model and levers.
The last line printed is the JSON document written to ``--json``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import itertools
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from ddpm.diffusion.samplers import ddim_sample, ddpm_sample
from ddpm.diffusion.schedule import NoiseSchedule
from ddpm.io.pretrained import load_unet_config
from ddpm.models.unet import UNet, UNetConfig

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "configs" / "models"
TRAIN_SCRIPT = ROOT / "scripts" / "train.py"
ALL_CONFIGS = ("quickstart-digits-16", "ddpm-cifar10-32", "train-unconditional-64")
QUICK_CONFIG = "quickstart-digits-16"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
IMPLS = ("diffusers", "ours")
LEVERS = ("fused", "foreach", "channels_last", "compile", "cudagraphs", "gc")  # also the order in row names
# train_unconditional.py's optimizer settings.
ADAMW = {"lr": 1e-4, "betas": (0.95, 0.999), "weight_decay": 1e-6, "eps": 1e-8}
# Dense (no sparsity) peak TFLOP/s by device-name fragment, first match wins; "tf32" is float32 on tensor cores.
PEAK_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H200 NVL", {"bf16": 835.0, "fp16": 835.0, "tf32": 417.5, "fp32": 60.0}),
    ("H200", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    ("H100 NVL", {"bf16": 835.0, "fp16": 835.0, "tf32": 417.5, "fp32": 60.0}),
    ("H100 PCIe", {"bf16": 756.5, "fp16": 756.5, "tf32": 378.0, "fp32": 51.2}),
    ("H100", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),  # SXM
    ("A100", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),
)
MEMORY_TAG = "BENCHMARK_MEMORY "
PHASES = ("train", "sample")


# ---------------------------------------------------------------------------------------------------- variants


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


def default_variants(args: argparse.Namespace, have_diffusers: bool) -> list[Variant]:
    """diffusers (when installed), ours, ours+fused, then one row per lever flag given."""
    specs = (["diffusers"] if have_diffusers else []) + ["ours", "ours+fused"]
    best = "ours+fused" + ("+channels_last" if args.channels_last else "")
    if args.channels_last:
        specs.append(best)
    if args.compile:
        specs.append(best + "+compile")
    if args.cudagraphs:
        specs.append(best + "+cudagraphs")
    if args.gradient_checkpointing:
        specs += (["diffusers+gc"] if have_diffusers else []) + [best + "+gc"]
    return [Variant.parse(spec) for spec in specs]


# ---------------------------------------------------------------------------------------------------- helpers


def resolve_config(spec: str) -> tuple[str, Path, dict[str, Any]]:
    """A config name from configs/models or a JSON path -> (name, path, diffusers-style dict)."""
    path = Path(spec)
    if not path.suffix and not path.exists():
        path = CONFIG_DIR / f"{spec}.json"
    if not path.is_file():
        names = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
        raise ValueError(f"--config {spec!r}: no such file, and not one of {names} (or 'all')")
    config = load_unet_config(path)  # validates, with the file named in errors
    return path.stem, path, config.to_dict()


def diffusers_module() -> Any | None:
    """The installed diffusers package, or None (then only our rows run)."""
    try:
        import diffusers
    except ImportError:
        return None
    return diffusers


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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


def _proc_status_bytes(field: str) -> int | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return None


def _reset_peak_rss() -> bool:
    """Lower the process's peak-RSS mark to its current RSS (Linux >= 4.0); False where impossible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _release_free_memory() -> None:
    """Return the C heap's free pages to the system (glibc), so that RSS reflects live memory."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _peak_rss_bytes() -> int:
    hwm = _proc_status_bytes("VmHWM")
    if hwm is not None:
        return hwm
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB elsewhere
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


# ---------------------------------------------------------------------------------------------------- one row


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
    ):
        self.variant = variant
        self.device = device
        self.max_grad_norm = max_grad_norm
        levers = variant.levers
        if variant.impl == "diffusers":
            diffusers = diffusers_module()
            if diffusers is None:
                raise ValueError(f"variant {variant.name!r} needs diffusers, which is not installed")
            model = diffusers.UNet2DModel(**config)
            model.load_state_dict(weights)
            if "gc" in levers:
                model.enable_gradient_checkpointing()
        else:
            model = UNet(UNetConfig.from_dict(config))
            model.load_state_dict(weights)
            model.gradient_checkpointing = "gc" in levers
        memory_format = torch.channels_last if "channels_last" in levers else torch.contiguous_format
        self.model = model.to(device, memory_format=memory_format)
        x, t, noise = inputs
        self.x, self.t, self.noise = x.contiguous(memory_format=memory_format), t, noise
        forward: Callable[..., Any] = self.model
        if "compile" in levers:
            forward = torch.compile(self.model, mode="reduce-overhead" if "cudagraphs" in levers else None)
        if variant.impl == "diffusers":
            compiled = forward
            self.forward = lambda x, t: compiled(x, t).sample
        else:
            self.forward = forward
        kwargs = dict(ADAMW, fused=True) if "fused" in levers else dict(ADAMW)
        if "foreach" in levers:
            kwargs["foreach"] = True
        self.optimizer = torch.optim.AdamW(self.model.parameters(), **kwargs)
        self.scaler = torch.amp.GradScaler(device.type, enabled=dtype == "fp16")
        self.amp_dtype = None if dtype == "fp32" else DTYPES[dtype]

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def train_step(self) -> None:
        with self.autocast():
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
        with self.autocast():
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


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


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


# ---------------------------------------------------------------------------------------------------- benchmark


def benchmark_config(
    args: argparse.Namespace, config_spec: str, dtype: str, variants: list[Variant], device: torch.device
) -> dict[str, Any]:
    """All rows of one (config, dtype): interleaved timings, memory, FLOPs, optional samplers and end-to-end."""
    name, path, config = resolve_config(config_spec)
    batch = args.batch_size
    weights = initial_weights(config)
    inputs = make_inputs(config, batch, device)
    runners = [Runner(v, config, weights, inputs, device, dtype, args.max_grad_norm) for v in variants]
    flops = model_flops(config)
    peak, peak_key = peak_tflops(device, dtype, args.peak_tflops)
    log = print if not args.json_only else (lambda *a, **k: None)
    log(f"\n== {name} | {device_name(device)} | {dtype} | batch {batch} | rows: {', '.join(v.name for v in variants)}")

    # Warm-up (compilation, cuDNN autotuning, allocator), and the outputs' agreement with the first row.
    reference_out, diffs = None, {}
    for runner in runners:
        for _ in range(args.warmup):
            for phase in PHASES:
                runner.set_phase(phase)
                runner.step(phase)()
        runner.set_phase("sample")
        out = runner.sample_step().float()
        if reference_out is None:
            reference_out = out
        diffs[runner.variant.name] = (out - reference_out).abs().max().item()
        del out
    # Calls per timed repeat: enough for --min_time seconds (GPUs are too fast to time one step).
    iters = {(runner.variant.name, phase): 1 for runner in runners for phase in PHASES}
    if args.min_time > 0:
        for runner in runners:
            for phase in PHASES:
                runner.set_phase(phase)
                once = timed(runner.step(phase), 1, device, args.clock)
                iters[runner.variant.name, phase] = max(1, math.ceil(args.min_time / max(once, 1e-9)))

    times: dict[tuple[str, str], list[float]] = {key: [] for key in iters}
    cuda_peaks: dict[tuple[str, str], int] = {}
    for repeat in range(args.repeats):
        shift = repeat % len(runners)
        for phase in PHASES:  # phase-major: the rows compared with each other run close together in time
            for runner in runners[shift:] + runners[:shift]:
                key_name = runner.variant.name
                runner.set_phase(phase)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                    before = torch.cuda.memory_allocated(device)
                step = runner.step(phase)
                times[key_name, phase].append(timed(step, iters[key_name, phase], device, args.clock))
                if device.type == "cuda":
                    extra = torch.cuda.max_memory_allocated(device) - before
                    own = extra + runner.resident_bytes() + sum(t.numel() * t.element_size() for t in inputs)
                    cuda_peaks[key_name, phase] = max(cuda_peaks.get((key_name, phase), 0), own)

    memory: dict[str, dict[str, float | None]] = {}
    memory_method = None
    if device.type == "cuda":
        memory_method = "cuda max_memory_allocated (the row's own tensors)"
        for v in variants:
            memory[v.name] = {phase: cuda_peaks[v.name, phase] / 2**20 for phase in PHASES}
    elif args.memory:
        memory_method = "subprocess peak RSS above the pre-model RSS"
        memory = memory_in_subprocesses(args, config_spec, dtype, variants, device)

    rows = []
    for runner in runners:
        v = runner.variant
        row: dict[str, Any] = {"variant": v.name, "impl": v.impl, "levers": [x for x in LEVERS if x in v.levers]}
        for phase in PHASES:
            samples = times[v.name, phase]
            seconds = statistics.median(samples)
            img_s = batch / seconds
            tflops = flops[phase] * img_s / 1e12
            row[phase] = {
                "img_s": img_s,
                "sec_per_step": seconds,
                "times_s": samples,
                "iters_per_repeat": iters[v.name, phase],
                "achieved_tflops": tflops,
                "mfu": tflops / peak if peak else None,
                "peak_mem_mb": memory.get(v.name, {}).get(phase),
            }
        row["max_abs_diff_vs_first_row"] = diffs[v.name]
        rows.append(row)
    # Speed-ups are paired: the median over repeats of this row's speed over diffusers' in the same repeat, which
    # cancels most of the load that other processes put on a shared machine between repeats.
    baseline = next((r for r in rows if r["impl"] == "diffusers" and not r["levers"]), None)
    for row in rows:
        row["speedup_vs_diffusers"] = None
        if baseline is not None:
            row["speedup_vs_diffusers"] = {
                phase: statistics.median(
                    theirs / ours
                    for ours, theirs in zip(row[phase]["times_s"], baseline[phase]["times_s"], strict=True)
                )
                for phase in PHASES
            }

    result: dict[str, Any] = {
        "config": name,
        "config_path": str(path),
        "unet_config": config,
        "parameters": sum(w.numel() for w in weights.values()),
        "dtype": dtype,
        "batch_size": batch,
        "gflop_per_image": {phase: flops[phase] / 1e9 for phase in PHASES},
        "peak_tflops": peak,
        "peak_tflops_key": peak_key,
        "memory_method": memory_method,
        "rows": rows,
        "samplers": None,
        "e2e": None,
    }
    ours = next((r for r in runners if r.variant.impl == "ours" and "compile" not in r.variant.levers), None)
    if args.samplers:
        if ours is None:
            result["samplers"] = {"skipped": "no eager row of ours to sample with"}
        else:
            result["samplers"] = benchmark_samplers(ours, batch, device, args.clock, log)
    if args.e2e:
        result["e2e"] = benchmark_e2e(args, path, config, dtype, device, rows, log)
    log(format_table(result))
    del runners
    gc.collect()
    return result


def memory_in_subprocesses(
    args: argparse.Namespace, config_spec: str, dtype: str, variants: list[Variant], device: torch.device
) -> dict[str, dict[str, float | None]]:
    """Peak memory (MiB) of each row alone, each measured by a fresh ``--memory_child`` process.

    The timings are over by now, so two children run at a time (resident memory is per process).
    """

    def measure(variant: Variant) -> dict[str, float | None]:
        command = [sys.executable, str(Path(__file__).resolve()), "--memory_child", variant.name]
        command += ["--config", config_spec, "--dtype", dtype, "--device", device.type]
        command += ["--batch_size", str(args.batch_size), "--max_grad_norm", str(args.max_grad_norm)]
        command += ["--threads", str(torch.get_num_threads())]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        lines = [line for line in done.stdout.splitlines() if line.startswith(MEMORY_TAG)]
        if done.returncode != 0 or not lines:
            print(f"memory subprocess for {variant.name} failed:\n{done.stderr[-2000:]}", file=sys.stderr)
            return {phase: None for phase in PHASES}
        return json.loads(lines[-1][len(MEMORY_TAG) :])

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip((v.name for v in variants), pool.map(measure, variants), strict=True))


def memory_child(args: argparse.Namespace) -> None:
    """In a fresh process: peak resident memory of one row's sampling, then training steps, printed as JSON.

    The figure is the peak RSS above the RSS before the row's model exists, measured after a throwaway batch-1 run
    of the same row has paid the runtime's one-off costs (library code paged in, thread pools, kernel caches) and
    its memory was handed back to the system. Rows with ``compile`` also compile inside the measured phases, so
    their figures include the compiler's memory.
    """
    device = torch.device(args.device)
    dtype = args.dtype[0]
    variant = Variant.parse(args.memory_child)
    _, _, config = resolve_config(args.config[0])
    weights = initial_weights(config)  # kept alive: the rows' own copies are what is measured
    throwaway = Runner(variant, config, weights, make_inputs(config, 1, device), device, dtype, args.max_grad_norm)
    for phase in PHASES:
        throwaway.set_phase(phase)
        throwaway.step(phase)()
    del throwaway
    inputs = make_inputs(config, args.batch_size, device)
    gc.collect()
    _release_free_memory()
    start = _proc_status_bytes("VmRSS") or _peak_rss_bytes()
    runner = Runner(variant, config, weights, inputs, device, dtype, args.max_grad_norm)
    gc.collect()
    _reset_peak_rss()  # forget construction transients; the row's weights stay in the current RSS
    peaks = {}
    for phase, steps in (("sample", 2), ("train", 3)):  # training's first step creates the optimizer state
        runner.set_phase(phase)
        for _ in range(steps):
            runner.step(phase)()
        peaks[phase] = max(0, _peak_rss_bytes() - start) / 2**20
    print(MEMORY_TAG + json.dumps(peaks), flush=True)


def benchmark_samplers(
    runner: Runner, batch: int, device: torch.device, clock: str, log: Callable[..., None]
) -> dict[str, Any]:
    """Seconds per image of DDIM with 50 steps and DDPM with 1000 steps (our model, our samplers)."""
    schedule = NoiseSchedule()
    runner.set_phase("sample")
    figures: dict[str, Any] = {"batch_size": batch}
    for label, sample, steps in (("ddim", ddim_sample, 50), ("ddpm", ddpm_sample, 1000)):
        log(f"sampling: {label} {steps} steps ...")
        generator = torch.Generator(device).manual_seed(0)
        with runner.autocast():
            seconds = timed(
                lambda sample=sample, steps=steps, generator=generator: sample(
                    runner.model, schedule, batch, num_inference_steps=steps, generator=generator
                ),
                1,
                device,
                clock,
            )
        figures[f"{label}_{steps}_s_per_image"] = seconds / batch
        figures[f"{label}_s_per_step"] = seconds / steps  # ~equal for both when the load stayed constant
    figures["ddim_speedup"] = figures["ddpm_1000_s_per_image"] / figures["ddim_50_s_per_image"]
    return figures


def write_image_folder(folder: Path, count: int, size: int, channels: int) -> None:
    """``count`` random PNG images of ``size`` px (the e2e run's data; decoding cost is that of real PNGs)."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        # Smooth random images (upsampled noise): PNG sizes closer to photographs' than white noise gives.
        small = rng.integers(0, 256, size=(max(size // 4, 1), max(size // 4, 1), channels), dtype=np.uint8)
        image = Image.fromarray(small[..., 0] if channels == 1 else small).resize((size, size), Image.BILINEAR)
        image.save(folder / f"{i:05d}.png")


def benchmark_e2e(
    args: argparse.Namespace,
    config_path: Path,
    config: dict[str, Any],
    dtype: str,
    device: torch.device,
    rows: list[dict[str, Any]],
    log: Callable[..., None],
) -> dict[str, Any]:
    """scripts/train.py's img/s on a generated image folder against the raw step img/s of the same row."""
    if not TRAIN_SCRIPT.is_file():
        log(f"e2e: skipped, {TRAIN_SCRIPT} does not exist yet")
        return {"skipped": f"{TRAIN_SCRIPT} not found"}
    levers = {"fused"} | ({"channels_last"} if args.channels_last else set()) | ({"compile"} if args.compile else set())
    raw_name = Variant("ours", frozenset(levers)).name
    raw = next((r for r in rows if r["variant"] == raw_name), None)
    if raw is None:
        return {"skipped": f"row {raw_name} (scripts/train.py's setup) was not benchmarked; add it to --variants"}
    steps = args.e2e_steps
    logging_steps = max(1, steps // 6)
    size = config["sample_size"]
    with tempfile.TemporaryDirectory(prefix="ddpm-bench-") as tmp:
        images = Path(tmp) / "images"
        write_image_folder(images, args.e2e_images, size, config["in_channels"])
        output = Path(tmp) / "run"
        command = [
            sys.executable,
            str(TRAIN_SCRIPT),
            "--train_data_dir", str(images),
            "--cache_dir", str(Path(tmp) / "cache"),
            "--model_config_name_or_path", str(config_path),
            "--resolution", str(size),
            "--train_batch_size", str(args.batch_size),
            "--max_train_steps", str(steps),
            "--logging_steps", str(logging_steps),
            "--checkpointing_steps", str(steps),
            "--output_dir", str(output),
            "--logger", "none",
            "--use_ema",
            "--mixed_precision", {"fp32": "no"}.get(dtype, dtype),
            "--max_grad_norm", str(args.max_grad_norm if args.max_grad_norm > 0 else 1e9),
            "--dataloader_num_workers", str(args.e2e_workers),
            "--eval_batch_size", "1",
            "--ddpm_num_inference_steps", "1",
            "--seed", "0",
            "--device", device.type,
        ] + [f"--{lever}" for lever in ("channels_last", "compile") if lever in levers]  # fmt: skip
        log(f"e2e: scripts/train.py, {steps} steps (logging every {logging_steps}) ...")
        env = dict(
            os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS=str(torch.get_num_threads())
        )
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
        wall = time.perf_counter() - start
        if done.returncode != 0:
            log(f"e2e: scripts/train.py failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
            return {"error": f"exit status {done.returncode}", "stderr_tail": done.stderr[-3000:]}
        lines = (output / "logs" / "metrics.jsonl").read_text().splitlines()
        records = [r for r in map(json.loads, lines) if "sec_per_step" in r]  # training records, not evaluations
    # The first logging interval holds the warm-up (compilation, first batches): leave it out. The median interval
    # is the steady state: the one holding the end of epoch 0 also holds the sample grid and pipeline export that
    # train_unconditional's schedule makes there (seconds for a large model), a one-off that a long run amortises.
    intervals = records[1:]
    if not intervals:
        return {"error": f"too few logged intervals in {len(records)} records; raise --e2e_steps"}
    img_s = args.batch_size / statistics.median(r["sec_per_step"] for r in intervals)
    mean_img_s = (
        args.batch_size
        * (records[-1]["step"] - records[0]["step"])
        / sum((r["step"] - q["step"]) * r["sec_per_step"] for q, r in itertools.pairwise(records))
    )
    return {
        "raw_row": raw_name,
        "raw_train_img_s": raw["train"]["img_s"],
        "train_py_img_s": img_s,
        "ratio": img_s / raw["train"]["img_s"],
        "train_py_mean_img_s": mean_img_s,  # every timed interval, the epoch-0 grid and export included
        "mean_ratio": mean_img_s / raw["train"]["img_s"],
        "steps": steps,
        "logging_steps": logging_steps,
        "timed_steps": records[-1]["step"] - records[0]["step"],
        "wall_s": wall,
        "flags": "EMA on, clipping, logging every N steps, DataLoader workers = "
        + str(args.e2e_workers)
        + ", fused AdamW"
        + "".join(f", {lever}" for lever in ("channels_last", "compile") if lever in levers),
    }


# ---------------------------------------------------------------------------------------------------- output


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(result: dict[str, Any]) -> str:
    """A Markdown table of one (config, dtype) result."""
    lines = [
        f"{result['config']} ({result['parameters'] / 1e6:.1f}M params, "
        f"{result['gflop_per_image']['train']:.1f} GFLOP/img train, "
        f"{result['gflop_per_image']['sample']:.1f} GFLOP/img sample), {result['dtype']}, "
        f"batch {result['batch_size']}",
        "",
        "| variant | train img/s | x diffusers | sample img/s | x diffusers | train peak MiB | sample peak MiB "
        "| train MFU | sample MFU | max abs diff |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        speed = row["speedup_vs_diffusers"] or {}
        train, sample = row["train"], row["sample"]
        lines.append(
            f"| {row['variant']} | {train['img_s']:.1f} | {_fmt(speed.get('train'), '.2f')} | "
            f"{sample['img_s']:.1f} | {_fmt(speed.get('sample'), '.2f')} | {_fmt(train['peak_mem_mb'], '.0f')} | "
            f"{_fmt(sample['peak_mem_mb'], '.0f')} | {_fmt(train['mfu'] and 100 * train['mfu'], '.1f')}"
            f"{'%' if train['mfu'] else ''} | {_fmt(sample['mfu'] and 100 * sample['mfu'], '.1f')}"
            f"{'%' if sample['mfu'] else ''} | {row['max_abs_diff_vs_first_row']:.1e} |"
        )
    if result["samplers"] and "skipped" not in result["samplers"]:
        s = result["samplers"]
        lines.append(
            f"\nsamplers (batch {s['batch_size']}): DDIM 50 steps {s['ddim_50_s_per_image']:.3f} s/img, "
            f"DDPM 1000 steps {s['ddpm_1000_s_per_image']:.3f} s/img: DDIM {s['ddim_speedup']:.1f}x faster"
        )
    if result["e2e"]:
        e = result["e2e"]
        if "ratio" in e:
            lines.append(
                f"\ne2e: scripts/train.py {e['train_py_img_s']:.1f} img/s vs raw {e['raw_row']} "
                f"{e['raw_train_img_s']:.1f} img/s: {100 * e['ratio']:.0f}% in the median logging interval, "
                f"{100 * e['mean_ratio']:.0f}% over all of them ({e['flags']})"
            )
        else:
            lines.append(f"\ne2e: {e.get('skipped') or e.get('error')}")
    return "\n".join(lines)


def write_json(document: dict[str, Any], path: Path) -> None:
    """Atomically (temporary file in the same folder, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(document, indent=2) + "\n")
    tmp.replace(path)


# ---------------------------------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config",
        action="append",
        help=f"model config: a name in configs/models, a JSON path, or 'all' ({', '.join(ALL_CONFIGS)}); "
        f"repeatable. Default: {QUICK_CONFIG} with --quick, else ddpm-cifar10-32",
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    parser.add_argument("--dtype", nargs="+", choices=tuple(DTYPES), help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--batch_size", type=int, help="default: 2 with --quick, 128 on CUDA, 8 on CPU")
    parser.add_argument("--quick", action="store_true", help="tiny run (CI): 1 warm-up, 2 repeats, batch 2")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--variants", help="comma-separated rows, e.g. diffusers,ours+fused+channels_last")
    parser.add_argument("--channels_last", action="store_true", help="add a channels_last row")
    parser.add_argument("--compile", action="store_true", help="add a torch.compile row")
    parser.add_argument("--cudagraphs", action="store_true", help="add a compile row with CUDA graphs")
    parser.add_argument("--gradient_checkpointing", action="store_true", help="add gradient-checkpointing rows")
    parser.add_argument("--warmup", type=int, help="warm-up steps per row and phase (default 3, 1 with --quick)")
    parser.add_argument("--repeats", type=int, help="timed repeats (default 5, 2 with --quick)")
    parser.add_argument(
        "--min_time", type=float, help="seconds per timed repeat (steps are repeated up to it; default 0.5)"
    )
    parser.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient clipping, 0 = off")
    parser.add_argument(
        "--clock",
        choices=tuple(CLOCKS),
        default="wall",
        help="wall time, or this process's CPU time (CPU only: not charged for other processes' load)",
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--tf32", action="store_true", help="allow TF32 matmuls and convolutions (CUDA, all rows)")
    parser.add_argument("--no_memory", dest="memory", action="store_false", help="skip the CPU memory subprocesses")
    parser.add_argument("--samplers", action="store_true", help="time DDIM 50 steps against DDPM 1000 steps")
    parser.add_argument("--e2e", action="store_true", help="also time scripts/train.py on a generated image folder")
    parser.add_argument("--e2e_steps", type=int, help="optimizer steps of the e2e run (default 60, 12 with --quick)")
    parser.add_argument("--e2e_images", type=int, default=256, help="images in the generated folder")
    parser.add_argument(
        "--e2e_workers", type=int, help="--dataloader_num_workers of the e2e run (default: 4 on CUDA, 0 on CPU)"
    )
    parser.add_argument("--peak_tflops", type=float, help="device peak TFLOP/s for MFU (default: built-in table)")
    parser.add_argument("--json_only", action="store_true", help="print only the JSON document")
    parser.add_argument("--memory_child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    have_cuda = torch.cuda.is_available()
    args.device = args.device or ("cuda" if have_cuda else "cpu")
    if args.device == "cuda" and not have_cuda:
        parser.error("--device cuda: CUDA is not available (torch.cuda.is_available() is False)")
    args.dtype = args.dtype or (["bf16"] if args.device == "cuda" else ["fp32"])
    configs = args.config or [QUICK_CONFIG if args.quick else "ddpm-cifar10-32"]
    args.config = [c for spec in configs for c in (ALL_CONFIGS if spec == "all" else [spec])]
    cuda = args.device == "cuda"
    if args.quick:
        defaults = {"batch_size": 2, "warmup": 1, "repeats": 2, "min_time": 0.0, "e2e_steps": 12}
    else:
        defaults = {"batch_size": 128 if cuda else 8, "warmup": 3, "repeats": 5, "min_time": 0.5, "e2e_steps": 60}
    defaults["e2e_workers"] = 4 if cuda else 0
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key in ("batch_size", "warmup", "repeats", "e2e_steps", "e2e_images", "e2e_workers"):
        if getattr(args, key) < (0 if key in ("warmup", "e2e_workers") else 1):
            parser.error(f"--{key}={getattr(args, key)} is too small")
    if args.e2e_steps < 12:
        parser.error(f"--e2e_steps={args.e2e_steps}: at least 12, to leave the warm-up interval out")
    if args.cudagraphs and args.device != "cuda":
        parser.error("--cudagraphs needs --device cuda")
    if args.clock == "cpu" and (args.device != "cpu" or args.e2e):
        parser.error("--clock cpu: only with --device cpu and without --e2e (train.py logs wall-clock img/s)")
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads={args.threads} must be >= 1")
        torch.set_num_threads(args.threads)
    try:
        for spec in args.config:
            resolve_config(spec)
        if args.variants:
            args.variants = [Variant.parse(spec) for spec in args.variants.split(",") if spec.strip()]
    except ValueError as e:
        parser.error(str(e))
    return args


@contextlib.contextmanager
def backend_flags(args: argparse.Namespace, device: torch.device) -> Iterator[None]:
    """cuDNN autotuning on (every row, diffusers' too: its gain goes to both) and optional TF32, restored after."""
    saved = (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        if args.tf32:
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages: other processes' load makes timings noisy (None where unknown)."""
    with contextlib.suppress(OSError, AttributeError):
        return [round(x, 2) for x in os.getloadavg()]
    return None


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns (and prints last) the JSON document."""
    args = parse_args(argv)
    if args.memory_child:
        memory_child(args)
        return {}
    device = torch.device(args.device)
    diffusers = diffusers_module()
    variants = args.variants or default_variants(args, diffusers is not None)
    if diffusers is None and any(v.impl == "diffusers" for v in variants):
        raise SystemExit("diffusers is not installed: drop the diffusers rows from --variants")
    if diffusers is None and not args.json_only:
        print("diffusers is not installed: benchmarking this project's UNet alone")
    document: dict[str, Any] = {
        "benchmark": "ddpm-unet",
        "version": 1,
        "device": device.type,
        "device_name": device_name(device),
        "torch": torch.__version__,
        "diffusers": getattr(diffusers, "__version__", None),
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "clock": args.clock,
        "quick": args.quick,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "min_time_s": args.min_time,
        "max_grad_norm": args.max_grad_norm,
        "tf32": args.tf32,
        "command": " ".join(["python", "scripts/benchmark.py", *(sys.argv[1:] if argv is None else argv)]),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "load_average_before": _load_average(),
        "results": [],
    }
    with backend_flags(args, device):
        for config_spec in args.config:
            for dtype in args.dtype:
                document["results"].append(benchmark_config(args, config_spec, dtype, variants, device))
    document["load_average_after"] = _load_average()
    if args.json:
        write_json(document, args.json)
    print(json.dumps(document))
    return document


if __name__ == "__main__":
    main()
