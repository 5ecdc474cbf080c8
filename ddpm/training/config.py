"""Every setting of a training run: :class:`TrainConfig`, its validation and ``--config`` files.

The fields of :class:`TrainConfig` are the command-line flags of ``scripts/train.py`` (train_unconditional's names,
defaults and meanings, plus additions); construction checks every value and raises a ValueError naming the flag.
It is values only: what they name (a model config file, the device's precision support, the output folder) is
checked by :func:`ddpm.training.setup.check_config` and :func:`~ddpm.training.setup.build_run`, still before any data
is read. :func:`load_config_file` reads a TOML or JSON file of flag names, refusing unknown keys and wrong types.
"""

from __future__ import annotations

import json
import math
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..data.datasets import DEFAULT_IMAGE_COLUMN
from ..diffusion.sampling import SAMPLERS
from ..diffusion.schedule import BETA_SCHEDULES, PREDICTION_TYPES, VARIANCE_TYPES
from ..runtime.precision import MIXED_PRECISION_CHOICES
from .lr_schedule import LR_SCHEDULERS, POLYNOMIAL_LR_END, parse_step_rules

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


def _flag(default: Any, help: str, choices: tuple[str, ...] | None = None) -> Any:
    metadata: dict[str, Any] = {"help": help}
    if choices is not None:
        metadata["choices"] = choices
    return field(default=default, metadata=metadata)


