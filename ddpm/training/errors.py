"""Why a run stopped when the user must act: the message says what happened and what to do.

``scripts/train.py`` prints these as one line and exits with status 1; every other exception is a bug or a bad
setting (a ValueError naming the flag).
"""

import errno


class TrainingError(RuntimeError):
    """The run stopped for a reason the user must act on; the message says what happened and what to do."""


class TrainingDiverged(TrainingError):
    """Too many optimizer steps in a row had non-finite gradients."""


class CheckpointSaveError(TrainingError):
    """A checkpoint could not be written (disk full, quota, I/O error); the previous one is intact."""


class ExportError(TrainingError):
    """The pipeline could not be exported (disk full, quota, I/O error); the previous export is intact."""


def write_failure_message(what: str, error: OSError, kept: str) -> str:
    """Why ``what`` (a checkpoint, the export) could not be written, what is left (``kept``), and what to do."""
    full = error.errno in (errno.ENOSPC, errno.EDQUOT)
    advice = "free some space (or lower --checkpoints_total_limit)" if full else "fix the cause"
    return (
        f"could not save {what}{' (the disk is full)' if full else ''}: {error}. Nothing was left half-written (the "
        f"temporary folder was removed) and {kept}; {advice}, then resume with --resume_from_checkpoint latest"
    )
