"""Export to the diffusers DDPMPipeline layout, proven by the installed diffusers itself."""

import hashlib
import json
import logging
import os
from pathlib import Path

import diffusers
import huggingface_hub
import numpy as np
import pytest
import torch
from helpers import EXPORT_FILES, load_script, write_model_checkpoint
from safetensors import safe_open
from unet_configs import CONFIG_DIR, TINY

import ddpm.io.export as export_module
from ddpm import NoiseSchedule, ScheduleConfig, UNet, UNetConfig, ddpm_sample
from ddpm.io.diffusers_format import (
    DIFFUSERS_VERSION,
    schedule_config_from_diffusers,
    unet_config_from_diffusers,
)
from ddpm.io.export import export_pipeline, make_model_card
from ddpm.io.hub import scrub_tokens
from ddpm.io.pretrained import load_model

pytestmark = pytest.mark.usefixtures("one_thread")  # every model that runs here is tiny


CASES = {
    # google/ddpm-cifar10-32 layout (35.7M parameters), with its fixed_large variance
    "cifar10": (
        json.loads((CONFIG_DIR / "ddpm-cifar10-32.json").read_text()),
        ScheduleConfig(variance_type="fixed_large"),
    ),
    # train_unconditional's default model at 64 px (113.7M parameters), default scheduler
    "train_unconditional_64": (json.loads((CONFIG_DIR / "train-unconditional-64.json").read_text()), ScheduleConfig()),
    # tiny, with every schedule setting away from its default
    "tiny": (
        TINY,
        ScheduleConfig(
            beta_schedule="squaredcos_cap_v2",
            prediction_type="v_prediction",
            clip_sample=False,
            timestep_spacing="trailing",
        ),
    ),
    # tiny, with cifar10's schedule: the defaults but for the fixed_large variance
    "tiny_fixed_large": (TINY, ScheduleConfig(variance_type="fixed_large")),
}
# Exported with real weights, written and loaded by diffusers; the two real configurations are exported as names and
# shapes only (their configs and tensor names are what matters, not 600 MB of random weights).
WRITTEN = ["tiny", "tiny_fixed_large"]


def _files(folder):
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def _digest(folder):
    return {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in _files(folder)}


def _random_model(unet_config, seed=0):
    torch.manual_seed(seed)
    return UNet(unet_config).eval()


