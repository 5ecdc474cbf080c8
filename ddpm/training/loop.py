"""The training job: diffusers' ``train_unconditional.py`` without accelerate, without its known defects.

:class:`ddpm.training.config.TrainConfig` holds every hyper-parameter (its fields are the command-line flags of
``scripts/train.py``, with train_unconditional's names, defaults and meanings); :func:`train` runs it on one process
or on every process of a ``torchrun`` launch.

What one optimizer step sees depends only on ``(seed, step)`` and the global batch ``G = per-device batch x processes
x accumulation``: the images come from :class:`~ddpm.data.sampler.GlobalBatchSampler` (this rank's slice of the step's
global batch, augmentations seeded per sample), and the timesteps and noise of the *whole* global batch are drawn on the
training device from a generator seeded with ``(seed, step)``, each micro-batch taking its slice. So one process with
batch G, N processes with G/N, and accumulation all average the same per-sample gradients, and a resumed run needs
no replay of random numbers. Each micro-batch loss is divided by the accumulation steps (DDP averages over ranks),
gradients are only all-reduced on the last micro-step (``no_sync``), clipped, and one AdamW step, one LR-scheduler
step and one EMA update follow.

Non-finite gradients skip the step in every precision (GradScaler for fp16; fused AdamW's ``found_inf`` or a check
otherwise) and are counted; ``max_nonfinite_steps`` in a row stop the run. No per-step host synchronisation: losses
and norms stay on the device until a log tick every ``logging_steps`` steps.

Resuming under another layout: with the same global batch G (e.g. 2 processes x batch 4 -> 1 process x batch 8, or
accumulation instead of processes) the run continues with the same step counter, LR schedule and data stream; with
another G it continues after the same number of samples seen (step ``samples_seen // G``, the LR schedule there).
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import secrets
import shlex
import shutil
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from ..data.datasets import ImageDataset, load_image_dataset
from ..data.sampler import GlobalBatchSampler, build_dataloader, derive_seed
from ..data.transforms import ImageTransform
from ..diffusion.samplers import ddim_sample, ddpm_sample
from ..diffusion.schedule import NoiseSchedule, ScheduleConfig
from ..evaluation.fid_monitor import FIDMonitor
from ..io.checkpoint import (
    CONFIG_NAME,
    MODEL_NAME,
    STATE_NAME,
    TrainingCheckpoint,
    capture_rng_state,
    checkpoint_step,
    is_training_checkpoint,
    latest_checkpoint,
    list_checkpoints,
    load_training_checkpoint,
    missing_files,
    remove_interrupted_saves,
    restore_rng_state,
    rotate_checkpoints,
    save_training_checkpoint,
)
from ..io.hub import hub_id_or_none
from ..io.images import save_grid, to_uint8
from ..models.ema import EMA
from ..models.unet import UNet, UNetConfig
from ..runtime.distributed import (
    DistributedContext,
    GracefulStop,
    StopAgreement,
    all_reduce_mean,
    barrier,
    broadcast_object,
    gather_objects,
    ignore_stop_signals,
    init_distributed,
    shutdown,
)
from ..runtime.precision import check_precision_support
from .config import TrainConfig, resize_unet
from .lr_schedule import build_lr_scheduler

logger = logging.getLogger(__name__)

TRACKER_PROJECT = "train_unconditional"  # TensorBoard sub-folder / wandb project, as accelerate names them
SAMPLES_DIR = "samples"
METRICS_FILE = "metrics.jsonl"
# Seed streams: ddpm.data uses 0 (permutations) and 1 (augmentations).
_NOISE_STREAM = 2
_PROCESS_STREAM = 3
# What a previous run leaves in output_dir; any of these makes a fresh start need --overwrite_output_dir.
_RUN_MARKERS = ("model_index.json", "unet", "scheduler")


# ---------------------------------------------------------------------------------------------------- results


@dataclass
class TrainResult:
    """What :func:`train` returns (on every rank)."""

    global_step: int
    epoch: int
    stopped_by_signal: bool
    last_checkpoint: Path | None
    unet: UNet  # live weights (the raw module, not the DDP/compiled wrapper)
    ema: EMA | None  # rank 0 only


class TrainingError(RuntimeError):
    """The run stopped for a reason the user must act on; the message says what happened and what to do."""


class TrainingDiverged(TrainingError):
    """Too many optimizer steps in a row had non-finite gradients."""


class CheckpointSaveError(TrainingError):
    """A checkpoint could not be written (disk full, quota, I/O error); the previous one is intact."""


@dataclass
class _Position:
    """Where the run is; saved in checkpoints."""

    global_step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0  # optimizer steps done in ``epoch``
    samples_seen: int = 0


# ---------------------------------------------------------------------------------------------------- logging


class _RunLog:
    """Rank 0's outputs: tqdm bar (on a TTY) or status lines, ``metrics.jsonl``, TensorBoard / wandb."""

    def __init__(self, config: TrainConfig, enabled: bool, log_dir: Path, run_config: dict[str, Any]) -> None:
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
        if config.logger == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                logger.warning("--logger tensorboard: the tensorboard package is not installed; skipping it")
            else:
                self.tensorboard = SummaryWriter(str(log_dir / TRACKER_PROJECT))
        elif config.logger == "wandb":
            try:
                import wandb
            except ImportError:
                logger.warning("--logger wandb: the wandb package is not installed; skipping it")
            else:
                self.wandb = wandb.init(project=TRACKER_PROJECT, config=run_config, dir=str(log_dir))

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
            self.bar.set_postfix(loss=f"{record['loss']:.4g}", lr=f"{record['lr']:.3g}", img_s=f"{record['img_s']:.1f}")
        else:
            mem = record.get("peak_mem_gb")
            tqdm.write(
                f"step {record['step']}/{total_steps}  epoch {record['epoch']}  img/s {record['img_s']:.1f}  "
                f"sec/step {record['sec_per_step']:.3f}  loss {record['loss']:.4f}  lr {record['lr']:.3e}  "
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


def _peak_memory_gb(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import resource
    except ImportError:  # Windows
        return None
    # ru_maxrss is in KiB on Linux (bytes on macOS, where this reads high by 1024x)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


# ---------------------------------------------------------------------------------------------------- trainer


class _Trainer:
    """One run of :func:`train` on this process; see the module docstring for the algorithm."""

    def __init__(self, config: TrainConfig, ctx: DistributedContext, command: str | None) -> None:
        self.cfg = config
        self.ctx = ctx
        self.device = ctx.device
        self.command = command
        self.out = Path(config.output_dir)
        self.amp_dtype = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}[config.mixed_precision]

    # ------------------------------------------------------------------ collectives around rank-0 work

    def _on_main(self, fn: Any, *args: Any, share: bool = True) -> Any:
        """Run ``fn`` on rank 0 while the other ranks wait; its error is raised on every rank (none waits forever).

        Returns ``fn``'s result on rank 0, and on the others too when ``share`` (it must then be small and
        picklable).
        """
        result, error = None, None
        if self.ctx.is_main:
            try:
                result = fn(*args)
            except Exception as e:  # re-raised below, after telling the other ranks
                error = e
        if self.ctx.is_distributed:
            message = f"{type(error).__name__}: {error}" if error is not None else None
            shared, message = broadcast_object(self.ctx, (result if share else None, message))
            if message is not None and error is None:
                raise RuntimeError(f"rank 0 failed: {message}")
            if not self.ctx.is_main:
                result = shared
        if error is not None:
            raise error
        return result

    # ------------------------------------------------------------------ setup

    def _prepare_output_dir(self) -> str | None:
        """Rank 0: resolve the checkpoint to resume from, and check or clear ``output_dir``."""
        cfg = self.cfg
        if cfg.overwrite_output_dir:
            self._clear_previous_run()
        resume = _resolve_resume(cfg.resume_from_checkpoint, self.out)
        if resume is None and cfg.resume_from_checkpoint is None and self.out.is_dir():
            found = sorted(p.name for p in self.out.iterdir() if p.name in _RUN_MARKERS) + [
                p.name for p in list_checkpoints(self.out)
            ]
            if found:
                raise ValueError(
                    f"--output_dir {self.out} already holds a training run ({', '.join(found)}): pass "
                    "--resume_from_checkpoint latest to continue it, or --overwrite_output_dir to start over"
                )
        if resume is not None:
            newer = [p.name for p in list_checkpoints(self.out) if checkpoint_step(p) > (checkpoint_step(resume) or -1)]
            if newer:
                logger.warning(
                    "%s in %s are newer than the checkpoint resumed from (%s): this run replaces them as it reaches "
                    "their steps; until then --resume_from_checkpoint latest would pick them",
                    ", ".join(newer),
                    self.out,
                    resume.name,
                )
        self.out.mkdir(parents=True, exist_ok=True)
        for stale in remove_interrupted_saves(self.out):
            logger.warning("removed %s, the remains of an interrupted checkpoint save", stale)
        return None if resume is None else str(resume)

    def _clear_previous_run(self) -> None:
        """Delete what a run writes (never other files): checkpoints, the export, samples and logs."""
        if not self.out.is_dir():
            return
        doomed = [self.out / name for name in (SAMPLES_DIR, self.cfg.logging_dir)]
        if (self.out / "model_index.json").is_file():  # an export: its card and grid go with it
            doomed += [self.out / name for name in (*_RUN_MARKERS, "README.md", "samples.png")]
        doomed += [*self.out.glob("checkpoint-*"), *self.out.glob(".tmp-*")]
        for path in doomed:
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
        logger.info("--overwrite_output_dir: cleared the previous run in %s", self.out)

    def _model_description(self) -> tuple[UNetConfig, ScheduleConfig, dict[str, torch.Tensor] | None]:
        cfg = self.cfg
        if cfg.pretrained_model_name_or_path is None:
            return cfg.unet_config(), cfg.schedule_config(), None
        from ..io.pretrained import load_model

        unet, schedule, weights = load_model(cfg.pretrained_model_name_or_path, cache_dir=cfg.cache_dir)
        resized = resize_unet(unet.to_dict(), cfg.resolution, cfg.pretrained_model_name_or_path)
        return resized, cfg.schedule_config(schedule), weights

    def _load_dataset(self, channels: int) -> ImageDataset:
        cfg = self.cfg

        def load() -> ImageDataset:
            data, column = load_image_dataset(
                cfg.dataset_name, cfg.dataset_config_name, cfg.train_data_dir, cfg.cache_dir, cfg.image_column
            )
            transform = ImageTransform(cfg.resolution, channels, cfg.center_crop, cfg.random_flip)
            return ImageDataset(data, column, transform, skip_corrupt_images=cfg.skip_corrupt_images)

        # Rank 0 downloads and prepares the cache alone, then the others read it.
        dataset = self._on_main(load, share=False)
        return dataset if self.ctx.is_main else load()

    def _build_optimizer(self, unet: UNet) -> tuple[torch.optim.Optimizer, bool]:
        cfg = self.cfg
        kwargs = dict(
            lr=cfg.learning_rate,
            betas=(cfg.adam_beta1, cfg.adam_beta2),
            weight_decay=cfg.adam_weight_decay,
            eps=cfg.adam_epsilon,
        )
        try:  # fused: one kernel per step, and it can skip a step on the device (found_inf) without a host sync
            return torch.optim.AdamW(unet.parameters(), fused=True, **kwargs), True
        except (RuntimeError, TypeError):  # a device or PyTorch version without fused AdamW
            return torch.optim.AdamW(unet.parameters(), **kwargs), False

    def _repo_id(self) -> str:
        return self.cfg.hub_model_id or self.out.resolve().name

    def _create_repo(self) -> None:
        """Rank 0, before training: a missing token or a wrong repo id fails now, not after hours of training."""
        from ..io.hub import ensure_repo

        url = ensure_repo(self._repo_id(), token=self.cfg.hub_token, private=self.cfg.hub_private_repo)
        logger.info("pushing exports to %s", url)

    def _configure_backends(self) -> None:
        cfg = self.cfg
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick the fastest kernels once
            if cfg.allow_tf32:
                torch.backends.cuda.matmul.allow_tf32 = True
                torch.backends.cudnn.allow_tf32 = True
        if cfg.enable_xformers_memory_efficient_attention:
            logger.info(
                "--enable_xformers_memory_efficient_attention: not needed, attention already runs on PyTorch's "
                "scaled_dot_product_attention (flash / memory-efficient kernels)"
            )

    def _seed(self, checkpoint: TrainingCheckpoint | None) -> int:
        saved = None if checkpoint is None else checkpoint.training_state.get("seed")
        if self.cfg.seed is not None:
            if saved is not None and saved != self.cfg.seed:
                logger.warning(
                    "--seed=%d differs from the checkpoint's seed %d: data order and noise will not continue the "
                    "interrupted run's",
                    self.cfg.seed,
                    saved,
                )
            return self.cfg.seed
        if saved is not None:
            return int(saved)
        return int(broadcast_object(self.ctx, secrets.randbits(62)))

    # ------------------------------------------------------------------ run

    def run(self) -> TrainResult:
        cfg, ctx, device = self.cfg, self.ctx, self.device
        check_precision_support(cfg.mixed_precision, device)
        self._configure_backends()
        resume_path = self._on_main(self._prepare_output_dir)
        if cfg.push_to_hub:
            self._on_main(self._create_repo)
        checkpoint = load_training_checkpoint(resume_path) if resume_path else None
        seed = self.seed = self._seed(checkpoint)
        unet_config, schedule_config, init_weights = self._model_description()
        if checkpoint is not None:
            _check_same_model(checkpoint, unet_config, schedule_config)
        self.unet_config, self.schedule_config = unet_config, schedule_config

        dataset = self.dataset = self._load_dataset(unet_config.in_channels)
        B, accum, world = cfg.train_batch_size, cfg.gradient_accumulation_steps, ctx.world_size
        self.global_batch = B * world * accum
        sampler = GlobalBatchSampler(len(dataset), B, world, ctx.rank, accum, seed)
        loader = build_dataloader(dataset, sampler, B, cfg.dataloader_num_workers, device.type == "cuda")
        loader.worker_init_fn = ignore_stop_signals
        steps_per_epoch = sampler.steps_per_epoch
        total_steps = cfg.max_train_steps or cfg.num_epochs * steps_per_epoch
        num_epochs = math.ceil(total_steps / steps_per_epoch)

        torch.manual_seed(seed)  # identical initial weights on every rank
        unet = self.unet = UNet(unet_config)
        if init_weights is not None:
            unet.load_state_dict(init_weights)
        memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        unet.to(device, memory_format=memory_format)
        unet.gradient_checkpointing = cfg.gradient_checkpointing
        torch.manual_seed(derive_seed(seed, _PROCESS_STREAM, ctx.rank))  # dropout etc.: a stream per rank

        optimizer, fused = self._build_optimizer(unet)
        self.optimizer, self.fused = optimizer, fused
        self.lr_scheduler = build_lr_scheduler(
            optimizer,
            cfg.lr_scheduler,
            cfg.lr_warmup_steps,
            total_steps,
            num_cycles=cfg.lr_num_cycles,
            power=cfg.lr_power,
        )
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.mixed_precision == "fp16")
        pos = _Position()
        self.skipped_before = 0
        if checkpoint is not None:
            unet.load_state_dict(checkpoint.model_state)
        self.ema = None
        if cfg.use_ema and ctx.is_main:  # only rank 0 samples and saves, so only it keeps the average
            self.ema = EMA(unet, inv_gamma=cfg.ema_inv_gamma, power=cfg.ema_power, max_decay=cfg.ema_max_decay)
        if checkpoint is not None:
            pos = self._restore(checkpoint, steps_per_epoch)
        self.last_saved_step = pos.global_step if checkpoint is not None else -1
        self.last_checkpoint = checkpoint.path if checkpoint is not None else None

        model: torch.nn.Module = unet
        self.ddp = None
        if ctx.is_distributed:
            device_ids = [device.index] if device.type == "cuda" else None
            self.ddp = model = DistributedDataParallel(unet, device_ids=device_ids, gradient_as_bucket_view=True)
        if cfg.compile:
            model = torch.compile(model)
        self.model = model

        # The schedule's arrays on the training device: indexing a CPU array per step would sync the host.
        self.train_schedule = NoiseSchedule(schedule_config)
        self.train_schedule.alphas_cumprod = self.train_schedule.alphas_cumprod.to(device)
        self.sample_schedule = NoiseSchedule(schedule_config)
        self.fid = self._fid_monitor() if cfg.fid_every_steps else None

        run_config = {**cfg.to_dict(), "seed": seed, "command": self.command}
        self.run_config = run_config
        self.log = _RunLog(cfg, ctx.is_main, self.out / cfg.logging_dir, run_config)
        self._announce(len(dataset), steps_per_epoch, total_steps, num_epochs, unet)
        try:
            stopped = self._loop(loader, sampler, pos, steps_per_epoch, total_steps, num_epochs)
        finally:
            self.log.close()
        barrier(ctx)
        return TrainResult(pos.global_step, pos.epoch, stopped, self.last_checkpoint, unet, self.ema)

    def _fid_monitor(self) -> FIDMonitor:
        """Loads the Inception network (failing now if its weights are missing) and the reference statistics."""
        cfg = self.cfg
        names = ("dataset_name", "dataset_config_name", "train_data_dir", "image_column", "resolution", "center_crop")
        return FIDMonitor(
            self.ctx,
            self.unet,
            self.sample_schedule,
            num_samples=cfg.fid_num_samples,
            num_inference_steps=cfg.fid_inference_steps,
            batch_size=cfg.fid_batch_size,
            reference=cfg.fid_reference,
            training_images=self.dataset,
            training_source={**{name: getattr(cfg, name) for name in names}, "channels": self.unet_config.in_channels},
            cache_dir=self.out,
            inception_weights=cfg.inception_weights,
            amp_dtype=self.amp_dtype,
        )

    def _announce(self, n_images: int, steps_per_epoch: int, total_steps: int, num_epochs: int, unet: UNet) -> None:
        cfg = self.cfg
        self.log.write(
            "***** Running training *****\n"
            f"  Num examples = {n_images}\n"
            f"  Num Epochs = {num_epochs}\n"
            f"  Instantaneous batch size per device = {cfg.train_batch_size}\n"
            f"  Total train batch size (w. parallel, distributed & accumulation) = {self.global_batch}"
            f" ({cfg.train_batch_size} x {self.ctx.world_size} processes x {cfg.gradient_accumulation_steps})\n"
            f"  Gradient Accumulation steps = {cfg.gradient_accumulation_steps}\n"
            f"  Optimizer steps per epoch = {steps_per_epoch}\n"
            f"  Total optimization steps = {total_steps}\n"
            f"  Model parameters = {unet.num_parameters():,}; device {self.device}; precision "
            f"{cfg.mixed_precision}; seed {self.seed}"
        )
        if self.device.type == "cuda" and cfg.dataloader_num_workers == 0:
            self.log.write("  Tip: --dataloader_num_workers 4 (or more) keeps the GPU fed")

    def _restore(self, checkpoint: TrainingCheckpoint, steps_per_epoch: int) -> _Position:
        """Load the optimizer, schedulers, EMA, RNG and position of ``checkpoint`` (weights are already in)."""
        state = checkpoint.training_state
        self.optimizer.load_state_dict(state["optimizer"])
        for group in self.optimizer.param_groups:  # the implementation is this machine's choice, not the saver's
            group["fused"], group["foreach"] = (True, None) if self.fused else (None, None)
        if self.scaler.is_enabled() and state.get("grad_scaler"):
            self.scaler.load_state_dict(state["grad_scaler"])
        if self.ema is not None:
            if checkpoint.ema_state is None or state.get("ema") is None:
                logger.warning("%s has no EMA weights: the EMA starts from the resumed weights", checkpoint.path)
            else:
                self.ema.load_state_dict(state["ema"], checkpoint.ema_state)
        self.skipped_before = int(state.get("skipped_steps", 0))
        old_batch = int(state["global_batch_size"])
        pos = _Position(
            global_step=int(state["global_step"]),
            epoch=int(state["epoch"]),
            step_in_epoch=int(state["step_in_epoch"]),
            samples_seen=int(state["samples_seen"]),
        )
        if old_batch == self.global_batch:
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        else:
            # Continue from the same number of samples seen: step counters are re-expressed in new global batches.
            pos.global_step = pos.samples_seen // self.global_batch
            pos.step_in_epoch = min(pos.step_in_epoch * old_batch // self.global_batch, steps_per_epoch)
            self.lr_scheduler.last_epoch = pos.global_step - 1
            with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()": intended here
                warnings.simplefilter("ignore", UserWarning)
                self.lr_scheduler.step()
            logger.warning(
                "the global batch changed from %d to %d: resuming after %d samples seen, at optimizer step %d",
                old_batch,
                self.global_batch,
                pos.samples_seen,
                pos.global_step,
            )
        same_layout = int(state.get("world_size", -1)) == self.ctx.world_size
        if same_layout and self.ctx.rank in checkpoint.rng_states:
            restore_rng_state(checkpoint.rng_states[self.ctx.rank])
        logger.info("resumed from %s at optimizer step %d (epoch %d)", checkpoint.path, pos.global_step, pos.epoch)
        return pos

    # ------------------------------------------------------------------ the loop

    def _loop(
        self,
        loader: Any,
        sampler: GlobalBatchSampler,
        pos: _Position,
        steps_per_epoch: int,
        total_steps: int,
        num_epochs: int,
    ) -> bool:
        """Train until ``total_steps``; returns True when stopped early by a signal."""
        cfg, device = self.cfg, self.device
        self.noise_generator = torch.Generator(device=device)
        self._init_meters(pos.global_step)
        self.log.start_bar(total_steps, pos.global_step)
        agreement = StopAgreement(self.ctx)
        with GracefulStop() as graceful:
            for epoch in range(pos.epoch, num_epochs):
                if epoch != pos.epoch:
                    pos.epoch, pos.step_in_epoch = epoch, 0
                sampler.set_epoch(epoch, pos.step_in_epoch)
                self.unet.train()
                batches = iter(loader)
                while pos.step_in_epoch < steps_per_epoch and pos.global_step < total_steps:
                    self._train_step(batches, pos.global_step)
                    pos.global_step += 1
                    pos.step_in_epoch += 1
                    pos.samples_seen += self.global_batch
                    self.log.advance()
                    if pos.global_step % cfg.logging_steps == 0 or pos.global_step == total_steps:
                        self._log_tick(pos, total_steps)
                    if self.fid is not None and (
                        pos.global_step % cfg.fid_every_steps == 0 or pos.global_step == total_steps
                    ):
                        self._log_fid(pos)
                    if pos.global_step % cfg.checkpointing_steps == 0 or pos.global_step == total_steps:
                        self._save_checkpoint(pos)
                    if agreement.poll(graceful.requested):
                        agreement.finish()
                        if self.last_saved_step != pos.global_step:
                            self._save_checkpoint(pos)
                        self.log.write(
                            f"Stopped by a signal after optimizer step {pos.global_step}; resume with "
                            f"--resume_from_checkpoint {self.last_checkpoint}"
                        )
                        return True
                del batches
                last = epoch == num_epochs - 1 or pos.global_step >= total_steps
                self._end_of_epoch(epoch, pos, last)
                if pos.global_step >= total_steps:
                    break
            agreement.finish()
        return False

    def _train_step(self, batches: Any, step: int) -> None:
        """One optimizer step: ``accum`` micro-batches forward/backward, clip, AdamW, LR, EMA. No host sync."""
        cfg, ctx, device = self.cfg, self.ctx, self.device
        B, accum, G = cfg.train_batch_size, cfg.gradient_accumulation_steps, self.global_batch
        c, res = self.unet_config.in_channels, cfg.resolution
        gen = self.noise_generator.manual_seed(derive_seed(self.seed, _NOISE_STREAM, step))
        timesteps = torch.randint(0, self.train_schedule.num_train_timesteps, (G,), device=device, generator=gen)
        noise = torch.randn((G, c, res, res), device=device, generator=gen)
        autocast = torch.autocast(device.type, dtype=self.amp_dtype) if self.amp_dtype is not None else nullcontext()
        step_loss = torch.zeros((), device=device)
        for micro in range(accum):
            x0 = next(batches).to(device, non_blocking=True)
            if cfg.channels_last:
                x0 = x0.contiguous(memory_format=torch.channels_last)
            lo = (micro * ctx.world_size + ctx.rank) * B
            sync = micro == accum - 1
            with self.ddp.no_sync() if self.ddp is not None and not sync else nullcontext():
                with autocast:
                    loss = self.train_schedule.training_loss(self.model, x0, timesteps[lo : lo + B], noise[lo : lo + B])
                self.scaler.scale(loss / accum).backward()
            step_loss += loss.detach() / accum

        if self.scaler.is_enabled():
            self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.unet.parameters(), cfg.max_grad_norm)
        finite = torch.isfinite(grad_norm)
        lr = self.optimizer.param_groups[0]["lr"]
        if self.scaler.is_enabled():
            self.scaler.step(self.optimizer)  # skips on inf/NaN (no host sync with fused AdamW)
            self.scaler.update()
        elif self.fused:
            # GradScaler's protocol with fused optimizers: the kernel skips the update when found_inf is 1.
            self.optimizer.grad_scale, self.optimizer.found_inf = None, (~finite).float()
            self.optimizer.step()
            del self.optimizer.grad_scale, self.optimizer.found_inf
        elif finite.item():
            self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.unet)

        self.loss_sum += step_loss
        self.skipped += ~finite
        self.nonfinite_run = torch.where(finite, 0, self.nonfinite_run + 1)
        self.last_grad_norm, self.last_lr = grad_norm.detach(), lr

    def _init_meters(self, step: int) -> None:
        """Device-side counters, read only at log ticks and saves."""
        device = self.device
        self.skipped = torch.zeros((), dtype=torch.int64, device=device)  # since this process started
        self.nonfinite_run = torch.zeros((), dtype=torch.int64, device=device)  # consecutive skipped steps
        self.last_grad_norm = torch.zeros((), device=device)
        self.last_lr = self.optimizer.param_groups[0]["lr"]
        self._start_interval(step)

    def _start_interval(self, step: int) -> None:
        self.loss_sum = torch.zeros((), device=self.device)
        self.tick_step, self.tick_time = step, time.perf_counter()

    def _log_tick(self, pos: _Position, total_steps: int) -> None:
        """Every ``logging_steps``: one host sync, one all-reduce of the loss, the records, the divergence check."""
        steps = pos.global_step - self.tick_step
        loss = all_reduce_mean(self.ctx, self.loss_sum / steps).item()
        grad_norm = self.last_grad_norm.item()
        nonfinite_run = int(self.nonfinite_run.item())
        skipped = self.skipped_before + int(self.skipped.item())
        elapsed = time.perf_counter() - self.tick_time
        record: dict[str, Any] = {
            "step": pos.global_step,
            "epoch": pos.epoch,
            "loss": loss,
            "lr": self.last_lr,
            "grad_norm": grad_norm,
            "img_s": steps * self.global_batch / elapsed,
            "sec_per_step": elapsed / steps,
            "skipped_steps": skipped,
        }
        if self.cfg.skip_corrupt_images:  # every rank reads its own images: the total is the sum
            record["corrupt_images_skipped"] = sum(gather_objects(self.ctx, self.dataset.num_corrupt_skipped))
        if self.ema is not None:
            record["ema_decay"] = self.ema.cur_decay
        if self.scaler.is_enabled():
            record["loss_scale"] = self.scaler.get_scale()
        record["peak_mem_gb"] = _peak_memory_gb(self.device)
        self.log.scalars(record, total_steps)
        if nonfinite_run >= self.cfg.max_nonfinite_steps:
            last = self.last_checkpoint
            raise TrainingDiverged(
                f"the last {nonfinite_run} optimizer steps (up to step {pos.global_step}) had non-finite gradients "
                f"and were skipped (--max_nonfinite_steps={self.cfg.max_nonfinite_steps}); stopping. "
                + (f"Last good checkpoint: {last}. " if last else "No checkpoint was saved. ")
                + "Try a lower --learning_rate, --mixed_precision bf16 or no, or a smaller --max_grad_norm."
            )
        self._start_interval(pos.global_step)

    def _log_fid(self, pos: _Position) -> None:
        result = self.fid.evaluate(self.unet, self.ema)
        self.log.evaluation({"step": pos.global_step, "epoch": pos.epoch, **result})
        self.tick_time += result["fid_seconds"]  # keep the evaluation out of the next tick's img/s

    # ------------------------------------------------------------------ saving

    def _save_checkpoint(self, pos: _Position) -> None:
        rng_states = gather_objects(self.ctx, capture_rng_state())
        skipped = self.skipped_before + int(self.skipped.item())
        path = self.out / f"checkpoint-{pos.global_step}"

        def save() -> None:
            cfg = self.cfg
            training_state = {
                "global_step": pos.global_step,
                "epoch": pos.epoch,
                "step_in_epoch": pos.step_in_epoch,
                "samples_seen": pos.samples_seen,
                "global_batch_size": self.global_batch,
                "world_size": self.ctx.world_size,
                "train_batch_size": cfg.train_batch_size,
                "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
                "seed": self.seed,
                "skipped_steps": skipped,
                "optimizer": self.optimizer.state_dict(),
                "lr_scheduler": self.lr_scheduler.state_dict(),
                "grad_scaler": self.scaler.state_dict(),
                "ema": self.ema.state_dict() if self.ema is not None else None,
            }
            try:
                save_training_checkpoint(
                    path,
                    step=pos.global_step,
                    unet_config=self.unet_config,
                    schedule_config=self.schedule_config,
                    run_config=self.run_config,
                    model_state=self.unet.state_dict(),
                    training_state=training_state,
                    rng_states=rng_states,
                    ema_state=self.ema.shadow if self.ema is not None else None,
                )
            except OSError as e:  # disk full, quota, I/O error: the write is undone, say so and what to do
                raise CheckpointSaveError(_save_failure_message(path, e, self.last_checkpoint)) from e
            removed = rotate_checkpoints(self.out, cfg.checkpoints_total_limit, keep=path)
            self.log.write(f"Saved {path}" + (f"; removed {', '.join(p.name for p in removed)}" if removed else ""))

        self._on_main(save)
        self.last_saved_step = pos.global_step
        self.last_checkpoint = path

    def _end_of_epoch(self, epoch: int, pos: _Position, last: bool) -> None:
        cfg = self.cfg
        if epoch % cfg.save_images_epochs == 0 or last:
            self._on_main(self._sample_images, epoch, pos)
        if epoch % cfg.save_model_epochs == 0 or last:
            self._on_main(self._export, epoch, pos)

    def _sample_images(self, epoch: int, pos: _Position) -> None:
        cfg = self.cfg
        sample = ddpm_sample if cfg.sampler == "ddpm" else ddim_sample
        generator = torch.Generator(device=self.device).manual_seed(0)  # the same images' noise every time
        self.unet.eval()
        with self.ema.applied_to(self.unet) if self.ema is not None else nullcontext():
            images = sample(
                self.unet,
                self.sample_schedule,
                cfg.eval_batch_size,
                num_inference_steps=cfg.ddpm_num_inference_steps,
                generator=generator,
            )
        self.unet.train()
        self.last_grid = save_grid(images, self.out / SAMPLES_DIR / f"step_{pos.global_step:06d}.png")
        self.log.images(images, epoch, pos.global_step)
        self.log.write(f"Saved samples {self.last_grid}")

    def _export(self, epoch: int, pos: _Position) -> None:
        from ..io.export import export_pipeline, make_model_card

        cfg = self.cfg
        weights = self.ema.shadow if self.ema is not None else self.unet.state_dict()
        repo_id = self._repo_id()
        grid = getattr(self, "last_grid", None)
        card = make_model_card(
            self.unet_config,
            self.schedule_config,
            name=repo_id,
            num_parameters=self.unet.num_parameters(),
            training_info={
                "command": self.command,
                "Optimizer steps": pos.global_step,
                "Epochs": epoch + 1,
                "Images seen": pos.samples_seen,
                "Global batch size": self.global_batch,
                "Weights": "EMA" if self.ema is not None else "live (no EMA)",
            },
            sample_grid="samples.png" if grid is not None else None,
            repo_id=repo_id if cfg.push_to_hub else None,
            # Hub metadata: only Hub ids, not local paths or built-in datasets
            base_model=hub_id_or_none(cfg.pretrained_model_name_or_path),
            dataset=hub_id_or_none(cfg.dataset_name),
        )
        export_pipeline(self.unet_config, self.schedule_config, weights, self.out, model_card=card, sample_grid=grid)
        self.log.write(f"Exported the pipeline to {self.out}")
        if cfg.push_to_hub:
            from ..io.hub import HubError, push_folder

            try:
                private, message = cfg.hub_private_repo, f"Step {pos.global_step} (epoch {epoch})"
                push_folder(self.out, repo_id, token=cfg.hub_token, private=private, commit_message=message)
            except HubError as e:  # a network hiccup must not end the run: the next export pushes again
                logger.warning("push to the Hub failed (training goes on): %s", e)


