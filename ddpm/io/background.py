"""Writing in the background: :class:`BackgroundWriter` runs one write at a time on a thread, and :func:`host_copy`
takes the snapshot it writes.

A training checkpoint of the 64 px model (weights, EMA, AdamW moments: ~1.8 GB) takes seconds to serialise and
fsync; the training only has to wait for the copy of its tensors off the device (or, on a CPU, out of the tensors
the next step will change), while the file work overlaps the following steps.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch


def host_copy(obj: Any) -> Any:
    """``obj`` (nested dicts, lists, tuples) with every tensor copied to CPU memory, detached: a snapshot that later
    in-place updates of the originals do not change. Device tensors are copied asynchronously into pinned memory and
    waited for once, at the end."""
    on_cuda = False

    def copy(value: Any) -> Any:
        nonlocal on_cuda
        if isinstance(value, torch.Tensor):
            if value.device.type == "cuda":
                on_cuda = True
                return value.detach().to("cpu", non_blocking=True)
            return value.detach().clone()
        if isinstance(value, dict):
            return type(value)((k, copy(v)) for k, v in value.items())
        if isinstance(value, (list, tuple)):
            return type(value)(copy(v) for v in value)
        return value

    snapshot = copy(obj)
    if on_cuda:
        torch.cuda.synchronize()  # the asynchronous copies are complete before anyone reads the snapshot
    return snapshot


class BackgroundWriter:
    """Runs one write at a time on a daemon thread; at most one is in flight.

    :meth:`submit` first waits for the previous write; :meth:`wait` returns once none is in flight and re-raises,
    once, the exception a write raised, so that a failure surfaces at the next save or at the end of the run.
    """

    def __init__(self, name: str = "background-writer") -> None:
        self.name = name
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, write: Callable[[], None]) -> None:
        """Wait for the previous write (raising its error), then start ``write()`` on the thread."""
        self.wait()

        def run() -> None:
            try:
                write()
            except BaseException as e:  # handed to the training thread by wait()
                self._error = e

        self._thread = threading.Thread(target=run, name=self.name, daemon=True)
        self._thread.start()

    def wait(self) -> None:
        """Block until no write is in flight; raise the error of the last one, if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        if error is not None:
            raise error
