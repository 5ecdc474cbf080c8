"""The diffusers format in one place: its file names, its config keys and the rules between them and our configs.

Both directions use these tables: :mod:`ddpm.io.export` writes a ``DDPMPipeline`` folder with
:func:`unet_config_json`, :func:`scheduler_config_json` and :func:`model_index_json`; :mod:`ddpm.io.pretrained`
reads one (or an older layout) with :func:`unet_config_from_diffusers`, :func:`schedule_config_from_diffusers` and
:func:`convert_legacy_state_dict`. Our :class:`~ddpm.models.unet.UNetConfig` and
:class:`~ddpm.diffusion.schedule.ScheduleConfig` use ``UNet2DModel``'s and ``DDPMScheduler``'s key names but know
only the keys they model; everything else about diffusers' dicts is handled here.

Writing: every config key is written, never left to a default. diffusers fills a missing key with the default of
the version that *reads* the file, so a key left out today could silently change the model with a future release.
The ``_diffusers_version`` written is the oldest release that knows every key written (``mid_block_type`` is
0.33.0); diffusers does not consult it for these classes.

Reading old configs. A key missing from a ``unet/config.json`` takes the default of the diffusers version that wrote
the file (:data:`LEGACY_UNET_DEFAULTS`), not today's. Research (huggingface/diffusers history): every
``UNet2DModel`` since the class appeared (the 0.0.4 development version that converted google/ddpm-*, then 0.1.0 to
today) has had the same defaults for the keys that change the maths of an old model: ``flip_sin_to_cos=True``,
``freq_shift=0``, ``downsample_padding=1``, ``attention_head_dim=8``, ``norm_eps=1e-5``; and ``register_to_config``
always wrote every ``__init__`` argument, so the google/ddpm-* configs (``_diffusers_version`` 0.0.4) carry these
five keys explicitly (``false, 1, 0, null, 1e-6``). Keys added later (``add_attention``, ``resnet_time_scale_shift``,
``dropout``, ``attn_norm_num_groups``, ``time_embedding_dim``, ``downsample_type``...) default to the behaviour the
older versions had hard-coded. The pre-0.1 class ``UNetUnconditionalModel`` used other keys and is refused. Early
``DDPMScheduler`` configs carry ``tensor_format`` (dropped: numpy or torch arrays, same maths), ``timestep_values``
(must be null) or ``predict_epsilon`` (0.7-0.9; mapped to ``prediction_type`` as diffusers does); its later keys
default to what early versions did (epsilon, "leading" spacing, offset 0, clip range 1). Old attention parameter
names (``query/key/value/proj_attn``) are renamed and 1x1-conv-shaped attention weights squeezed to the linear
weights they are.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from ..diffusion.schedule import ScheduleConfig
from ..models.unet import UNet, UNetConfig

DIFFUSERS_VERSION = "0.33.0"

# ------------------------------------------------------------------------------------------------------- file names

MODEL_INDEX_NAME = "model_index.json"
UNET_FOLDER = "unet"
SCHEDULER_FOLDER = "scheduler"
UNET_CONFIG_NAME = "config.json"
SCHEDULER_CONFIG_NAME = "scheduler_config.json"
WEIGHTS_STEM = "diffusion_pytorch_model"
MODEL_CARD_NAME = "README.md"
SAMPLE_GRID_NAME = "samples.png"
# Where a model repo keeps each config: at its root (a bare UNet2DModel, the early flat pipeline layout) or in the
# component's folder.
UNET_CONFIG_PATHS = (UNET_CONFIG_NAME, f"{UNET_FOLDER}/{UNET_CONFIG_NAME}")
SCHEDULER_CONFIG_PATHS = (SCHEDULER_CONFIG_NAME, f"{SCHEDULER_FOLDER}/{SCHEDULER_CONFIG_NAME}")
# train_unconditional's accelerate checkpoints keep the EMA model beside unet/ under this name.
EMA_UNET_FOLDER = "unet_ema"
# What an exported pipeline consists of, as upload patterns: never checkpoints, logs or optimizer state.
PIPELINE_PATTERNS = [MODEL_INDEX_NAME, f"{UNET_FOLDER}/*", f"{SCHEDULER_FOLDER}/*", MODEL_CARD_NAME, SAMPLE_GRID_NAME]
# Weight dtypes and the diffusers ``variant`` naming their file (``from_pretrained(..., variant="fp16")``).
DTYPE_VARIANTS: dict[torch.dtype, str | None] = {torch.float32: None, torch.float16: "fp16", torch.bfloat16: "bf16"}


def weights_name(variant: str | None = None) -> str:
    """``diffusion_pytorch_model[.variant].safetensors``."""
    return f"{WEIGHTS_STEM}.{variant}.safetensors" if variant else f"{WEIGHTS_STEM}.safetensors"


# ------------------------------------------------------------------------------------------------------- key rules

PIPELINE_CLASS = "DDPMPipeline"
UNET_CLASS = "UNet2DModel"
SCHEDULER_CLASS = "DDPMScheduler"
# model_index.json entries: component folder -> diffusers class.
PIPELINE_COMPONENTS = {UNET_FOLDER: UNET_CLASS, SCHEDULER_FOLDER: SCHEDULER_CLASS}

# UNet2DModel keys our UNet does not model, at the only values it implements (written so, accepted only so).
UNET_FIXED_KEYS: dict[str, Any] = {
    "time_embedding_type": "positional",
    "class_embed_type": None,
    "num_class_embeds": None,
    "num_train_timesteps": None,  # only used by learned time embeddings
    "downsample_type": "conv",
    "upsample_type": "conv",
    "mid_block_type": "UNetMidBlock2D",
}
UNET_ANY_VALUE_KEYS = frozenset({"num_train_timesteps"})  # diffusers ignores it with positional time embeddings
# DDPMScheduler keys our schedule does not model: no custom betas, no dynamic thresholding. Written at these values
# (diffusers' defaults); read, they must hold them, except the keys below, which only matter with thresholding on.
SCHEDULER_FIXED_KEYS: dict[str, Any] = {
    "trained_betas": None,
    "thresholding": False,
    "dynamic_thresholding_ratio": 0.995,
    "sample_max_value": 1.0,
}
SCHEDULER_ANY_VALUE_KEYS = frozenset({"dynamic_thresholding_ratio", "sample_max_value"})

# Defaults of the diffusers versions that wrote UNet2DModel configs, for the keys that matter (module docstring).
LEGACY_UNET_DEFAULTS: dict[str, Any] = {
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "downsample_padding": 1,
    "attention_head_dim": 8,
    "norm_eps": 1e-5,
}
# Counters EMAModel.save_pretrained adds to a UNet config (train_unconditional's unet_ema/); not model settings.
EMA_CONFIG_KEYS = frozenset(
    {"decay", "min_decay", "optimization_step", "update_after_step", "use_ema_warmup", "inv_gamma", "power"}
)
LEGACY_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_LEGACY_ATTENTION_KEY = re.compile(r"^(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")
_ATTENTION_LINEAR = re.compile(r"\.attentions\.\d+\.(to_q|to_k|to_v|to_out\.0)\.weight$")


# ---------------------------------------------------------------------------------------------------------- writing


def _header(class_name: str) -> dict[str, Any]:
    return {"_class_name": class_name, "_diffusers_version": DIFFUSERS_VERSION}


def unet_config_json(config: UNetConfig) -> dict[str, Any]:
    """The complete ``unet/config.json`` dict for ``config``."""
    return {**_header(UNET_CLASS), **config.to_dict(), **UNET_FIXED_KEYS}


def scheduler_config_json(config: ScheduleConfig) -> dict[str, Any]:
    """The complete ``scheduler/scheduler_config.json`` dict for ``config``."""
    return {**_header(SCHEDULER_CLASS), **config.to_dict(), **SCHEDULER_FIXED_KEYS}


def model_index_json() -> dict[str, Any]:
    """The ``model_index.json`` dict of a DDPMPipeline."""
    return {**_header(PIPELINE_CLASS), **{name: ["diffusers", cls] for name, cls in PIPELINE_COMPONENTS.items()}}


# ---------------------------------------------------------------------------------------------------------- reading


def check_model_index(index: dict[str, Any], source: str) -> None:
    """Raise ValueError unless the pipeline's components are the UNet2DModel and DDPMScheduler we read."""
    for component, expected in PIPELINE_COMPONENTS.items():
        entry = index.get(component)
        if entry is not None and (not isinstance(entry, list) or entry[-1] != expected):
            raise ValueError(f"{source}: {component}={entry!r} is not supported (expected {expected})")


