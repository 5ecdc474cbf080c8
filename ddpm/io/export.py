"""Write a model as a diffusers ``DDPMPipeline`` folder that ``DDPMPipeline.from_pretrained`` loads without a warning.

Layout written into ``output_dir`` (nothing else there is touched: a run's ``checkpoint-*/`` and ``logs/`` stay)::

    model_index.json                          {"_class_name": "DDPMPipeline", "unet": [...], "scheduler": [...]}
    unet/config.json                          every UNet2DModel config key, written explicitly
    unet/diffusion_pytorch_model.safetensors  fp32, metadata {"format": "pt"} (``.fp16.`` / ``.bf16.`` variants)
    scheduler/scheduler_config.json           every DDPMScheduler config key, written explicitly
    README.md                                 model card with Hub metadata
    samples.png                               sample grid, when one is given

Every config key is written, never left to a default: diffusers fills a missing key with the default of the version
that *reads* the file, so a key left out today could silently change the model with a future release. The
``_diffusers_version`` written is the oldest release that knows every key written (``mid_block_type`` is 0.33.0);
diffusers does not consult it for these classes.

Atomicity: all files are first written into a hidden staging folder inside ``output_dir`` (so a failure while
writing, e.g. a full disk, leaves any previous export complete and untouched). They are then committed:
``model_index.json`` is removed first, ``scheduler/`` then ``unet/`` are each swapped in with one folder rename
(:func:`ddpm.io.files.atomic_write_dir`), the card and grid are renamed in, and ``model_index.json`` is renamed in
last. A crash during the commit therefore leaves a folder without ``model_index.json``, which neither diffusers nor
:func:`ddpm.io.pretrained.load_model` takes for a pipeline.
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..diffusion.schedule import ScheduleConfig
from ..models.unet import UNet, UNetConfig
from .checkpoint import EMA_NAME, is_checkpoint, latest_checkpoint, load_checkpoint_model
from .files import atomic_write_dir, commit_file, write_json, write_safetensors

logger = logging.getLogger(__name__)

DIFFUSERS_VERSION = "0.33.0"
MODEL_INDEX_NAME = "model_index.json"
UNET_FOLDER = "unet"
SCHEDULER_FOLDER = "scheduler"
UNET_CONFIG_NAME = "config.json"
SCHEDULER_CONFIG_NAME = "scheduler_config.json"
WEIGHTS_STEM = "diffusion_pytorch_model"
MODEL_CARD_NAME = "README.md"
SAMPLE_GRID_NAME = "samples.png"
# What an exported pipeline consists of, as upload patterns: never checkpoints, logs or optimizer state.
PIPELINE_PATTERNS = [MODEL_INDEX_NAME, f"{UNET_FOLDER}/*", f"{SCHEDULER_FOLDER}/*", MODEL_CARD_NAME, SAMPLE_GRID_NAME]
# Weight dtypes and the diffusers ``variant`` naming their file (``from_pretrained(..., variant="fp16")``).
DTYPE_VARIANTS: dict[torch.dtype, str | None] = {torch.float32: None, torch.float16: "fp16", torch.bfloat16: "bf16"}

# UNet2DModel keys our UNet does not model, at the only values it implements.
_UNET_FIXED_KEYS: dict[str, Any] = {
    "time_embedding_type": "positional",
    "class_embed_type": None,
    "num_class_embeds": None,
    "num_train_timesteps": None,
    "downsample_type": "conv",
    "upsample_type": "conv",
    "mid_block_type": "UNetMidBlock2D",
}
# DDPMScheduler keys our schedule does not model: no custom betas, no dynamic thresholding (its two settings are
# unused without it and are written at diffusers' defaults).
_SCHEDULER_FIXED_KEYS: dict[str, Any] = {
    "trained_betas": None,
    "thresholding": False,
    "dynamic_thresholding_ratio": 0.995,
    "sample_max_value": 1.0,
}
# Hugging Face tokens and a --hub_token value in a command line, scrubbed from anything written into a model card.
_TOKEN_PATTERNS = (re.compile(r"(--hub_token[= ]|--token[= ])\S+"), re.compile(r"\bhf_[A-Za-z0-9]{8,}"))


def weights_name(variant: str | None = None) -> str:
    """``diffusion_pytorch_model[.variant].safetensors``."""
    return f"{WEIGHTS_STEM}.{variant}.safetensors" if variant else f"{WEIGHTS_STEM}.safetensors"


def unet_config_json(config: UNetConfig) -> dict[str, Any]:
    """The complete ``unet/config.json`` dict for ``config``."""
    header = {"_class_name": "UNet2DModel", "_diffusers_version": DIFFUSERS_VERSION}
    return {**header, **config.to_dict(), **_UNET_FIXED_KEYS}


def scheduler_config_json(config: ScheduleConfig) -> dict[str, Any]:
    """The complete ``scheduler/scheduler_config.json`` dict for ``config``."""
    return {
        "_class_name": "DDPMScheduler",
        "_diffusers_version": DIFFUSERS_VERSION,
        **config.to_dict(),
        **_SCHEDULER_FIXED_KEYS,
    }


def model_index_json() -> dict[str, Any]:
    return {
        "_class_name": "DDPMPipeline",
        "_diffusers_version": DIFFUSERS_VERSION,
        "scheduler": ["diffusers", "DDPMScheduler"],
        "unet": ["diffusers", "UNet2DModel"],
    }


def validate_state_dict(config: UNetConfig, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Raise ValueError unless ``state_dict`` has exactly the tensors and shapes the UNet of ``config`` needs."""
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        expected = {k: tuple(v.shape) for k, v in UNet(config).state_dict().items()}
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing:
        raise ValueError(f"{source}: {len(missing)} tensor(s) the UNet config needs are missing, e.g. {missing[:5]}")
    if unexpected:
        raise ValueError(f"{source}: {len(unexpected)} tensor(s) the UNet config does not have, e.g. {unexpected[:5]}")
    for key, shape in expected.items():
        tensor = state_dict[key]
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            raise ValueError(f"{source}: {key!r} is not a floating-point tensor ({getattr(tensor, 'dtype', tensor)})")
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{source}: tensor {key!r} has shape {list(tensor.shape)}, the config needs {list(shape)}")


