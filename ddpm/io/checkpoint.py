"""Training checkpoints: a self-describing folder, written atomically, read without unpickling.

Layout of ``checkpoint-N/``::

    config.json          {"format": "ddpm-checkpoint", "version": 1, "step": N,
                          "unet": UNetConfig, "schedule": ScheduleConfig, "run": the run's flags (no token)}
    model.safetensors    live weights, keyed exactly like a diffusers UNet2DModel state dict
    ema.safetensors      EMA weights (runs with EMA only)
    training_state.pt    optimizer, LR scheduler, GradScaler, EMA counters, position in the data stream
    rng_state_{rank}.pt  each rank's RNG states

``config.json`` is written last inside a temporary folder that is then renamed, so a folder named ``checkpoint-N``
is always complete; a crash mid-write leaves only a ``.tmp-*`` folder that nothing picks up (and that the next run
removes, see :func:`remove_interrupted_saves`). Rotation renames a folder away before deleting it, for the same reason.
"""

from __future__ import annotations

import logging
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..diffusion.schedule import ScheduleConfig
from ..models.unet import UNetConfig
from .files import (
    atomic_write_dir,
    read_json,
    read_safetensors,
    read_torch_state,
    replaced_dir_name,
    replaced_dir_original,
    write_json,
    write_safetensors,
    write_torch_state,
)

logger = logging.getLogger(__name__)

FORMAT = "ddpm-checkpoint"
VERSION = 1
CONFIG_NAME = "config.json"
MODEL_NAME = "model.safetensors"
EMA_NAME = "ema.safetensors"
STATE_NAME = "training_state.pt"


def is_checkpoint(path: str | Path) -> bool:
    """True for a complete training checkpoint folder."""
    path = Path(path)
    return (path / CONFIG_NAME).is_file() and (path / MODEL_NAME).is_file()


def is_training_checkpoint(path: str | Path) -> bool:
    """True for a complete checkpoint that a run can resume from (:func:`is_checkpoint` plus the training state)."""
    return is_checkpoint(path) and (Path(path) / STATE_NAME).is_file()


def checkpoint_step(path: str | Path) -> int | None:
    """N for a folder named ``checkpoint-N``, else None."""
    prefix, _, number = Path(path).name.partition("-")
    return int(number) if prefix == "checkpoint" and number.isdigit() else None


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete ``checkpoint-N`` folders in ``output_dir``, oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir() if checkpoint_step(p) is not None and is_checkpoint(p)]
    return sorted(found, key=lambda p: checkpoint_step(p))


def missing_files(checkpoint: str | Path, resumable: bool = True) -> list[str]:
    """The files a complete checkpoint has that ``checkpoint`` lacks (the training state only when ``resumable``)."""
    names = (CONFIG_NAME, MODEL_NAME, STATE_NAME) if resumable else (CONFIG_NAME, MODEL_NAME)
    return [name for name in names if not (Path(checkpoint) / name).is_file()]


def latest_checkpoint(folder: str | Path, *, resumable: bool = False) -> Path | None:
    """The newest complete ``checkpoint-N`` in ``folder`` (``resumable``: with its training state too), or None.

    A newer folder named ``checkpoint-N`` that lacks files (copied or deleted by hand) is skipped with a warning
    naming what it lacks; interrupted saves never carry that name (see the module docstring).
    """
    folder = Path(folder)
    named = [p for p in folder.glob("checkpoint-*") if checkpoint_step(p) is not None and p.is_dir()]
    for candidate in sorted(named, key=checkpoint_step, reverse=True):
        lacking = missing_files(candidate, resumable)
        if not lacking:
            return candidate
        logger.warning("skipping the incomplete checkpoint %s (it lacks %s)", candidate, ", ".join(lacking))
    return None


def find_checkpoint(path: str | Path) -> Path:
    """``path`` itself when it is a training checkpoint, else the latest ``checkpoint-N`` inside it."""
    path = Path(path)
    if is_checkpoint(path):
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise FileNotFoundError(f"{path}: not a training checkpoint, and no checkpoint-N folder inside it")
    return latest


def read_checkpoint_config(path: str | Path) -> dict[str, Any]:
    """The checkpoint's ``config.json``, checked for format and version."""
    config = read_json(Path(path) / CONFIG_NAME)
    if config.get("format") != FORMAT:
        raise ValueError(
            f"{Path(path) / CONFIG_NAME}: not a ddpm training checkpoint (format={config.get('format')!r})"
        )
    if config.get("version") != VERSION:
        raise ValueError(f"{Path(path) / CONFIG_NAME}: unsupported checkpoint version {config.get('version')!r}")
    return config


