"""The benchmark run: for each (config, dtype), every row warmed up, checked against the first, timed interleaved,
its memory measured; then the JSON document of all of them."""

from __future__ import annotations

import gc
import json
import math
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ...diffusion.samplers import ddim_sample, ddpm_sample
from ...diffusion.schedule import NoiseSchedule
from .e2e import benchmark_e2e
from .memory import memory_child, memory_in_subprocesses
from .options import BenchmarkOptions, resolve_config
from .report import format_table, write_json
from .rows import LEVERS, PHASES, Runner, Variant, default_variants, initial_weights, make_inputs
from .timing import backend_flags, device_name, load_average, model_flops, peak_tflops, timed

Key = tuple[str, str]  # (row name, phase)


def _warm_up(runners: list[Runner], warmup: int) -> dict[str, float]:
    """Warm-up (compilation, cuDNN autotuning, allocator); returns each row's max |output - first row's output|."""
    reference_out, diffs = None, {}
    for runner in runners:
        for _ in range(warmup):
            for phase in PHASES:
                runner.set_phase(phase)
                runner.step(phase)()
        runner.set_phase("sample")
        out = runner.sample_step().float()
        if reference_out is None:
            reference_out = out
        diffs[runner.variant.name] = (out - reference_out).abs().max().item()
        del out
    return diffs


def _calls_per_repeat(runners: list[Runner], options: BenchmarkOptions, device: torch.device) -> dict[Key, int]:
    """Calls per timed repeat: enough for --min_time seconds (GPUs are too fast to time one step)."""
    iters = {(runner.variant.name, phase): 1 for runner in runners for phase in PHASES}
    if options.min_time > 0:
        for runner in runners:
            for phase in PHASES:
                runner.set_phase(phase)
                once = timed(runner.step(phase), 1, device, options.clock)
                iters[runner.variant.name, phase] = max(1, math.ceil(options.min_time / max(once, 1e-9)))
    return iters


def _time_rows(
    runners: list[Runner], iters: dict[Key, int], options: BenchmarkOptions, device: torch.device, inputs_bytes: int
) -> tuple[dict[Key, list[float]], dict[Key, int]]:
    """Seconds per step of every row and phase in each repeat, and on CUDA the bytes each held at its peak.

    Each repeat runs every row once, in rotating order, phase-major (the rows compared with each other run close
    together in time), so that load from other processes hits all rows alike.
    """
    times: dict[Key, list[float]] = {key: [] for key in iters}
    cuda_peaks: dict[Key, int] = {}
    for repeat in range(options.repeats):
        shift = repeat % len(runners)
        for phase in PHASES:
            for runner in runners[shift:] + runners[:shift]:
                key = (runner.variant.name, phase)
                runner.set_phase(phase)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                    before = torch.cuda.memory_allocated(device)
                times[key].append(timed(runner.step(phase), iters[key], device, options.clock))
                if device.type == "cuda":
                    extra = torch.cuda.max_memory_allocated(device) - before
                    own = extra + runner.resident_bytes() + inputs_bytes
                    cuda_peaks[key] = max(cuda_peaks.get(key, 0), own)
    return times, cuda_peaks


def _memory(
    options: BenchmarkOptions,
    config_spec: str,
    dtype: str,
    variants: list[Variant],
    device: torch.device,
    cuda_peaks: dict[Key, int],
) -> tuple[dict[str, dict[str, float | None]], str | None]:
    """Peak MiB per row and phase, and how it was measured (None: not measured)."""
    if device.type == "cuda":
        memory = {v.name: {phase: cuda_peaks[v.name, phase] / 2**20 for phase in PHASES} for v in variants}
        return memory, "cuda max_memory_allocated (the row's own tensors)"
    if options.memory:
        memory = memory_in_subprocesses(options, config_spec, dtype, variants, device)
        return memory, "subprocess peak RSS above the pre-model RSS"
    return {}, None


def _row(
    variant: Variant,
    times: dict[Key, list[float]],
    iters: dict[Key, int],
    batch: int,
    flops: dict[str, float],
    peak: float | None,
    memory: dict[str, dict[str, float | None]],
    diff: float,
) -> dict[str, Any]:
    """One row's figures: medians over the repeats, achieved TFLOP/s and MFU, peak memory, agreement."""
    levers = [x for x in LEVERS if x in variant.levers]
    row: dict[str, Any] = {"variant": variant.name, "impl": variant.impl, "levers": levers}
    for phase in PHASES:
        samples = times[variant.name, phase]
        seconds = statistics.median(samples)
        img_s = batch / seconds
        tflops = flops[phase] * img_s / 1e12
        row[phase] = {
            "img_s": img_s,
            "sec_per_step": seconds,
            "times_s": samples,
            "iters_per_repeat": iters[variant.name, phase],
            "achieved_tflops": tflops,
            "mfu": tflops / peak if peak else None,
            "peak_mem_mb": memory.get(variant.name, {}).get(phase),
        }
    row["max_abs_diff_vs_first_row"] = diff
    return row


