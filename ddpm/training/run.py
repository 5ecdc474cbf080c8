"""The parts of one training run, as one declared object: :class:`Run`, built by :func:`ddpm.training.setup.build_run`.

Every part the loop, the step, the checkpoints and the epoch-end outputs use is a field here, built once before the
first step and never replaced; what changes while training (the position, the counters) is
:class:`ddpm.training.state.TrainState`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import LRScheduler
from torch.utils.data import DataLoader

from ..data.datasets import ImageDataset
from ..data.prepared import PreparedImages
from ..data.sampler import GlobalBatchSampler
from ..diffusion.schedule import NoiseSchedule, ScheduleConfig
from ..evaluation.fid_monitor import FIDMonitor
from ..io.background import BackgroundWriter
from ..models.ema import EMA
from ..models.unet import UNet, UNetConfig
from ..runtime.distributed import DistributedContext
from ..runtime.precision import Precision
from .config import TrainConfig
from .run_log import RunLog
from .uploads import BackgroundUploads

# (x0, t, noise) -> the mean loss: NoiseSchedule.training_loss with the model (in DDP) bound, maybe compiled.
TrainingLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True, eq=False)
class Run:
    """One run of :func:`ddpm.training.loop.train` on this process: its settings and every part built from them."""

    # ---- the settings, and where they run
    config: TrainConfig
    ctx: DistributedContext  # this process's rank among world_size processes, and its device
    command: str | None  # the command line (token-free), recorded in checkpoints and the model card
    seed: int  # --seed, else the resumed run's, else drawn once on rank 0 and shared
    run_config: dict[str, Any]  # the settings with the seed and command, as checkpoints and trackers record them
    # ---- the model
    unet_config: UNetConfig  # at sample_size = --resolution
    schedule_config: ScheduleConfig
    unet: UNet  # the live weights (the raw module: what is saved, sampled and exported)
    channels_last: bool  # the memory format of the UNet and its inputs (setup.use_channels_last)
    training_loss: TrainingLoss  # the forward pass: noising, unet (in DDP on several processes), loss; compiled?
    ddp: DistributedDataParallel | None  # the DDP wrapper (for no_sync on non-final micro-steps); None on 1 process
    ema: EMA | None  # --use_ema, on rank 0 only: it saves the average and broadcasts it for the shared grids
    # ---- the data
    dataset: ImageDataset | PreparedImages  # a prepared folder, or the source images decoded on the fly
    sampler: GlobalBatchSampler  # the global batch layout: this rank's share of each optimizer step's images
    loader: DataLoader  # micro-batches of this rank, in the sampler's order
    total_steps: int  # optimizer steps of the whole run (--max_train_steps, else --num_epochs epochs)
    # ---- one optimizer step
    optimizer: torch.optim.Optimizer  # AdamW on the live weights
    fused: bool  # the optimizer is fused: it skips a non-finite step on the device (found_inf), without a host sync
    lr_scheduler: LRScheduler  # stepped once per optimizer step
    precision: Precision  # the forward pass's autocast dtype
    scaler: torch.amp.GradScaler  # loss scaling, enabled for fp16 only
    train_schedule: NoiseSchedule  # its arrays on the training device: indexing them costs no host sync
    noise_generator: torch.Generator  # on the training device, re-seeded with (seed, NOISE, step) every step
    # ---- outputs
    sampling_unet: UNet  # every rank's copy of the weights to sample grids and FID samples with (EMA if any)
    sample_schedule: NoiseSchedule  # of the sample grids and FID samples
    fid: FIDMonitor | None  # --fid_every_steps > 0
    log: RunLog  # rank 0's status lines or progress bar, metrics.jsonl and tracker
    checkpoints: BackgroundWriter  # rank 0's checkpoint writes, one at a time, while the training goes on
    exports: BackgroundWriter  # rank 0's pipeline exports (and the uploads they start), one at a time, likewise
    uploads: BackgroundUploads | None  # --push_to_hub, rank 0: the exports' uploads, in a background thread

    @property
    def device(self) -> torch.device:
        return self.ctx.device

    @property
    def output_dir(self) -> Path:
        return Path(self.config.output_dir)

    @property
    def global_batch(self) -> int:
        """Images per optimizer step, over every process and micro-step."""
        return self.sampler.global_batch_size

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.steps_per_epoch

    @property
    def num_epochs(self) -> int:
        """Epochs to begin for ``total_steps`` (the last one may end early)."""
        return math.ceil(self.total_steps / self.steps_per_epoch)
