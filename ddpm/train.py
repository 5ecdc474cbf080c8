"""The training job: diffusers' ``train_unconditional.py`` without accelerate, without its known defects.

:class:`TrainConfig` holds every hyper-parameter (its fields are the command-line flags of ``scripts/train.py``, with
train_unconditional's names, defaults and meanings); :func:`train` runs it on one process or on every process of a
``torchrun`` launch.

What one optimizer step sees depends only on ``(seed, step)`` and the global batch ``G = per-device batch x processes
x accumulation``: the images come from :class:`ddpm.data.GlobalBatchSampler` (this rank's slice of the step's global
batch, augmentations seeded per sample), and the timesteps and noise of the *whole* global batch are drawn on the
training device from a generator seeded with ``(seed, step)``, each micro-batch taking its slice. So one process with
batch G, N processes with G/N, and accumulation all average the same per-sample gradients, and a resumed run needs
no replay of random numbers. Each micro-batch loss is divided by the accumulation steps (DDP averages over ranks),
gradients are only all-reduced on the last micro-step (``no_sync``), clipped, and one AdamW step, one LR-scheduler
step and one EMA update follow.

Non-finite gradients skip the step in every precision (GradScaler for fp16; fused AdamW's ``found_inf`` or a check
otherwise) and are counted; ``max_nonfinite_steps`` in a row stop the run. No per-step host synchronisation: losses
and norms stay on the device until a log tick every ``logging_steps`` steps.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import secrets
import shlex
import shutil
import sys
import time
import typing
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from .checkpoint import (
    TrainingCheckpoint,
    capture_rng_state,
    is_checkpoint,
    list_checkpoints,
    load_training_checkpoint,
    read_json,
    restore_rng_state,
    rotate_checkpoints,
    save_training_checkpoint,
)
from .data import GlobalBatchSampler, ImageDataset, ImageTransform, build_dataloader, derive_seed, load_image_dataset
from .distributed import (
    DistributedContext,
    GracefulStop,
    StopAgreement,
    all_reduce_mean,
    barrier,
    broadcast_object,
    gather_objects,
    ignore_stop_signals,
    init_distributed,
    resolve_device,
    shutdown,
)
from .ema import EMA
from .lr_schedule import LR_SCHEDULERS, POLYNOMIAL_LR_END, build_lr_scheduler
from .sampling import ddim_sample, ddpm_sample, save_grid, to_uint8
from .schedule import BETA_SCHEDULES, PREDICTION_TYPES, VARIANCE_TYPES, NoiseSchedule, ScheduleConfig
from .unet import UNet, UNetConfig

logger = logging.getLogger(__name__)

# train_unconditional's built-in architecture (reference §2.1); sample_size becomes --resolution.
DEFAULT_UNET = {
    "in_channels": 3,
    "out_channels": 3,
    "layers_per_block": 2,
    "block_out_channels": [128, 128, 256, 256, 512, 512],
    "down_block_types": [
        "DownBlock2D",
        "DownBlock2D",
        "DownBlock2D",
        "DownBlock2D",
        "AttnDownBlock2D",
        "DownBlock2D",
    ],
    "up_block_types": ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"],
}
TRACKER_PROJECT = "train_unconditional"  # TensorBoard sub-folder / wandb project, as accelerate names them
SAMPLES_DIR = "samples"
METRICS_FILE = "metrics.jsonl"
# Seed streams: ddpm.data uses 0 (permutations) and 1 (augmentations).
_NOISE_STREAM = 2
_PROCESS_STREAM = 3
# What a previous run leaves in output_dir; any of these makes a fresh start need --overwrite_output_dir.
_RUN_MARKERS = ("model_index.json", "unet", "scheduler")


def _flag(default: Any, help: str, choices: tuple[str, ...] | None = None) -> Any:
    metadata: dict[str, Any] = {"help": help}
    if choices is not None:
        metadata["choices"] = choices
    return field(default=default, metadata=metadata)


@dataclass
class TrainConfig:
    """Every setting of a training run; the field names are the flags of ``scripts/train.py``.

    The first block are train_unconditional's flags with its defaults; the rest are additions. Validated on
    construction: a bad value raises ValueError naming the flag.
    """

    # ---- train_unconditional.py flags
    dataset_name: str | None = _flag(
        None,
        "Dataset to train on: a Hub dataset id, a local dataset folder, a `save_to_disk` folder, or "
        "`builtin:digits` (shipped, no download). Its 'train' split is used.",
    )
    dataset_config_name: str | None = _flag(None, "Configuration name of the dataset (`load_dataset`'s 2nd argument).")
    model_config_name_or_path: str | None = _flag(
        None,
        "UNet config: a JSON file, a folder holding config.json (diffusers UNet2DModel format accepted) or a Hub "
        "model id. Default: train_unconditional's architecture. Its sample_size is replaced by --resolution.",
    )
    train_data_dir: str | None = _flag(
        None, "A folder of images (read by datasets' `imagefolder`), used instead of --dataset_name."
    )
    output_dir: str = _flag("ddpm-model-64", "Where the pipeline, checkpoint-N/ folders, samples/ and logs go.")
    overwrite_output_dir: bool = _flag(
        False,
        "Start over in an --output_dir that holds a previous run: delete its checkpoints, exported pipeline, samples "
        "and logs first. Without it, such a folder is refused unless --resume_from_checkpoint is given.",
    )
    cache_dir: str | None = _flag(None, "Cache folder for downloaded datasets and models.")
    resolution: int = _flag(64, "Training image size: the shorter side is resized to it, then a square crop.")
    center_crop: bool = _flag(False, "Crop the centre of the image (default: a random crop, as train_unconditional).")
    random_flip: bool = _flag(False, "Flip images horizontally at random (p=0.5).")
    train_batch_size: int = _flag(16, "Batch size per device (per process) and per micro-step.")
    eval_batch_size: int = _flag(16, "Number of images sampled for each sample grid.")
    dataloader_num_workers: int = _flag(0, "DataLoader worker processes per rank (0: load in the main process).")
    num_epochs: int = _flag(100, "Number of passes over the data (overridden by --max_train_steps).")
    save_images_epochs: int = _flag(10, "Sample a grid every N epochs (and after the last one).")
    save_model_epochs: int = _flag(10, "Export the diffusers pipeline to --output_dir every N epochs (and at the end).")
    gradient_accumulation_steps: int = _flag(1, "Micro-steps accumulated per optimizer step.")
    learning_rate: float = _flag(1e-4, "Peak learning rate (after warm-up).")
    lr_scheduler: str = _flag("cosine", "Learning-rate schedule.", LR_SCHEDULERS)
    lr_warmup_steps: int = _flag(
        500, "Linear warm-up length in optimizer steps (not multiplied by accumulation or processes)."
    )
    adam_beta1: float = _flag(0.95, "AdamW beta1.")
    adam_beta2: float = _flag(0.999, "AdamW beta2.")
    adam_weight_decay: float = _flag(1e-6, "AdamW weight decay (on all parameters).")
    adam_epsilon: float = _flag(1e-08, "AdamW epsilon.")
    use_ema: bool = _flag(False, "Keep an EMA of the weights; samples and exported models use it.")
    ema_inv_gamma: float = _flag(1.0, "EMA warm-up inv_gamma.")
    ema_power: float = _flag(3 / 4, "EMA warm-up power.")
    ema_max_decay: float = _flag(0.9999, "EMA maximum decay.")
    push_to_hub: bool = _flag(False, "Upload the exported pipeline to the Hugging Face Hub after each export.")
    hub_token: str | None = _flag(
        None, "Hub token (default: HF_TOKEN or the cached login). Never written to disk or logs."
    )
    hub_model_id: str | None = _flag(None, "Hub repo id to push to (default: the name of --output_dir).")
    hub_private_repo: bool = _flag(False, "Create the Hub repo as private.")
    logger: str = _flag(
        "tensorboard",
        "Experiment tracker besides logs/metrics.jsonl (skipped with a warning when not installed).",
        ("tensorboard", "wandb", "none"),
    )
    logging_dir: str = _flag("logs", "Log folder, relative to --output_dir.")
    local_rank: int = _flag(-1, "Legacy torch.distributed.launch rank; the LOCAL_RANK environment variable wins.")
    mixed_precision: str = _flag(
        "no",
        "Autocast precision: fp16 (with a GradScaler) or bf16; weights and optimizer stay float32.",
        ("no", "fp16", "bf16"),
    )
    prediction_type: str = _flag("epsilon", "What the model predicts (training target).", PREDICTION_TYPES)
    ddpm_num_steps: int = _flag(1000, "Number of diffusion steps T of the noise schedule.")
    ddpm_num_inference_steps: int = _flag(1000, "Denoising steps used for the sample grids.")
    ddpm_beta_schedule: str = _flag("linear", "Beta schedule.", BETA_SCHEDULES)
    checkpointing_steps: int = _flag(500, "Save a resumable checkpoint-N/ every N optimizer steps (and at the end).")
    checkpoints_total_limit: int | None = _flag(None, "Keep only the newest N checkpoints.")
    resume_from_checkpoint: str | None = _flag(
        None,
        "Resume from a checkpoint folder (any path; a bare name is looked up in --output_dir) or 'latest' "
        "(the newest in --output_dir; a fresh start when there is none).",
    )
    enable_xformers_memory_efficient_attention: bool = _flag(
        False, "Accepted for compatibility: attention always uses PyTorch's fused scaled_dot_product_attention."
    )

    # ---- additions
    seed: int | None = _flag(None, "Seed of everything random (data order, augmentations, noise, initial weights).")
    max_train_steps: int | None = _flag(None, "Total optimizer steps; overrides --num_epochs.")
    max_grad_norm: float = _flag(1.0, "Gradient-norm clipping threshold.")
    image_column: str = _flag("image", "Dataset column holding the images (default: 'image', else the first one).")
    pretrained_model_name_or_path: str | None = _flag(
        None,
        "Start from these weights: a diffusers pipeline or UNet folder, a run or checkpoint folder, or a Hub id. "
        "Its schedule is kept unless a --ddpm_*/--prediction_type flag is given a non-default value.",
    )
    ddpm_variance_type: str = _flag("fixed_small", "Variance of the DDPM sampler.", VARIANCE_TYPES)
    sampler: str = _flag("ddpm", "Sampler for the sample grids.", ("ddpm", "ddim"))
    lr_num_cycles: float | None = _flag(
        None, "Cosine waves (cosine, default 0.5) or hard restarts (cosine_with_restarts, default 1)."
    )
    lr_power: float = _flag(1.0, "Power of the polynomial schedule.")
    allow_tf32: bool = _flag(False, "Allow TF32 matmuls and convolutions on Ampere+ GPUs (faster float32).")
    gradient_checkpointing: bool = _flag(False, "Recompute activations in the backward pass to save memory.")
    compile: bool = _flag(False, "torch.compile the model.")
    channels_last: bool = _flag(False, "Use the channels_last memory format (often faster convolutions on GPUs).")
    logging_steps: int = _flag(10, "Log (metrics.jsonl, trackers, status line) every N optimizer steps.")
    max_nonfinite_steps: int = _flag(
        100, "Stop when this many optimizer steps in a row have non-finite gradients (they are skipped)."
    )
    ddp_timeout: int = _flag(1800, "Seconds a rank waits for the others before failing (instead of hanging).")
    device: str = _flag("auto", "Training device: auto (this rank's GPU if any), cpu or cuda.", ("auto", "cpu", "cuda"))

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"--{name}={getattr(self, name)!r}: {why}")

        for f in fields(self):
            choices = f.metadata.get("choices")
            if choices is not None and getattr(self, f.name) not in choices:
                raise bad(f.name, f"choose one of {', '.join(choices)}")
        if self.dataset_name is None and self.train_data_dir is None:
            raise ValueError(
                "You must specify either a dataset name from the hub (--dataset_name) or a train data directory "
                "(--train_data_dir)."
            )
        if self.dataset_name is not None and self.train_data_dir is not None:
            raise ValueError("Give only one of --dataset_name and --train_data_dir")
        positive = (
            "resolution",
            "train_batch_size",
            "eval_batch_size",
            "num_epochs",
            "save_images_epochs",
            "save_model_epochs",
            "gradient_accumulation_steps",
            "ddpm_num_steps",
            "ddpm_num_inference_steps",
            "checkpointing_steps",
            "logging_steps",
            "max_nonfinite_steps",
            "ddp_timeout",
        )
        for name in positive:
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise bad(name, "must be a positive integer")
        for name in ("max_train_steps", "checkpoints_total_limit"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 1):
                raise bad(name, "must be a positive integer (or left unset)")
        for name in ("dataloader_num_workers", "lr_warmup_steps"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 0:
                raise bad(name, "must be an integer >= 0")
        for name in ("learning_rate", "adam_epsilon", "ema_inv_gamma", "ema_power", "max_grad_norm", "lr_power"):
            if not getattr(self, name) > 0:
                raise bad(name, "must be positive")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise bad(name, "must be in [0, 1)")
        if not self.adam_weight_decay >= 0:
            raise bad("adam_weight_decay", "must be >= 0")
        if not 0 <= self.ema_max_decay <= 1:
            raise bad("ema_max_decay", "must be in [0, 1]")
        if self.lr_scheduler == "polynomial" and not self.learning_rate > POLYNOMIAL_LR_END:
            raise bad("learning_rate", f"the polynomial schedule decays to {POLYNOMIAL_LR_END}: start above it")
        if self.lr_num_cycles is not None and not self.lr_num_cycles > 0:
            raise bad("lr_num_cycles", "must be positive")
        if self.ddpm_num_inference_steps > self.ddpm_num_steps:
            raise bad("ddpm_num_inference_steps", f"must be <= --ddpm_num_steps={self.ddpm_num_steps}")
        if self.model_config_name_or_path is not None and self.pretrained_model_name_or_path is not None:
            raise ValueError(
                "Give only one of --model_config_name_or_path and --pretrained_model_name_or_path "
                "(a pretrained model brings its own architecture)"
            )
        if self.overwrite_output_dir and self.resume_from_checkpoint is not None:
            resume = Path(self.resume_from_checkpoint)
            if self.resume_from_checkpoint == "latest" or _is_inside(resume, Path(self.output_dir)):
                raise ValueError(
                    f"--overwrite_output_dir would delete the checkpoint --resume_from_checkpoint="
                    f"{self.resume_from_checkpoint!r} resumes from; drop one of them"
                )
        model_config = self.model_config_name_or_path
        if self.pretrained_model_name_or_path is None and (model_config is None or not _is_hub_id(model_config)):
            self.unet_config()  # a local architecture: check it (and --resolution against it) now
        device = resolve_device(self.device, max(self.local_rank, 0))
        if device.type == "cpu":  # a GPU is checked by train() once this rank's device is set: no CUDA init here
            check_precision_support(self.mixed_precision, device)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> TrainConfig:
        """Build from a dict of flag names (e.g. a ``--config`` file), checked by :func:`check_settings`."""
        return cls(**check_settings(values, source))

    def to_dict(self) -> dict[str, Any]:
        """All settings, JSON-friendly, without the Hub token."""
        values = asdict(self)
        values.pop("hub_token")
        return values

    def unet_config(self) -> UNetConfig:
        """The architecture to train (not for --pretrained_model_name_or_path), at ``sample_size=resolution``."""
        if self.model_config_name_or_path is None:
            return _resize_unet(dict(DEFAULT_UNET), self.resolution, "the default train_unconditional UNet")
        path, values = _read_model_config(self.model_config_name_or_path, self.cache_dir)
        return _resize_unet(values, self.resolution, str(path))

    def schedule_config(self, base: ScheduleConfig | None = None) -> ScheduleConfig:
        """The noise schedule from the --ddpm_* flags; with ``base`` (a pretrained model's), only non-default flags
        override it."""
        flags = {
            "num_train_timesteps": ("ddpm_num_steps", self.ddpm_num_steps),
            "beta_schedule": ("ddpm_beta_schedule", self.ddpm_beta_schedule),
            "prediction_type": ("prediction_type", self.prediction_type),
            "variance_type": ("ddpm_variance_type", self.ddpm_variance_type),
        }
        if base is None:
            return ScheduleConfig(**{key: value for key, (_, value) in flags.items()})
        defaults = {f.name: f.default for f in fields(self)}
        changed = {key: value for key, (flag, value) in flags.items() if value != defaults[flag]}
        return ScheduleConfig(**{**base.to_dict(), **changed})


def check_settings(values: dict[str, Any], source: str) -> dict[str, Any]:
    """``values`` checked against :class:`TrainConfig`'s fields: unknown names and wrong types raise a ValueError
    naming ``source`` and the key; integers given for float settings become floats."""
    hints = typing.get_type_hints(TrainConfig)
    unknown = sorted(set(values) - set(hints))
    if unknown:
        raise ValueError(f"{source}: unknown setting(s) {', '.join(unknown)} (the flags of scripts/train.py --help)")
    checked = {}
    for key, value in values.items():
        allowed = typing.get_args(hints[key]) or (hints[key],)
        if value is None:
            ok = type(None) in allowed
        elif isinstance(value, bool):
            ok = bool in allowed
        elif isinstance(value, int) and float in allowed:
            ok, value = True, float(value)
        else:
            ok = type(value) in allowed
        if not ok:
            names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
            raise ValueError(f"{source}: {key}={value!r} must be {names}")
        checked[key] = value
    return checked


def load_config_file(path: str | Path) -> dict[str, Any]:
    """The settings of a ``--config`` file: a TOML or JSON object whose keys are flag names (checked, see
    :func:`check_settings`)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ValueError(f"--config {path}: cannot read it: {e}") from e
    if path.suffix == ".toml":
        tomllib = _toml_module(path)
        try:
            values = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"--config {path}: invalid TOML: {e}") from e
    elif path.suffix == ".json":
        try:
            values = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"--config {path}: invalid JSON: {e}") from e
        if not isinstance(values, dict):
            raise ValueError(f"--config {path}: expected a JSON object of flag names")
    else:
        raise ValueError(f"--config {path}: use a .toml or .json file")
    return check_settings(values, f"--config {path}")