def _add_speedups(rows: list[dict[str, Any]]) -> None:
    """Each row's speed-up over plain diffusers (None without that row).

    Speed-ups are paired: the median over repeats of this row's speed over diffusers' in the same repeat, which
    cancels most of the load that other processes put on a shared machine between repeats.
    """
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
        with runner.precision.autocast():
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


def _extras(
    options: BenchmarkOptions,
    runners: list[Runner],
    result: dict[str, Any],
    device: torch.device,
    log: Callable[..., None],
) -> None:
    """The optional figures of one (config, dtype): --samplers (with an eager row of ours) and --e2e."""
    ours = next((r for r in runners if r.variant.impl == "ours" and "compile" not in r.variant.levers), None)
    if options.samplers:
        if ours is None:
            result["samplers"] = {"skipped": "no eager row of ours to sample with"}
        else:
            result["samplers"] = benchmark_samplers(ours, result["batch_size"], device, options.clock, log)
    if options.e2e:
        config_path, config = Path(result["config_path"]), result["unet_config"]
        result["e2e"] = benchmark_e2e(options, config_path, config, result["dtype"], device, result["rows"], log)


def benchmark_config(
    options: BenchmarkOptions, config_spec: str, dtype: str, variants: list[Variant], device: torch.device
) -> dict[str, Any]:
    """All rows of one (config, dtype): interleaved timings, memory, FLOPs, optional samplers and end-to-end."""
    name, path, config = resolve_config(config_spec, options.config_dir)
    batch = options.batch_size
    weights = initial_weights(config)
    inputs = make_inputs(config, batch, device)
    row = dict(device=device, dtype=dtype, max_grad_norm=options.max_grad_norm, reference=options.reference)
    runners = [Runner(v, config, weights, inputs, **row) for v in variants]
    flops = model_flops(config)
    peak, peak_key = peak_tflops(device, dtype, options.peak_tflops)
    log = _log_function(options)
    log(f"\n== {name} | {device_name(device)} | {dtype} | batch {batch} | rows: {', '.join(v.name for v in variants)}")

    diffs = _warm_up(runners, options.warmup)
    iters = _calls_per_repeat(runners, options, device)
    times, cuda_peaks = _time_rows(runners, iters, options, device, sum(t.numel() * t.element_size() for t in inputs))
    memory, memory_method = _memory(options, config_spec, dtype, variants, device, cuda_peaks)
    rows = [_row(r.variant, times, iters, batch, flops, peak, memory, diffs[r.variant.name]) for r in runners]
    _add_speedups(rows)
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
    _extras(options, runners, result, device, log)
    log(format_table(result))
    del runners
    gc.collect()
    return result


def _log_function(options: BenchmarkOptions) -> Callable[..., None]:
    """print, or nothing with --json_only."""
    return print if not options.json_only else (lambda *a, **k: None)


def _document(options: BenchmarkOptions, device: torch.device, diffusers_version: str | None) -> dict[str, Any]:
    """The document's header: what ran where, with which settings (the results are added to it)."""
    return {
        "benchmark": "ddpm-unet",
        "version": 1,
        "device": device.type,
        "device_name": device_name(device),
        "torch": torch.__version__,
        "diffusers": diffusers_version,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "clock": options.clock,
        "quick": options.quick,
        "warmup": options.warmup,
        "repeats": options.repeats,
        "min_time_s": options.min_time,
        "max_grad_norm": options.max_grad_norm,
        "tf32": options.tf32,
        "command": options.command,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "load_average_before": load_average(),
        "results": [],
    }


def run_benchmark(options: BenchmarkOptions) -> dict[str, Any]:
    """Run the benchmark; returns (and prints last) the JSON document, also written to ``options.json``.

    In a ``--memory_child`` process, measures that one row's memory instead and returns ``{}``. ValueError when a
    diffusers row is asked for without diffusers installed.
    """
    if options.threads is not None:
        torch.set_num_threads(options.threads)
    if options.memory_child:
        memory_child(options)
        return {}
    device = torch.device(options.device)
    reference = options.reference
    variants = options.variants or default_variants(
        reference is not None,
        channels_last=options.channels_last,
        compile=options.compile,
        cudagraphs=options.cudagraphs,
        gradient_checkpointing=options.gradient_checkpointing,
    )
    if reference is None and any(v.impl == "diffusers" for v in variants):
        raise ValueError("diffusers is not installed: drop the diffusers rows from --variants")
    if reference is None and not options.json_only:
        print("diffusers is not installed: benchmarking this project's UNet alone")
    document = _document(options, device, reference.version if reference else None)
    with backend_flags(device, options.tf32):
        for config_spec in options.config:
            for dtype in options.dtype:
                document["results"].append(benchmark_config(options, config_spec, dtype, variants, device))
    document["load_average_after"] = load_average()
    if options.json:
        write_json(document, options.json)
    print(json.dumps(document))
    return document