def _check_class(config: dict[str, Any], expected: str, source: str) -> None:
    class_name = config.get("_class_name", expected)
    if class_name != expected:
        raise ValueError(f"{source}: _class_name={class_name!r} is not supported (expected {expected!r})")


def _own_keys(
    config: dict[str, Any], fixed: dict[str, Any], what: str, any_value: frozenset[str] = frozenset()
) -> dict[str, Any]:
    """``config`` without diffusers' private ``_`` keys and the ``fixed`` keys, which must hold their value there."""
    own = {}
    for key, value in config.items():
        if key.startswith("_"):
            continue
        if key not in fixed:
            own[key] = value  # ours, or unknown: the config class refuses it naming the key
        elif key not in any_value and value != fixed[key]:
            raise ValueError(f"{what} config key {key!r}={value!r} is not supported; supported: {[fixed[key]]}")
    return own


def unet_config_from_diffusers(config: dict[str, Any], source: str = "UNet2DModel config") -> UNetConfig:
    """A ``UNetConfig`` from a diffusers UNet2DModel config dict; missing keys from :data:`LEGACY_UNET_DEFAULTS`.

    Errors are ValueErrors that start with ``source``.
    """
    _check_class(config, UNET_CLASS, source)
    if "sample_size" not in config:
        raise ValueError(f"{source}: no sample_size key (the image size DDPMPipeline samples at)")
    config = {k: v for k, v in config.items() if k not in EMA_CONFIG_KEYS}
    try:
        own = _own_keys({**LEGACY_UNET_DEFAULTS, **config}, UNET_FIXED_KEYS, "UNet", UNET_ANY_VALUE_KEYS)
        return UNetConfig.from_dict(own)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: {e}") from e