def _shapes_only(unet_config: UNetConfig) -> dict[str, torch.Tensor]:
    """The model's state dict as zero-stride float32 tensors of the right shapes: no memory, nothing to initialise."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in UNet(unet_config).state_dict().items()}
    return {k: torch.zeros(()).expand(shape) for k, shape in shapes.items()}


def _diffusers_unet_on_meta(folder: Path) -> torch.nn.Module:
    """The UNet2DModel diffusers builds from the exported ``unet/config.json``, without allocating its weights."""
    with torch.device("meta"):
        return diffusers.UNet2DModel.from_config(diffusers.UNet2DModel.load_config(folder / "unet"))


class _Exports:
    """Each case exported once per module, with the tensors handed to the weights writer recorded."""

    def __init__(self, root):
        self.root, self.cache = root, {}

    def __call__(self, name):
        if name not in self.cache:
            config_dict, schedule_config = CASES[name]
            unet_config = UNetConfig.from_dict(config_dict)
            recorded, write = {}, export_module.write_safetensors

            def record(tensors, path):
                recorded.update({k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()})
                if name in WRITTEN:
                    write(tensors, path)
                else:
                    Path(path).touch()  # the file name export_pipeline chose, without the bytes

            if name in WRITTEN:
                model = _random_model(unet_config)
                state_dict = model.state_dict()
            else:
                model, state_dict = None, _shapes_only(unet_config)
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(export_module, "write_safetensors", record)
                folder = export_pipeline(unet_config, schedule_config, state_dict, self.root / name)
            pipeline = diffusers.DDPMPipeline.from_pretrained(folder, low_cpu_mem_usage=False) if model else None
            self.cache[name] = (config_dict, unet_config, schedule_config, model, folder, pipeline, recorded)
        return self.cache[name]


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    return _Exports(tmp_path_factory.mktemp("exports"))


@pytest.mark.parametrize("name", list(CASES))
def test_layout_and_every_config_key_written(exports, name):
    config_dict, unet_config, schedule_config, _, folder, _, _ = exports(name)
    assert _files(folder) == EXPORT_FILES
    assert json.loads((folder / "model_index.json").read_text()) == {
        "_class_name": "DDPMPipeline",
        "_diffusers_version": DIFFUSERS_VERSION,
        "scheduler": ["diffusers", "DDPMScheduler"],
        "unet": ["diffusers", "UNet2DModel"],
    }
    # Golden key sets: every key today's UNet2DModel / DDPMScheduler has, so that none falls back to a default (a new
    # diffusers key makes this fail instead of silently taking that release's default).
    unet_json = json.loads((folder / "unet/config.json").read_text())
    scheduler_json = json.loads((folder / "scheduler/scheduler_config.json").read_text())
    with torch.device("meta"):
        reference_unet = {k for k in diffusers.UNet2DModel(**config_dict).config if not k.startswith("_")}
    reference_scheduler = {k for k in diffusers.DDPMScheduler().config if not k.startswith("_")}
    assert set(unet_json) == reference_unet | {"_class_name", "_diffusers_version"}
    assert set(scheduler_json) == reference_scheduler | {"_class_name", "_diffusers_version"}
    assert unet_json["_class_name"] == "UNet2DModel" and scheduler_json["_class_name"] == "DDPMScheduler"
    # ...and diffusers reads back every value as written
    unet = _diffusers_unet_on_meta(folder)
    scheduler = diffusers.DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    for key in reference_unet:
        assert json.loads(json.dumps(unet.config[key])) == unet_json[key], key
    for key in reference_scheduler:
        assert json.loads(json.dumps(scheduler.config[key])) == scheduler_json[key], key
    # ...and so do we
    assert unet_config_from_diffusers(unet_json) == unet_config
    assert schedule_config_from_diffusers(scheduler_json) == schedule_config


@pytest.mark.parametrize("name", list(CASES))
def test_exported_tensors_are_those_of_the_diffusers_model_of_the_exported_config(exports, name):
    """The names, shapes and dtype export_pipeline writes equal the state dict of the UNet2DModel diffusers builds
    from the written config (on the meta device: the real configurations without their weights)."""
    _, _, _, _, folder, _, recorded = exports(name)
    expected = {k: (torch.float32, tuple(v.shape)) for k, v in _diffusers_unet_on_meta(folder).state_dict().items()}
    assert recorded == expected
    assert list(recorded) == list(expected)


@pytest.mark.parametrize("name", WRITTEN)
def test_weights_file_is_fp32_with_pt_metadata_and_diffusers_finds_every_key(exports, name):
    _, _, _, model, folder, pipeline, _ = exports(name)
    path = folder / "unet/diffusion_pytorch_model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        keys = set(f.keys())
        for key, tensor in model.state_dict().items():
            stored = f.get_tensor(key)
            assert stored.dtype == torch.float32 and torch.equal(stored, tensor), key
    assert keys == set(model.state_dict())
    # diffusers only warns on missing/unexpected keys: compare the key sets ourselves
    _, info = diffusers.UNet2DModel.from_pretrained(
        folder, subfolder="unet", output_loading_info=True, low_cpu_mem_usage=False
    )
    assert info["missing_keys"] == [] and info["unexpected_keys"] == [] and info["mismatched_keys"] == []
    assert set(pipeline.unet.state_dict()) == keys


def test_diffusers_loads_with_no_warning(exports, caplog):
    _, _, _, _, folder, _, _ = exports("tiny")
    logger = logging.getLogger("diffusers")
    logger.addHandler(caplog.handler)  # diffusers' loggers do not propagate to the root logger
    try:
        with caplog.at_level(logging.WARNING, logger="diffusers"):
            diffusers.DDPMPipeline.from_pretrained(folder, low_cpu_mem_usage=False)
    finally:
        logger.removeHandler(caplog.handler)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


@pytest.mark.parametrize("name, steps, batch", [("tiny", 10, 2), ("tiny_fixed_large", 10, 2)])
def test_pipeline_images_equal_our_sampler(exports, name, steps, batch):
    _, _, schedule_config, model, _, pipeline, _ = exports(name)
    expected = pipeline(
        batch_size=batch, generator=torch.Generator().manual_seed(7), num_inference_steps=steps, output_type="np"
    ).images
    generator = torch.Generator().manual_seed(7)
    ours = ddpm_sample(model, NoiseSchedule(schedule_config), batch, num_inference_steps=steps, generator=generator)
    got = (ours / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert np.abs(got - expected).max() <= 1e-4


def test_fp16_variant(tmp_path):
    unet_config, schedule_config = UNetConfig.from_dict(TINY), CASES["tiny"][1]
    state_dict = _random_model(unet_config).state_dict()
    folder = export_pipeline(unet_config, schedule_config, state_dict, tmp_path / "fp16", dtype=torch.float16)
    assert _files(folder) == EXPORT_FILES - {"unet/diffusion_pytorch_model.safetensors"} | {
        "unet/diffusion_pytorch_model.fp16.safetensors"
    }
    unet, info = diffusers.UNet2DModel.from_pretrained(
        folder, subfolder="unet", variant="fp16", torch_dtype=torch.float16, output_loading_info=True
    )
    assert info["missing_keys"] == [] and info["unexpected_keys"] == []
    for key, tensor in unet.state_dict().items():
        assert tensor.dtype == torch.float16 and torch.equal(tensor, state_dict[key].half()), key
    _, _, loaded = load_model(folder)  # our loader takes the only (variant) weights file
    assert all(torch.equal(loaded[k], state_dict[k].half()) for k in state_dict)


def test_export_touches_nothing_else_and_replaces_previous_export(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoint-10").mkdir(parents=True)
    (run / "checkpoint-10" / "training_state.pt").write_bytes(b"optimizer state")
    (run / "logs").mkdir()
    (run / "logs" / "events.out").write_bytes(b"events")
    before = _digest(run)
    unet_config, schedule_config = UNetConfig.from_dict(TINY), ScheduleConfig()
    export_pipeline(unet_config, schedule_config, _random_model(unet_config, 1).state_dict(), run, dtype=torch.float16)
    state_dict = _random_model(unet_config, 2).state_dict()
    grid = tmp_path / "grid.png"
    grid.write_bytes(b"png")
    export_pipeline(unet_config, schedule_config, state_dict, run, sample_grid=grid)
    after = _digest(run)
    assert {k: after[k] for k in before} == before  # checkpoints and logs untouched
    # the second export replaced the first wholesale: no stale fp16 variant, no leftovers
    assert set(after) - set(before) == EXPORT_FILES | {"samples.png"}
    assert "](samples.png)" in (run / "README.md").read_text()
    _, _, loaded = load_model(run)  # the exported pipeline is the run's result
    assert all(torch.equal(loaded[k], v) for k, v in state_dict.items())
    # a third export without a grid removes the second one's: it showed other weights
    export_pipeline(unet_config, schedule_config, _random_model(unet_config, 3).state_dict(), run)
    assert not (run / "samples.png").exists() and "samples.png" not in (run / "README.md").read_text()


def test_failed_write_leaves_previous_export_intact(tmp_path, monkeypatch):
    unet_config, schedule_config = UNetConfig.from_dict(TINY), ScheduleConfig()
    folder = export_pipeline(unet_config, schedule_config, _random_model(unet_config).state_dict(), tmp_path / "p")
    before = _digest(folder)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export_module, "write_safetensors", disk_full)
    with pytest.raises(OSError, match="No space left"):
        export_pipeline(unet_config, schedule_config, _random_model(unet_config, 1).state_dict(), folder)
    assert _digest(folder) == before
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "model_index.json", "scheduler", "unet"]
    with pytest.raises(OSError):
        export_pipeline(unet_config, schedule_config, _random_model(unet_config).state_dict(), tmp_path / "new")
    assert not (tmp_path / "new").exists()
    # a file system that allocates late refuses the data at fsync: still before the commit touches the export
    monkeypatch.undo()
    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        export_pipeline(unet_config, schedule_config, _random_model(unet_config, 1).state_dict(), folder)
    assert _digest(folder) == before


def test_interrupted_commit_leaves_no_model_index(tmp_path, monkeypatch):
    unet_config, schedule_config = UNetConfig.from_dict(TINY), ScheduleConfig()
    folder = export_pipeline(unet_config, schedule_config, _random_model(unet_config).state_dict(), tmp_path / "p")
    real = export_module.atomic_write_dir

    def crash_on_unet(path):
        if path.name == "unet":
            raise KeyboardInterrupt  # e.g. the job is killed between the two folder swaps
        return real(path)

    monkeypatch.setattr(export_module, "atomic_write_dir", crash_on_unet)
    with pytest.raises(KeyboardInterrupt):
        export_pipeline(unet_config, schedule_config, _random_model(unet_config, 1).state_dict(), folder)
    assert not (folder / "model_index.json").exists()
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]
    with pytest.raises(ValueError, match="interrupted export"):
        load_model(folder)
    with pytest.raises(OSError):
        diffusers.DDPMPipeline.from_pretrained(folder)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda sd: sd.update({"conv_out.weight": torch.zeros(1, 16, 3, 3)}), r"'conv_out.weight' has shape \[1, 16"),
        (lambda sd: sd.pop("conv_in.bias"), "missing.*conv_in.bias"),
        (lambda sd: sd.update({"extra.weight": torch.zeros(1)}), "does not have.*extra.weight"),
        (lambda sd: sd.update({"conv_in.bias": torch.zeros(16, dtype=torch.long)}), "conv_in.bias.*floating"),
    ],
)
def test_bad_weights_are_refused_before_anything_is_written(tmp_path, change, match):
    unet_config = UNetConfig.from_dict(TINY)
    state_dict = dict(_random_model(unet_config).state_dict())
    change(state_dict)
    with pytest.raises(ValueError, match=match):
        export_pipeline(unet_config, ScheduleConfig(), state_dict, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_fp16_overflow_is_refused(tmp_path):
    unet_config = UNetConfig.from_dict(TINY)
    state_dict = dict(_random_model(unet_config).state_dict())
    state_dict["conv_in.bias"] = torch.full((16,), 1e6)
    with pytest.raises(ValueError, match="conv_in.bias.*range"):
        export_pipeline(unet_config, ScheduleConfig(), state_dict, tmp_path / "out", dtype=torch.float16)
    assert not (tmp_path / "out").exists()


def test_convert_to_diffusers_cli(tmp_path):
    main = load_script("convert_to_diffusers").main
    unet_config, schedule_config = UNetConfig.from_dict(TINY), CASES["tiny"][1]
    live, ema = _random_model(unet_config, 1).state_dict(), _random_model(unet_config, 2).state_dict()
    command = "python scripts/train.py --dataset_name x --push_to_hub --hub_token hf_SecretSecretSecret1234"
    run = tmp_path / "run"
    write_model_checkpoint(run / "checkpoint-2", 2, unet_config, schedule_config, ema, ema, {"command": command})
    write_model_checkpoint(run / "checkpoint-4", 4, unet_config, schedule_config, live, ema, {"command": command})

    main(["--checkpoint", str(run), "--output_dir", str(tmp_path / "ema")])  # latest checkpoint, EMA weights
    unet, _ = diffusers.UNet2DModel.from_pretrained(tmp_path / "ema", subfolder="unet", output_loading_info=True)
    assert all(torch.equal(unet.state_dict()[k], v) for k, v in ema.items())
    card = (tmp_path / "ema" / "README.md").read_text()
    assert "checkpoint-4" in card and "| Weights | EMA |" in card and "--dataset_name x" in card
    assert "hf_Secret" not in card and "--hub_token ***" in card

    main(["--checkpoint", str(run / "checkpoint-4"), "--output_dir", str(tmp_path / "live"), "--no_ema"])
    _, _, loaded = load_model(tmp_path / "live")
    assert all(torch.equal(loaded[k], v) for k, v in live.items())

    main(["--checkpoint", str(run), "--output_dir", str(tmp_path / "half"), "--dtype", "fp16"])
    assert (tmp_path / "half" / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()

    with pytest.raises(SystemExit, match="no checkpoint-N"):
        main(["--checkpoint", str(tmp_path / "ema"), "--output_dir", str(tmp_path / "never")])
    assert not (tmp_path / "never").exists()


def test_model_card_metadata_and_content():
    unet_config, schedule_config = UNetConfig.from_dict(TINY), ScheduleConfig(variance_type="fixed_large")
    card = make_model_card(
        unet_config,
        schedule_config,
        name="ddpm-tiny",
        num_parameters=177427,
        training_info={
            "command": "train.py --hub_token=hf_abcdefghijklmnop",
            "Steps": 1000,
            "Final loss": 0.0312,
            "hub_token": "hf_abcdefghijklmnop",
        },
        sample_grid="samples.png",
        repo_id="me/ddpm-tiny",
        dataset="me/digits",
    )
    data = huggingface_hub.ModelCard(card).data
    assert data.library_name == "diffusers"
    assert data.pipeline_tag == "unconditional-image-generation"
    assert {"diffusers", "ddpm", "unconditional-image-generation"} <= set(data.tags)
    assert data.datasets == ["me/digits"]
    assert 'DDPMPipeline.from_pretrained("me/ddpm-tiny")' in card
    assert "![Samples](samples.png)" in card and "| Parameters | 177,427 |" in card
    assert "| Steps | 1000 |" in card and "| Final loss | 0.0312 |" in card and "fixed_large" in card
    assert "hf_abc" not in card and "--hub_token=***" in card
    assert scrub_tokens("token hf_ABCDEFGHIJKLMNOP end") == "token *** end"
