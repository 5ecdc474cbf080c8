"""Import from diffusers-made folders (and our own checkpoints and runs): same outputs, same tensors, clear refusals."""

import json
import logging
import shutil
from pathlib import Path

import diffusers
import huggingface_hub
import numpy as np
import pytest
import torch
from helpers import load_script, write_model_checkpoint
from safetensors.torch import load_file, save_file
from unet_configs import TINY

from ddpm import NoiseSchedule, ScheduleConfig, UNet, UNetConfig, ddpm_sample
from ddpm.io.diffusers_format import LEGACY_UNET_DEFAULTS, unet_config_from_diffusers
from ddpm.io.export import export_pipeline
from ddpm.io.files import write_json
from ddpm.io.pretrained import load_model

LEGACY_NAMES = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


pytestmark = pytest.mark.usefixtures("one_thread")  # every model here is tiny


def _reference_pipeline():
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(**TINY)
    scheduler = diffusers.DDPMScheduler(variance_type="fixed_large", beta_schedule="squaredcos_cap_v2")
    return diffusers.DDPMPipeline(unet=unet, scheduler=scheduler)


def _legacy(key):
    for new, old in LEGACY_NAMES.items():
        if f".{new}." in key and ".attentions." in key:
            return key.replace(f".{new}.", f".{old}.")
    return key


def _make_folder(kind, folder):
    """A diffusers-made DDPMPipeline folder in one of the weight formats the importer accepts."""
    pipeline = _reference_pipeline()
    if kind == "bin":
        pipeline.save_pretrained(folder, safe_serialization=False)
    elif kind == "sharded":
        pipeline.save_pretrained(folder, max_shard_size="200KB")
    else:
        pipeline.save_pretrained(folder)
    if kind == "legacy_names":  # as saved by diffusers < 0.14 (still loaded by today's from_pretrained)
        path = folder / "unet" / "diffusion_pytorch_model.safetensors"
        save_file({_legacy(k): v for k, v in load_file(path).items()}, path, metadata={"format": "pt"})
    return pipeline.unet.state_dict()


