"""The training job: :func:`train` runs a :class:`~ddpm.training.config.TrainConfig` on one process or on every
process of a ``torchrun`` launch (diffusers' ``train_unconditional.py`` without accelerate, without its known defects).

It reads top to bottom. Set up: :func:`~ddpm.training.setup.build_run` checks what the settings name, then builds
the parts of the run (data, model, optimizer, ...). Resume: :func:`~ddpm.training.state.restore_state` loads a
checkpoint into them. Train: epochs of optimizer steps (:func:`~ddpm.training.step.optimizer_step`), each step
followed, when due, by a log tick, an FID evaluation, a checkpoint (:func:`~ddpm.training.state.save_state`) and a
look at the stop signals; each epoch by its sample grid and export (:mod:`ddpm.training.artifacts`). Losses and norms
stay on the device until a log tick (every ``--logging_steps`` steps) reads them: no per-step host synchronisation.
"""

from __future__ import annotations

import math
import os
import shlex
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data.sampler import stop_workers
from ..io.hub import scrub_tokens
from ..io.lock import release_lock
from ..models.ema import EMA
from ..models.unet import UNet
from ..runtime.distributed import (
    GracefulStop,
    StopAgreement,
    all_reduce_mean,
    barrier,
    gather_objects,
    init_distributed,
    leave_by_the_error,
    lost_peer,
    shutdown,
)
from .artifacts import end_of_epoch
from .config import TrainConfig
from .errors import TrainingDiverged
from .run import Run
from .run_log import peak_memory_gb
from .setup import build_run
from .state import TrainState, finish_saves, restore_state, save_state
from .step import StepStats, optimizer_step


@dataclass
class TrainResult:
    """What :func:`train` returns (on every rank)."""

    global_step: int
    epoch: int
    stopped_by_signal: bool
    last_checkpoint: Path | None
    unet: UNet  # live weights (the raw module, not the DDP/compiled wrapper)
    ema: EMA | None  # rank 0 only


def train(config: TrainConfig, command: str | None = None) -> TrainResult:
    """Run ``config`` on this process (one of ``torchrun``'s, or alone); returns when every rank is done.

    ``command`` (the command line, token-free) is recorded in checkpoints and the model card. A first SIGTERM/SIGINT
    ends the run after the current step with a checkpoint (``result.stopped_by_signal``). Raises
    :class:`~ddpm.training.errors.TrainingDiverged` after ``max_nonfinite_steps`` skipped steps in a row,
    :class:`~ddpm.training.errors.CheckpointSaveError` when a checkpoint cannot be written (the previous one stays
    intact), :class:`~ddpm.training.errors.ExportError` when the pipeline cannot be exported; a rank that dies or
    hangs makes the others fail within ``ddp_timeout`` seconds.
    """
    ctx = init_distributed(config.device, config.ddp_timeout, config.local_rank)
    try:
        # ---- set up: check the settings, prepare the output folder, load the dataset, construct the parts
        run, checkpoint = build_run(config, ctx, command)
        try:
            # ---- resume: the checkpoint's weights, optimizer, schedules, EMA, RNG and position (or step 0)
            state = restore_state(run, checkpoint) if checkpoint is not None else TrainState.start(run.device)
            del checkpoint  # its tensors are in the run's parts now
            _announce(run)
            # ---- train
            stopped = _train(run, state)
            finish_saves(run)  # the run ends once its last checkpoint and export are on disk
        finally:
            _settle_saves(run)
            stop_workers(run.loader)  # a run that failed would otherwise wait at exit for workers that never leave
            run.log.close()
        barrier(ctx)
        if run.uploads is not None:  # rank 0 waits for its last Hub upload once the others have left
            run.uploads.finish()
        return TrainResult(state.global_step, state.epoch, stopped, state.last_checkpoint, run.unet, run.ema)
    except RuntimeError as e:
        if lost_peer(e):  # another process failed: torchrun is about to SIGTERM this one, which leaves by the error
            leave_by_the_error()
        raise
    finally:
        if ctx.is_main:  # the lock build_run took on --output_dir (if it got that far: never another run's)
            release_lock(config.output_dir)
        shutdown(ctx)


