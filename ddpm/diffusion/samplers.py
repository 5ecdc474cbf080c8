"""Samplers: ancestral DDPM and DDIM, diffusers-exact.

:func:`ddpm_sample` draws its random numbers in the same order and with the same arithmetic as diffusers'
``DDPMPipeline`` + ``DDPMScheduler`` (one ``randn`` for the initial noise, then one per step with ``t > 0``), so the
same weights and the same ``torch.Generator`` seed give the same images. :func:`ddim_sample` matches
``DDIMScheduler`` (``set_alpha_to_one=True``) in the same way.

Like diffusers' pipelines, the samplers also take a list of generators, one per image: each image then draws its
own noise from its own stream, so an image does not depend on which batch it was sampled in.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from .schedule import NoiseSchedule, ScheduleConfig

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Generators = torch.Generator | list[torch.Generator] | None


def inference_timesteps(config: ScheduleConfig, num_inference_steps: int) -> list[int]:
    """The descending timesteps a sampler visits, as ``DDPMScheduler.set_timesteps`` spaces them."""
    t_max = config.num_train_timesteps
    if not 1 <= num_inference_steps <= t_max:
        raise ValueError(f"num_inference_steps={num_inference_steps} must be in [1, num_train_timesteps={t_max}]")
    if config.timestep_spacing == "linspace":
        steps = np.linspace(0, t_max - 1, num_inference_steps).round()[::-1]
    elif config.timestep_spacing == "leading":
        steps = (np.arange(num_inference_steps) * (t_max // num_inference_steps)).round()[::-1] + config.steps_offset
    else:  # trailing
        steps = np.round(np.arange(t_max, 0, -t_max / num_inference_steps)) - 1
    check_first_timestep(int(steps[0]), config, num_inference_steps)
    return [int(t) for t in steps.astype(np.int64)]


def check_first_timestep(first: int, config: ScheduleConfig, num_inference_steps: int) -> None:
    """A ValueError when "leading" spacing shifted by ``steps_offset`` (as DDIM-made scheduler configs have) starts
    past the last timestep, where diffusers' schedulers fail indexing their tables."""
    if first >= config.num_train_timesteps:
        raise ValueError(
            f"num_inference_steps={num_inference_steps} with steps_offset={config.steps_offset} would start at "
            f"timestep {first}, past the last one ({config.num_train_timesteps - 1}): use fewer steps"
        )


