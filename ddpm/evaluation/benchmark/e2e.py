"""End to end: scripts/train.py's logged img/s on a generated image folder, against the raw step img/s of the row
with the same model and levers (how much the data pipeline, EMA, logging and checkpoints cost)."""

from __future__ import annotations

import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .options import BenchmarkOptions
from .rows import Variant, mixed_precision


def write_image_folder(folder: Path, count: int, size: int, channels: int) -> None:
    """``count`` random PNG images of ``size`` px (the e2e run's data; decoding cost is that of real PNGs)."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        # Smooth random images (upsampled noise): PNG sizes closer to photographs' than white noise gives.
        small = rng.integers(0, 256, size=(max(size // 4, 1), max(size // 4, 1), channels), dtype=np.uint8)
        image = Image.fromarray(small[..., 0] if channels == 1 else small).resize((size, size), Image.BILINEAR)
        image.save(folder / f"{i:05d}.png")


def _train_levers(options: BenchmarkOptions) -> list[str]:
    """The levers scripts/train.py is run with (besides fused AdamW, which it always uses)."""
    return [lever for lever in ("channels_last", "compile") if getattr(options, lever)]


def _train_command(
    options: BenchmarkOptions, tmp: Path, config_path: Path, size: int, dtype: str, device: torch.device
) -> list[str]:
    steps = options.e2e_steps
    return [
        sys.executable,
        str(options.train_script),
        "--train_data_dir", str(tmp / "images"),
        "--cache_dir", str(tmp / "cache"),
        "--model_config_name_or_path", str(config_path),
        "--resolution", str(size),
        "--train_batch_size", str(options.batch_size),
        "--max_train_steps", str(steps),
        "--logging_steps", str(max(1, steps // 6)),
        "--checkpointing_steps", str(steps),
        "--output_dir", str(tmp / "run"),
        "--logger", "none",
        "--use_ema",
        "--mixed_precision", mixed_precision(dtype),
        "--max_grad_norm", str(options.max_grad_norm if options.max_grad_norm > 0 else 1e9),
        "--dataloader_num_workers", str(options.e2e_workers),
        "--eval_batch_size", "1",
        "--ddpm_num_inference_steps", "1",
        "--seed", "0",
        "--device", device.type,
        "--channels_last" if options.channels_last else "--no-channels_last",  # as the raw row it is compared with
    ] + (["--compile"] if options.compile else [])  # fmt: skip


def _throughput(records: list[dict[str, Any]], batch: int, raw_img_s: float) -> dict[str, Any] | None:
    """img/s of the logged intervals against the raw step's; None when too few intervals were logged.

    The first logging interval holds the warm-up (compilation, first batches): it is left out. The median interval
    is the steady state: the one holding the end of epoch 0 also holds the sample grid and pipeline export that
    train_unconditional's schedule makes there (seconds for a large model), a one-off that a long run amortises.
    """
    intervals = records[1:]
    if not intervals:
        return None
    img_s = batch / statistics.median(r["sec_per_step"] for r in intervals)
    mean_img_s = (
        batch
        * (records[-1]["step"] - records[0]["step"])
        / sum((r["step"] - q["step"]) * r["sec_per_step"] for q, r in itertools.pairwise(records))
    )
    return {
        "raw_train_img_s": raw_img_s,
        "train_py_img_s": img_s,
        "ratio": img_s / raw_img_s,
        "train_py_mean_img_s": mean_img_s,  # every timed interval, the epoch-0 grid and export included
        "mean_ratio": mean_img_s / raw_img_s,
    }


def benchmark_e2e(
    options: BenchmarkOptions,
    config_path: Path,
    config: dict[str, Any],
    dtype: str,
    device: torch.device,
    rows: list[dict[str, Any]],
    log: Callable[..., None],
) -> dict[str, Any]:
    """scripts/train.py's img/s on a generated image folder against the raw step img/s of the same row."""
    if not options.train_script.is_file():
        log(f"e2e: skipped, {options.train_script} does not exist yet")
        return {"skipped": f"{options.train_script} not found"}
    raw_name = Variant("ours", frozenset({"fused", *_train_levers(options)})).name
    raw = next((r for r in rows if r["variant"] == raw_name), None)
    if raw is None:
        return {"skipped": f"row {raw_name} (scripts/train.py's setup) was not benchmarked; add it to --variants"}
    steps, logging_steps = options.e2e_steps, max(1, options.e2e_steps // 6)
    with tempfile.TemporaryDirectory(prefix="ddpm-bench-") as tmp:
        write_image_folder(Path(tmp) / "images", options.e2e_images, config["sample_size"], config["in_channels"])
        command = _train_command(options, Path(tmp), config_path, config["sample_size"], dtype, device)
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
        lines = (Path(tmp) / "run" / "logs" / "metrics.jsonl").read_text().splitlines()
        records = [r for r in map(json.loads, lines) if "sec_per_step" in r]  # training records, not evaluations
    figures = _throughput(records, options.batch_size, raw["train"]["img_s"])
    if figures is None:
        return {"error": f"too few logged intervals in {len(records)} records; raise --e2e_steps"}
    return {
        "raw_row": raw_name,
        **figures,
        "steps": steps,
        "logging_steps": logging_steps,
        "timed_steps": records[-1]["step"] - records[0]["step"],
        "wall_s": wall,
        "flags": f"EMA on, clipping, logging every N steps, DataLoader workers = {options.e2e_workers}, fused AdamW"
        + "".join(f", {lever}" for lever in _train_levers(options)),
    }
