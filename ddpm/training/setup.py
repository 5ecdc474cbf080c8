"""Setting a run up: :func:`build_run` checks what the settings name, then builds every part of the :class:`Run`.

The checks come first and read no data: the model config (readable, ``--resolution`` divisible by its down-sampling
factor), the precision on this device, the output folder and the checkpoint to resume from, the Hub repo, and that
the checkpoint holds the same model. Then, in an order that fixes every random number: the dataset and its sampler,
the UNet (the same initial weights on every rank), the optimizer and LR schedule, the precision, the EMA, the
DDP / compile wrapper, the noise schedules, the FID monitor and the run log.
"""

from __future__ import annotations

import importlib
import logging
import os
import secrets
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import LRScheduler
from torch.utils.data import DataLoader

from ..data.datasets import ImageDataset, is_builtin, load_image_dataset
from ..data.prepared import PreparedImages, check_prepared, is_prepared
from ..data.sampler import GlobalBatchSampler, SeedStream, build_dataloader, derive_seed
from ..data.transforms import ImageTransform
from ..diffusion.sampling import sampler_timesteps
from ..diffusion.schedule import NoiseSchedule, ScheduleConfig
from ..evaluation.fid_monitor import FIDMonitor
from ..io.background import BackgroundWriter
from ..io.checkpoint import TrainingCheckpoint, load_training_checkpoint
from ..io.hub import is_hub_id
from ..models.ema import EMA
from ..models.unet import UNet, UNetConfig
from ..runtime.distributed import (
    DistributedContext,
    broadcast_object,
    ignore_stop_signals,
    resolve_device,
    run_on_main,
)
from ..runtime.precision import Precision, resolve_mixed_precision
from .artifacts import create_repo
from .config import TrainConfig
from .lr_schedule import build_lr_scheduler
from .model_config import model_description, unet_config
from .output_dir import prepare_output_dir
from .run import Run, TrainingLoss
from .run_log import RunLog
from .uploads import BackgroundUploads

logger = logging.getLogger(__name__)


def check_config(config: TrainConfig, device: torch.device | None = None) -> None:
    """What the settings alone cannot tell: a ValueError naming the flag when the model config cannot be read or
    --resolution does not suit it, when a prepared dataset was prepared with other settings, when the --logger's
    package is not installed, or when --mixed_precision cannot run on ``device``.

    A model config on the Hub is only read by :func:`build_run`. Without ``device`` (a command line being parsed) the
    precision is checked for a CPU run only: a GPU is checked once this rank's device is set, without initialising
    CUDA here.
    """
    model_config = config.model_config_name_or_path
    channels = None
    if config.pretrained_model_name_or_path is None and (model_config is None or not is_hub_id(model_config)):
        channels = unet_config(config).in_channels
    prepared = prepared_source(config)
    if prepared is not None:
        flag, path = prepared
        check_prepared(
            path,
            flag,
            resolution=config.resolution,
            center_crop=config.center_crop,
            channels=channels,
            preserve_input_precision=config.preserve_input_precision,
        )
    _check_tracker(config.logger)
    if device is None:
        device = resolve_device(config.device, max(config.local_rank, 0))
        if device.type != "cpu":
            return
    Precision.resolved(config.mixed_precision, device).check_supported()


# What to install for each --logger (upstream stops with an ImportError too, rather than train without a tracker).
TRACKER_INSTALL = {
    "tensorboard": ("torch.utils.tensorboard", "pip install tensorboard (a dependency of this package)"),
    "wandb": ("wandb", 'pip install -e ".[wandb]"'),
}


def _check_tracker(name: str) -> None:
    if name not in TRACKER_INSTALL:
        return
    module, install = TRACKER_INSTALL[name]
    try:
        importlib.import_module(module)
    except ImportError:
        raise ValueError(f"--logger {name}: the {name} package is not installed: {install}") from None


def _check_sampler_steps(config: TrainConfig, schedule_config: ScheduleConfig) -> None:
    """The grids' and the FID's step counts fit their samplers' grids on this schedule (DPM-Solver's "leading" grid
    has fewer timesteps to offer than DDPM's), so a bad value fails now, not at the first grid."""
    checks = [("ddpm_num_inference_steps", config.sampler, config.ddpm_num_inference_steps)]
    if config.fid_every_steps:
        checks.append(("fid_inference_steps", config.fid_sampler, config.fid_inference_steps))
    for flag, sampler, steps in checks:
        try:
            sampler_timesteps(sampler, schedule_config, steps)
        except ValueError as e:
            raise ValueError(f"--{flag}={steps} with the {sampler} sampler: {e}") from None