def _toml_module(path: Path) -> Any:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: the backport, if installed
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            raise ValueError(f"--config {path}: TOML needs Python 3.11+ or `pip install tomli`; or use JSON") from None
    return tomllib


def _is_hub_id(spec: str) -> bool:
    """``owner/name`` that is not an existing path (nor a JSON file name)."""
    return not Path(spec).exists() and not spec.endswith(".json") and re.fullmatch(r"[\w.-]+/[\w.-]+", spec) is not None


def _hub_id_or_none(spec: str | None) -> str | None:
    return spec if spec is not None and _is_hub_id(spec) else None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
    except ValueError:
        return False
    return True


def _read_model_config(spec: str, cache_dir: str | None) -> tuple[Path, dict[str, Any]]:
    """(file, dict) of a UNet config given as a JSON file, a folder (``config.json`` or ``unet/config.json``) or a
    Hub model id."""
    path = Path(spec)
    if path.is_dir():
        candidates = [path / "config.json", path / "unet" / "config.json"]
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            raise ValueError(f"--model_config_name_or_path={spec!r}: no config.json or unet/config.json in it")
        path = found
    elif not path.exists():
        if not _is_hub_id(spec):
            raise ValueError(f"--model_config_name_or_path={spec!r}: no such file or folder")
        path = _download_model_config(spec, cache_dir)
    return path, read_json(path)


