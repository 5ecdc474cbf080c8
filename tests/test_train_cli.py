"""scripts/train.py's command line: diffusers' flags and defaults, --config files, validation errors."""

import json
import math
import re
import shlex
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
from helpers import assert_same_tensors, load_script, read_metrics, subprocess_env
from PIL import Image

from ddpm.io.checkpoint import load_training_checkpoint
from ddpm.training.config import DEFAULT_UNET, TrainConfig, load_config_file
from ddpm.training.model_config import unet_config
from ddpm.training.setup import check_config

ROOT = Path(__file__).resolve().parents[1]

# The seed guide's three commands (diffusers docs / examples README), script arguments only.
GUIDE_COMMANDS = {
    "flowers": 'accelerate launch train_unconditional.py --dataset_name="huggan/flowers-102-categories" '
    '--resolution=64 --center_crop --random_flip --output_dir="ddpm-ema-flowers-64" --train_batch_size=16 '
    "--num_epochs=100 --gradient_accumulation_steps=1 --use_ema --learning_rate=1e-4 --lr_warmup_steps=500 "
    "--mixed_precision=no --push_to_hub",
    "pokemon": 'accelerate launch train_unconditional.py --dataset_name="huggan/pokemon" --resolution=64 '
    '--center_crop --random_flip --output_dir="ddpm-ema-pokemon-64" --train_batch_size=16 --num_epochs=100 '
    "--gradient_accumulation_steps=1 --use_ema --learning_rate=1e-4 --lr_warmup_steps=500 --mixed_precision=no "
    "--push_to_hub",
    "multi_gpu": 'accelerate launch --mixed_precision="fp16" --multi_gpu train_unconditional.py '
    '--dataset_name="huggan/pokemon" --resolution=64 --center_crop --random_flip --output_dir="ddpm-ema-pokemon-64" '
    "--train_batch_size=16 --num_epochs=100 --gradient_accumulation_steps=1 --use_ema --learning_rate=1e-4 "
    '--lr_warmup_steps=500 --mixed_precision="fp16" --logger="wandb"',
}

# The latest train_unconditional.py's flags (45) and defaults (reference §1.1).
DIFFUSERS_DEFAULTS = {
    "dataset_name": None,
    "dataset_config_name": None,
    "model_config_name_or_path": None,
    "train_data_dir": None,
    "output_dir": "ddpm-model-64",
    "overwrite_output_dir": False,
    "cache_dir": None,
    "resolution": 64,
    "center_crop": False,
    "random_flip": False,
    "train_batch_size": 16,
    "eval_batch_size": 16,
    "dataloader_num_workers": 0,
    "num_epochs": 100,
    "save_images_epochs": 10,
    "save_model_epochs": 10,
    "gradient_accumulation_steps": 1,
    "learning_rate": 1e-4,
    "lr_scheduler": "cosine",
    "lr_warmup_steps": 500,
    "adam_beta1": 0.95,
    "adam_beta2": 0.999,
    "adam_weight_decay": 1e-6,
    "adam_epsilon": 1e-08,
    "use_ema": False,
    "ema_inv_gamma": 1.0,
    "ema_power": 0.75,
    "ema_max_decay": 0.9999,
    "push_to_hub": False,
    "hub_token": None,
    "hub_model_id": None,
    "hub_private_repo": False,
    "logger": "tensorboard",
    "logging_dir": "logs",
    "local_rank": -1,
    "mixed_precision": "no",
    "prediction_type": "epsilon",
    "ddpm_num_steps": 1000,
    "ddpm_num_inference_steps": 1000,
    "ddpm_beta_schedule": "linear",
    "checkpointing_steps": 500,
    "checkpoints_total_limit": None,
    "resume_from_checkpoint": None,
    "enable_xformers_memory_efficient_attention": False,
    "preserve_input_precision": False,
}


script = load_script("train")


def guide_args(name: str) -> list[str]:
    words = shlex.split(GUIDE_COMMANDS[name])
    return words[words.index("train_unconditional.py") + 1 :]


@pytest.mark.parametrize("name", sorted(GUIDE_COMMANDS))
def test_guide_commands_parse_with_their_meaning(name):
    config = script.parse_args(guide_args(name))
    assert config.resolution == 64 and config.center_crop and config.random_flip and config.use_ema
    assert config.train_batch_size == 16 and config.num_epochs == 100 and config.gradient_accumulation_steps == 1
    assert config.learning_rate == 1e-4 and config.lr_warmup_steps == 500
    assert config.push_to_hub == (name != "multi_gpu")
    assert config.mixed_precision == ("fp16" if name == "multi_gpu" else "no")
    assert config.logger == ("wandb" if name == "multi_gpu" else "tensorboard")
    assert config.dataset_name == ("huggan/flowers-102-categories" if name == "flowers" else "huggan/pokemon")
    # untouched flags keep train_unconditional's defaults
    assert config.lr_scheduler == "cosine" and config.adam_beta1 == 0.95 and config.checkpointing_steps == 500