def build_run(
    config: TrainConfig, ctx: DistributedContext, command: str | None = None
) -> tuple[Run, TrainingCheckpoint | None]:
    """Check, then build the parts of ``config``'s run on this process; returns them and the checkpoint to resume from.

    Every rank calls it; rank 0 alone prepares the output folder, creates the Hub repo and first reads the dataset.
    """
    # ---- check what the settings name, before any data is read
    checkpoint = _prepare(config, ctx)
    seed = _seed(config, ctx, checkpoint)
    unet_config, schedule_config, init_weights = model_description(config)
    if checkpoint is not None:
        check_same_model(checkpoint, unet_config, schedule_config)
    _check_sampler_steps(config, schedule_config)
    # ---- load dataset
    dataset, sampler, loader = _load_data(config, ctx, unet_config.in_channels, seed)
    total_steps = config.max_train_steps or config.num_epochs * sampler.steps_per_epoch
    # ---- construct network, optimizer, precision, EMA, wrapper
    channels_last = use_channels_last(config, unet_config, ctx.device)
    unet = _build_unet(config, ctx, unet_config, init_weights, seed, channels_last)
    optimizer, fused, lr_scheduler = _build_optimizer(config, unet, total_steps)
    precision = Precision.resolved(config.mixed_precision, ctx.device)
    ema = None
    if config.use_ema and ctx.is_main:  # rank 0 keeps the average: it saves it and broadcasts it for the grids
        ema = EMA(unet, inv_gamma=config.ema_inv_gamma, power=config.ema_power, max_decay=config.ema_max_decay)
    # ---- noise schedules, the training forward pass, FID monitor, run log
    train_schedule = NoiseSchedule(schedule_config)
    # its arrays on the training device: indexing a CPU array every step would sync the host
    train_schedule.alphas_cumprod = train_schedule.alphas_cumprod.to(ctx.device)
    training_loss, ddp = _wrap(unet, ctx, train_schedule, config.snr_gamma, config.compile)
    sample_schedule = NoiseSchedule(schedule_config)
    with torch.device("meta"):  # no initialisation (and no draw from the RNG): its weights are copied in when used
        sampling_unet = UNet(unet_config)
    sampling_unet = sampling_unet.to_empty(device=ctx.device).eval().requires_grad_(False)
    if channels_last:
        sampling_unet.to(memory_format=torch.channels_last)
    fid = None
    if config.fid_every_steps:
        fid = _fid_monitor(config, ctx, sampling_unet, sample_schedule, dataset, precision)
    run_config = {**config.to_dict(), "seed": seed, "command": command}
    log_dir = Path(config.output_dir) / config.logging_dir
    wandb_run_id = checkpoint.training_state.get("wandb_run_id") if checkpoint is not None else None
    log = RunLog(config, ctx.is_main, log_dir, run_config, wandb_run_id)
    run = Run(
        config=config,
        ctx=ctx,
        command=command,
        seed=seed,
        run_config=run_config,
        unet_config=unet_config,
        schedule_config=schedule_config,
        unet=unet,
        channels_last=channels_last,
        training_loss=training_loss,
        ddp=ddp,
        ema=ema,
        dataset=dataset,
        sampler=sampler,
        loader=loader,
        total_steps=total_steps,
        optimizer=optimizer,
        fused=fused,
        lr_scheduler=lr_scheduler,
        precision=precision,
        scaler=precision.grad_scaler(),
        train_schedule=train_schedule,
        noise_generator=torch.Generator(device=ctx.device),
        sampling_unet=sampling_unet,
        sample_schedule=sample_schedule,
        fid=fid,
        log=log,
        checkpoints=BackgroundWriter("checkpoint-writer"),
        exports=BackgroundWriter("export-writer"),
        uploads=BackgroundUploads() if config.push_to_hub and ctx.is_main else None,
    )
    return run, checkpoint


def _prepare(config: TrainConfig, ctx: DistributedContext) -> TrainingCheckpoint | None:
    """Check the settings on this device, prepare the output folder and the Hub repo; the checkpoint to resume from."""
    check_config(config, ctx.device)
    _configure_backends(config, ctx.device)
    resume = run_on_main(ctx, prepare_output_dir, config)
    if config.push_to_hub:
        run_on_main(ctx, create_repo, config)
    return load_training_checkpoint(resume) if resume is not None else None


def check_same_model(checkpoint: TrainingCheckpoint, unet: UNetConfig, schedule: ScheduleConfig) -> None:
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