def load_checkpoint_model(
    path: str | Path, use_ema: bool = True
) -> tuple[UNetConfig, ScheduleConfig, dict[str, torch.Tensor], dict[str, Any]]:
    """The model of a training checkpoint: configs, weights (EMA when present and asked for) and its config.json."""
    path = Path(path)
    config = read_checkpoint_config(path)
    try:
        unet_config = UNetConfig.from_dict(config["unet"])
        schedule_config = ScheduleConfig.from_dict(config["schedule"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path / CONFIG_NAME}: bad model description: {e}") from e
    return unet_config, schedule_config, read_safetensors(model_weights_file(path, use_ema)), config


def model_weights_file(path: str | Path, use_ema: bool = True) -> Path:
    """The weights a checkpoint's model is: the EMA weights when asked for and present, the live ones otherwise."""
    path = Path(path)
    return path / EMA_NAME if use_ema and (path / EMA_NAME).is_file() else path / MODEL_NAME


# ---------------------------------------------------------------------------------------------------- training state

RNG_PATTERN = "rng_state_{rank}.pt"


def capture_rng_state() -> dict[str, Any]:
    """This process's Python, NumPy, torch CPU and CUDA RNG states, as plain tensors and containers."""
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state` (CUDA states only when this process has as many devices)."""
    random.setstate(_as_python_random_state(state["python"]))
    np_state = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": "MT19937",
            "state": {"key": np_state["key"].numpy().astype(np.uint32), "pos": np_state["pos"]},
            "has_gauss": np_state["has_gauss"],
            "gauss": np_state["gauss"],
        }
    )
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def _as_python_random_state(value: Any) -> tuple:
    """``random.setstate`` wants tuples; a round trip through some serialisers turns them into lists."""
    version, internal, gauss = value
    return int(version), tuple(int(v) for v in internal), gauss


@dataclass
class TrainingCheckpoint:
    """Everything :func:`save_training_checkpoint` wrote, read back on the CPU."""

    path: Path
    config: dict[str, Any]  # config.json: step, unet, schedule, run
    model_state: dict[str, torch.Tensor]
    ema_state: dict[str, torch.Tensor] | None
    training_state: dict[str, Any]
    rng_states: dict[int, dict[str, Any]]  # rank -> capture_rng_state()

    @property
    def step(self) -> int:
        return int(self.config["step"])


def save_training_checkpoint(
    path: str | Path,
    *,
    step: int,
    unet_config: UNetConfig,
    schedule_config: ScheduleConfig,
    run_config: dict[str, Any],
    model_state: dict[str, torch.Tensor],
    training_state: dict[str, Any],
    rng_states: list[dict[str, Any]],
    ema_state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write the checkpoint folder ``path`` atomically (see the module docstring for the layout).

    ``training_state`` must hold only tensors, numbers, strings and containers of them (optimizer, LR scheduler and
    GradScaler ``state_dict()``s do) so that it loads with ``weights_only=True``; ``rng_states[r]`` is rank r's
    :func:`capture_rng_state`. ``run_config`` must not contain secrets: it is written as is.
    """
    path = Path(path)
    with atomic_write_dir(path) as tmp:
        write_safetensors(model_state, tmp / MODEL_NAME)
        if ema_state is not None:
            write_safetensors(ema_state, tmp / EMA_NAME)
        write_torch_state(training_state, tmp / STATE_NAME)
        for rank, rng in enumerate(rng_states):
            write_torch_state(rng, tmp / RNG_PATTERN.format(rank=rank))
        # config.json last: its presence marks a complete checkpoint (is_checkpoint)
        write_json(
            {
                "format": FORMAT,
                "version": VERSION,
                "step": int(step),
                "unet": unet_config.to_dict(),
                "schedule": schedule_config.to_dict(),
                "run": run_config,
            },
            tmp / CONFIG_NAME,
        )
    return path


def load_training_checkpoint(path: str | Path) -> TrainingCheckpoint:
    """Read a folder written by :func:`save_training_checkpoint`; errors name the file at fault."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint folder {path} does not exist")
    config = read_checkpoint_config(path)
    for key in ("step", "unet", "schedule", "run"):
        if key not in config:
            raise ValueError(f"{path / CONFIG_NAME}: missing key {key!r}")
    training_state = read_torch_state(path / STATE_NAME)
    if not isinstance(training_state, dict):
        raise ValueError(f"{path / STATE_NAME}: expected a dict, found {type(training_state).__name__}")
    rng_states = {}
    for file in path.glob(RNG_PATTERN.format(rank="*")):
        rank = file.stem.rpartition("_")[2]
        if rank.isdigit():
            rng_states[int(rank)] = read_torch_state(file)
    ema_path = path / EMA_NAME
    return TrainingCheckpoint(
        path=path,
        config=config,
        model_state=read_safetensors(path / MODEL_NAME),
        ema_state=read_safetensors(ema_path) if ema_path.is_file() else None,
        training_state=training_state,
        rng_states=rng_states,
    )


def rotate_checkpoints(output_dir: str | Path, limit: int | None, keep: str | Path | None = None) -> list[Path]:
    """Delete the oldest ``checkpoint-N`` folders of ``output_dir`` so that at most ``limit`` remain, never ``keep``.

    Called after a save, with ``keep`` the checkpoint just saved (the guide's script deletes before saving: the same
    folders survive, but a failed save there leaves one checkpoint fewer). ``keep`` matters when a run resumed from
    an older checkpoint while newer ones exist: by step number alone, the checkpoint just saved would be among the
    oldest. Leftover ``.tmp-checkpoint-*`` folders of interrupted saves go too. Returns the deleted paths.
    """
    if limit is None:
        return []
    if limit < 1:
        raise ValueError(f"checkpoints_total_limit={limit} must be >= 1")
    leftovers = remove_interrupted_saves(output_dir)
    kept = Path(keep).resolve() if keep is not None else None
    others = [p for p in list_checkpoints(output_dir) if p.resolve() != kept]
    removed = others[: max(0, len(others) + (kept is not None) - limit)]
    for stale in removed:
        # Renamed first: a crash halfway through rmtree must not leave a half-deleted folder named checkpoint-N.
        doomed = stale.with_name(f".tmp-{stale.name}-deleting")
        stale.rename(doomed)
        shutil.rmtree(doomed, ignore_errors=True)
    return removed + leftovers


def remove_interrupted_saves(output_dir: str | Path) -> list[Path]:
    """Delete the ``.tmp-checkpoint-*`` folders that saves (or rotations) killed midway left in ``output_dir``.

    Only one process writes checkpoints to an output folder, so any such folder there is garbage, never a save in
    progress. A save that replaced a ``checkpoint-N`` and was killed between its two renames left the old folder
    aside and no ``checkpoint-N``: it is put back. Returns the deleted paths.
    """
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = sorted(p for p in output_dir.glob(".tmp-checkpoint-*") if p.is_dir())
    for aside in sorted(p for p in output_dir.glob(replaced_dir_name("checkpoint-*")) if p.is_dir()):
        original = output_dir / replaced_dir_original(aside.name)
        if original.exists():
            found.append(aside)  # the save completed: the old folder is garbage
        else:
            aside.rename(original)
            logger.warning("restored %s, set aside by a checkpoint save that was interrupted", original)
    for stale in found:
        shutil.rmtree(stale, ignore_errors=True)
    return found


# ---------------------------------------------------------------------------------------------------- comparison

# The training_state entries that say where a run stands in its data stream; checkpoint_differences compares them.
TRAINING_POSITION_KEYS = ("global_step", "epoch", "step_in_epoch", "samples_seen", "skipped_steps")


def checkpoint_differences(a: str | Path, b: str | Path) -> list[str]:
    """What differs between two training checkpoints; empty when they hold bit-equal live weights, EMA weights,
    optimizer state and data position (:data:`TRAINING_POSITION_KEYS`).

    Each entry names one thing: ``model.<key>`` / ``ema.<key>`` (a tensor), ``optimizer.<param>.<key>``, a position
    key, or ``<what>: different keys`` / ``ema: only in one`` / ``optimizer: different parameters``.
    """
    ca, cb = load_training_checkpoint(a), load_training_checkpoint(b)
    differences: list[str] = []
    for what, ta, tb in (("model", ca.model_state, cb.model_state), ("ema", ca.ema_state, cb.ema_state)):
        if ta is None or tb is None:
            differences += [f"{what}: only in one"] if (ta is None) != (tb is None) else []
            continue
        if ta.keys() != tb.keys():
            differences.append(f"{what}: different keys")
        differences += [f"{what}.{k}" for k in ta if k in tb and not torch.equal(ta[k], tb[k])]
    sa, sb = ca.training_state["optimizer"]["state"], cb.training_state["optimizer"]["state"]
    if sa.keys() != sb.keys():
        differences.append("optimizer: different parameters")
    differences += [
        f"optimizer.{i}.{k}" for i in sa.keys() & sb.keys() for k in sa[i] if not torch.equal(sa[i][k], sb[i][k])
    ]
    differences += [k for k in TRAINING_POSITION_KEYS if ca.training_state.get(k) != cb.training_state.get(k)]
    return differences
