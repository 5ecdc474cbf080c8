"""What a benchmark run measures: the model configs, the device, the dtypes, the rows and the timing settings, with
the defaults that depend on other settings (``--quick``, the device) filled in."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ...io.pretrained import load_unet_config
from .rows import ReferenceUNet, Variant

ALL_CONFIGS = ("quickstart-digits-16", "ddpm-cifar10-32", "train-unconditional-64")
QUICK_CONFIG = "quickstart-digits-16"
# Defaults of a --quick run (CI: seconds on a CPU) and of a full one on each device.
_QUICK_DEFAULTS = {"batch_size": 2, "warmup": 1, "repeats": 2, "min_time": 0.0, "e2e_steps": 12}
_FULL_DEFAULTS = {"warmup": 3, "repeats": 5, "min_time": 0.5, "e2e_steps": 60}
_MINIMA = {"batch_size": 1, "warmup": 0, "repeats": 1, "e2e_steps": 1, "e2e_images": 1, "e2e_workers": 0}


@dataclass(frozen=True)
class BenchmarkOptions:
    """scripts/benchmark.py's flags (see its ``--help``), resolved, plus where the files it runs and reads are."""

    config: list[str]
    device: str
    dtype: list[str]
    batch_size: int
    quick: bool
    json: Path | None
    variants: list[Variant] | None  # None: the default rows (see ``default_variants``)
    channels_last: bool
    compile: bool
    cudagraphs: bool
    gradient_checkpointing: bool
    warmup: int
    repeats: int
    min_time: float
    max_grad_norm: float
    clock: str
    threads: int | None
    tf32: bool
    memory: bool
    samplers: bool
    e2e: bool
    e2e_steps: int
    e2e_images: int
    e2e_workers: int
    peak_tflops: float | None
    json_only: bool
    memory_child: str | None  # set in the subprocess that measures one row's memory: that row's name
    command: str  # the command line, for the record
    script: Path  # scripts/benchmark.py: the memory subprocesses run it with --memory_child
    train_script: Path  # scripts/train.py, timed by --e2e
    config_dir: Path  # configs/models: where config names are looked up
    reference: ReferenceUNet | None  # the UNet of the diffusers rows; None when diffusers is not installed


def resolve_config(spec: str, config_dir: Path) -> tuple[str, Path, dict[str, Any]]:
    """A config name from ``config_dir`` or a JSON path -> (name, path, diffusers-style dict)."""
    path = Path(spec)
    if not path.suffix and not path.exists():
        path = config_dir / f"{spec}.json"
    if not path.is_file():
        names = sorted(p.stem for p in config_dir.glob("*.json"))
        raise ValueError(f"--config {spec!r}: no such file, and not one of {names} (or 'all')")
    config = load_unet_config(path)  # validates, with the file named in errors
    return path.stem, path, config.to_dict()


def resolve_options(values: dict[str, Any]) -> BenchmarkOptions:
    """The parsed flags (None where not given) with their defaults filled in; ValueError naming a bad flag.

    ``--threads`` is only checked here: :func:`~.run.run_benchmark` applies it.
    """
    v = dict(values)
    have_cuda = torch.cuda.is_available()
    v["device"] = v["device"] or ("cuda" if have_cuda else "cpu")
    if v["device"] == "cuda" and not have_cuda:
        raise ValueError("--device cuda: CUDA is not available (torch.cuda.is_available() is False)")
    cuda = v["device"] == "cuda"
    v["dtype"] = v["dtype"] or (["bf16"] if cuda else ["fp32"])
    configs = v["config"] or [QUICK_CONFIG if v["quick"] else "ddpm-cifar10-32"]
    v["config"] = [c for spec in configs for c in (ALL_CONFIGS if spec == "all" else [spec])]
    defaults = dict(_QUICK_DEFAULTS) if v["quick"] else dict(_FULL_DEFAULTS, batch_size=128 if cuda else 8)
    defaults["e2e_workers"] = 4 if cuda else 0
    for key, value in defaults.items():
        if v[key] is None:
            v[key] = value
    for key, minimum in _MINIMA.items():
        if v[key] < minimum:
            raise ValueError(f"--{key}={v[key]} is too small")
    if v["e2e_steps"] < 12:
        raise ValueError(f"--e2e_steps={v['e2e_steps']}: at least 12, to leave the warm-up interval out")
    if v["cudagraphs"] and not cuda:
        raise ValueError("--cudagraphs needs --device cuda")
    if v["clock"] == "cpu" and (cuda or v["e2e"]):
        raise ValueError("--clock cpu: only with --device cpu and without --e2e (train.py logs wall-clock img/s)")
    if v["threads"] is not None and v["threads"] < 1:
        raise ValueError(f"--threads={v['threads']} must be >= 1")
    for spec in v["config"]:
        resolve_config(spec, v["config_dir"])
    if v["variants"]:
        v["variants"] = [Variant.parse(spec) for spec in v["variants"].split(",") if spec.strip()]
    v["variants"] = v["variants"] or None
    return BenchmarkOptions(**v)