def _download_model_config(repo_id: str, cache_dir: str | None) -> Path:
    import huggingface_hub

    errors = []
    for name in ("config.json", "unet/config.json"):
        try:
            return Path(huggingface_hub.hf_hub_download(repo_id, name, cache_dir=cache_dir))
        except Exception as e:  # not found, offline, no network: try the next layout, then report all
            errors.append(f"{name}: {type(e).__name__}: {e}")
    raise ValueError(f"--model_config_name_or_path={repo_id!r}: not a local path, and the Hub gave: {errors}")


def _resize_unet(values: dict[str, Any], resolution: int, source: str) -> UNetConfig:
    """The UNet config ``values`` at ``sample_size=resolution``, checked for training (1 or 3 channels in and out)."""
    from .pretrained import unet_config_from_diffusers

    # A placeholder size every architecture divides, so that the --resolution check below can name the flag.
    unet = unet_config_from_diffusers({**values, "sample_size": 2**16}, source)
    factor = unet.downsampling_factor
    if resolution % factor:
        raise ValueError(
            f"--resolution={resolution} must be divisible by {factor}, the down-sampling factor of {source} "
            f"({len(unet.block_out_channels)} blocks)"
        )
    unet = UNetConfig.from_dict({**unet.to_dict(), "sample_size": resolution})
    if unet.in_channels not in (1, 3) or unet.out_channels != unet.in_channels:
        raise ValueError(
            f"{source}: in_channels={unet.in_channels}, out_channels={unet.out_channels}; training needs 1 "
            "(grayscale) or 3 (RGB) channels, the same in and out"
        )
    return unet


