"""File helpers every writer and reader uses: one atomic-write mechanism, JSON, safetensors, safe ``torch.load``.

Nothing here unpickles arbitrary objects: weights are safetensors, everything else loads with
``torch.load(weights_only=True)``. Errors name the file at fault.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

# How safetensors' Rust writer names the OS error of a failed write: "... (os error 28)" (0.5 on), "IoError(Os {
# code: 28, ...})" (0.4).
_OS_ERROR = re.compile(r"\(os error (\d+)\)|Os \{ code: (\d+)")


@contextmanager
def atomic_write_dir(final_path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``final_path``; on success it replaces ``final_path``, on error it is removed.

    An existing ``final_path`` is only removed once the new folder is complete, so a failure at any point leaves
    the previous content intact (a kill between its two renames leaves it as :func:`replaced_dir_name`, which
    the next writer may restore).
    """
    final_path = Path(final_path)
    final_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final_path.name}-", dir=final_path.parent))
    try:
        yield tmp
        fsync_tree(tmp)
        if final_path.exists():
            old = final_path.with_name(replaced_dir_name(final_path.name, os.getpid()))
            final_path.rename(old)
            tmp.rename(final_path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final_path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replaced_dir_name(name: str, pid: int | str = "*") -> str:
    """Where :func:`atomic_write_dir` keeps the folder ``name`` it replaces until the new one is in place (a glob
    pattern with the default ``pid``); :func:`replaced_dir_original` is the way back."""
    return f".old-{name}-{pid}"


def replaced_dir_original(replaced: str) -> str:
    """The name of the folder that :func:`replaced_dir_name` set aside as ``replaced``."""
    return replaced.removeprefix(".old-").rpartition("-")[0]


@contextmanager
def atomic_write_file(final_path: str | Path, shared: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``final_path`` to write; on success it is flushed and renamed over ``final_path``,
    on error removed. A file that exists under its final name is therefore always complete.

    When one process writes a given path, the temporary name is fixed: a rerun after a kill mid-write overwrites the
    leftover instead of adding another. ``shared=True`` is for a file several processes may write at once (a cache
    the ranks of a run fill alike): each writes a temporary file of its own, and the last rename wins."""
    final_path = Path(final_path)
    final_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = final_path.with_name(f".{final_path.name}.tmp" + (f"-{os.getpid()}" if shared else ""))
    try:
        yield tmp
        commit_file(tmp, final_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def commit_file(written: Path, final_path: Path) -> None:
    """Flush ``written`` to disk, then rename it to ``final_path`` (a power cut must not expose a file of zeros)."""
    with open(written, "rb") as f:
        os.fsync(f.fileno())
    os.replace(written, final_path)


def fsync_tree(root: Path) -> None:
    """Flush the contents of the files under ``root`` to disk (before a rename makes them visible: a power cut must
    not expose zeros; a full disk may refuse only here, where file systems allocate late)."""
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def write_json(data: dict[str, Any], path: str | Path) -> None:
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_json(path: str | Path) -> dict[str, Any]:
    """Read a JSON object; errors name the file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"missing file {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def write_safetensors(tensors: dict[str, torch.Tensor], path: str | Path) -> None:
    """Save contiguous CPU tensors with the ``{"format": "pt"}`` metadata diffusers and transformers expect.

    A failed write (disk full, quota, file too large) raises the ``OSError`` it is, as Python's own writes do.
    """
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})
    except SafetensorError as e:
        found = _OS_ERROR.search(str(e))  # the Rust writer gives the OS error in its message only
        if found is None:
            raise
        code = int(found.group(1) or found.group(2))
        raise OSError(code, os.strerror(code), str(path)) from e


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file on the CPU; a truncated or corrupt file gives an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"missing weights file {path}")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"corrupt or truncated weights file {path}: {e}") from e


def write_torch_state(obj: Any, path: str | Path) -> None:
    """``torch.save`` of plain tensors and containers; a failed write raises the ``OSError`` it is.

    torch reports a failed write as a ``RuntimeError`` about stream positions; written through a Python file, the
    ``OSError`` of that write is the error's context, and is what the caller gets, naming ``path``.
    """
    with open(path, "wb") as f:
        try:
            torch.save(obj, f)
        except RuntimeError as e:
            failed = e.__context__
            if isinstance(failed, OSError):
                raise OSError(failed.errno, failed.strerror, str(path)) from e
            raise


def read_torch_state(path: str | Path) -> Any:
    """``torch.load(weights_only=True)``: plain tensors and containers only, never arbitrary pickled objects."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"missing file {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, truncated zip archives, refused globals all land here
        raise ValueError(f"cannot load {path} (corrupt, truncated or not a plain-tensor file): {e}") from e
