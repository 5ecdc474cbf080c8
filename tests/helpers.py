"""Helpers the test modules import (fixtures live in conftest.py): the scripts as modules, the environment of test
subprocesses, and a minimal training checkpoint on disk."""

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

from ddpm.io.checkpoint import CONFIG_NAME, EMA_NAME, FORMAT, MODEL_NAME, VERSION
from ddpm.io.files import atomic_write_dir, write_json, write_safetensors

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


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