def test_every_diffusers_flag_has_its_default():
    assert len(DIFFUSERS_DEFAULTS) == 45
    config = TrainConfig(dataset_name="x")
    for name, default in DIFFUSERS_DEFAULTS.items():
        expected = "x" if name == "dataset_name" else default
        assert getattr(config, name) == expected, name


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        script.parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for f in fields(TrainConfig):
        assert f"--{f.name}" in text, f.name
        assert f.metadata.get("help"), f"--{f.name} has no help text"
    assert "--config" in text


def test_default_architecture_is_train_unconditionals_at_the_resolution():
    unet = unet_config(TrainConfig(dataset_name="x", resolution=128))
    assert unet.sample_size == 128
    assert list(unet.block_out_channels) == DEFAULT_UNET["block_out_channels"]
    assert list(unet.down_block_types) == DEFAULT_UNET["down_block_types"]
    assert (unet.attention_head_dim, unet.norm_num_groups, unet.flip_sin_to_cos) == (8, 32, True)


def test_model_config_accepts_diffusers_json_and_folder(tmp_path, tiny_unet_json):
    diffusers_config = {
        "_class_name": "UNet2DModel",
        "_diffusers_version": "0.30.0",
        **json.loads(tiny_unet_json.read_text()),
    }
    folder = tmp_path / "unet"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(diffusers_config))
    for source in (tiny_unet_json, folder):
        unet = unet_config(TrainConfig(dataset_name="x", model_config_name_or_path=str(source), resolution=16))
        assert unet.sample_size == 16 and list(unet.block_out_channels) == [16, 32]


