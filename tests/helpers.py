"""Helpers the test modules import (fixtures live in conftest.py): the scripts as modules, the environment of test
subprocesses and waiting for them, weight comparisons, and a minimal training checkpoint on disk."""

import importlib.util
import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType

import pytest
import torch

from ddpm.io.checkpoint import CONFIG_NAME, EMA_NAME, FORMAT, MODEL_NAME, VERSION
from ddpm.io.files import atomic_write_dir, read_torch_state, write_json, write_safetensors

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
# The files of an exported diffusers pipeline; a push of a training run's folder also sends its last sample grid.
EXPORT_FILES = {
    "model_index.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "scheduler/scheduler_config.json",
    "README.md",
}
PUSHED_FILES = EXPORT_FILES | {"samples.png"}


def load_script(name: str) -> ModuleType:
    """``scripts/<name>.py`` as a module object (the scripts are files, not a package)."""
    spec = importlib.util.spec_from_file_location(f"scripts_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment of a test's subprocesses: one thread each (the two CI cores are shared by all the processes
    of a test) and no network."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **extra}


def read_metrics(output_dir: str | os.PathLike) -> list[dict]:
    """The records of ``output_dir/logs/metrics.jsonl``, one per logged step or evaluation, in order."""
    lines = (Path(output_dir) / "logs" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def wait_for_metrics(
    output_dir: str | os.PathLike, lines: int, processes: Sequence[subprocess.Popen], timeout: float = 300.0
) -> None:
    """Return once ``output_dir/logs/metrics.jsonl`` has ``lines`` lines (rank 0 logged that many steps).

    Fails the test, after killing ``processes``, if one of them exits first or ``timeout`` seconds pass. The processes
    must have been started with ``stderr=subprocess.PIPE`` (the failure shows the end of it).
    """
    path = Path(output_dir) / "logs" / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while not (path.is_file() and len(path.read_text().splitlines()) >= lines):
        exited = [p for p in processes if p.poll() is not None]
        if exited or time.monotonic() > deadline:
            for p in processes:
                p.kill()
            if exited:
                stderr = exited[0].communicate()[1] or ""
                pytest.fail(f"training exited early with {exited[0].returncode}: {stderr[-4000:]}")
            pytest.fail(f"no {lines} metric lines in {path} after {timeout} s")
        time.sleep(0.05)  # a step takes longer than this: no need to spin a core the trainings need


def assert_same_tensors(
    a: Mapping[str, torch.Tensor],
    b: Mapping[str, torch.Tensor],
    exact: bool = True,
    rtol: float = 1e-5,
    atol: float = 5e-6,
) -> None:
    """The same keys and, for each, bit-equal tensors, or (``exact=False``) equal within ``rtol`` / ``atol``.

    Within tolerance, attention key biases are left out: softmax ignores a shift of every logit of a query, so their
    true gradient is zero and AdamW turns the rounding noise of a differently summed batch into full-size steps.
    Other weights with near-zero gradients get a milder form of the same (AdamW divides by sqrt(v) + eps): up to
    1.5e-6 after 4 steps with one CPU thread, hence the default atol 5e-6.
    """
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    for key in a:
        if exact:
            assert torch.equal(a[key], b[key]), key
        elif not key.endswith("to_k.bias"):
            torch.testing.assert_close(a[key], b[key], rtol=rtol, atol=atol, msg=key)


def optimizer_tensors(checkpoint_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A training checkpoint's optimizer state as flat ``"<param index>.<name>"`` tensors (Adam's moments, steps)."""
    state = read_torch_state(Path(checkpoint_dir) / "training_state.pt")["optimizer"]["state"]
    return {f"{i}.{k}": v for i, s in state.items() for k, v in s.items()}


def write_model_checkpoint(path, step, unet_config, schedule_config, live, ema=None, run=None) -> Path:
    """A training checkpoint folder with only what loading its model reads (no optimizer or RNG state)."""
    with atomic_write_dir(path) as tmp:
        write_safetensors(live, tmp / MODEL_NAME)
        if ema is not None:
            write_safetensors(ema, tmp / EMA_NAME)
        config = {
            "format": FORMAT,
            "version": VERSION,
            "step": step,
            "unet": unet_config.to_dict(),
            "schedule": schedule_config.to_dict(),
            "run": run or {},
        }
        write_json(config, tmp / CONFIG_NAME)
    return Path(path)
