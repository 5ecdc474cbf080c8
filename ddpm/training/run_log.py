"""Rank 0's outputs of a run: a tqdm bar (on a TTY) or status lines, ``metrics.jsonl``, TensorBoard or wandb.

Every record goes to ``logs/metrics.jsonl`` (one JSON object a line, appended to by resumed runs) and, its numbers
as ``train/<key>`` or ``eval/<key>``, to the tracker of ``--logger``. On other ranks a :class:`RunLog` does nothing.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..io.images import to_uint8
from .config import TrainConfig

TRACKER_PROJECT = "train_unconditional"  # TensorBoard sub-folder / wandb project, as accelerate names them
METRICS_FILE = "metrics.jsonl"


class RunLog:
    """Rank 0's outputs: tqdm bar (on a TTY) or status lines, ``metrics.jsonl``, TensorBoard / wandb."""

    def __init__(
        self,
        config: TrainConfig,
        enabled: bool,
        log_dir: Path,
        run_config: dict[str, Any],
        wandb_run_id: str | None = None,
    ) -> None:
        """``wandb_run_id``: the wandb run a resumed run continues (kept in its checkpoints, see :attr:`wandb_run_id`);
        None starts a new one."""
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.bar: tqdm | None = None
        self.tensorboard = None
        self.wandb = None
        if not enabled:
            return
        log_dir.mkdir(parents=True, exist_ok=True)
        _drop_partial_line(log_dir / METRICS_FILE)
        self.metrics = open(log_dir / METRICS_FILE, "a")  # appended to by resumed runs; closed in close()
        # the package is there: ddpm.training.setup.check_config refused the flag otherwise
        if config.logger == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(log_dir / TRACKER_PROJECT))
        elif config.logger == "wandb":
            import wandb

            self.wandb = wandb.init(
                project=TRACKER_PROJECT, config=run_config, dir=str(log_dir), id=wandb_run_id, resume="allow"
            )

    @property
    def wandb_run_id(self) -> str | None:
        """The wandb run's id (None without wandb): saved in checkpoints so that a resumed run logs to the same run."""
        return self.wandb.id if self.wandb is not None else None

    def start_bar(self, total: int, initial: int) -> None:
        if self.enabled and self.tty:
            self.bar = tqdm(total=total, initial=initial, desc="Steps", dynamic_ncols=True)

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def write(self, message: str) -> None:
        """A line for the user, above the bar."""
        if self.enabled:
            tqdm.write(message, file=sys.stderr)

    def _record(self, record: dict[str, Any], group: str) -> None:
        """One line of ``metrics.jsonl``; its numbers to the tracker as ``group/key``."""
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()
        step = record["step"]
        numbers = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        if self.tensorboard is not None:
            for key, value in numbers.items():
                self.tensorboard.add_scalar(f"{group}/{key}", value, step)
        if self.wandb is not None:
            self.wandb.log({f"{group}/{key}": value for key, value in numbers.items()}, step=step)

    def scalars(self, record: dict[str, Any], total_steps: int) -> None:
        if not self.enabled:
            return
        self._record(record, "train")
        if self.bar is not None:
            self.bar.set_postfix(
                loss=f"{record['loss']:.4g}",
                lr=f"{record['lr']:.3g}",
                img_s=f"{record['img_s']:.1f}",
                data_wait=f"{record['data_wait']:.0%}",
            )
        else:
            mem = record.get("peak_mem_gb")
            tqdm.write(
                f"step {record['step']}/{total_steps}  epoch {record['epoch']}  img/s {record['img_s']:.1f}  "
                f"sec/step {record['sec_per_step']:.3f}  data_wait {record['data_wait']:.0%}  "
                f"loss {record['loss']:.4f}  lr {record['lr']:.3e}  "
                f"gnorm {record['grad_norm']:.3f}  skipped {record['skipped_steps']}"
                + (f"  mem {mem:.2f}GB" if mem is not None else ""),
                file=sys.stderr,
            )

    def evaluation(self, record: dict[str, Any]) -> None:
        """An FID record (``step``, ``fid``, ``fid_num_samples``, ``fid_seconds``)."""
        if not self.enabled:
            return
        self._record(record, "eval")
        self.write(
            f"step {record['step']}  FID {record['fid']:.3f}  ({record['fid_num_samples']} EMA samples, "
            f"{record['fid_seconds']:.1f} s)"
        )

    def images(self, images: torch.Tensor, epoch: int, step: int) -> None:
        if not self.enabled:
            return
        pixels = to_uint8(images)  # NHWC uint8
        if self.tensorboard is not None:
            self.tensorboard.add_images("test_samples", pixels.transpose(0, 3, 1, 2), epoch)
        if self.wandb is not None:
            import wandb

            frames = [wandb.Image(img[..., 0] if img.shape[-1] == 1 else img) for img in pixels]
            self.wandb.log({"test_samples": frames, "epoch": epoch}, step=step)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        self.metrics.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


def _drop_partial_line(path: Path) -> None:
    """Cut an unfinished last line (a run killed mid-write) so that the records appended next stay valid JSON lines."""
    if not path.is_file():
        return
    with open(path, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)


def peak_memory_gb(device: torch.device) -> float | None:
    """Peak memory of this process on ``device``: allocated CUDA memory, else the resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import resource
    except ImportError:  # Windows
        return None
    # ru_maxrss is in KiB on Linux (bytes on macOS, where this reads high by 1024x)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