def scrub_tokens(text: str) -> str:
    """Replace anything that looks like a Hugging Face token (or follows --hub_token) with ``***``."""
    text = _TOKEN_PATTERNS[0].sub(r"\1***", text)
    return _TOKEN_PATTERNS[1].sub("***", text)


def make_model_card(
    unet_config: UNetConfig,
    schedule_config: ScheduleConfig,
    *,
    name: str,
    num_parameters: int | None = None,
    training_info: dict[str, Any] | None = None,
    sample_grid: str | None = None,
    repo_id: str | None = None,
    base_model: str | None = None,
    dataset: str | None = None,
) -> str:
    """A small, factual ``README.md``: Hub metadata, samples, usage, architecture and what ``training_info`` holds.

    ``training_info`` is rendered as given (``{"command": ..., "steps": ..., "images seen": ..., "final loss": ...}``;
    ``command`` as a code block); keys mentioning a token are dropped and token-like strings scrubbed.
    ``sample_grid`` is the grid's file name relative to the card. ``repo_id`` goes into the usage snippet
    (default: ``name``).
    """
    header = ["---", "library_name: diffusers", "pipeline_tag: unconditional-image-generation", "tags:"]
    header += [f"- {tag}" for tag in ("pytorch", "diffusers", "unconditional-image-generation", "ddpm")]
    if base_model:
        header.append(f'base_model: "{scrub_tokens(base_model)}"')
    if dataset:
        header += ["datasets:", f'- "{scrub_tokens(dataset)}"']
    header.append("---")

    c, s = unet_config, schedule_config
    size = f"{c.sample_size}×{c.sample_size}, {c.in_channels} channel{'s' if c.in_channels > 1 else ''}"
    rows = [("Image size", size)]
    if num_parameters is not None:
        rows.append(("Parameters", f"{num_parameters:,}"))
    rows += [
        ("UNet widths", ", ".join(str(w) for w in c.block_out_channels) + f" ({c.layers_per_block} resnets/block)"),
        ("UNet blocks", ", ".join(c.down_block_types)),
        ("Noise schedule", f"{s.beta_schedule}, β {s.beta_start:g}→{s.beta_end:g}, T = {s.num_train_timesteps}"),
        ("Prediction", s.prediction_type),
        ("Sampler variance", s.variance_type + (f", x0 clipped to ±{s.clip_sample_range:g}" if s.clip_sample else "")),
    ]
    body = [f"# {name}", "", "An unconditional image diffusion model (DDPM), trained with the `ddpm` toolkit.", ""]
    if sample_grid:
        body += [f"![Samples]({sample_grid})", ""]
    body += [
        "## Usage",
        "",
        "```python",
        "from diffusers import DDPMPipeline",
        "",
        f'pipeline = DDPMPipeline.from_pretrained("{repo_id or name}")',
        f"image = pipeline(num_inference_steps={s.num_train_timesteps}).images[0]",
        'image.save("sample.png")',
        "```",
        "",
        "## Model",
        "",
        "| | |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in rows],
    ]
    info = {k: v for k, v in (training_info or {}).items() if "token" not in k.lower() and v is not None}
    command = info.pop("command", None)
    if info or command:
        body += ["", "## Training", ""]
        if command:
            body += ["```bash", scrub_tokens(str(command)), "```", ""]
        if info:
            body += ["| | |", "|---|---|", *[f"| {k} | {scrub_tokens(str(v))} |" for k, v in info.items()]]
    return "\n".join(header + [""] + body) + "\n"


