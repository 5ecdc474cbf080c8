"""How a script ends on bad input: one line, ``<script>: error: <message>``, and a non-zero exit; no traceback.

A traceback is for bugs. A missing folder, a bad flag value or a missing token is the user's to fix, and a traceback
around its message makes it look like a crash. :class:`ScriptParser` reports usage errors that way (exit status 2),
:func:`user_errors` the errors raised while the script runs (exit status 1). Under ``torchrun`` the line is printed
once: usage errors and errors that rank 0 shares with the others (:class:`~ddpm.runtime.distributed.PeerFailed`)
by rank 0 only; the other ranks exit quietly with the same status, and none is killed by torchrun's agent on the way
out (:func:`~ddpm.runtime.distributed.leave_together`). Every script's ``--debug`` flag (or ``DDPM_DEBUG=1``) shows
the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import typing
from collections.abc import Iterator
from contextlib import contextmanager

from .distributed import PeerFailed, backend_message, leave_by_the_error, leave_together, lost_peer

DEBUG_ENV = "DDPM_DEBUG"  # set to 1: expected errors raise with their traceback (to debug the tool itself)


def debugging() -> bool:
    """Whether expected errors keep their traceback (``--debug`` or ``DDPM_DEBUG=1``)."""
    return os.environ.get(DEBUG_ENV) == "1"


def process_rank() -> int:
    """This process's rank in a ``torchrun`` launch (0 without one), read before any process group exists."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


# How torch's DataLoader re-raises in the main process an error a worker process met: the worker's traceback, whose
# last line is "ErrorType: the original message", is the new exception's message after this line.
_WORKER_TRACEBACK = "Original Traceback (most recent call last):"


def error_line(prog: str, message: object) -> str:
    """``prog: error: message`` on one line (a multi-line message is joined)."""
    return f"{prog}: error: " + " ".join(str(message).split("\n"))


def _message(error: BaseException) -> str:
    """``error``'s message; of an error a DataLoader worker met, the worker's own message (the last line of its
    traceback: this project's messages are one line), not the traceback."""
    text = str(error)
    if _WORKER_TRACEBACK in text:
        text = text.rstrip().splitlines()[-1].split(": ", 1)[-1]
    return text


class ScriptParser(argparse.ArgumentParser):
    """``argparse`` whose usage errors are one line, ``prog: error: message`` (``--help`` shows the usage), printed
    by rank 0 only; exit status 2 as argparse's. It adds ``--debug`` to every script: given, it sets ``DDPM_DEBUG=1``
    for :func:`user_errors` (and the processes this one starts) and is not part of the parsed namespace."""

    def __init__(self, *args: typing.Any, **kwargs: typing.Any):
        super().__init__(*args, **kwargs)
        self.add_argument(
            "--debug",
            action="store_true",
            help=f"show the Python traceback of an expected error too, to debug the tool itself (as {DEBUG_ENV}=1)",
        )

    def parse_known_args(self, *args: typing.Any, **kwargs: typing.Any) -> tuple[argparse.Namespace, list[str]]:
        namespace, rest = super().parse_known_args(*args, **kwargs)
        if vars(namespace).pop("debug", False):
            os.environ[DEBUG_ENV] = "1"
        return namespace, rest

    def error(self, message: str) -> None:  # type: ignore[override]
        leave_together()
        self.exit(2, error_line(self.prog, message) + "\n" if process_rank() == 0 else None)


@contextmanager
def user_errors(prog: str, *errors: type[BaseException]) -> Iterator[None]:
    """Turn ``errors`` (default: ValueError and OSError, which name the flag or file) raised inside into a
    ``SystemExit`` whose message is :func:`error_line` (exit status 1): Python prints it without a traceback.

    On a rank other than 0, an error rank 0 shared (:class:`PeerFailed`), or one rank 0 meets too (it is leaving on an
    error within seconds: :func:`~ddpm.runtime.distributed.leave_together`), exits with status 1 and no message; an
    error of this rank's own is printed with its rank. A collective that finds another process gone or silent
    (:func:`lost_peer`) ends this one with one line too (that process printed its own error, if it could); any other
    RuntimeError is a bug and keeps its traceback.
    """
    errors = errors or (ValueError, OSError)
    try:
        yield
    except PeerFailed:
        if debugging():
            raise
        leave_together()
        raise SystemExit(1) from None
    except errors as e:
        if debugging():
            raise
        rank = process_rank()
        if leave_together():  # rank 0 fails too (an error every rank meets): it prints the line
            raise SystemExit(1) from None
        message = _message(e)
        raise SystemExit(error_line(prog, message if rank == 0 else f"[rank {rank}] {message}")) from None
    except RuntimeError as e:
        if debugging() or not lost_peer(e):
            raise  # a bug: its traceback
        # Another process reported its own error and left (or was killed, or hangs): one line here, not a traceback
        # around the collective that noticed. No leave_together: the peer may be gone without counting out.
        leave_by_the_error()
        message = f"[rank {process_rank()}] another process left or stopped answering (its error, if any, is above): "
        raise SystemExit(error_line(prog, message + backend_message(e))) from None