def _configure_backends(config: TrainConfig, device: torch.device) -> None:
    if device.type == "cuda":
        if config.deterministic:
            # cuBLAS reads its workspace setting when its first handle is made (after this): fixed, for reproducible
            # matmuls. Operations with no deterministic kernel warn instead of failing.
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.backends.cudnn.deterministic = True
            torch.use_deterministic_algorithms(True, warn_only=True)
        else:
            # Fixed shapes: cuDNN times its kernels once and keeps the fastest (so two runs may round differently).
            torch.backends.cudnn.benchmark = True
        if config.allow_tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
    if config.enable_xformers_memory_efficient_attention:
        logger.info(
            "--enable_xformers_memory_efficient_attention: not needed, attention already runs on PyTorch's "
            "scaled_dot_product_attention (flash / memory-efficient kernels)"
        )


def _seed(config: TrainConfig, ctx: DistributedContext, checkpoint: TrainingCheckpoint | None) -> int:
    """--seed, else the resumed run's, else a random one drawn by rank 0 (every rank needs the same)."""
    saved = None if checkpoint is None else checkpoint.training_state.get("seed")
    if config.seed is not None:
        if saved is not None and saved != config.seed:
            logger.warning(
                "--seed=%d differs from the checkpoint's seed %d: data order and noise will not continue the "
                "interrupted run's",
                config.seed,
                saved,
            )
        return config.seed
    if saved is not None:
        return int(saved)
    return int(broadcast_object(ctx, secrets.randbits(62)))


def _load_data(
    config: TrainConfig, ctx: DistributedContext, channels: int, seed: int
) -> tuple[ImageDataset | PreparedImages, GlobalBatchSampler, DataLoader]:
    """The dataset (a prepared folder, read without decoding, or the source images), this rank's sampler of the
    global batches, and its loader of micro-batches."""
    transform = ImageTransform(
        config.resolution, channels, config.center_crop, config.random_flip, config.preserve_input_precision
    )
    prepared = prepared_source(config)

    def load() -> ImageDataset | PreparedImages:
        if prepared is not None:
            flag, path = prepared
            if config.dataset_config_name is not None:
                raise ValueError(f"--dataset_config_name does not apply to the prepared dataset {flag} {path!r}")
            return PreparedImages(path, transform, flag)
        data, column = load_image_dataset(
            config.dataset_name,
            config.dataset_config_name,
            config.train_data_dir,
            config.cache_dir,
            config.image_column,
        )
        # a built-in set is small: decoding and resizing each image once, not at every access, keeps the step fed
        keep = is_builtin(config.dataset_name)
        return ImageDataset(data, column, transform, skip_corrupt_images=config.skip_corrupt_images, keep_resized=keep)

    # Rank 0 downloads and prepares the cache alone, then the others read it.
    dataset = run_on_main(ctx, load, share=False)
    if not ctx.is_main:
        dataset = load()
    batch, accum = config.train_batch_size, config.gradient_accumulation_steps
    sampler = GlobalBatchSampler(len(dataset), batch, ctx.world_size, ctx.rank, accum, seed)
    loader = build_dataloader(dataset, sampler, batch, config.dataloader_num_workers, ctx.device.type == "cuda")
    loader.worker_init_fn = ignore_stop_signals
    return dataset, sampler, loader


def prepared_source(config: TrainConfig) -> tuple[str, str] | None:
    """``(flag, path)`` when --train_data_dir or --dataset_name names a prepared folder (ddpm.data.prepared)."""
    for flag, path in (("--train_data_dir", config.train_data_dir), ("--dataset_name", config.dataset_name)):
        if is_prepared(path):
            return flag, path
    return None