def _predict_x0_eps(
    schedule: NoiseSchedule, model_output: torch.Tensor, x_t: torch.Tensor, ab_t: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x0 and epsilon implied by the model output (epsilon is computed lazily by DDIM only)."""
    kind = schedule.config.prediction_type
    if kind == "epsilon":
        return (x_t - (1 - ab_t) ** 0.5 * model_output) / ab_t**0.5, model_output
    if kind == "v_prediction":
        return ab_t**0.5 * x_t - (1 - ab_t) ** 0.5 * model_output, ab_t**0.5 * model_output + (1 - ab_t) ** 0.5 * x_t
    return model_output, None


def _clip(schedule: NoiseSchedule, x0: torch.Tensor) -> torch.Tensor:
    cfg = schedule.config
    return x0.clamp(-cfg.clip_sample_range, cfg.clip_sample_range) if cfg.clip_sample else x0


def _initial_noise(
    shape: tuple[int, ...], generator: Generators, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """``randn`` on the generator's device, then moved, as diffusers' ``randn_tensor`` does.

    A list holds one generator per item of the batch: each draws its own item, and the items are concatenated.
    """
    if isinstance(generator, list):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}; pass one per image")
        gen_device = generator[0].device
        items = [torch.randn((1, *shape[1:]), generator=g, device=gen_device, dtype=dtype) for g in generator]
        return torch.cat(items).to(device)
    gen_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gen_device, dtype=dtype).to(device)


def _randn_like(x: torch.Tensor, generator: Generators) -> torch.Tensor:
    return _initial_noise(tuple(x.shape), generator, x.device, x.dtype)


def _image_shape(model: torch.nn.Module, batch_size: int) -> tuple[int, int, int, int]:
    cfg = model.config
    return (batch_size, cfg.in_channels, cfg.sample_size, cfg.sample_size)


def _model_device_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters())
    return p.device, p.dtype


@torch.no_grad()
def ddpm_sample(
    model: torch.nn.Module,
    schedule: NoiseSchedule,
    batch_size: int,
    *,
    num_inference_steps: int | None = None,
    generator: Generators = None,
) -> torch.Tensor:
    """Ancestral DDPM sampling; returns images in [-1, 1] (not clamped), shaped ``[B, C, H, W]``.

    ``num_inference_steps`` defaults to the number of training steps; fewer gives respaced DDPM over
    :func:`inference_timesteps`. The model runs on its own device and dtype.
    """
    device, dtype = _model_device_dtype(model)
    steps = inference_timesteps(schedule.config, num_inference_steps or schedule.num_train_timesteps)
    x = _initial_noise(_image_shape(model, batch_size), generator, device, dtype)
    model_timesteps = torch.tensor(steps).to(device, non_blocking=True)  # one copy to the device, not one per step
    for i, t in enumerate(steps):
        prev_t = steps[i + 1] if i + 1 < len(steps) else -1
        x = ddpm_step(schedule, model(x, model_timesteps[i]), t, prev_t, x, generator)
    return x


def ddpm_step(
    schedule: NoiseSchedule,
    out: torch.Tensor,
    t: int,
    prev_t: int,
    x: torch.Tensor,
    generator: Generators = None,
) -> torch.Tensor:
    """One ancestral step from ``t`` to ``prev_t`` (-1 after the last) over the possibly respaced grid.

    Across a skipped interval the effective beta is ``1 - abar_t / abar_prev`` (respaced DDPM).
    """
    ab_t = schedule.alphas_cumprod[t]
    ab_prev = schedule.alphas_cumprod[prev_t] if prev_t >= 0 else torch.tensor(1.0)
    alpha_t = ab_t / ab_prev
    beta_t = 1 - alpha_t
    x0 = _clip(schedule, _predict_x0_eps(schedule, out, x, ab_t)[0])
    mean = (ab_prev**0.5 * beta_t) / (1 - ab_t) * x0 + alpha_t**0.5 * (1 - ab_prev) / (1 - ab_t) * x
    if t == 0:
        return mean
    noise = _randn_like(out, generator)
    variance = torch.clamp((1 - ab_prev) / (1 - ab_t) * beta_t, min=1e-20)
    if schedule.config.variance_type == "fixed_large":
        variance = beta_t
    return mean + variance**0.5 * noise


@torch.no_grad()
def ddim_sample(
    model: torch.nn.Module,
    schedule: NoiseSchedule,
    batch_size: int,
    *,
    num_inference_steps: int = 50,
    eta: float = 0.0,
    generator: Generators = None,
) -> torch.Tensor:
    """DDIM sampling (``eta=0`` deterministic, ``eta=1`` DDPM-like); returns images in [-1, 1]."""
    if eta < 0:
        raise ValueError(f"eta={eta} must be >= 0")
    device, dtype = _model_device_dtype(model)
    steps = inference_timesteps(schedule.config, num_inference_steps)
    ratio = schedule.num_train_timesteps // num_inference_steps
    x = _initial_noise(_image_shape(model, batch_size), generator, device, dtype)
    model_timesteps = torch.tensor(steps).to(device, non_blocking=True)  # one copy to the device, not one per step
    for i, t in enumerate(steps):
        out = model(x, model_timesteps[i])
        prev_t = t - ratio  # DDIMScheduler's rule, whatever the spacing
        ab_t = schedule.alphas_cumprod[t]
        ab_prev = schedule.alphas_cumprod[prev_t] if prev_t >= 0 else torch.tensor(1.0)
        x0, eps = _predict_x0_eps(schedule, out, x, ab_t)
        if eps is None:  # sample prediction
            eps = (x - ab_t**0.5 * x0) / (1 - ab_t) ** 0.5
        x0 = _clip(schedule, x0)
        std = eta * ((1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev)) ** 0.5
        x = ab_prev**0.5 * x0 + (1 - ab_prev - std**2) ** 0.5 * eps
        if eta > 0:
            x = x + std * _randn_like(out, generator)
    return x
