"""Write a model as a diffusers ``DDPMPipeline`` folder that ``DDPMPipeline.from_pretrained`` loads without a warning.

Layout written into ``output_dir`` (nothing else there is touched: a run's ``checkpoint-*/`` and ``logs/`` stay)::

    model_index.json                          {"_class_name": "DDPMPipeline", "unet": [...], "scheduler": [...]}
    unet/config.json                          every UNet2DModel config key, written explicitly
    unet/diffusion_pytorch_model.safetensors  fp32, metadata {"format": "pt"} (``.fp16.`` / ``.bf16.`` variants)
    scheduler/scheduler_config.json           every DDPMScheduler config key, written explicitly
    README.md                                 model card with Hub metadata
    samples.png                               sample grid, when one is given

The names, keys and values come from :mod:`ddpm.io.diffusers_format` (every config key is written explicitly; its
docstring says why).

Atomicity: all files are first written into a hidden staging folder inside ``output_dir`` (so a failure while
writing, e.g. a full disk, leaves any previous export complete and untouched). They are then committed:
``model_index.json`` is removed first, ``scheduler/`` then ``unet/`` are each swapped in with one folder rename
(:func:`ddpm.io.files.atomic_write_dir`), the card and grid are renamed in, and ``model_index.json`` is renamed in
last. A crash during the commit therefore leaves a folder without ``model_index.json``, which neither diffusers nor
:func:`ddpm.io.pretrained.load_model` takes for a pipeline.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..diffusion.schedule import ScheduleConfig
from ..models.unet import UNetConfig
from .checkpoint import EMA_NAME, find_checkpoint, load_checkpoint_model, model_weights_file
from .diffusers_format import (
    DTYPE_VARIANTS,
    MODEL_CARD_NAME,
    MODEL_INDEX_NAME,
    SAMPLE_GRID_NAME,
    SCHEDULER_CONFIG_NAME,
    SCHEDULER_FOLDER,
    UNET_CONFIG_NAME,
    UNET_FOLDER,
    model_index_json,
    scheduler_config_json,
    unet_config_json,
    validate_state_dict,
    weights_name,
)
from .files import atomic_write_dir, commit_file, fsync_tree, write_json, write_safetensors
from .hub import scrub_tokens

logger = logging.getLogger(__name__)


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
    body = [f"# {name}", "", "An unconditional image diffusion model (DDPM), trained with the `ddpm` toolkit.", ""]
    if sample_grid:
        body += [f"![Samples]({sample_grid})", ""]
    body += _usage(repo_id or name, schedule_config.num_train_timesteps)
    body += ["## Model", "", *_table(_model_rows(unet_config, schedule_config, num_parameters))]
    body += _training_section(training_info or {})
    return "\n".join(_card_metadata(base_model, dataset) + [""] + body) + "\n"


def _card_metadata(base_model: str | None, dataset: str | None) -> list[str]:
    """The YAML header the Hub reads: library, task, tags, and where the model came from."""
    header = ["---", "library_name: diffusers", "pipeline_tag: unconditional-image-generation", "tags:"]
    header += [f"- {tag}" for tag in ("pytorch", "diffusers", "unconditional-image-generation", "ddpm")]
    if base_model:
        header.append(f'base_model: "{scrub_tokens(base_model)}"')
    if dataset:
        header += ["datasets:", f'- "{scrub_tokens(dataset)}"']
    return header + ["---"]


def _usage(repo_id: str, num_inference_steps: int) -> list[str]:
    return [
        "## Usage",
        "",
        "```python",
        "from diffusers import DDPMPipeline",
        "",
        f'pipeline = DDPMPipeline.from_pretrained("{repo_id}")',
        f"image = pipeline(num_inference_steps={num_inference_steps}).images[0]",
        'image.save("sample.png")',
        "",
        "# Faster: the stochastic DPM-Solver++ in 20 steps (from_config keeps this model's noise schedule)",
        "from diffusers import DPMSolverMultistepScheduler",
        "",
        "pipeline.scheduler = DPMSolverMultistepScheduler.from_config(",
        '    pipeline.scheduler.config, algorithm_type="sde-dpmsolver++"',
        ")",
        "image = pipeline(num_inference_steps=20).images[0]",
        "```",
        "",
    ]


def _model_rows(c: UNetConfig, s: ScheduleConfig, num_parameters: int | None) -> list[tuple[str, Any]]:
    size = f"{c.sample_size}×{c.sample_size}, {c.in_channels} channel{'s' if c.in_channels > 1 else ''}"
    rows: list[tuple[str, Any]] = [("Image size", size)]
    if num_parameters is not None:
        rows.append(("Parameters", f"{num_parameters:,}"))
    return rows + [
        ("UNet widths", ", ".join(str(w) for w in c.block_out_channels) + f" ({c.layers_per_block} resnets/block)"),
        ("UNet blocks", ", ".join(c.down_block_types)),
        ("Noise schedule", f"{s.beta_schedule}, β {s.beta_start:g}→{s.beta_end:g}, T = {s.num_train_timesteps}"),
        ("Prediction", s.prediction_type),
        ("Sampler variance", s.variance_type + (f", x0 clipped to ±{s.clip_sample_range:g}" if s.clip_sample else "")),
    ]


def _table(rows: list[tuple[str, Any]]) -> list[str]:
    """A two-column Markdown table without a heading."""
    return ["| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows]]


def _training_section(training_info: dict[str, Any]) -> list[str]:
    """The command (a code block) and the other facts (a table), scrubbed; nothing when there is nothing to say."""
    info = {k: v for k, v in training_info.items() if "token" not in k.lower() and v is not None}
    command = info.pop("command", None)
    if not info and not command:
        return []
    lines = ["", "## Training", ""]
    if command:
        lines += ["```bash", scrub_tokens(str(command)), "```", ""]
    if info:
        lines += _table([(k, scrub_tokens(str(v))) for k, v in info.items()])
    return lines


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
        fsync_tree(staging)  # a disk that refuses the data refuses it now, while the previous export is whole
        _commit(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created and not any(output_dir.iterdir()):
            output_dir.rmdir()
        raise
    shutil.rmtree(staging, ignore_errors=True)
    logger.info("exported DDPMPipeline to %s", output_dir)
    return output_dir


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
    ema = model_weights_file(source, use_ema).name == EMA_NAME
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