def _build_unet(
    config: TrainConfig,
    ctx: DistributedContext,
    unet_config: UNetConfig,
    init_weights: dict[str, torch.Tensor] | None,
    seed: int,
    channels_last: bool,
) -> UNet:
    """The UNet on the training device: the same initial weights on every rank (``init_weights`` when given)."""
    torch.manual_seed(seed)
    unet = UNet(unet_config)
    if init_weights is not None:
        unet.load_state_dict(init_weights)
    unet.to(ctx.device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    unet.gradient_checkpointing = config.gradient_checkpointing
    torch.manual_seed(derive_seed(seed, SeedStream.PROCESS, ctx.rank))  # dropout etc.: a stream per rank, from now on
    return unet


# On a CPU, oneDNN's channels-last convolutions measured faster for UNets whose every level has at least this many
# channels (the CIFAR-10 and 64 px models, 128-512 channels, at batch 8 and 16), and slower for narrower ones at the
# batch they train with (the quick-start model, 32-64 channels, at batch 64: training 0.91x, sampling 0.81x).
# README, Performance.
CPU_CHANNELS_LAST_MIN_WIDTH = 128


def use_channels_last(config: TrainConfig, unet_config: UNetConfig, device: torch.device) -> bool:
    """--channels_last, or by default: on a CPU for wide UNets (:data:`CPU_CHANNELS_LAST_MIN_WIDTH`), and under
    fp16/bf16 autocast on a GPU, whose tensor-core convolutions run channels-last (what scripts/gpu_check.py's
    benchmark measures)."""
    if config.channels_last is not None:
        return config.channels_last
    if device.type == "cpu":
        return min(unet_config.block_out_channels) >= CPU_CHANNELS_LAST_MIN_WIDTH
    return resolve_mixed_precision(config.mixed_precision, device) != "no"


def _build_optimizer(
    config: TrainConfig, unet: UNet, total_steps: int
) -> tuple[torch.optim.Optimizer, bool, LRScheduler]:
    """AdamW (fused when available: whether it is, too) and its LR schedule."""
    kwargs = dict(
        lr=config.learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
        weight_decay=config.adam_weight_decay,
        eps=config.adam_epsilon,
    )
    try:  # fused: one kernel per step, and it can skip a step on the device (found_inf) without a host sync
        optimizer, fused = torch.optim.AdamW(unet.parameters(), fused=True, **kwargs), True
    except (RuntimeError, TypeError):  # a device or PyTorch version without fused AdamW
        optimizer, fused = torch.optim.AdamW(unet.parameters(), **kwargs), False
    lr_scheduler = build_lr_scheduler(
        optimizer,
        config.lr_scheduler,
        config.lr_warmup_steps,
        total_steps,
        num_cycles=config.lr_num_cycles,
        power=config.lr_power,
        step_rules=config.lr_step_rules,
    )
    return optimizer, fused, lr_scheduler


def _wrap(
    unet: UNet, ctx: DistributedContext, schedule: NoiseSchedule, snr_gamma: float | None, use_compile: bool
) -> tuple[TrainingLoss, DistributedDataParallel | None]:
    """The training forward pass ``(x0, t, noise) -> loss`` (noising, ``unet`` in DDP on several processes, the
    loss), torch.compile'd as a whole with ``use_compile``; and the DDP wrapper.

    DDP keeps the gradients as views into its all-reduce buckets (the step zeroes them in place instead of dropping
    them, so no gradient is copied into a bucket). No ``static_graph``: with accumulation the first backward pass
    runs under ``no_sync``, which static-graph DDP cannot start with (an internal assert in the reducer, torch 2.14);
    and what it would save is small here, since the unused-parameter search it skips is off anyway
    (``find_unused_parameters=False``: the UNet uses every parameter) and DDP re-orders its buckets after the first
    step by itself.
    """
    model: torch.nn.Module = unet
    ddp = None
    if ctx.is_distributed:
        device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        ddp = model = DistributedDataParallel(unet, device_ids=device_ids, gradient_as_bucket_view=True)

    def training_loss(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return schedule.training_loss(model, x0, t, noise, snr_gamma=snr_gamma)

    return (torch.compile(training_loss) if use_compile else training_loss), ddp


def _fid_monitor(
    config: TrainConfig,
    ctx: DistributedContext,
    sampling_unet: UNet,
    schedule: NoiseSchedule,
    dataset: ImageDataset | PreparedImages,
    precision: Precision,
) -> FIDMonitor:
    """Loads the Inception network (failing now if its weights are missing) and the reference statistics."""
    names = ("dataset_name", "dataset_config_name", "train_data_dir", "image_column", "resolution", "center_crop")
    names += ("preserve_input_precision",)  # 16-bit images read at full precision give other statistics
    return FIDMonitor(
        ctx,
        sampling_unet,
        schedule,
        num_samples=config.fid_num_samples,
        sampler=config.fid_sampler,
        num_inference_steps=config.fid_inference_steps,
        batch_size=config.fid_batch_size,
        reference=config.fid_reference,
        training_images=dataset,
        training_source={
            **{name: getattr(config, name) for name in names},
            "channels": sampling_unet.config.in_channels,
        },
        cache_dir=Path(config.output_dir),
        inception_weights=config.inception_weights,
        amp_dtype=precision.dtype,
    )