@dataclass
class TrainConfig:
    """Every setting of a training run; the field names are the flags of ``scripts/train.py``.

    The first block are train_unconditional's flags with its defaults; the rest are additions. Validated on
    construction (values and how they combine; no file or device is looked at): a bad value raises ValueError naming
    the flag.
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
        "Experiment tracker besides logs/metrics.jsonl. tensorboard is installed with the package; wandb with "
        '`pip install -e ".[wandb]"` (a run with --logger wandb without it stops at start).',
        ("tensorboard", "wandb", "none"),
    )
    logging_dir: str = _flag("logs", "Log folder, relative to --output_dir.")
    local_rank: int = _flag(-1, "Legacy torch.distributed.launch rank; the LOCAL_RANK environment variable wins.")
    mixed_precision: str = _flag(
        "no",
        "Autocast precision: fp16 (with a GradScaler) or bf16; weights and optimizer stay float32. auto: bf16 where "
        "the device computes bfloat16 natively (a GPU of compute capability 8.0 or later, a CPU with AVX512-BF16 or "
        "AMX), no elsewhere.",
        MIXED_PRECISION_CHOICES,
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
        "(the newest in --output_dir; a fresh start when there is none). As in diffusers' example, the checkpoint's "
        "optimizer settings continue (learning rate, betas, eps, weight decay); a new --learning_rate applies only "
        "when the global batch changed.",
    )
    enable_xformers_memory_efficient_attention: bool = _flag(
        False, "Accepted for compatibility: attention always uses PyTorch's fused scaled_dot_product_attention."
    )
    preserve_input_precision: bool = _flag(
        False,
        "Keep 16-bit (PNG/TIFF) and float images at full precision through the transforms (float32 before the resize) "
        "instead of rounding them to 8 bits.",
    )

    # ---- additions
    seed: int | None = _flag(None, "Seed of everything random (data order, augmentations, noise, initial weights).")
    max_train_steps: int | None = _flag(None, "Total optimizer steps; overrides --num_epochs.")
    max_grad_norm: float = _flag(1.0, "Gradient-norm clipping threshold.")
    image_column: str = _flag(
        DEFAULT_IMAGE_COLUMN,
        f"Dataset column holding the images (default: {DEFAULT_IMAGE_COLUMN!r}, else the first image column).",
    )
    skip_corrupt_images: bool = _flag(
        False,
        "Replace an unreadable image by the next readable one and count it (metric corrupt_images_skipped) instead "
        "of stopping with an error naming the file.",
    )
    pretrained_model_name_or_path: str | None = _flag(
        None,
        "Start from these weights: a diffusers pipeline or UNet folder, a run or checkpoint folder, or a Hub id. "
        "Its schedule is kept unless a --ddpm_*/--prediction_type/--rescale_betas_zero_snr flag is given a non-default "
        "value.",
    )
    ddpm_variance_type: str = _flag("fixed_small", "Variance of the DDPM sampler.", VARIANCE_TYPES)
    rescale_betas_zero_snr: bool = _flag(
        False,
        "Rescale the betas to a zero terminal SNR (Lin et al. 2023): the last timestep is pure noise. Lands in the "
        "exported scheduler config.",
    )
    snr_gamma: float | None = _flag(
        None,
        "Min-SNR-gamma loss weighting (Hang et al. 2023; 5 is the paper's choice), as diffusers' training scripts "
        "compute it. Default: off.",
    )
    noise_offset: float = _flag(
        0.0, "Offset noise: add this times one normal draw per image and channel to the noise. 0: off."
    )
    sampler: str = _flag(
        "ddpm", "Sampler for the sample grids (the last two: DPM-Solver++, deterministic or stochastic).", SAMPLERS
    )
    lr_num_cycles: float | None = _flag(
        None, "Cosine waves (cosine, default 0.5) or hard restarts (cosine_with_restarts, default 1)."
    )
    lr_power: float = _flag(1.0, "Power of the polynomial schedule.")
    lr_step_rules: str | None = _flag(
        None,
        "Multipliers of the piecewise_constant schedule (diffusers' step_rules): '1:1000,0.1:2000,0.01' is 1 before "
        "step 1000, 0.1 before step 2000, then 0.01.",
    )
    allow_tf32: bool = _flag(False, "Allow TF32 matmuls and convolutions on Ampere+ GPUs (faster float32).")
    deterministic: bool = _flag(
        False,
        "Deterministic GPU kernels (no cuDNN autotuning; torch.use_deterministic_algorithms): a run and its resume "
        "give the same weights bit for bit on the same GPU, at some speed, where every operation has a "
        "deterministic kernel (torch warns, naming any that has none). CPU runs are deterministic without it.",
    )
    gradient_checkpointing: bool = _flag(False, "Recompute activations in the backward pass to save memory.")
    compile: bool = _flag(False, "torch.compile the model.")
    channels_last: bool | None = _flag(
        None,
        "Use the channels_last memory format for the UNet and its inputs (faster convolutions). Default: on a CPU "
        "for UNets of 128 or more channels at every level (measured faster, see the README) and with "
        "--mixed_precision fp16/bf16 on a GPU (tensor cores); off otherwise. --no-channels_last turns it off.",
    )
    logging_steps: int = _flag(10, "Log (metrics.jsonl, trackers, status line) every N optimizer steps.")
    max_nonfinite_steps: int = _flag(
        100, "Stop when this many optimizer steps in a row have non-finite gradients (they are skipped)."
    )
    ddp_timeout: int = _flag(
        7200,
        "Seconds a rank waits for the others before failing (instead of hanging); upstream's 7200: rank 0 alone "
        "prepares the dataset while the others wait (grids are shared; checkpoints, exports and Hub uploads are "
        "written in the background).",
    )
    fid_every_steps: int = _flag(
        0,
        "Every N optimizer steps (and at the end), log the FID of --fid_num_samples EMA samples (--fid_sampler) "
        "against --fid_reference to metrics.jsonl and the tracker. 0: never.",
    )
    fid_sampler: str = _flag("ddim", "Sampler of the FID samples.", SAMPLERS)
    fid_num_samples: int = _flag(1000, "Samples per FID evaluation (split across the processes).")
    fid_inference_steps: int = _flag(50, "Steps of the FID sampler.")
    fid_batch_size: int = _flag(64, "Per-process batch size of FID sampling and of the Inception network.")
    fid_reference: str | None = _flag(
        None,
        "FID reference: a statistics .npz, an image folder, a .npz of images or a dataset. Default: the training "
        "images at --resolution (statistics computed once, cached in --output_dir).",
    )
    inception_weights: str | None = _flag(
        None,
        "FID Inception weights file (default: $DDPM_INCEPTION_WEIGHTS, the torch hub cache, "
        "~/.cache/ddpm/inception-fid.safetensors, else a download).",
    )
    device: str = _flag("auto", "Training device: auto (this rank's GPU if any), cpu or cuda.", ("auto", "cpu", "cuda"))

    def __post_init__(self) -> None:
        for check in (_check_choices, _check_data_source, _check_integers, _check_rates, _check_combinations):
            check(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> TrainConfig:
        """Build from a dict of flag names (e.g. a ``--config`` file), checked by :func:`check_settings`."""
        return cls(**check_settings(values, source))

    def to_dict(self) -> dict[str, Any]:
        """All settings, JSON-friendly, without the Hub token."""
        values = asdict(self)
        values.pop("hub_token")
        return values


# ---------------------------------------------------------------------------------------------------- validation
# In this order: the first bad setting found is the one reported.

_POSITIVE = (
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
    "fid_inference_steps",
    "fid_batch_size",
)
_POSITIVE_OR_UNSET = ("max_train_steps", "checkpoints_total_limit")
_NON_NEGATIVE = ("dataloader_num_workers", "lr_warmup_steps", "fid_every_steps")
_POSITIVE_RATES = ("learning_rate", "adam_epsilon", "ema_inv_gamma", "ema_power", "max_grad_norm", "lr_power")


def _bad(config: TrainConfig, name: str, why: str) -> ValueError:
    return ValueError(f"--{name}={getattr(config, name)!r}: {why}")


def _check_choices(config: TrainConfig) -> None:
    for f in fields(config):
        choices = f.metadata.get("choices")
        if choices is not None and getattr(config, f.name) not in choices:
            raise _bad(config, f.name, f"choose one of {', '.join(choices)}")


def _check_data_source(config: TrainConfig) -> None:
    if config.dataset_name is None and config.train_data_dir is None:
        raise ValueError(
            "You must specify either a dataset name from the hub (--dataset_name) or a train data directory "
            "(--train_data_dir)."
        )
    if config.dataset_name is not None and config.train_data_dir is not None:
        raise ValueError("Give only one of --dataset_name and --train_data_dir")


def _check_integers(config: TrainConfig) -> None:
    for name in _POSITIVE:
        if not _is_int(getattr(config, name)) or getattr(config, name) < 1:
            raise _bad(config, name, "must be a positive integer")
    for name in _POSITIVE_OR_UNSET:
        value = getattr(config, name)
        if value is not None and (not _is_int(value) or value < 1):
            raise _bad(config, name, "must be a positive integer (or left unset)")
    for name in _NON_NEGATIVE:
        if not _is_int(getattr(config, name)) or getattr(config, name) < 0:
            raise _bad(config, name, "must be an integer >= 0")


def _check_rates(config: TrainConfig) -> None:
    for name in _POSITIVE_RATES:
        if not getattr(config, name) > 0:
            raise _bad(config, name, "must be positive")
        if name != "max_grad_norm" and not math.isfinite(getattr(config, name)):  # inf max_grad_norm: no clipping
            raise _bad(config, name, "must be finite")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(config, name) < 1:
            raise _bad(config, name, "must be in [0, 1)")
    if not (config.adam_weight_decay >= 0 and math.isfinite(config.adam_weight_decay)):
        raise _bad(config, "adam_weight_decay", "must be a finite number >= 0")
    if not 0 <= config.ema_max_decay <= 1:
        raise _bad(config, "ema_max_decay", "must be in [0, 1]")
    if config.lr_scheduler == "polynomial" and not config.learning_rate > POLYNOMIAL_LR_END:
        raise _bad(config, "learning_rate", f"the polynomial schedule decays to {POLYNOMIAL_LR_END}: start above it")
    if config.lr_num_cycles is not None and not (config.lr_num_cycles > 0 and math.isfinite(config.lr_num_cycles)):
        raise _bad(config, "lr_num_cycles", "must be a positive number")
    if config.lr_scheduler == "piecewise_constant":
        parse_step_rules(config.lr_step_rules)
    if config.snr_gamma is not None and not (config.snr_gamma > 0 and math.isfinite(config.snr_gamma)):
        raise _bad(config, "snr_gamma", "must be a positive number (or left unset)")
    if not (config.noise_offset >= 0 and math.isfinite(config.noise_offset)):
        raise _bad(config, "noise_offset", "must be >= 0")


def _check_combinations(config: TrainConfig) -> None:
    """Settings that only make sense together."""
    for name in ("ddpm_num_inference_steps", "fid_inference_steps"):
        if getattr(config, name) > config.ddpm_num_steps:
            raise _bad(config, name, f"must be <= --ddpm_num_steps={config.ddpm_num_steps}")
    if not _is_int(config.fid_num_samples) or config.fid_num_samples < 2:
        raise _bad(config, "fid_num_samples", "must be an integer >= 2 (FID needs a covariance)")
    if config.model_config_name_or_path is not None and config.pretrained_model_name_or_path is not None:
        raise ValueError(
            "Give only one of --model_config_name_or_path and --pretrained_model_name_or_path "
            "(a pretrained model brings its own architecture)"
        )
    if config.overwrite_output_dir and config.resume_from_checkpoint == "latest":  # a path: prepare_output_dir
        raise ValueError(
            "--overwrite_output_dir would delete the checkpoint --resume_from_checkpoint='latest' resumes from; "
            "drop one of them"
        )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ---------------------------------------------------------------------------------------------------- --config files


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
