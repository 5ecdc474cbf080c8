"""A run's ``--output_dir``: the checkpoint to resume from, and what to do with a previous run found there.

A fresh start in a folder that holds a previous run is refused (it would mix two runs' checkpoints and logs) unless
``--overwrite_output_dir`` clears it first or ``--resume_from_checkpoint`` continues it. Rank 0 does this alone,
before any data is read; the remains of an interrupted checkpoint save are removed at the same time.

One run at a time: rank 0 holds a lock file in the folder (:mod:`ddpm.io.lock`) from before it looks at the folder
until the run ends; a second run started there stops at once, naming the first one's process.

A worker that ``torchrun --max-restarts`` restarted continues its run: it resumes from the latest complete
checkpoint in the folder (else from what the flags name) and never clears the folder, whatever the flags say.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from ..io.checkpoint import (
    CONFIG_NAME,
    MODEL_NAME,
    STATE_NAME,
    checkpoint_step,
    is_training_checkpoint,
    latest_checkpoint,
    list_checkpoints,
    missing_files,
    remove_interrupted_saves,
)
from ..io.lock import acquire_lock
from ..runtime.distributed import restart_count
from .config import TrainConfig

logger = logging.getLogger(__name__)

SAMPLES_DIR = "samples"  # the sample grids, step_NNNNNN.png
# What a previous run leaves in output_dir; any of these makes a fresh start need --overwrite_output_dir.
RUN_MARKERS = ("model_index.json", "unet", "scheduler")


def prepare_output_dir(config: TrainConfig) -> Path | None:
    """Rank 0: lock ``--output_dir`` (creating it), clear or check it; returns the checkpoint to resume from (None:
    a fresh start). The caller releases the lock (:func:`ddpm.io.lock.release_lock`) when the run ends."""
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    acquire_lock(out)
    # first: a checkpoint an interrupted save set aside is back before "latest" is looked for
    for stale in remove_interrupted_saves(out):
        logger.warning("removed %s, the remains of an interrupted checkpoint save", stale)
    restarts, resume = restart_count(), None
    if restarts:  # the flags started this run, and this worker continues it from where it got to
        resume = latest_checkpoint(out, resumable=True)
        logger.info("torchrun restarted the workers (restart %d): resuming from %s", restarts, resume or "the start")
    if resume is None:
        resume = resolve_resume(config.resume_from_checkpoint, out)
    if config.overwrite_output_dir and not restarts:
        # checked on the resolved path: a bare "checkpoint-N" names the one in --output_dir
        if resume is not None and resume.resolve().is_relative_to(out.resolve()):
            raise ValueError(
                f"--overwrite_output_dir would delete the checkpoint --resume_from_checkpoint="
                f"{config.resume_from_checkpoint!r} resumes from ({resume}); drop one of them"
            )
        clear_previous_run(out, config.logging_dir)
    if resume is None and config.resume_from_checkpoint is None and not restarts:
        found = sorted(p.name for p in out.iterdir() if p.name in RUN_MARKERS) + [p.name for p in list_checkpoints(out)]
        if found:
            raise ValueError(
                f"--output_dir {out} already holds a training run ({', '.join(found)}): pass "
                "--resume_from_checkpoint latest to continue it, or --overwrite_output_dir to start over"
            )
    if resume is not None:
        newer = [p.name for p in list_checkpoints(out) if checkpoint_step(p) > (checkpoint_step(resume) or -1)]
        if newer:
            logger.warning(
                "%s in %s are newer than the checkpoint resumed from (%s): this run replaces them as it reaches "
                "their steps; until then --resume_from_checkpoint latest would pick them",
                ", ".join(newer),
                out,
                resume.name,
            )
    return resume


def clear_previous_run(out: Path, logging_dir: str) -> None:
    """Delete what a run writes (never other files): checkpoints, the export, samples and logs."""
    if not out.is_dir():
        return
    doomed = [out / name for name in (SAMPLES_DIR, logging_dir)]
    if (out / "model_index.json").is_file():  # an export: its card and grid go with it
        doomed += [out / name for name in (*RUN_MARKERS, "README.md", "samples.png")]
    doomed += [*out.glob("checkpoint-*"), *out.glob(".tmp-*")]
    for path in doomed:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    logger.info("--overwrite_output_dir: cleared the previous run in %s", out)


def resolve_resume(spec: str | None, output_dir: Path) -> Path | None:
    """The checkpoint folder ``--resume_from_checkpoint`` names, or None for a fresh start."""
    if spec is None:
        return None
    if spec == "latest":
        latest = latest_checkpoint(output_dir, resumable=True)
        if latest is None:
            logger.warning("Checkpoint 'latest' does not exist. Starting a new training run.")
        return latest
    candidates = list(dict.fromkeys((Path(spec), output_dir / Path(spec).name)))
    for candidate in candidates:
        if is_training_checkpoint(candidate):
            return candidate
    for candidate in candidates:  # a folder that looks like a checkpoint: say what it lacks
        if candidate.is_dir() and (checkpoint_step(candidate) is not None or (candidate / CONFIG_NAME).is_file()):
            raise FileNotFoundError(
                f"--resume_from_checkpoint={spec!r}: {candidate} is not a complete training checkpoint (it lacks "
                f"{', '.join(missing_files(candidate))})"
            )
    raise FileNotFoundError(
        f"--resume_from_checkpoint={spec!r}: no checkpoint at {' or '.join(map(str, candidates))} (a checkpoint "
        f"folder holds {CONFIG_NAME}, {MODEL_NAME} and {STATE_NAME})"
    )