def _images(pipeline_or_model, schedule=None, steps=10):
    generator = torch.Generator().manual_seed(11)
    if schedule is None:
        return pipeline_or_model(batch_size=2, generator=generator, num_inference_steps=steps, output_type="np").images
    x = ddpm_sample(pipeline_or_model, schedule, 2, num_inference_steps=steps, generator=generator)
    return (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def _our_model(unet_config, state_dict):
    model = UNet(unet_config).eval()
    model.load_state_dict(state_dict, strict=True)
    return model


@pytest.mark.parametrize("kind", ["safetensors", "bin", "sharded", "legacy_names"])
def test_diffusers_folder_imports_with_identical_outputs_and_round_trips_bit_for_bit(tmp_path, kind):
    source = tmp_path / "source"
    reference = _make_folder(kind, source)
    if kind == "sharded":
        assert (source / "unet" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    unet_config, schedule_config, state_dict = load_model(source)
    expected = _images(diffusers.DDPMPipeline.from_pretrained(source, low_cpu_mem_usage=False))
    got = _images(_our_model(unet_config, state_dict), NoiseSchedule(schedule_config))
    assert np.abs(got - expected).max() <= 1e-4

    # export(import(x)) reproduces x: every tensor bit for bit, every config value
    load_script("convert_from_diffusers").main(["--model", str(source), "--output_dir", str(tmp_path / "out")])
    exported = load_file(tmp_path / "out" / "unet" / "diffusion_pytorch_model.safetensors")
    assert set(exported) == set(reference)
    for key, tensor in reference.items():
        assert exported[key].dtype == tensor.dtype and torch.equal(exported[key], tensor), key
    for sub, name in (("unet", "config.json"), ("scheduler", "scheduler_config.json")):
        original = json.loads((source / sub / name).read_text())
        written = json.loads((tmp_path / "out" / sub / name).read_text())
        assert {k: v for k, v in original.items() if not k.startswith("_")} == {
            k: v for k, v in written.items() if not k.startswith("_")
        }


def test_conv_shaped_legacy_attention_weights(tmp_path):
    reference = _make_folder("safetensors", tmp_path)
    path = tmp_path / "unet" / "diffusion_pytorch_model.safetensors"
    legacy = {}
    for key, tensor in load_file(path).items():
        if ".attentions." in key and key.endswith("weight") and tensor.ndim == 2:
            tensor = tensor[:, :, None, None].contiguous()  # 1x1-conv form of the original DDPM checkpoints
        legacy[_legacy(key)] = tensor
    save_file(legacy, path)
    _, _, state_dict = load_model(tmp_path)
    assert set(state_dict) == set(reference)
    assert all(torch.equal(state_dict[k], v) for k, v in reference.items())


def test_old_configs_take_the_defaults_of_the_version_that_wrote_them(tmp_path):
    _make_folder("safetensors", tmp_path)
    config_path = tmp_path / "unet" / "config.json"
    config = json.loads(config_path.read_text())
    # a config written before these keys existed (and before any later key)
    old = {k: v for k, v in config.items() if k not in LEGACY_UNET_DEFAULTS and k not in ("add_attention", "dropout")}
    old["_diffusers_version"] = "0.1.1"
    config_path.write_text(json.dumps(old))
    scheduler_path = tmp_path / "scheduler" / "scheduler_config.json"
    scheduler_path.write_text(
        json.dumps(
            {
                "_class_name": "DDPMScheduler",
                "_diffusers_version": "0.1.1",
                "beta_end": 0.02,
                "beta_schedule": "linear",
                "beta_start": 0.0001,
                "clip_sample": True,
                "num_train_timesteps": 1000,
                "trained_betas": None,
                "variance_type": "fixed_large",
                "tensor_format": "pt",
                "timestep_values": None,
            }
        )
    )
    unet_config, schedule_config, _ = load_model(tmp_path)
    for key, value in LEGACY_UNET_DEFAULTS.items():
        assert getattr(unet_config, key) == value
    # the research finding: the early defaults are today's, so today's diffusers reads these files the same way
    today = diffusers.UNet2DModel.from_config(old).config
    assert {k: today[k] for k in LEGACY_UNET_DEFAULTS} == LEGACY_UNET_DEFAULTS
    assert schedule_config == ScheduleConfig(variance_type="fixed_large")
    # diffusers 0.7-0.9 wrote predict_epsilon instead of prediction_type
    scheduler_path.write_text(json.dumps({"_class_name": "DDPMScheduler", "predict_epsilon": False}))
    assert load_model(tmp_path)[1].prediction_type == "sample"


def test_google_flat_layout_with_bin(tmp_path):
    """The early google/ddpm-* repo layout: everything at the root, ``.bin`` weights."""
    pipeline = _reference_pipeline()
    pipeline.unet.save_pretrained(tmp_path, safe_serialization=False)
    pipeline.scheduler.save_pretrained(tmp_path)
    write_json(
        {"_class_name": "DDPMPipeline", "scheduler": ["diffusers", "DDPMScheduler"]}, tmp_path / "model_index.json"
    )
    unet_config, schedule_config, state_dict = load_model(tmp_path)
    assert schedule_config.variance_type == "fixed_large"
    assert all(torch.equal(state_dict[k], v) for k, v in pipeline.unet.state_dict().items())


def test_bare_unet_folder_uses_default_schedule(tmp_path, caplog):
    pipeline = _reference_pipeline()
    pipeline.unet.save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING, logger="ddpm.io.pretrained"):
        unet_config, schedule_config, _ = load_model(tmp_path)
    assert schedule_config == ScheduleConfig()
    assert "default schedule" in caplog.text
    assert unet_config == unet_config_from_diffusers(dict(pipeline.unet.config))


def test_train_unconditional_accelerate_checkpoint_prefers_ema(tmp_path):
    live = diffusers.UNet2DModel(**TINY)
    live.save_pretrained(tmp_path / "unet")
    torch.manual_seed(1)
    ema = diffusers.UNet2DModel(**TINY)
    ema.register_to_config(decay=0.9999, optimization_step=10, inv_gamma=1.0, power=0.75)  # as EMAModel writes
    ema.save_pretrained(tmp_path / "unet_ema")
    _, _, state_dict = load_model(tmp_path)
    assert all(torch.equal(state_dict[k], v) for k, v in ema.state_dict().items())
    _, _, state_dict = load_model(tmp_path, use_ema=False)
    assert all(torch.equal(state_dict[k], v) for k, v in live.state_dict().items())


def test_checkpoints_and_run_folders(tmp_path):
    unet_config = UNetConfig.from_dict(TINY)
    weights = {}
    for seed in range(5):
        torch.manual_seed(seed)
        weights[seed] = UNet(unet_config).state_dict()
    run = tmp_path / "run"
    schedule_config = ScheduleConfig(prediction_type="sample")
    write_model_checkpoint(run / "checkpoint-2", 2, unet_config, schedule_config, weights[0], weights[1])
    write_model_checkpoint(run / "checkpoint-4", 4, unet_config, schedule_config, weights[2], weights[3])

    def loaded(*args, **kwargs):
        return load_model(*args, **kwargs)[2]

    def same(a, b):
        return all(torch.equal(a[k], b[k]) for k in b)

    assert same(loaded(run / "checkpoint-2"), weights[1])  # EMA by default
    assert same(loaded(run / "checkpoint-2", use_ema=False), weights[0])
    assert same(loaded(run), weights[3])  # no export yet: the latest checkpoint
    export_pipeline(unet_config, ScheduleConfig(), weights[4], run)
    assert same(loaded(run), weights[4])  # the exported pipeline is the run's result
    assert load_model(run)[1] == ScheduleConfig()
    assert same(loaded(run, use_ema=False), weights[2])  # live weights only live in the checkpoints


@pytest.fixture
def hub_repo(tmp_path, monkeypatch):
    """``(remote, calls)``: a Hub repo whose files are those of the folder ``remote``; ``snapshot_download`` copies
    the ones its allow patterns match (huggingface_hub's own filter) into a cache snapshot, as the Hub does."""
    from huggingface_hub.utils import filter_repo_objects

    remote, calls = tmp_path / "remote", []

    def snapshot_download(repo_id, *, cache_dir=None, allow_patterns=None):
        calls.append((repo_id, cache_dir, list(allow_patterns)))
        snapshot = Path(cache_dir) / "snapshot"
        files = sorted(p.relative_to(remote).as_posix() for p in remote.rglob("*") if p.is_file())
        for name in filter_repo_objects(files, allow_patterns=allow_patterns):
            (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(remote / name, snapshot / name)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return remote, calls


def test_hub_id_downloads_only_what_is_needed(tmp_path, hub_repo):
    remote, calls = hub_repo
    state_dict = _make_folder("bin", remote)
    _, schedule_config, loaded = load_model("google/ddpm-tiny", cache_dir=tmp_path / "cache")
    assert schedule_config.variance_type == "fixed_large"
    assert all(torch.equal(loaded[k], v) for k, v in state_dict.items())
    # safetensors asked for first; this repo only has .bin, so a second call asks for that (as the folder is read)
    assert [(c[0], c[1]) for c in calls] == [("google/ddpm-tiny", tmp_path / "cache")] * 2
    first, second = (c[2] for c in calls)
    assert "unet/diffusion_pytorch_model.safetensors" in first and not any(p.endswith(".bin") for p in first)
    assert "unet/diffusion_pytorch_model.bin" in second and not any(p.endswith(".safetensors") for p in second)
    assert "model_index.json" in first and "scheduler/scheduler_config.json" in first
    assert not any(p.startswith("*") for p in first + second)  # named files only, never the whole repo


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_hub_model_exported_in_half_precision_loads(tmp_path, hub_repo, dtype):
    """An export with --dtype fp16/bf16 has only the variant weights file (diffusion_pytorch_model.fp16.safetensors):
    the download fetches it (and not the float32 file of a repo that has both)."""
    remote, calls = hub_repo
    unet_config = UNetConfig.from_dict(TINY)
    torch.manual_seed(0)
    weights = UNet(unet_config).state_dict()
    export_pipeline(unet_config, ScheduleConfig(), weights, remote, dtype=dtype)
    _, _, loaded = load_model("me/ddpm-half", cache_dir=tmp_path / "cache")
    assert all(torch.equal(loaded[k], v.to(dtype)) for k, v in weights.items())
    assert len(calls) == 3  # float32 safetensors asked for first, then .bin, then a variant
    variant = next((remote / "unet").glob("diffusion_pytorch_model.*.safetensors"))
    shutil.copy(variant, tmp_path / variant.name)
    export_pipeline(unet_config, ScheduleConfig(), weights, remote)  # float32 (an export replaces unet/ wholesale)
    shutil.copy(tmp_path / variant.name, variant)  # and the variant beside it
    shutil.rmtree(tmp_path / "cache")
    calls.clear()
    _, _, loaded = load_model("me/ddpm-half", cache_dir=tmp_path / "cache")
    assert len(calls) == 1 and all(torch.equal(loaded[k], v) for k, v in weights.items())


def test_hub_id_offline_gives_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match="not in the Hugging Face cache.*offline"):
        load_model("google/ddpm-cifar10-32", cache_dir=tmp_path)


def test_missing_local_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        load_model(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="not a training checkpoint, run folder"):
        load_model(tmp_path)


def _break(kind, folder):
    unet_dir = folder / "unet"
    if kind == "missing unet config":
        (unet_dir / "config.json").unlink()
        return r"unet/config.json"
    if kind == "truncated safetensors":
        path = unet_dir / "diffusion_pytorch_model.safetensors"
        path.write_bytes(path.read_bytes()[:-1000])
        return "corrupt or truncated.*diffusion_pytorch_model.safetensors"
    if kind == "wrong shapes":
        path = unet_dir / "diffusion_pytorch_model.safetensors"
        tensors = load_file(path)
        tensors["conv_out.weight"] = tensors["conv_out.weight"][:1].contiguous()
        save_file(tensors, path)
        return r"'conv_out.weight' has shape \[1, 16, 3, 3\].*\[3, 16, 3, 3\]"
    changes = {
        "class embeddings": ("unet/config.json", "class_embed_type", "timestep"),
        "unknown block type": ("unet/config.json", "down_block_types", ["DownBlock2D", "CrossAttnDownBlock2D"]),
        "fourier time embedding": ("unet/config.json", "time_embedding_type", "fourier"),
        "learned variance": ("scheduler/scheduler_config.json", "variance_type", "learned_range"),
        "other unet class": ("unet/config.json", "_class_name", "UNet2DConditionModel"),
    }
    name, key, value = changes[kind]
    config = json.loads((folder / name).read_text())
    config[key] = value
    (folder / name).write_text(json.dumps(config))
    return f"{key}.*{value if isinstance(value, str) else 'CrossAttnDownBlock2D'}"


@pytest.mark.parametrize(
    "kind",
    [
        "missing unet config",
        "truncated safetensors",
        "wrong shapes",
        "class embeddings",
        "unknown block type",
        "fourier time embedding",
        "learned variance",
        "other unet class",
    ],
)
def test_bad_inputs_give_clear_errors_and_write_nothing(tmp_path, kind):
    source = tmp_path / "source"
    _make_folder("safetensors", source)
    match = _break(kind, source)
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        load_model(source)
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match=match):
        load_script("convert_from_diffusers").main(["--model", str(source), "--output_dir", str(out)])
    assert not out.exists()
