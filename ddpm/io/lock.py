"""One writer per folder: a lock file naming the process that holds it (pid, host, start time).

Two training runs writing into one ``--output_dir`` would interleave their checkpoints, logs and exports. The lock
is a file created atomically, whole (written under a temporary name, then hard-linked to its name, which fails if
it exists), so a reader never sees half of it. It is not an OS lock that dies with its process: a run killed with
SIGKILL leaves it behind, so a lock whose process is gone (same host, pid not running), or that the previous attempt
of the same ``torchrun`` job left before a restart, is stale and taken over with a warning. A lock held from another
host cannot be checked: the error says to delete the file if that run is over.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

LOCK_NAME = ".ddpm-run.lock"


def _this_process() -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        # torchrun's job and attempt: a restarted worker takes over the lock its killed predecessor left
        "torchrun_run_id": os.environ.get("TORCHELASTIC_RUN_ID"),
        "torchrun_restart": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0),
    }


def _read(path: Path) -> dict[str, Any] | None:
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) and isinstance(holder.get("pid"), int) else None


def _is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _is_stale(holder: dict[str, Any], me: dict[str, Any]) -> bool:
    """The holder is gone: a dead process on this host, or an earlier attempt of this torchrun job."""
    if me["torchrun_run_id"] is not None and holder.get("torchrun_run_id") == me["torchrun_run_id"]:
        return int(holder.get("torchrun_restart", 0)) < me["torchrun_restart"]
    return holder.get("host") == me["host"] and not _is_running(holder["pid"])


def _describe(holder: dict[str, Any]) -> str:
    return f"pid {holder['pid']} on {holder.get('host', '?')}, started {holder.get('started', '?')}"


def acquire_lock(folder: str | Path, what: str = "--output_dir") -> None:
    """Make this process the one writer of ``folder`` (which must exist).

    Raises ValueError naming the process that holds it; takes over a stale lock with a warning. Holding it already
    is fine (a second call does nothing).
    """
    path = Path(folder) / LOCK_NAME
    me = _this_process()
    with tempfile.NamedTemporaryFile("w", dir=folder, prefix=".tmp-lock-", delete=False) as tmp:
        json.dump(me, tmp)
    try:
        for _ in range(3):  # a stale lock removed, then a race with another starter: try again, briefly
            try:
                os.link(tmp.name, path)
                return
            except FileExistsError:
                pass
            holder = _read(path)
            if holder is None:  # deleted meanwhile, or not a lock of ours: try again
                if path.exists():
                    raise ValueError(f"{what} {folder}: {path} exists but is not a readable lock; delete it") from None
                continue
            if holder["pid"] == me["pid"] and holder.get("host") == me["host"]:
                return
            if not _is_stale(holder, me):
                raise ValueError(
                    f"{what} {folder} is in use by another training run ({_describe(holder)}): wait for it to end or "
                    f"stop it, or choose another {what}. If that run is over (e.g. on another host), delete {path}"
                )
            logger.warning(
                "%s: taking over the lock of a run that is no longer running (%s)", folder, _describe(holder)
            )
            path.unlink(missing_ok=True)
        raise ValueError(f"{what} {folder}: could not take {path} (other runs are starting there)")
    finally:
        Path(tmp.name).unlink(missing_ok=True)


def release_lock(folder: str | Path) -> None:
    """Remove ``folder``'s lock if this process holds it (never another run's)."""
    path = Path(folder) / LOCK_NAME
    holder = _read(path)
    if holder is not None and holder["pid"] == os.getpid() and holder.get("host") == socket.gethostname():
        path.unlink(missing_ok=True)