def _cast_weights(state_dict: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    out = {}
    for key, tensor in state_dict.items():
        cast = tensor.detach().to("cpu", dtype)
        if cast.dtype != tensor.dtype and not torch.isfinite(cast).all() and torch.isfinite(tensor).all():
            raise ValueError(f"tensor {key!r} has values outside the range of {dtype}; export it in float32")
        out[key] = cast
    return out


def _commit(staging: Path, output_dir: Path) -> None:
    """Move the staged pipeline into ``output_dir``; ``model_index.json`` is absent until everything else is in."""
    index = output_dir / MODEL_INDEX_NAME
    index.unlink(missing_ok=True)
    # scheduler/ first: interrupted after it, a fresh folder has no unet/ and does not load as a bare UNet either
    for folder in (SCHEDULER_FOLDER, UNET_FOLDER):
        with atomic_write_dir(output_dir / folder) as tmp:
            for path in (staging / folder).iterdir():
                path.rename(tmp / path.name)
    for name in (MODEL_CARD_NAME, SAMPLE_GRID_NAME, MODEL_INDEX_NAME):
        if (staging / name).is_file():
            commit_file(staging / name, output_dir / name)
        elif name == SAMPLE_GRID_NAME:  # a previous export's grid would pass for samples of these weights
            (output_dir / name).unlink(missing_ok=True)


def export_pipeline(
    unet_config: UNetConfig,
    schedule_config: ScheduleConfig,
    state_dict: dict[str, torch.Tensor],
    output_dir: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    model_card: str | None = None,
    sample_grid: Path | None = None,
) -> Path:
    """Write (or replace) the DDPMPipeline files in ``output_dir``; returns ``output_dir``.

    ``state_dict`` must match ``unet_config`` exactly (checked before anything is written). ``dtype`` float16 or
    bfloat16 writes the ``fp16`` / ``bf16`` variant weights file instead of the float32 one. ``model_card`` is the
    README text (default: :func:`make_model_card` without training details); ``sample_grid`` an image copied in as
    ``samples.png``. See the module docstring for what is written and how a failure is contained.
    """
    output_dir = Path(output_dir)
    if dtype not in DTYPE_VARIANTS:
        raise ValueError(f"dtype={dtype}: supported {[str(d) for d in DTYPE_VARIANTS]}")
    if sample_grid is not None and not Path(sample_grid).is_file():
        raise FileNotFoundError(f"sample grid {sample_grid} does not exist")
    validate_state_dict(unet_config, state_dict, "weights to export")
    weights = _cast_weights(state_dict, dtype)
    if model_card is None:
        model_card = make_model_card(
            unet_config,
            schedule_config,
            name=output_dir.resolve().name,
            num_parameters=sum(t.numel() for t in weights.values()),
            sample_grid=SAMPLE_GRID_NAME if sample_grid is not None else None,
        )

    created = not output_dir.exists()
    output_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tmp-export-", dir=output_dir))
    try:
        (staging / UNET_FOLDER).mkdir()
        write_json(unet_config_json(unet_config), staging / UNET_FOLDER / UNET_CONFIG_NAME)
        write_safetensors(weights, staging / UNET_FOLDER / weights_name(DTYPE_VARIANTS[dtype]))
        (staging / SCHEDULER_FOLDER).mkdir()
        write_json(scheduler_config_json(schedule_config), staging / SCHEDULER_FOLDER / SCHEDULER_CONFIG_NAME)
        (staging / MODEL_CARD_NAME).write_text(scrub_tokens(model_card))  # a caller's card too: never a token
        if sample_grid is not None:
            shutil.copyfile(sample_grid, staging / SAMPLE_GRID_NAME)
        write_json(model_index_json(), staging / MODEL_INDEX_NAME)
        _commit(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created and not any(output_dir.iterdir()):
            output_dir.rmdir()
        raise
    shutil.rmtree(staging, ignore_errors=True)
    logger.info("exported DDPMPipeline to %s", output_dir)
    return output_dir


def find_checkpoint(path: str | Path) -> Path:
    """``path`` itself when it is a training checkpoint, else the latest ``checkpoint-N`` inside it."""
    path = Path(path)
    if is_checkpoint(path):
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise FileNotFoundError(f"{path}: not a training checkpoint, and no checkpoint-N folder inside it")
    return latest


def export_checkpoint(
    checkpoint_or_run_dir: str | Path,
    output_dir: str | Path,
    *,
    use_ema: bool = True,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Export a training checkpoint (or a run folder's latest one) as a DDPMPipeline folder.

    EMA weights are exported when ``use_ema`` and the checkpoint has them, the live weights otherwise.
    """
    source = find_checkpoint(checkpoint_or_run_dir)
    unet_config, schedule_config, state_dict, config = load_checkpoint_model(source, use_ema=use_ema)
    ema = use_ema and (source / EMA_NAME).is_file()
    if use_ema and not ema:
        logger.info("%s has no EMA weights; exporting the live weights", source)
    run = config.get("run") if isinstance(config.get("run"), dict) else {}
    info = {
        "command": run.get("command"),
        "Checkpoint": source.name,
        "Optimizer steps": config.get("step"),
        "Weights": "EMA" if ema else "live (no EMA)",
    }
    card = make_model_card(
        unet_config,
        schedule_config,
        name=Path(output_dir).resolve().name,
        num_parameters=sum(t.numel() for t in state_dict.values()),
        training_info=info,
    )
    return export_pipeline(unet_config, schedule_config, state_dict, output_dir, dtype=dtype, model_card=card)