def test_config_file_values_are_defaults_that_the_command_line_overrides(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('dataset_name = "builtin:digits"\nresolution = 32\nuse_ema = true\nlearning_rate = 1\n')
    config = script.parse_args(["--config", str(toml), "--resolution", "64"])
    assert config.dataset_name == "builtin:digits" and config.resolution == 64 and config.use_ema
    assert config.learning_rate == 1.0 and isinstance(config.learning_rate, float)
    assert not script.parse_args(["--config", str(toml), "--no-use_ema"]).use_ema
    as_json = tmp_path / "run.json"
    as_json.write_text(json.dumps({"dataset_name": "builtin:digits", "seed": 3}))
    assert script.parse_args(["--config", str(as_json)]).seed == 3


@pytest.mark.parametrize(
    "content, message",
    [
        ('dataset_name = "x"\nlearning_rat = 1e-4\nfoo = 1\n', "unknown setting(s) foo, learning_rat"),
        ('dataset_name = "x"\nresolution = "64"\n', "resolution='64' must be int"),
        ('dataset_name = "x"\nuse_ema = 1\n', "use_ema=1 must be bool"),
        ("dataset_name = [1\n", "invalid TOML"),
    ],
)
def test_bad_config_files_are_refused_naming_the_key(tmp_path, content, message):
    path = tmp_path / "bad.toml"
    path.write_text(content)
    with pytest.raises(ValueError, match=re.escape(message)):
        load_config_file(path)


def test_bad_config_file_is_a_usage_error(tmp_path, capsys):
    path = tmp_path / "bad.json"
    path.write_text('{"dataset_name": "x", "nope": 1}')
    with pytest.raises(SystemExit) as exit_info:
        script.parse_args(["--config", str(path)])
    assert exit_info.value.code == 2
    assert "unknown setting(s) nope" in capsys.readouterr().err


def test_config_without_a_value_is_train_pys_one_line_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        script.parse_args(["--dataset_name", "x", "--config"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "train.py: error: argument --config: expected one argument\n"


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"dataset_name": None}, "either a dataset name from the hub (--dataset_name) or a train data directory"),
        ({"train_data_dir": "imgs"}, "only one of --dataset_name and --train_data_dir"),
        ({"train_batch_size": 0}, "--train_batch_size=0: must be a positive integer"),
        ({"learning_rate": -1.0}, "--learning_rate=-1.0: must be positive"),
        ({"learning_rate": math.inf}, "--learning_rate=inf: must be finite"),
        ({"adam_epsilon": math.inf}, "--adam_epsilon=inf: must be finite"),
        ({"adam_weight_decay": math.inf}, "--adam_weight_decay=inf: must be a finite number >= 0"),
        ({"lr_num_cycles": math.inf}, "--lr_num_cycles=inf: must be a positive number"),
        ({"lr_scheduler": "cosine_annealing"}, "--lr_scheduler='cosine_annealing': choose one of"),
        ({"mixed_precision": "fp8"}, "--mixed_precision='fp8'"),
        ({"resolution": 48}, "--resolution=48 must be divisible by 32"),
        ({"checkpoints_total_limit": 0}, "--checkpoints_total_limit=0"),
        ({"ddpm_num_inference_steps": 2000}, "--ddpm_num_inference_steps=2000: must be <= --ddpm_num_steps=1000"),
        ({"adam_beta1": 1.0}, "--adam_beta1=1.0: must be in [0, 1)"),
        ({"snr_gamma": 0.0}, "--snr_gamma=0.0: must be a positive number"),
        ({"noise_offset": -0.1}, "--noise_offset=-0.1: must be >= 0"),
        ({"sampler": "unipc"}, "--sampler='unipc': choose one of ddpm, ddim, dpmsolver++, sde-dpmsolver++"),
        ({"fid_sampler": "euler"}, "--fid_sampler='euler': choose one of"),
        ({"model_config_name_or_path": "missing.json"}, "no such file or folder"),
        (
            {"overwrite_output_dir": True, "resume_from_checkpoint": "latest"},
            "--overwrite_output_dir would delete the checkpoint",
        ),
    ],
)
def test_invalid_settings_raise_naming_the_flag(changes, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        check_config(TrainConfig(**{"dataset_name": "x", **changes}))


def test_an_infinite_max_grad_norm_means_no_clipping():
    check_config(TrainConfig(dataset_name="x", max_grad_norm=math.inf))  # accepted: torch's clipping is a no-op then


def test_resolution_must_suit_a_custom_model(tiny_unet_json):
    with pytest.raises(ValueError, match=re.escape("--resolution=9 must be divisible by 2")):
        check_config(TrainConfig(dataset_name="x", model_config_name_or_path=str(tiny_unet_json), resolution=9))


def test_to_dict_never_contains_the_hub_token():
    config = TrainConfig(dataset_name="x", hub_token="hf_secret_value_123")
    assert "hub_token" not in config.to_dict()
    assert "hf_secret" not in json.dumps(config.to_dict())


def test_recorded_command_line_scrubs_the_token():
    from ddpm.training.loop import command_line

    line = command_line(["--dataset_name", "x", "--hub_token", "hf_abcdefghijkl"])
    assert "hf_abcdefghijkl" not in line and "scripts/train.py --dataset_name x" in line


def test_model_config_from_a_hub_id(monkeypatch, tiny_unet_json):
    import huggingface_hub

    asked = []

    def fake_download(repo_id, filename, cache_dir=None):
        asked.append((repo_id, filename))
        if filename == "config.json":  # a pipeline repo: the UNet config is in unet/
            raise FileNotFoundError(filename)
        return str(tiny_unet_json)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    config = TrainConfig(dataset_name="x", model_config_name_or_path="someone/tiny-ddpm", resolution=16)
    assert unet_config(config).sample_size == 16
    assert asked == [("someone/tiny-ddpm", "config.json"), ("someone/tiny-ddpm", "unet/config.json")]


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_shipped_recipes_are_valid(path, monkeypatch):
    monkeypatch.chdir(ROOT)  # their model config paths are relative to the repository root
    config = script.parse_args(["--config", str(path.relative_to(ROOT))])
    assert config.dataset_name is not None


def test_quickstart_recipe_trains_the_digits_model(monkeypatch, tmp_path):
    """The README's main command, ``python scripts/train.py --config configs/quickstart.toml``, run as a user runs
    it (a subprocess in the repository root), shortened by flags that change only the run's length, sampling and
    output folder: it trains, logs, writes a sample grid, a checkpoint and an export that diffusers loads."""
    monkeypatch.chdir(ROOT)
    config = script.parse_args(["--config", str(ROOT / "configs" / "quickstart.toml")])
    assert config.dataset_name == "builtin:digits" and config.use_ema
    assert config.model_config_name_or_path == "configs/models/quickstart-digits-16.json"

    out = tmp_path / "quickstart"
    short = ["--max_train_steps", "2", "--ddpm_num_inference_steps", "2", "--eval_batch_size", "4"]
    done = subprocess.run(
        [sys.executable, "scripts/train.py", "--config", "configs/quickstart.toml", *short, "--output_dir", str(out)],
        cwd=ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]

    records = read_metrics(out)
    assert records[-1]["step"] == 2 and math.isfinite(records[-1]["loss"])
    with Image.open(out / "samples" / "step_000002.png") as grid:  # 4 one-channel 16x16 samples, 2 per row
        # torchvision's make_grid layout, the 16 px samples scaled x16 so that the grid is >= 512 px wide
        assert grid.mode == "L" and grid.size == (2 * (256 + 2) + 2,) * 2
    checkpoint = load_training_checkpoint(out / "checkpoint-2")
    assert checkpoint.step == 2 and checkpoint.ema_state is not None

    import diffusers

    pipeline = diffusers.DDPMPipeline.from_pretrained(out)
    model_json = json.loads((ROOT / config.model_config_name_or_path).read_text())
    assert {k: pipeline.unet.config[k] for k in model_json} == model_json
    assert pipeline.scheduler.config.num_train_timesteps == config.ddpm_num_steps
    assert_same_tensors(pipeline.unet.state_dict(), checkpoint.ema_state)  # the EMA weights, as trained