@dataclass
class _Tick:
    """The steps since the last log tick: their summed loss (on the device), the last one's figures, the clock."""

    step: int  # the global step the tick began at
    start: float  # time.perf_counter() then (moved on by FID evaluations, kept out of img/s)
    loss_sum: torch.Tensor
    data_wait: float = 0.0  # seconds the steps waited for data
    last: StepStats | None = None

    @classmethod
    def begin(cls, step: int, device: torch.device) -> _Tick:
        return cls(step, time.perf_counter(), torch.zeros((), device=device))


def _train(run: Run, state: TrainState) -> bool:
    """Train from ``state`` until ``run.total_steps``; returns True when stopped early by a signal."""
    config = run.config
    tick = _Tick.begin(state.global_step, run.device)
    run.log.start_bar(run.total_steps, state.global_step)
    agreement = StopAgreement(run.ctx)
    end_epoch = _end_epoch(run, state)
    # One iterator over every remaining epoch: the loader prefetches across epoch ends (and their grids, exports).
    run.sampler.set_epoch(state.epoch, state.step_in_epoch, epochs=end_epoch - state.epoch)
    batches = iter(run.loader)
    with GracefulStop() as graceful:
        for epoch in range(state.epoch, end_epoch):
            if epoch != state.epoch:
                state.epoch, state.step_in_epoch = epoch, 0
            run.unet.train()
            while state.step_in_epoch < run.steps_per_epoch and state.global_step < run.total_steps:
                # ---- one optimizer step
                stats = optimizer_step(run, batches, state.global_step)
                state.advance(stats, run.global_batch)
                tick.loss_sum += stats.loss
                tick.data_wait += stats.data_wait
                tick.last = stats
                run.log.advance()
                done = state.global_step == run.total_steps
                # ---- when due: log tick, FID, checkpoint; then the stop signals
                if state.global_step % config.logging_steps == 0 or done:
                    tick = _log_tick(run, state, tick)
                if run.fid is not None and (state.global_step % config.fid_every_steps == 0 or done):
                    tick.start += _log_fid(run, state)  # keep the evaluation out of the next tick's img/s
                if state.global_step % config.checkpointing_steps == 0 or done:
                    save_state(run, state)
                if agreement.poll(graceful.requested):
                    agreement.finish()
                    if state.last_saved_step != state.global_step:
                        save_state(run, state)
                    run.log.write(
                        f"Stopped by a signal after optimizer step {state.global_step}; resume with "
                        f"--resume_from_checkpoint {state.last_checkpoint}"
                    )
                    return True
            # ---- epoch end: sample grid, export
            end_of_epoch(run, state, epoch, last=epoch == end_epoch - 1 or state.global_step >= run.total_steps)
            if state.global_step >= run.total_steps:
                break
        agreement.finish()
    return False


def _end_epoch(run: Run, state: TrainState) -> int:
    """The epoch (exclusive) in which ``run.total_steps`` is reached from ``state``: ``run.num_epochs``, unless a
    resume under another global batch put the step counter (samples seen // batch) off the epoch grid."""
    steps_after_this_epoch = run.total_steps - state.global_step - (run.steps_per_epoch - state.step_in_epoch)
    return state.epoch + 1 + max(0, math.ceil(steps_after_this_epoch / run.steps_per_epoch))


def _settle_saves(run: Run) -> None:
    """On the way out of a failed run too: let the checkpoint and export being written complete (or fail) before the
    process exits, so that the newest ones are whole; their errors, if any, are logged (the run's own propagates)."""
    for writer, what in ((run.checkpoints, "checkpoint"), (run.exports, "export")):
        try:
            writer.wait()
        except Exception as e:
            run.log.write(f"the last {what} write failed too: {e}")


