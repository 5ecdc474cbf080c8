"""Process-group setup for ``torchrun`` and the few collectives the training loop needs.

``torchrun`` (single node or multi-node through its rendezvous) exports ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``;
without them the run is a single process and no process group is created. CUDA ranks talk over NCCL, CPU ranks over
gloo. Control traffic (barriers, stop flags, small Python objects) goes through a gloo group in both cases, so it
never waits on, or synchronises with, the GPU streams. Every collective has the group's timeout: a dead rank makes
the others fail after ``timeout_s`` instead of hanging forever.

Signals: the first SIGTERM/SIGINT only sets a flag (the loop finishes its step, saves a checkpoint and exits 0); a
second one exits at once. The ranks agree on when to stop through :class:`StopAgreement`, because a signal can reach
them at different steps.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

# Signals arriving this soon after the first are taken as forwarded copies of it, not as a second request.
DUPLICATE_SIGNAL_WINDOW_S = 2.0


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands: its rank among ``world_size`` processes and the device it trains on."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    control_group: Any = None  # gloo group for barriers and objects (None: single process)

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that logs, samples and writes files."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        """In a process group (several processes, or one started by ``torchrun``): the model trains in DDP."""
        return self.control_group is not None


class PeerFailed(RuntimeError):
    """Rank 0 failed in work the other ranks waited for (:func:`run_on_main`); rank 0 reports its error, this one
    only carries it to the ranks that waited."""


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def restart_count() -> int:
    """How many times ``torchrun --max-restarts`` has restarted this worker group (0: the first start, or no
    torchrun)."""
    return _env_int("TORCHELASTIC_RESTART_COUNT", 0)


def resolve_device(device: str, local_rank: int) -> torch.device:
    """``auto`` picks this rank's GPU when CUDA is available, else the CPU; ``cpu`` / ``cuda`` force it."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"--device={device!r}: choose auto, cpu or cuda")
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("--device=cuda but CUDA is not available")
    if local_rank >= torch.cuda.device_count():
        raise ValueError(
            f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA device(s) are visible: "
            "use --nproc_per_node <= the number of GPUs"
        )
    return torch.device("cuda", local_rank)


def init_distributed(device: str = "auto", timeout_s: float = 7200.0, local_rank: int = -1) -> DistributedContext:
    """Join the ``torchrun`` process group if there is one, else describe a single process.

    A process started by ``torchrun`` joins a group even when it is the only one (as nanoGPT does), so
    ``torchrun --nproc_per_node=1`` runs the multi-GPU path (NCCL, DDP, ``no_sync``) on one GPU; a plain
    ``python scripts/train.py`` is a single process without one. ``local_rank`` is the legacy ``--local_rank``
    flag of ``torch.distributed.launch``; ``LOCAL_RANK`` from the environment wins over it, as in diffusers.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", max(local_rank, 0))
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"inconsistent torchrun environment: RANK={rank}, WORLD_SIZE={world_size}")
    torch_device = resolve_device(device, local_rank)
    if torch_device.type == "cuda":
        torch.cuda.set_device(torch_device)
    if world_size == 1 and "TORCHELASTIC_RUN_ID" not in os.environ:  # torchrun's agent sets it for its workers
        return DistributedContext(device=torch_device)
    timeout = timedelta(seconds=timeout_s)
    group = dict(timeout=timeout, store=agent_store(timeout), rank=rank, world_size=world_size)
    if torch_device.type == "cuda":
        dist.init_process_group("nccl", device_id=torch_device, **group)
        control = dist.new_group(backend="gloo", timeout=timeout)
    else:
        dist.init_process_group("gloo", **group)
        control = dist.group.WORLD
    return DistributedContext(rank, local_rank, world_size, torch_device, control)


def agent_store(timeout: timedelta) -> dist.Store | None:
    """torchrun's key-value store, under a prefix of its own for each restart (None without torchrun's agent: the
    process group then finds its store through ``MASTER_ADDR``/``MASTER_PORT`` itself).

    The agent keeps one store across ``--max-restarts`` restarts: a process group formed again under the same keys
    can read the addresses the killed workers published there, and gloo then fails to connect (seen with torch 2.14).
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timeout)
    return dist.PrefixStore(f"ddpm/restart_{restart_count()}", store)