def check_precision_support(mixed_precision: str, device: torch.device) -> None:
    """ValueError when ``--mixed_precision`` cannot run on ``device``."""
    if mixed_precision == "no":
        return
    dtype = torch.float16 if mixed_precision == "fp16" else torch.bfloat16
    if device.type == "cuda":
        if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            name = torch.cuda.get_device_name(device)
            raise ValueError(f"--mixed_precision=bf16: {name} does not support bfloat16; use fp16")
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.autocast(device.type, dtype=dtype):
            enabled = torch.is_autocast_enabled(device.type)
    if not enabled or any("not supported" in str(w.message) for w in caught):
        raise ValueError(f"--mixed_precision={mixed_precision}: this PyTorch cannot autocast to {dtype} on {device}")


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


class TrainingDiverged(RuntimeError):
    """Too many optimizer steps in a row had non-finite gradients."""


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

    def scalars(self, record: dict[str, Any], total_steps: int) -> None:
        if not self.enabled:
            return
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()
        step = record["step"]
        numbers = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        if self.tensorboard is not None:
            for key, value in numbers.items():
                self.tensorboard.add_scalar(f"train/{key}", value, step)
        if self.wandb is not None:
            self.wandb.log(numbers, step=step)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{record['loss']:.4g}", lr=f"{record['lr']:.3g}", img_s=f"{record['img_s']:.1f}")
        else:
            mem = record.get("peak_mem_gb")
            tqdm.write(
                f"step {step}/{total_steps}  epoch {record['epoch']}  img/s {record['img_s']:.1f}  "
                f"sec/step {record['sec_per_step']:.3f}  loss {record['loss']:.4f}  lr {record['lr']:.3e}  "
                f"gnorm {record['grad_norm']:.3f}  skipped {record['skipped_steps']}"
                + (f"  mem {mem:.2f}GB" if mem is not None else ""),
                file=sys.stderr,
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
        self.out.mkdir(parents=True, exist_ok=True)
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
        from .pretrained import load_model

        unet, schedule, weights = load_model(cfg.pretrained_model_name_or_path, cache_dir=cfg.cache_dir)
        resized = _resize_unet(unet.to_dict(), cfg.resolution, cfg.pretrained_model_name_or_path)
        return resized, cfg.schedule_config(schedule), weights

    def _load_dataset(self, channels: int) -> ImageDataset:
        cfg = self.cfg

        def load() -> ImageDataset:
            data, column = load_image_dataset(
                cfg.dataset_name, cfg.dataset_config_name, cfg.train_data_dir, cfg.cache_dir, cfg.image_column
            )
            transform = ImageTransform(cfg.resolution, channels, cfg.center_crop, cfg.random_flip)
            return ImageDataset(data, column, transform)

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
        from .hub import ensure_repo

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

        dataset = self._load_dataset(unet_config.in_channels)
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
            removed = rotate_checkpoints(self.out, cfg.checkpoints_total_limit)
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
        from .export import export_pipeline, make_model_card

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
            base_model=_hub_id_or_none(cfg.pretrained_model_name_or_path),
            dataset=_hub_id_or_none(cfg.dataset_name),
        )
        export_pipeline(self.unet_config, self.schedule_config, weights, self.out, model_card=card, sample_grid=grid)
        self.log.write(f"Exported the pipeline to {self.out}")
        if cfg.push_to_hub:
            from .hub import HubError, push_folder

            try:
                private, message = cfg.hub_private_repo, f"Epoch {epoch}"
                push_folder(self.out, repo_id, token=cfg.hub_token, private=private, commit_message=message)
            except HubError as e:  # a network hiccup must not end the run: the next export pushes again
                logger.warning("push to the Hub failed (training goes on): %s", e)


