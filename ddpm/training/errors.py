"""Why a run stopped when the user must act: the message says what happened and what to do.

``scripts/train.py`` prints these as one line and exits with status 1; every other exception is a bug or a bad
setting (a ValueError naming the flag).
"""


class TrainingError(RuntimeError):
    """The run stopped for a reason the user must act on; the message says what happened and what to do."""


class TrainingDiverged(TrainingError):
    """Too many optimizer steps in a row had non-finite gradients."""


class CheckpointSaveError(TrainingError):
    """A checkpoint could not be written (disk full, quota, I/O error); the previous one is intact."""
