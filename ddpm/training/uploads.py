"""--push_to_hub uploads in the background on rank 0: the other ranks never wait on a collective while rank 0 uploads.

An export is written on rank 0's export writer thread (:func:`ddpm.training.artifacts.export`), and its upload, which
can take longer than any timeout, is queued from there to one worker thread, from a snapshot of the export (hard
links, a copy where links are refused), so the next export can replace the files meanwhile and each push sends one
consistent export. Uploads run in order; a failed one is logged and training goes on (the next export pushes again).
:meth:`BackgroundUploads.finish` waits for the last one, after the other ranks have left (``ddpm.training.loop.train``).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from ..io.hub import HubError, files_to_upload, push_folder

logger = logging.getLogger(__name__)


class BackgroundUploads:
    """Rank 0's Hub pushes of the exports, one at a time, in a worker thread."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hub-push")
        self._pending: list[Future] = []

    def push(self, folder: Path, repo_id: str, *, token: str | None, private: bool, commit_message: str) -> None:
        """Snapshot the pipeline files of ``folder`` now and upload them in the background."""
        snapshot = _snapshot(folder)
        self._pending.append(
            self._executor.submit(
                _push, folder, snapshot, repo_id, token=token, private=private, message=commit_message
            )
        )

    def finish(self) -> None:
        """Wait for every upload: a Hub error was logged as it happened; any other error is raised here."""
        for future in self._pending:
            future.result()
        self._pending.clear()
        self._executor.shutdown()


def _snapshot(folder: Path) -> Path:
    """The pipeline files of ``folder`` linked (or copied) into a temporary folder beside them (never uploaded nor
    kept: ``.tmp-*``)."""
    snapshot = Path(tempfile.mkdtemp(prefix=".tmp-push-", dir=folder))
    for name in files_to_upload(folder):
        target = snapshot / name
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(folder / name, target)  # exports replace files by renaming: a link keeps this export's content
        except OSError:
            shutil.copy2(folder / name, target)
    return snapshot


def _push(folder: Path, snapshot: Path, repo_id: str, *, token: str | None, private: bool, message: str) -> None:
    try:
        push_folder(snapshot, repo_id, token=token, private=private, commit_message=message)
    except HubError as e:  # a network hiccup must not end the run: the next export pushes again
        logger.warning("push to the Hub failed (training goes on): %s", str(e).replace(str(snapshot), str(folder)))
    finally:
        shutil.rmtree(snapshot, ignore_errors=True)
