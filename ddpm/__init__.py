"""ddpm: train unconditional image diffusion models in pure PyTorch, from one CPU to many GPUs, and hand the result
to diffusers (``DDPMPipeline.from_pretrained``) and the Hugging Face Hub."""

from .diffusion.dpm_solver import dpm_solver_sample
from .diffusion.samplers import ddim_sample, ddpm_sample, ddpm_step, inference_timesteps
from .diffusion.schedule import NoiseSchedule, ScheduleConfig
from .io.images import make_grid, save_grid, to_uint8
from .io.pretrained import load_model, load_unet_config
from .models.ema import EMA
from .models.unet import UNet, UNetConfig

__version__ = "0.1.0"

__all__ = [
    "EMA",
    "NoiseSchedule",
    "ScheduleConfig",
    "UNet",
    "UNetConfig",
    "ddim_sample",
    "ddpm_sample",
    "ddpm_step",
    "dpm_solver_sample",
    "inference_timesteps",
    "load_model",
    "load_unet_config",
    "make_grid",
    "save_grid",
    "to_uint8",
]