# How a collective reports a peer that is gone or silent: gloo raises plain RuntimeErrors from its transport;
# NCCL and the rendezvous store raise torch.distributed.DistError subclasses.
_LOST_PEER_MESSAGES = ("Connection closed by peer", "Connection reset by peer", "pair closure", "Timed out waiting")


def lost_peer(error: BaseException) -> bool:
    """Whether ``error`` is a collective noticing that another process left or stopped answering (never alone, as
    under ``torchrun --nproc_per_node=1``: there is no other process, so such an error is something else)."""
    if _env_int("WORLD_SIZE", 1) < 2:
        return False
    if isinstance(error, getattr(dist, "DistError", ())):
        return True
    return isinstance(error, RuntimeError) and any(text in str(error) for text in _LOST_PEER_MESSAGES)


def backend_message(error: BaseException) -> str:
    """The first line of a backend's error message, without its C++ source location (``[.../pair.cc:561] ``)."""
    line = str(error).strip().split("\n")[0]
    if line.startswith("[") and "] " in line:
        line = line.split("] ", 1)[1]
    return line


def leave_by_the_error() -> None:
    """This worker is leaving on an error another process caused: torchrun's agent, which saw that process exit,
    sends this one SIGTERM within its monitor interval (0.1 s); ignore it so that the worker ends by its own exit
    status, not by the signal. A no-op off the main thread (signal handlers can only be set there)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def leave_together(timeout_s: float = 30.0, rank0_wait_s: float = 5.0) -> bool:
    """Before this ``torchrun`` worker exits on an error: count this rank out in the launcher's store; rank 0 then
    waits (at most ``timeout_s``) until every rank has. Returns, on another rank, whether rank 0 is leaving on an
    error too (it counted out within ``rank0_wait_s``: it reports the error, this rank need not); False on rank 0
    and outside torchrun.

    torchrun's agent stops the remaining workers with SIGTERM as soon as one has failed: without this, rank 0 exits
    first and the others, a moment behind, die by that signal. A worker counted out ignores SIGTERM (it is leaving
    anyway). A no-op outside torchrun, whose store this needs (``TORCHELASTIC_USE_AGENT_STORE``).
    """
    world_size = _env_int("WORLD_SIZE", 1)
    if world_size < 2 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return False
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        store = agent_store(timedelta(seconds=timeout_s))
        store.add("leaving", 1)
        if _env_int("RANK", 0) != 0:
            store.wait(["rank0_leaving"], timedelta(seconds=rank0_wait_s))
            return True
        store.set("rank0_leaving", "1")
        deadline = time.monotonic() + timeout_s
        while store.add("leaving", 0) < world_size and time.monotonic() < deadline:
            time.sleep(0.05)
    except (RuntimeError, KeyError, ValueError):  # no store to reach, or rank 0 is not leaving: leave now
        pass
    return False


def shutdown(ctx: DistributedContext) -> None:
    """Leave the process group (a no-op for a single process)."""
    if ctx.is_distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistributedContext) -> None:
    """Wait for every rank (host-side only: queued GPU work is not waited for)."""
    if ctx.is_distributed:
        dist.barrier(group=ctx.control_group)


def broadcast_object(ctx: DistributedContext, obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (small picklable objects: seeds, decisions, messages)."""
    if not ctx.is_distributed:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src, group=ctx.control_group)
    return holder[0]


def gather_objects(ctx: DistributedContext, obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not ctx.is_distributed:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj, group=ctx.control_group)
    return out


