"""A sampling run, as ``scripts/sample.py`` makes it: a model loaded from a checkpoint, run folder, diffusers folder
or Hub id and prepared for sampling, then the output folder's missing images made by every rank (a round-robin
share each), and the grid and the .npz written by rank 0. The folder layout and the seeding are
:mod:`ddpm.evaluation.generate`'s."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..diffusion.sampling import default_inference_steps, sampler_timesteps
from ..diffusion.schedule import NoiseSchedule, ScheduleConfig
from ..io.pretrained import load_model
from ..models.unet import UNet, UNetConfig
from ..runtime.distributed import DistributedContext, barrier
from ..runtime.precision import Precision
from .generate import (
    GRID_NAME,
    IMAGES_FOLDER,
    NPZ_NAME,
    SETTINGS_NAME,
    Autocast,
    check_settings,
    generate_images,
    pending_indices,
    weights_digest,
    write_grid,
    write_npz,
    write_settings,
)


@dataclass(frozen=True)
class SamplingOptions:
    """scripts/sample.py's flags (see its ``--help``)."""

    model: str  # checkpoint folder, run folder, diffusers folder or Hub id
    output_dir: str
    num_images: int
    batch_size: int = 64  # per forward pass, per process
    sampler: str = "ddpm"
    num_inference_steps: int | None = None  # None: diffusion.sampling.default_inference_steps
    eta: float = 0.0
    timestep_spacing: str | None = None  # None: the model's scheduler config
    seed: int = 0
    save_npz: bool = False
    mixed_precision: str = "no"  # the network only; "auto": bf16 where the device computes it natively
    compile: bool = False
    device: str = "auto"  # for ``init_distributed``
    no_ema: bool = False  # the live weights of a checkpoint, not its EMA
    cache_dir: str | None = None  # Hugging Face cache folder for Hub ids


@dataclass(frozen=True)
class PreparedSampling:
    """The network ready to sample with (on its device, wrapped for compile / mixed precision), its noise schedule,
    and the settings the images are made with (what ``sampling.json`` records)."""

    model: nn.Module
    schedule: NoiseSchedule
    settings: dict[str, Any]


def _num_steps(options: SamplingOptions, schedule_config: ScheduleConfig) -> int:
    """The sampler's step count, checked against the schedule (ValueError naming --num_inference_steps)."""
    num_steps = options.num_inference_steps or default_inference_steps(options.sampler, schedule_config)
    try:
        sampler_timesteps(options.sampler, schedule_config, num_steps)
    except ValueError as e:
        raise ValueError(f"--num_inference_steps: {e}") from None
    return num_steps


def _settings(
    options: SamplingOptions,
    unet_config: UNetConfig,
    schedule_config: ScheduleConfig,
    state_dict: dict[str, torch.Tensor],
    num_steps: int,
    mixed_precision: str,
) -> dict[str, Any]:
    """Everything that changes the images (and only that, besides ``model``): a resumed run must match it."""
    return {
        "model": str(Path(options.model).resolve()) if Path(options.model).exists() else options.model,
        "weights_sha256": weights_digest(state_dict),
        "unet": unet_config.to_dict(),
        "schedule": schedule_config.to_dict(),
        "sampler": options.sampler,
        "num_inference_steps": num_steps,
        "eta": options.eta,
        "seed": options.seed,
        "mixed_precision": mixed_precision,  # as resolved: "auto" makes the images of what it chose
    }


def prepare_sampling(options: SamplingOptions, device: torch.device) -> PreparedSampling:
    """Load the model onto ``device`` and check the settings against the output folder's (OSError / ValueError)."""
    unet_config, schedule_config, state_dict = load_model(
        options.model, use_ema=not options.no_ema, cache_dir=options.cache_dir
    )
    if unet_config.in_channels not in (1, 3, 4):
        raise ValueError(
            f"{options.model}: the model makes {unet_config.in_channels}-channel images; PNG needs 1, 3 or 4"
        )
    if options.timestep_spacing is not None:
        schedule_config = dataclasses.replace(schedule_config, timestep_spacing=options.timestep_spacing)
    num_steps = _num_steps(options, schedule_config)
    precision = Precision.resolved(options.mixed_precision, device)
    precision.check_supported()
    unet = UNet(unet_config)
    unet.load_state_dict(state_dict)
    unet.requires_grad_(False).eval().to(device)
    model: nn.Module = unet
    if options.compile:  # on CUDA also captured as a CUDA graph: one launch per step instead of ~1,000 kernels
        model = torch.compile(unet, mode="reduce-overhead" if device.type == "cuda" else None)
    if precision.dtype is not None:
        model = Autocast(model, precision.dtype, config=unet_config)
    settings = _settings(options, unet_config, schedule_config, state_dict, num_steps, precision.name)
    check_settings(Path(options.output_dir) / SETTINGS_NAME, settings)
    return PreparedSampling(model, NoiseSchedule(schedule_config), settings)


def _generate_share(
    options: SamplingOptions, prepared: PreparedSampling, ctx: DistributedContext, pending: list[int]
) -> None:
    """This rank's round-robin share of ``pending``, with rank 0's progress bar counting everyone's images."""
    bar = tqdm(total=len(pending), unit="img", desc="sampling", disable=not ctx.is_main or not pending)

    def on_batch(n: int) -> None:
        # Round-robin shards advance in step, so rank 0's progress times the world size is everyone's.
        if ctx.is_main:
            bar.update(min(n * ctx.world_size, len(pending) - bar.n))

    with bar:
        generate_images(
            prepared.model,
            prepared.schedule,
            Path(options.output_dir) / IMAGES_FOLDER,
            pending[ctx.rank :: ctx.world_size],
            seed=options.seed,
            sampler=options.sampler,
            num_inference_steps=prepared.settings["num_inference_steps"],
            eta=options.eta,
            batch_size=options.batch_size,
            on_batch=on_batch,
        )


def sample_to_folder(options: SamplingOptions, prepared: PreparedSampling, ctx: DistributedContext) -> str | None:
    """Sample this rank's share of the missing images; rank 0 then writes the grid and the .npz and returns a line
    saying what was written (other ranks: None)."""
    output_dir = Path(options.output_dir)
    images_dir = output_dir / IMAGES_FOLDER
    images_dir.mkdir(parents=True, exist_ok=True)
    if ctx.is_main and not (output_dir / SETTINGS_NAME).is_file():
        write_settings(output_dir / SETTINGS_NAME, prepared.settings)
    pending = pending_indices(images_dir, options.num_images)
    barrier(ctx)  # every rank has listed the folder before any writes to it, so all agree on `pending`
    _generate_share(options, prepared, ctx, pending)
    barrier(ctx)
    if not ctx.is_main:
        return None
    write_grid(images_dir, options.num_images, output_dir / GRID_NAME)
    written = [f"{options.num_images} images in {images_dir} ({len(pending)} new)", f"grid {output_dir / GRID_NAME}"]
    if options.save_npz:
        written.append(f"array {write_npz(images_dir, options.num_images, output_dir / NPZ_NAME)}")
    return "wrote " + "; ".join(written)
