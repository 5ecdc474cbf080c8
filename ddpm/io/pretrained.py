"""Load a model from anything it may come as: our checkpoints and runs, diffusers folders, or the Hub.

:func:`load_model` accepts, in this order of detection:

1. a training checkpoint folder (``checkpoint-N/``): its EMA weights when ``use_ema`` and present;
2. a folder with ``model_index.json``: a diffusers pipeline (``unet/`` + ``scheduler/``, or the early flat layout
   with ``config.json`` + ``scheduler_config.json`` at the root). A run's output folder is one of these once the run
   has exported: **the exported pipeline wins over the run's checkpoints**, since it is what the run saved as its
   result (the EMA weights when EMA was used). Only ``use_ema=False`` sends a run folder to its latest checkpoint's
   live weights, which the pipeline does not hold;
3. a run folder without an export yet: its latest ``checkpoint-N``;
4. a folder with ``unet/config.json`` but neither ``model_index.json`` nor ``scheduler/`` (a train_unconditional
   ``checkpoint-N`` saved by accelerate): ``unet_ema/`` when ``use_ema`` and present, else ``unet/``. With
   ``scheduler/`` it is an interrupted export (see :mod:`ddpm.io.export`) and refused;
5. a bare ``UNet2DModel`` folder (``config.json`` + weights; ``scheduler_config.json`` beside it if present);
6. otherwise a Hub id ``owner/name``, fetched with ``huggingface_hub.snapshot_download`` (only the files needed,
   honouring ``cache_dir``, the HF cache and ``HF_HUB_OFFLINE``).

Without a scheduler config (cases 4 and 5) the schedule is ``DDPMScheduler``'s defaults (linear 1e-4..0.02,
T=1000, epsilon, fixed_small, clipped), which is also what diffusers would use; a warning says so.

Weights: ``diffusion_pytorch_model.safetensors``, sharded safetensors with their ``.index.json``, legacy ``.bin``
(``torch.load(weights_only=True)``), or a single variant file (``.fp16.safetensors``) when there is nothing else.
Tensors keep their stored dtype. Old attention names (``query/key/value/proj_attn``) are renamed and 1x1-conv-shaped
attention weights squeezed to the linear weights they are; the result must then match the config exactly, or the
error names the tensor.

Old configs (keys missing from early ``UNet2DModel`` and ``DDPMScheduler`` releases, renamed scheduler keys) are read
by the rules of :mod:`ddpm.io.diffusers_format`, whose docstring gives the research behind them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import huggingface_hub
import torch
from huggingface_hub.utils import LocalEntryNotFoundError, RepositoryNotFoundError

from ..diffusion.schedule import ScheduleConfig
from ..models.unet import UNetConfig
from .checkpoint import is_checkpoint, latest_checkpoint, load_checkpoint_model
from .diffusers_format import (
    EMA_UNET_FOLDER,
    MODEL_INDEX_NAME,
    SCHEDULER_CONFIG_NAME,
    SCHEDULER_CONFIG_PATHS,
    SCHEDULER_FOLDER,
    UNET_CONFIG_NAME,
    UNET_CONFIG_PATHS,
    UNET_FOLDER,
    WEIGHTS_STEM,
    check_model_index,
    convert_legacy_state_dict,
    schedule_config_from_diffusers,
    unet_config_from_diffusers,
    validate_state_dict,
)
from .files import read_json, read_safetensors, read_torch_state
from .hub import is_hub_id

logger = logging.getLogger(__name__)


def load_model(
    path_or_id: str | Path, use_ema: bool = True, cache_dir: str | Path | None = None
) -> tuple[UNetConfig, ScheduleConfig, dict[str, torch.Tensor]]:
    """UNet config, schedule config and weights (diffusers key names) from any supported source (module docstring).

    ``use_ema`` picks EMA weights where a source holds both; ``cache_dir`` is the Hub cache for Hub ids.
    Raises FileNotFoundError when nothing is found, ValueError for something found but not representable.
    """
    path = Path(path_or_id)
    if not path.exists():
        if not is_hub_id(str(path_or_id)):
            raise FileNotFoundError(f"{path_or_id}: no such folder (and not a Hub repo id of the form owner/name)")
        path = download(str(path_or_id), cache_dir=cache_dir)
    elif not path.is_dir():
        raise ValueError(f"{path}: expected a folder (checkpoint, run, diffusers pipeline or UNet2DModel folder)")
    unet_config, schedule_config, state_dict = _load_local(path, use_ema)
    validate_state_dict(unet_config, state_dict, str(path))
    return unet_config, schedule_config, state_dict


def _load_local(path: Path, use_ema: bool) -> tuple[UNetConfig, ScheduleConfig, dict[str, torch.Tensor]]:
    if is_checkpoint(path):
        return _load_checkpoint(path, use_ema)
    latest = latest_checkpoint(path)
    if (path / MODEL_INDEX_NAME).is_file():
        if not use_ema and latest is not None:
            logger.info("use_ema=False: loading the live weights of %s, not the exported pipeline", latest)
            return _load_checkpoint(latest, use_ema)
        return load_pipeline_folder(path)
    if latest is not None:
        return _load_checkpoint(latest, use_ema)
    if (path / UNET_FOLDER / UNET_CONFIG_NAME).is_file():
        if (path / SCHEDULER_FOLDER).is_dir():
            raise ValueError(
                f"{path}: unet/ and scheduler/ but no {MODEL_INDEX_NAME}: an interrupted export? Export it again"
            )
        ema = path / EMA_UNET_FOLDER
        unet_config, state_dict = load_unet_folder(
            ema if use_ema and (ema / UNET_CONFIG_NAME).is_file() else path / UNET_FOLDER
        )
        return unet_config, _default_schedule(path), state_dict
    if (path / UNET_CONFIG_NAME).is_file():
        unet_config, state_dict = load_unet_folder(path)
        scheduler_config = path / SCHEDULER_CONFIG_NAME  # the early flat layout keeps it beside config.json
        if not scheduler_config.is_file():
            return unet_config, _default_schedule(path), state_dict
        return unet_config, schedule_config_from_diffusers(read_json(scheduler_config), str(path)), state_dict
    raise FileNotFoundError(
        f"{path}: not a training checkpoint, run folder, diffusers pipeline or UNet2DModel folder "
        f"(no {MODEL_INDEX_NAME}, config.json, {UNET_FOLDER}/{UNET_CONFIG_NAME} or checkpoint-N inside)"
    )


def _load_checkpoint(path: Path, use_ema: bool) -> tuple[UNetConfig, ScheduleConfig, dict[str, torch.Tensor]]:
    logger.info("loading training checkpoint %s", path)
    unet_config, schedule_config, state_dict, _ = load_checkpoint_model(path, use_ema=use_ema)
    return unet_config, schedule_config, state_dict


def _default_schedule(path: Path) -> ScheduleConfig:
    logger.warning("%s has no scheduler config: using DDPMScheduler's default schedule", path)
    return ScheduleConfig()


def load_pipeline_folder(path: Path) -> tuple[UNetConfig, ScheduleConfig, dict[str, torch.Tensor]]:
    """A diffusers DDPM pipeline folder (``unet/`` + ``scheduler/`` subfolders, or the early flat layout)."""
    index_path = path / MODEL_INDEX_NAME
    check_model_index(read_json(index_path), str(index_path))
    flat = not (path / UNET_FOLDER).is_dir() and (path / UNET_CONFIG_NAME).is_file()
    unet_folder = path if flat else path / UNET_FOLDER
    scheduler_config = path / SCHEDULER_CONFIG_NAME if flat else path / SCHEDULER_FOLDER / SCHEDULER_CONFIG_NAME
    logger.info("loading diffusers pipeline %s", path)
    unet_config, state_dict = load_unet_folder(unet_folder)
    schedule_config = schedule_config_from_diffusers(read_json(scheduler_config), str(scheduler_config))
    return unet_config, schedule_config, state_dict


def load_unet_folder(folder: Path) -> tuple[UNetConfig, dict[str, torch.Tensor]]:
    """Config and weights of a diffusers ``UNet2DModel`` folder, legacy names and shapes converted."""
    config_path = folder / UNET_CONFIG_NAME
    unet_config = unet_config_from_diffusers(read_json(config_path), str(config_path))
    return unet_config, convert_legacy_state_dict(read_unet_weights(folder))


def read_unet_config(spec: str | Path, cache_dir: str | Path | None = None) -> tuple[Path, dict[str, Any]]:
    """(file, dict) of a UNet config given as a JSON file (ours or diffusers'), a folder holding ``config.json`` or
    ``unet/config.json``, or a Hub model id (only the config is downloaded)."""
    path = Path(spec)
    if path.is_dir():
        found = next((path / name for name in UNET_CONFIG_PATHS if (path / name).is_file()), None)
        if found is None:
            raise ValueError(f"{spec!r}: no {' or '.join(UNET_CONFIG_PATHS)} in it")
        path = found
    elif not path.exists():
        if not is_hub_id(str(spec)):
            raise ValueError(f"{spec!r}: no such file or folder")
        path = _download_unet_config(str(spec), cache_dir)
    return path, read_json(path)


def _download_unet_config(repo_id: str, cache_dir: str | Path | None) -> Path:
    errors = []
    for name in UNET_CONFIG_PATHS:
        try:
            return Path(huggingface_hub.hf_hub_download(repo_id, name, cache_dir=cache_dir))
        except Exception as e:  # not found, offline, no network: try the next layout, then report all
            errors.append(f"{name}: {type(e).__name__}: {e}")
    raise ValueError(f"{repo_id!r}: not a local path, and the Hub gave: {errors}")


def load_unet_config(spec: str | Path, cache_dir: str | Path | None = None) -> UNetConfig:
    """The :class:`UNetConfig` of :func:`read_unet_config`'s source, validated; errors name the file."""
    path, values = read_unet_config(spec, cache_dir)
    return unet_config_from_diffusers(values, str(path))


def read_unet_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The UNet tensors of a diffusers model folder, from whichever weights file(s) it has (safetensors first)."""
    for suffix in ("safetensors", "bin"):
        single, index = folder / f"{WEIGHTS_STEM}.{suffix}", folder / f"{WEIGHTS_STEM}.{suffix}.index.json"
        if single.is_file():
            return _read_weights_file(single)
        if index.is_file():
            return _read_sharded(index)
    variants = sorted(folder.glob(f"{WEIGHTS_STEM}.*.safetensors")) or sorted(folder.glob(f"{WEIGHTS_STEM}.*.bin"))
    if len(variants) == 1:
        logger.info("using the only weights file %s", variants[0])
        return _read_weights_file(variants[0])
    found = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    raise FileNotFoundError(
        f"{folder}: no {WEIGHTS_STEM}.safetensors, .bin or sharded index (found {found[:10]}"
        + (", several variants: pick one by removing the others" if variants else "")
        + ")"
    )


def _read_weights_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    state = read_torch_state(path)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: not a state dict of tensors")
    return state


def _read_sharded(index_path: Path) -> dict[str, torch.Tensor]:
    weight_map = read_json(index_path).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index_path}: no weight_map")
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        tensors.update(_read_weights_file(index_path.parent / shard))
    missing = sorted(set(weight_map) - set(tensors))
    if missing:
        raise ValueError(f"{index_path}: tensors listed in weight_map are not in their shards, e.g. {missing[:5]}")
    return {k: tensors[k] for k in weight_map}


def download(repo_id: str, cache_dir: str | Path | None = None) -> Path:
    """Fetch the configs and one kind of UNet weights of a Hub model, in the order :func:`read_unet_weights` reads
    them: safetensors if it has them, else ``.bin``, else a variant's safetensors (a model exported in fp16 or bf16
    has only ``diffusion_pytorch_model.fp16.safetensors``)."""
    configs = [MODEL_INDEX_NAME, *UNET_CONFIG_PATHS, *SCHEDULER_CONFIG_PATHS]

    def in_both_layouts(names: list[str]) -> list[str]:  # a pipeline's unet/ or a bare model's root
        return names + [f"{UNET_FOLDER}/{name}" for name in names]

    def weights(suffix: str) -> list[str]:
        return in_both_layouts(
            [f"{WEIGHTS_STEM}.{suffix}", f"{WEIGHTS_STEM}.{suffix}.index.json", f"{WEIGHTS_STEM}-*.{suffix}"]
        )

    for names in (weights("safetensors"), weights("bin"), in_both_layouts([f"{WEIGHTS_STEM}.*.safetensors"])):
        folder = _snapshot(repo_id, configs + names, cache_dir)
        if any(any(folder.glob(name)) for name in names):
            break
    return folder


def _snapshot(repo_id: str, allow_patterns: list[str], cache_dir: str | Path | None) -> Path:
    try:
        return Path(huggingface_hub.snapshot_download(repo_id, cache_dir=cache_dir, allow_patterns=allow_patterns))
    except LocalEntryNotFoundError as e:
        raise FileNotFoundError(
            f"{repo_id}: not a local folder, and not in the Hugging Face cache"
            f"{f' {cache_dir}' if cache_dir else ''} while the Hub cannot be reached (offline mode "
            f"HF_HUB_OFFLINE={int(huggingface_hub.constants.HF_HUB_OFFLINE)}, or no connection): {e}"
        ) from e
    except RepositoryNotFoundError as e:
        raise FileNotFoundError(
            f"{repo_id}: no such model on the Hub (or it is private/gated: log in or set HF_TOKEN)"
        ) from e