def run_on_main(ctx: DistributedContext, fn: Callable[..., Any], *args: Any, share: bool = True) -> Any:
    """Run ``fn(*args)`` on rank 0 while the other ranks wait; its error is raised on every rank (none waits forever):
    rank 0's own, :class:`PeerFailed` on the others.

    Returns ``fn``'s result on rank 0, and on the others too when ``share`` (it must then be small and picklable).
    """
    result, error = None, None
    if ctx.is_main:
        try:
            result = fn(*args)
        except Exception as e:  # re-raised below, after telling the other ranks
            error = e
    if ctx.is_distributed:
        message = f"{type(error).__name__}: {error}" if error is not None else None
        shared, message = broadcast_object(ctx, (result if share else None, message))
        if message is not None and error is None:
            raise PeerFailed(f"rank 0 failed: {message}")
        if not ctx.is_main:
            result = shared
    if error is not None:
        raise error
    return result


def all_reduce_sum(ctx: DistributedContext, tensor: torch.Tensor) -> torch.Tensor:
    """The sum of ``tensor`` over ranks (in place, on the training backend)."""
    if ctx.is_distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_mean(ctx: DistributedContext, tensor: torch.Tensor) -> torch.Tensor:
    """The mean of ``tensor`` over ranks (in place, on the training backend)."""
    if ctx.is_distributed:
        all_reduce_sum(ctx, tensor).div_(ctx.world_size)
    return tensor


def broadcast_module(ctx: DistributedContext, module: torch.nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers of ``module`` into every rank's (in place)."""
    if ctx.is_distributed:
        for tensor in module.state_dict().values():
            dist.broadcast(tensor, src=src)


class GracefulStop:
    """SIGTERM/SIGINT handler: the first signal sets :attr:`requested`, a second one exits at once.

    A second signal within :data:`DUPLICATE_SIGNAL_WINDOW_S` of the first is ignored: Ctrl-C under torchrun reaches
    the workers both from the terminal and from torchrun, and SLURM signals every process of the job.

    Used as a context manager around the training loop; the previous handlers are restored on exit. Only the main
    thread of the main interpreter can install handlers; elsewhere (e.g. a test thread) this does nothing.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.requested = False
        self.signal_name: str | None = None
        self._first_at = 0.0
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.requested:
            # A launcher that forwards the signal it got (torchrun, or SLURM signalling every process) delivers a
            # copy right after the first: that is not a user insisting.
            if time.monotonic() - self._first_at < DUPLICATE_SIGNAL_WINDOW_S:
                return
            sys.stderr.write(f"\n{name} received again: exiting now without saving\n")
            os._exit(128 + signum)
        self.requested = True
        self.signal_name = name
        self._first_at = time.monotonic()
        sys.stderr.write(f"\n{name} received: finishing the current step, saving a checkpoint, then exiting\n")

    def __enter__(self) -> GracefulStop:
        try:
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread
            self._previous.clear()
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def ignore_stop_signals(worker_id: int | None = None) -> None:
    """DataLoader ``worker_init_fn``: workers ignore SIGTERM/SIGINT and let the main process stop cleanly.

    Without it, a Ctrl-C (sent to the whole process group) or a cluster's SIGTERM kills the workers and the main
    process fails fetching the last batches it needs to finish its step.
    """
    for sig in GracefulStop.SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


class StopAgreement:
    """Makes every rank stop after the same optimizer step when any of them asked to.

    Each call of :meth:`poll` starts a non-blocking all-reduce (MAX) of this rank's flag and returns the result of the
    previous call's all-reduce, so the decision lags one step but costs no waiting; all ranks call :meth:`poll` at
    the same steps, so they all see the same answer. A single process answers at once.
    """

    def __init__(self, ctx: DistributedContext) -> None:
        self.ctx = ctx
        self._pending: tuple[Any, torch.Tensor] | None = None

    def poll(self, local_request: bool) -> bool:
        if not self.ctx.is_distributed:
            return local_request
        agreed = self._collect()
        flag = torch.tensor([int(local_request)], dtype=torch.int32)
        work = dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.ctx.control_group, async_op=True)
        self._pending = (work, flag)
        return agreed

    def _collect(self) -> bool:
        if self._pending is None:
            return False
        work, flag = self._pending
        self._pending = None
        work.wait()
        return bool(flag.item())

    def finish(self) -> None:
        """Complete the outstanding all-reduce (call before leaving the loop, on every rank)."""
        self._collect()
