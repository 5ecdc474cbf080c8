"""Every sampler by name: :data:`SAMPLERS`, their default step counts and :func:`sample`, which the sample grids,
``scripts/sample.py`` and the FID monitor call."""

from __future__ import annotations

import torch

from .dpm_solver import dpm_solver_sample, dpm_solver_timesteps
from .samplers import Generators, ddim_sample, ddpm_sample, inference_timesteps
from .schedule import NoiseSchedule, ScheduleConfig

# "dpmsolver++" / "sde-dpmsolver++" are diffusers' algorithm_type names of DPMSolverMultistepScheduler.
SAMPLERS = ("ddpm", "ddim", "dpmsolver++", "sde-dpmsolver++")
# The diffusers pipelines' defaults (DDPMPipeline: every training step) and DPM-Solver's usual 20 steps.
_DEFAULT_STEPS = {"ddim": 50, "dpmsolver++": 20, "sde-dpmsolver++": 20}


def default_inference_steps(sampler: str, config: ScheduleConfig) -> int:
    """The step count of ``sampler`` when none is given."""
    _check_sampler(sampler)
    return _DEFAULT_STEPS.get(sampler, config.num_train_timesteps)


def sampler_timesteps(sampler: str, config: ScheduleConfig, num_inference_steps: int) -> list[int]:
    """The timesteps ``sampler`` visits (ValueError when ``num_inference_steps`` does not fit the schedule)."""
    _check_sampler(sampler)
    if sampler in ("ddpm", "ddim"):
        return inference_timesteps(config, num_inference_steps)
    return dpm_solver_timesteps(config, num_inference_steps)


def sample(
    model: torch.nn.Module,
    schedule: NoiseSchedule,
    batch_size: int,
    *,
    sampler: str = "ddpm",
    num_inference_steps: int | None = None,
    eta: float = 0.0,
    generator: Generators = None,
) -> torch.Tensor:
    """``batch_size`` images in [-1, 1] from the sampler named ``sampler``; ``eta`` is DDIM's only."""
    _check_sampler(sampler)
    if eta and sampler != "ddim":
        raise ValueError(f"eta={eta} only applies to the DDIM sampler")
    steps = num_inference_steps or default_inference_steps(sampler, schedule.config)
    if sampler == "ddpm":
        return ddpm_sample(model, schedule, batch_size, num_inference_steps=steps, generator=generator)
    if sampler == "ddim":
        return ddim_sample(model, schedule, batch_size, num_inference_steps=steps, eta=eta, generator=generator)
    return dpm_solver_sample(
        model, schedule, batch_size, num_inference_steps=steps, generator=generator, algorithm_type=sampler
    )


def _check_sampler(sampler: str) -> None:
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler={sampler!r}: choose one of {list(SAMPLERS)}")
