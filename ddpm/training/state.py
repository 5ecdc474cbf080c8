"""What changes while a run trains (:class:`TrainState`), and what a checkpoint saves and restores of it and the run.

:func:`save_state` writes ``checkpoint-N/`` (atomically, through :func:`ddpm.io.checkpoint.save_training_checkpoint`):
the live and EMA weights, the optimizer, LR-scheduler, GradScaler and EMA states, the position, the seed and batch
layout, and every rank's RNG states. :func:`restore_state` reads all of it back into a freshly built run, which then
continues bit for bit.

Resuming under another layout: with the same global batch G (e.g. 2 processes x batch 4 -> 1 process x batch 8, or
accumulation instead of processes) the run continues with the same step counter, LR schedule and data stream; with
another G it continues after the same number of samples seen (step ``samples_seen // G``, the LR schedule there).
Each rank's RNG state is restored only under the same number of processes.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..io.background import host_copy
from ..io.checkpoint import (
    TrainingCheckpoint,
    capture_rng_state,
    restore_rng_state,
    rotate_checkpoints,
    save_training_checkpoint,
)
from ..runtime.distributed import gather_objects, run_on_main
from .errors import CheckpointSaveError, write_failure_message
from .run import Run
from .step import StepStats

logger = logging.getLogger(__name__)


@dataclass
class TrainState:
    """Where the run is and what it has counted: advanced by the loop, saved in checkpoints."""

    # ---- the position
    global_step: int  # optimizer steps done
    epoch: int
    step_in_epoch: int  # optimizer steps done in ``epoch``
    samples_seen: int  # images trained on, over every process
    # ---- counters on the training device: counting costs no host sync (log ticks and saves read them)
    skipped_steps: torch.Tensor  # steps skipped for non-finite gradients, since the run began (resumes included)
    nonfinite_run: torch.Tensor  # how many of the last steps in a row were skipped
    longest_nonfinite_run: torch.Tensor  # the longest such run since the last log tick (which reads and resets it)
    # ---- outputs so far
    last_checkpoint: Path | None = None  # the newest checkpoint saved, or the one resumed from
    last_saved_step: int = -1  # the step it holds (-1: none)
    last_grid: Path | None = None  # rank 0: the newest sample grid (an export of the same step shows it)

    @classmethod
    def start(cls, device: torch.device, skipped_steps: int = 0) -> TrainState:
        """Step 0 of a run (the position of a resumed run is then set by :func:`restore_state`)."""
        counter = torch.tensor(skipped_steps, dtype=torch.int64, device=device)
        zero = torch.zeros_like(counter)
        return cls(0, 0, 0, 0, skipped_steps=counter, nonfinite_run=zero, longest_nonfinite_run=zero)

    def advance(self, stats: StepStats, global_batch: int) -> None:
        """Count the optimizer step just taken."""
        self.global_step += 1
        self.step_in_epoch += 1
        self.samples_seen += global_batch
        self.skipped_steps += ~stats.finite
        self.nonfinite_run = torch.where(stats.finite, 0, self.nonfinite_run + 1)
        self.longest_nonfinite_run = torch.maximum(self.longest_nonfinite_run, self.nonfinite_run)


def save_state(run: Run, state: TrainState) -> Path:
    """Start writing ``checkpoint-<step>`` in the background; every rank calls it (each adds its RNG state).

    Rank 0 copies what the checkpoint holds off the device (the training waits only for that: the "Saved" line
    gives the pause), and :attr:`Run.checkpoints` writes it while the training continues, then rotates
    the old checkpoints. At most one write is in flight: the next save, and :func:`finish_saves` at the end of the
    run, wait for it. A failed write raises :class:`CheckpointSaveError` there, on every rank (nothing
    half-written stays behind: a folder named ``checkpoint-N`` is complete).
    """
    rng_states = gather_objects(run.ctx, capture_rng_state())
    skipped = int(state.skipped_steps.item())
    path = run.output_dir / f"checkpoint-{state.global_step}"
    previous = state.last_checkpoint

    def snapshot_and_submit() -> None:
        run.checkpoints.wait()  # at most one write in flight; a failed previous write is raised here
        start = time.perf_counter()
        snapshot = host_copy(_checkpoint_contents(run, state, skipped))
        pause = time.perf_counter() - start
        run.checkpoints.submit(lambda: _write_checkpoint(run, path, snapshot, rng_states, previous, pause))

    run_on_main(run.ctx, snapshot_and_submit)
    state.last_saved_step, state.last_checkpoint = state.global_step, path
    return path


def finish_saves(run: Run) -> None:
    """Every rank: return once the last checkpoint and the last export are on disk (raising, on every rank, if a
    write failed; when both did, the checkpoint's error, which says how to resume: the loop's way out then waits
    for the export and logs its error)."""

    def wait_for_both() -> None:
        run.checkpoints.wait()
        run.exports.wait()

    run_on_main(run.ctx, wait_for_both)


def _checkpoint_contents(run: Run, state: TrainState, skipped: int) -> dict[str, Any]:
    """What ``checkpoint-<step>`` holds besides the RNG states (live tensors: :func:`host_copy` snapshots them)."""
    config = run.config
    return {
        "model_state": run.unet.state_dict(),
        "ema_state": run.ema.shadow if run.ema is not None else None,
        "training_state": {
            "global_step": state.global_step,
            "epoch": state.epoch,
            "step_in_epoch": state.step_in_epoch,
            "samples_seen": state.samples_seen,
            "global_batch_size": run.global_batch,
            "world_size": run.ctx.world_size,
            "train_batch_size": config.train_batch_size,
            "gradient_accumulation_steps": config.gradient_accumulation_steps,
            "seed": run.seed,
            "skipped_steps": skipped,
            "optimizer": run.optimizer.state_dict(),
            "lr_scheduler": run.lr_scheduler.state_dict(),
            "grad_scaler": run.scaler.state_dict(),
            "ema": run.ema.state_dict() if run.ema is not None else None,
            "wandb_run_id": run.log.wandb_run_id,  # a resumed run continues the same wandb run
        },
    }


def _write_checkpoint(
    run: Run, path: Path, snapshot: dict[str, Any], rng_states: list, previous: Path | None, pause: float
) -> None:
    """On the writer thread: the checkpoint folder (atomically), then the rotation."""
    start = time.perf_counter()
    try:
        save_training_checkpoint(
            path,
            step=snapshot["training_state"]["global_step"],
            unet_config=run.unet_config,
            schedule_config=run.schedule_config,
            run_config=run.run_config,
            rng_states=rng_states,
            **snapshot,
        )
    except OSError as e:  # disk full, quota, I/O error: the write is undone, say so and what to do
        kept = "no earlier checkpoint exists" if previous is None else f"the previous checkpoint {previous} is intact"
        raise CheckpointSaveError(write_failure_message(str(path), e, kept)) from e
    removed = rotate_checkpoints(run.output_dir, run.config.checkpoints_total_limit, keep=path)
    run.log.write(
        f"Saved {path} (training paused {pause:.2f} s, written in {time.perf_counter() - start:.1f} s in the "
        "background)" + (f"; removed {', '.join(p.name for p in removed)}" if removed else "")
    )


def restore_state(run: Run, checkpoint: TrainingCheckpoint) -> TrainState:
    """Load what :func:`save_state` wrote into ``run``'s freshly built parts; returns the state to continue from."""
    saved = checkpoint.training_state
    run.unet.load_state_dict(checkpoint.model_state)
    run.optimizer.load_state_dict(saved["optimizer"])
    for group in run.optimizer.param_groups:  # the implementation is this machine's choice, not the saver's
        group["fused"], group["foreach"] = (True, None) if run.fused else (None, None)
    if run.scaler.is_enabled() and saved.get("grad_scaler"):
        run.scaler.load_state_dict(saved["grad_scaler"])
    if run.ema is not None:
        if checkpoint.ema_state is None or saved.get("ema") is None:
            logger.warning("%s has no EMA weights: the EMA starts from the resumed weights", checkpoint.path)
            # build_run's EMA is still fresh (no update yet): restart it from the weights just loaded
            run.ema.load_state_dict(run.ema.state_dict(), dict(run.unet.named_parameters()))
        else:
            run.ema.load_state_dict(saved["ema"], checkpoint.ema_state)
    state = _restore_position(run, saved)
    if state.global_step > run.total_steps:
        raise ValueError(
            f"--resume_from_checkpoint: {checkpoint.path} is at optimizer step {state.global_step}, past this run's "
            f"{run.total_steps} steps: raise --max_train_steps (or --num_epochs)"
        )
    state.last_saved_step, state.last_checkpoint = state.global_step, checkpoint.path
    same_layout = int(saved.get("world_size", -1)) == run.ctx.world_size
    if same_layout and run.ctx.rank in checkpoint.rng_states:
        restore_rng_state(checkpoint.rng_states[run.ctx.rank])
    logger.info("resumed from %s at optimizer step %d (epoch %d)", checkpoint.path, state.global_step, state.epoch)
    return state


def _restore_position(run: Run, saved: dict[str, Any]) -> TrainState:
    """The saved position and LR schedule, re-expressed in the new global batch if it changed."""
    state = TrainState.start(run.device, skipped_steps=int(saved.get("skipped_steps", 0)))
    state.global_step, state.epoch = int(saved["global_step"]), int(saved["epoch"])
    state.step_in_epoch, state.samples_seen = int(saved["step_in_epoch"]), int(saved["samples_seen"])
    old_batch = int(saved["global_batch_size"])
    if old_batch == run.global_batch:
        run.lr_scheduler.load_state_dict(saved["lr_scheduler"])
        return state
    # Continue from the same number of samples seen: step counters are re-expressed in new global batches.
    state.global_step = state.samples_seen // run.global_batch
    state.step_in_epoch = min(state.step_in_epoch * old_batch // run.global_batch, run.steps_per_epoch)
    run.lr_scheduler.last_epoch = state.global_step - 1
    with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()": intended here
        warnings.simplefilter("ignore", UserWarning)
        run.lr_scheduler.step()
    logger.warning(
        "the global batch changed from %d to %d: resuming after %d samples seen, at optimizer step %d",
        old_batch,
        run.global_batch,
        state.samples_seen,
        state.global_step,
    )
    return state
