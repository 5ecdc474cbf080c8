"""One optimizer step: :func:`optimizer_step`.

What a step sees depends only on ``(seed, step)`` and the global batch ``G = per-device batch x processes x
accumulation``: the images come from :class:`~ddpm.data.sampler.GlobalBatchSampler` (this rank's share of the step's
global batch, augmentations seeded per sample), and the timesteps and noise of the *whole* global batch are drawn on
the training device from a generator seeded with ``(seed, NOISE, step)``, each micro-batch taking the slice the
sampler gave its images. So one process with batch G, N processes with G/N, and accumulation all average the same
per-sample gradients, and a resumed run needs no replay of random numbers. Each micro-batch loss is divided by the
accumulation steps (DDP averages over ranks), gradients are all-reduced on the last micro-step only (``no_sync``),
clipped, and one AdamW step, one LR-scheduler step and one EMA update follow.

Non-finite gradients skip the update in every precision (GradScaler for fp16; fused AdamW's ``found_inf``, else a
check) and :attr:`StepStats.finite` says so. No host synchronisation with fp16 or fused AdamW (the default
wherever it exists): the figures stay on the device; only plain AdamW reads the check on the host.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from ..data.sampler import SeedStream, derive_seed
from ..diffusion.schedule import offset_noise
from .run import Run


@dataclass
class StepStats:
    """One optimizer step's figures, on the training device (reading them syncs the host: the log ticks do)."""

    loss: torch.Tensor  # this rank's training loss, the mean over its micro-batches
    grad_norm: torch.Tensor  # the gradient norm before clipping
    finite: torch.Tensor  # bool: the gradients were finite, so the update was applied
    lr: float  # the learning rate of the update
    data_wait: float  # seconds this process waited for its micro-batches (host clock)


def optimizer_step(run: Run, batches: Iterator[torch.Tensor], step: int) -> StepStats:
    """Optimizer step ``step``: this rank's micro-batches forward and backward, clip, AdamW, LR, EMA. No host sync but
    plain AdamW's check (see the module docstring)."""
    config, sampler, device = run.config, run.sampler, run.device
    accum, channels, size = sampler.grad_accum, run.unet_config.in_channels, config.resolution
    generator = run.noise_generator.manual_seed(derive_seed(run.seed, SeedStream.NOISE, step))
    num_timesteps = run.train_schedule.num_train_timesteps
    timesteps = torch.randint(0, num_timesteps, (run.global_batch,), device=device, generator=generator)
    noise = torch.randn((run.global_batch, channels, size, size), device=device, generator=generator)
    if config.noise_offset:  # drawn after the noise: without it, every other number is the same
        noise = offset_noise(noise, config.noise_offset, generator)
    step_loss = torch.zeros((), device=device)
    data_wait = 0.0
    for micro in range(accum):
        wait_start = time.perf_counter()
        x0 = next(batches)
        data_wait += time.perf_counter() - wait_start
        x0 = x0.to(device, non_blocking=True)  # from pinned memory on CUDA: the copy overlaps the step
        if run.channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        share = sampler.micro_slice(micro)  # where this rank's images sit in the global batch
        final = micro == accum - 1  # gradients are all-reduced once, on the last micro-step
        with run.ddp.no_sync() if run.ddp is not None and not final else nullcontext():
            with run.precision.autocast():
                loss = run.training_loss(x0, timesteps[share], noise[share])
            run.scaler.scale(loss / accum).backward()
        step_loss += loss.detach() / accum

    optimizer = run.optimizer
    if run.scaler.is_enabled():
        run.scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(run.unet.parameters(), config.max_grad_norm)
    finite = torch.isfinite(grad_norm)
    lr = optimizer.param_groups[0]["lr"]
    if run.scaler.is_enabled():
        run.scaler.step(optimizer)  # skips on inf/NaN (no host sync with fused AdamW)
        run.scaler.update()
    elif run.fused:
        # GradScaler's protocol with fused optimizers: the kernel skips the update when found_inf is 1.
        optimizer.grad_scale, optimizer.found_inf = None, (~finite).float()
        optimizer.step()
        del optimizer.grad_scale, optimizer.found_inf
    elif finite.item():
        optimizer.step()
    run.lr_scheduler.step()
    # Zeroed in place, not set to None: under DDP the gradients are views into its all-reduce buckets
    # (gradient_as_bucket_view), and dropping them would make DDP copy every gradient into its bucket each step.
    optimizer.zero_grad(set_to_none=run.ddp is None)
    if run.ema is not None:
        run.ema.update(run.unet)
    return StepStats(loss=step_loss, grad_norm=grad_norm.detach(), finite=finite, lr=lr, data_wait=data_wait)