def _log_tick(run: Run, state: TrainState, tick: _Tick) -> _Tick:
    """One host sync, one all-reduce of the loss, the records, the divergence check; returns the next tick."""
    config, last = run.config, tick.last
    steps = state.global_step - tick.step
    loss = all_reduce_mean(run.ctx, tick.loss_sum / steps).item()
    grad_norm = last.grad_norm.item()
    nonfinite_run = int(state.longest_nonfinite_run.item())  # a run that ended between ticks counts too
    state.longest_nonfinite_run = state.nonfinite_run
    skipped = int(state.skipped_steps.item())
    elapsed = time.perf_counter() - tick.start
    record = {
        "step": state.global_step,
        "epoch": state.epoch,
        "loss": loss,
        "lr": last.lr,
        "grad_norm": grad_norm,
        "img_s": steps * run.global_batch / elapsed,
        "sec_per_step": elapsed / steps,
        "data_wait": min(tick.data_wait / elapsed, 1.0),  # the share of the tick spent waiting for data (rank 0)
        "skipped_steps": skipped,
    }
    if config.skip_corrupt_images:  # every rank reads its own images: the total is the sum
        record["corrupt_images_skipped"] = sum(gather_objects(run.ctx, run.dataset.num_corrupt_skipped))
    if run.ema is not None:
        record["ema_decay"] = run.ema.cur_decay
    if run.scaler.is_enabled():
        record["loss_scale"] = run.scaler.get_scale()
    record["peak_mem_gb"] = peak_memory_gb(run.device)
    run.log.scalars(record, run.total_steps)
    if nonfinite_run >= config.max_nonfinite_steps:
        checkpoint = state.last_checkpoint
        raise TrainingDiverged(
            f"{nonfinite_run} optimizer steps in a row (by step {state.global_step}) had non-finite gradients "
            f"and were skipped (--max_nonfinite_steps={config.max_nonfinite_steps}); stopping. "
            + (f"Last good checkpoint: {checkpoint}. " if checkpoint else "No checkpoint was saved. ")
            + "Try a lower --learning_rate, --mixed_precision bf16 or no, or a smaller --max_grad_norm."
        )
    return _Tick.begin(state.global_step, run.device)


def _log_fid(run: Run, state: TrainState) -> float:
    """Every --fid_every_steps: the FID of EMA samples, logged; returns the seconds it took."""
    result = run.fid.evaluate(run.unet, run.ema)
    run.log.evaluation({"step": state.global_step, "epoch": state.epoch, **result})
    return result["fid_seconds"]


def _announce(run: Run) -> None:
    config = run.config
    run.log.write(
        "***** Running training *****\n"
        f"  Num examples = {len(run.dataset)}\n"
        f"  Num Epochs = {run.num_epochs}\n"
        f"  Instantaneous batch size per device = {config.train_batch_size}\n"
        f"  Total train batch size (w. parallel, distributed & accumulation) = {run.global_batch}"
        f" ({config.train_batch_size} x {run.ctx.world_size} processes x {config.gradient_accumulation_steps})\n"
        f"  Gradient Accumulation steps = {config.gradient_accumulation_steps}\n"
        f"  Optimizer steps per epoch = {run.steps_per_epoch}\n"
        f"  Total optimization steps = {run.total_steps}\n"
        f"  Model parameters = {run.unet.num_parameters():,}; device {run.device}; precision "
        f"{run.precision.name}{' (auto)' if config.mixed_precision == 'auto' else ''}; seed {run.seed}"
        + (f"; DDP over {torch.distributed.get_backend()}" if run.ddp is not None else "")
    )
    if run.device.type == "cuda" and config.dataloader_num_workers == 0:
        run.log.write("  Tip: --dataloader_num_workers 4 (or more) keeps the GPU fed")


def command_line(argv: list[str], program: str = "scripts/train.py") -> str:
    """A shell-quoted command line for records, with any Hub token scrubbed."""
    launcher = (
        "torchrun --nproc_per_node=" + os.environ["LOCAL_WORLD_SIZE"] + " "
        if "LOCAL_WORLD_SIZE" in os.environ
        else "python "
    )
    return scrub_tokens(launcher + shlex.join([program, *argv]))