def _resolve_resume(spec: str | None, output_dir: Path) -> Path | None:
    """The checkpoint folder ``--resume_from_checkpoint`` names, or None for a fresh start."""
    if spec is None:
        return None
    if spec == "latest":
        latest = latest_checkpoint(output_dir, resumable=True)
        if latest is None:
            logger.warning("Checkpoint 'latest' does not exist. Starting a new training run.")
        return latest
    candidates = list(dict.fromkeys((Path(spec), output_dir / Path(spec).name)))
    for candidate in candidates:
        if is_training_checkpoint(candidate):
            return candidate
    for candidate in candidates:  # a folder that looks like a checkpoint: say what it lacks
        if candidate.is_dir() and (checkpoint_step(candidate) is not None or (candidate / CONFIG_NAME).is_file()):
            raise FileNotFoundError(
                f"--resume_from_checkpoint={spec!r}: {candidate} is not a complete training checkpoint (it lacks "
                f"{', '.join(missing_files(candidate))})"
            )
    raise FileNotFoundError(
        f"--resume_from_checkpoint={spec!r}: no checkpoint at {' or '.join(map(str, candidates))} (a checkpoint "
        f"folder holds {CONFIG_NAME}, {MODEL_NAME} and {STATE_NAME})"
    )


def _save_failure_message(path: Path, error: OSError, previous: Path | None) -> str:
    full = error.errno in (errno.ENOSPC, errno.EDQUOT)
    kept = f"the previous checkpoint {previous} is intact" if previous is not None else "no earlier checkpoint exists"
    advice = "free some space (or lower --checkpoints_total_limit)" if full else "fix the cause"
    return (
        f"could not save {path}{' (the disk is full)' if full else ''}: {error}. Nothing was left half-written (the "
        f"temporary folder was removed) and {kept}; {advice}, then resume with --resume_from_checkpoint latest"
    )