def schedule_config_from_diffusers(config: dict[str, Any], source: str = "DDPMScheduler config") -> ScheduleConfig:
    """A ``ScheduleConfig`` from a diffusers DDPMScheduler config dict, with the early releases' keys translated.

    Errors are ValueErrors that start with ``source``.
    """
    _check_class(config, SCHEDULER_CLASS, source)
    config = dict(config)
    config.pop("tensor_format", None)
    if config.pop("timestep_values", None) is not None:
        raise ValueError(f"{source}: custom timestep_values are not supported")
    predict_epsilon = config.pop("predict_epsilon", None)
    if predict_epsilon is not None and "prediction_type" not in config:
        config["prediction_type"] = "epsilon" if predict_epsilon else "sample"
    try:
        own = _own_keys(config, SCHEDULER_FIXED_KEYS, "scheduler", SCHEDULER_ANY_VALUE_KEYS)
        return ScheduleConfig.from_dict(own)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: {e}") from e


def convert_legacy_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename old attention parameters (``query`` -> ``to_q`` ...) and squeeze 1x1-conv attention weights to 2-D."""
    out = {}
    for key, tensor in state_dict.items():
        match = _LEGACY_ATTENTION_KEY.match(key)
        if match:
            prefix, old, kind = match.groups()
            key = f"{prefix}.{LEGACY_ATTENTION_NAMES[old]}.{kind}"
        if _ATTENTION_LINEAR.search(key) and tensor.ndim == 4 and tensor.shape[2:] == (1, 1):
            tensor = tensor[:, :, 0, 0]
        if key in out:
            raise ValueError(f"tensor {key!r} appears under both its old and its new name")
        out[key] = tensor
    return out


def validate_state_dict(config: UNetConfig, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Raise ValueError unless ``state_dict`` has exactly the tensors and shapes the UNet of ``config`` needs.

    The UNet's parameter names are UNet2DModel's, so this is also the check that a diffusers weights file fits.
    """
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