def _resolve_resume(spec: str | None, output_dir: Path) -> Path | None:
    """The checkpoint folder ``--resume_from_checkpoint`` names, or None for a fresh start."""
    if spec is None:
        return None
    if spec == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            logger.warning("Checkpoint 'latest' does not exist. Starting a new training run.")
            return None
        return found[-1]
    for candidate in (Path(spec), output_dir / Path(spec).name):
        if is_checkpoint(candidate):
            return candidate
    raise FileNotFoundError(
        f"--resume_from_checkpoint={spec!r}: no checkpoint at {spec} or {output_dir / Path(spec).name} "
        "(a checkpoint folder holds config.json and model.safetensors)"
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
    :class:`TrainingDiverged` after ``max_nonfinite_steps`` skipped steps in a row.
    """
    ctx = init_distributed(config.device, config.ddp_timeout, config.local_rank)
    try:
        return _Trainer(config, ctx, command).run()
    finally:
        shutdown(ctx)


def command_line(argv: list[str], program: str = "scripts/train.py") -> str:
    """A shell-quoted command line for records, with any Hub token scrubbed."""
    from .export import scrub_tokens

    launcher = (
        "torchrun --nproc_per_node=" + os.environ["LOCAL_WORLD_SIZE"] + " "
        if "LOCAL_WORLD_SIZE" in os.environ
        else "python "
    )
    return scrub_tokens(launcher + shlex.join([program, *argv]))
