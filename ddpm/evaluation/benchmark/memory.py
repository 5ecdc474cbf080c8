"""Peak memory of a row on the CPU: each row runs alone in a fresh subprocess, since a process's peak resident
memory only grows. (On CUDA the timing loop reads ``torch.cuda.max_memory_allocated`` instead.)"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import resource
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from .options import BenchmarkOptions, resolve_config
from .rows import PHASES, Runner, Variant, initial_weights, make_inputs

MEMORY_TAG = "BENCHMARK_MEMORY "


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


def memory_in_subprocesses(
    options: BenchmarkOptions, config_spec: str, dtype: str, variants: list[Variant], device: torch.device
) -> dict[str, dict[str, float | None]]:
    """Peak memory (MiB) of each row alone, each measured by a fresh ``--memory_child`` process.

    The timings are over by now, so two children run at a time (resident memory is per process).
    """

    def measure(variant: Variant) -> dict[str, float | None]:
        command = [sys.executable, str(options.script), "--memory_child", variant.name]
        command += ["--config", config_spec, "--dtype", dtype, "--device", device.type]
        command += ["--batch_size", str(options.batch_size), "--max_grad_norm", str(options.max_grad_norm)]
        command += ["--threads", str(torch.get_num_threads())]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        lines = [line for line in done.stdout.splitlines() if line.startswith(MEMORY_TAG)]
        if done.returncode != 0 or not lines:
            print(f"memory subprocess for {variant.name} failed:\n{done.stderr[-2000:]}", file=sys.stderr)
            return {phase: None for phase in PHASES}
        return json.loads(lines[-1][len(MEMORY_TAG) :])

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip((v.name for v in variants), pool.map(measure, variants), strict=True))


def memory_child(options: BenchmarkOptions) -> None:
    """In a fresh process: peak resident memory of one row's sampling, then training steps, printed as JSON.

    The figure is the peak RSS above the RSS before the row's model exists, measured after a throwaway batch-1 run
    of the same row has paid the runtime's one-off costs (library code paged in, thread pools, kernel caches) and
    its memory was handed back to the system. Rows with ``compile`` also compile inside the measured phases, so
    their figures include the compiler's memory.
    """
    device = torch.device(options.device)
    dtype = options.dtype[0]
    variant = Variant.parse(options.memory_child)
    _, _, config = resolve_config(options.config[0], options.config_dir)
    weights = initial_weights(config)  # kept alive: the rows' own copies are what is measured
    row = dict(device=device, dtype=dtype, max_grad_norm=options.max_grad_norm, reference=options.reference)
    throwaway = Runner(variant, config, weights, make_inputs(config, 1, device), **row)
    for phase in PHASES:
        throwaway.set_phase(phase)
        throwaway.step(phase)()
    del throwaway
    inputs = make_inputs(config, options.batch_size, device)
    gc.collect()
    _release_free_memory()
    start = _proc_status_bytes("VmRSS") or _peak_rss_bytes()
    runner = Runner(variant, config, weights, inputs, **row)
    gc.collect()
    _reset_peak_rss()  # forget construction transients; the row's weights stay in the current RSS
    peaks = {}
    for phase, steps in (("sample", 2), ("train", 3)):  # training's first step creates the optimizer state
        runner.set_phase(phase)
        for _ in range(steps):
            runner.step(phase)()
        peaks[phase] = max(0, _peak_rss_bytes() - start) / 2**20
    print(MEMORY_TAG + json.dumps(peaks), flush=True)