def _check_same_model(checkpoint: TrainingCheckpoint, unet: UNetConfig, schedule: ScheduleConfig) -> None:
    """Refuse to resume into another architecture or noise schedule; the error lists what differs."""
    for what, saved, current in (
        ("UNet", checkpoint.config["unet"], unet.to_dict()),
        ("schedule", checkpoint.config["schedule"], schedule.to_dict()),
    ):
        diff = {
            k: (saved.get(k), current.get(k))
            for k in sorted(set(saved) | set(current))
            if saved.get(k) != current.get(k)
        }
        if diff:
            detail = "; ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in diff.items())
            raise ValueError(f"cannot resume from {checkpoint.path}: the {what} config differs ({detail})")


# ---------------------------------------------------------------------------------------------------- entry point


def train(config: TrainConfig, command: str | None = None) -> TrainResult:
    """Run ``config`` on this process (one of ``torchrun``'s, or alone); returns when every rank is done.

    ``command`` (the command line, token-free) is recorded in checkpoints and the model card. A first SIGTERM/SIGINT
    ends the run after the current step with a checkpoint (``result.stopped_by_signal``). Raises
    :class:`TrainingDiverged` after ``max_nonfinite_steps`` skipped steps in a row, :class:`CheckpointSaveError` when a
    checkpoint cannot be written (the previous one stays intact); a rank that dies or hangs makes the others fail
    within ``ddp_timeout`` seconds.
    """
    ctx = init_distributed(config.device, config.ddp_timeout, config.local_rank)
    try:
        return _Trainer(config, ctx, command).run()
    finally:
        shutdown(ctx)


def command_line(argv: list[str], program: str = "scripts/train.py") -> str:
    """A shell-quoted command line for records, with any Hub token scrubbed."""
    from ..io.export import scrub_tokens

    launcher = (
        "torchrun --nproc_per_node=" + os.environ["LOCAL_WORLD_SIZE"] + " "
        if "LOCAL_WORLD_SIZE" in os.environ
        else "python "
    )
    return scrub_tokens(launcher + shlex.join([program, *argv]))
