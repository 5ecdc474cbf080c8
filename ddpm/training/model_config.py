"""The model a run trains, from its settings: the UNet config at ``--resolution``, the noise schedule, the weights.

The UNet comes from ``--model_config_name_or_path`` (a JSON file, a folder holding config.json, a Hub id; default
train_unconditional's architecture) or ``--pretrained_model_name_or_path`` (whose weights are then the starting
point); its ``sample_size`` becomes ``--resolution``, which its down-sampling factor must divide. The ``--ddpm_*``,
``--prediction_type`` and ``--rescale_betas_zero_snr`` flags give the schedule; a pretrained model keeps its own
except for flags given a non-default value.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import torch

from ..diffusion.schedule import ScheduleConfig
from ..io.diffusers_format import unet_config_from_diffusers
from ..io.pretrained import load_model, read_unet_config
from ..models.unet import UNetConfig
from .config import DEFAULT_UNET, TrainConfig


def model_description(config: TrainConfig) -> tuple[UNetConfig, ScheduleConfig, dict[str, torch.Tensor] | None]:
    """The UNet config, the schedule config and the starting weights (None: a fresh initialisation)."""
    if config.pretrained_model_name_or_path is None:
        return unet_config(config), schedule_config(config), None
    unet, schedule, weights = load_model(config.pretrained_model_name_or_path, cache_dir=config.cache_dir)
    resized = resize_unet(unet.to_dict(), config.resolution, config.pretrained_model_name_or_path)
    return resized, schedule_config(config, schedule), weights


def unet_config(config: TrainConfig) -> UNetConfig:
    """The architecture to train (not for --pretrained_model_name_or_path), at ``sample_size=resolution``."""
    if config.model_config_name_or_path is None:
        return resize_unet(dict(DEFAULT_UNET), config.resolution, "the default train_unconditional UNet")
    try:
        path, values = read_unet_config(config.model_config_name_or_path, config.cache_dir)
    except ValueError as e:
        raise ValueError(f"--model_config_name_or_path={e}") from e
    return resize_unet(values, config.resolution, str(path))


def schedule_config(config: TrainConfig, base: ScheduleConfig | None = None) -> ScheduleConfig:
    """The noise schedule from the flags named above; with ``base`` (a pretrained model's), only non-default flags
    override it."""
    flags = {
        "num_train_timesteps": ("ddpm_num_steps", config.ddpm_num_steps),
        "beta_schedule": ("ddpm_beta_schedule", config.ddpm_beta_schedule),
        "prediction_type": ("prediction_type", config.prediction_type),
        "variance_type": ("ddpm_variance_type", config.ddpm_variance_type),
        "rescale_betas_zero_snr": ("rescale_betas_zero_snr", config.rescale_betas_zero_snr),
    }
    if base is None:
        return ScheduleConfig(**{key: value for key, (_, value) in flags.items()})
    defaults = {f.name: f.default for f in fields(config)}
    changed = {key: value for key, (flag, value) in flags.items() if value != defaults[flag]}
    return ScheduleConfig(**{**base.to_dict(), **changed})


def resize_unet(values: dict[str, Any], resolution: int, source: str) -> UNetConfig:
    """The UNet config ``values`` at ``sample_size=resolution``, checked for training (1 or 3 channels in and out)."""
    # A placeholder size every architecture divides, so that the --resolution check below can name the flag.
    unet = unet_config_from_diffusers({**values, "sample_size": 2**16}, source)
    factor = unet.downsampling_factor
    if resolution % factor:
        raise ValueError(
            f"--resolution={resolution} must be divisible by {factor}, the down-sampling factor of {source} "
            f"({len(unet.block_out_channels)} blocks)"
        )
    unet = UNetConfig.from_dict({**unet.to_dict(), "sample_size": resolution})
    if unet.in_channels not in (1, 3) or unet.out_channels != unet.in_channels:
        raise ValueError(
            f"{source}: in_channels={unet.in_channels}, out_channels={unet.out_channels}; training needs 1 "
            "(grayscale) or 3 (RGB) channels, the same in and out"
        )
    return unet
