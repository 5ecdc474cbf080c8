"""The training loop on CPU: the guide's commands, accumulation, precision, exact resume, rotation, outputs."""

import importlib.util
import json
import logging
import re
import shlex
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import TINY_UNET
from helpers import assert_same_tensors, load_script, read_metrics

from ddpm.diffusion.schedule import NoiseSchedule
from ddpm.io.checkpoint import list_checkpoints, load_training_checkpoint
from ddpm.io.files import read_safetensors, read_torch_state
from ddpm.training.errors import TrainingDiverged
from ddpm.training.loop import train

ROOT = Path(__file__).resolve().parents[1]
script = load_script("train")
WANDB_INSTALLED = importlib.util.find_spec("wandb") is not None
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: thread hand-offs cost more than the maths

GUIDE_SCRIPT_ARGS = {
    "flowers": '--dataset_name="huggan/flowers-102-categories" --resolution=64 --center_crop --random_flip '
    '--output_dir="ddpm-ema-flowers-64" --train_batch_size=16 --num_epochs=100 --gradient_accumulation_steps=1 '
    "--use_ema --learning_rate=1e-4 --lr_warmup_steps=500 --mixed_precision=no --push_to_hub",
    "pokemon": '--dataset_name="huggan/pokemon" --resolution=64 --center_crop --random_flip '
    '--output_dir="ddpm-ema-pokemon-64" --train_batch_size=16 --num_epochs=100 --gradient_accumulation_steps=1 '
    "--use_ema --learning_rate=1e-4 --lr_warmup_steps=500 --mixed_precision=no --push_to_hub",
    "multi_gpu": '--dataset_name="huggan/pokemon" --resolution=64 --center_crop --random_flip '
    '--output_dir="ddpm-ema-pokemon-64" --train_batch_size=16 --num_epochs=100 --gradient_accumulation_steps=1 '
    '--use_ema --learning_rate=1e-4 --lr_warmup_steps=500 --mixed_precision="fp16" --logger="wandb"',
}


def run(args):
    return train(script.parse_args(args))


def optimizer_tensors(checkpoint_dir):
    state = read_torch_state(Path(checkpoint_dir) / "training_state.pt")["optimizer"]["state"]
    return {f"{i}.{k}": v for i, s in state.items() for k, v in s.items()}


# ---------------------------------------------------------------------------------------------------- guide


@pytest.mark.parametrize("name", sorted(GUIDE_SCRIPT_ARGS))
def test_guide_commands_run_shortened(name, tmp_path, make_train_args, caplog):
    """The guide's commands with local data, a tiny UNet, 2 steps and no push (their other flags unchanged)."""
    guide = [a for a in shlex.split(GUIDE_SCRIPT_ARGS[name]) if not a.startswith(("--dataset_name", "--push"))]
    tiny = make_train_args(tmp_path / "out")
    keep = {"--train_data_dir", "--cache_dir", "--model_config_name_or_path", "--output_dir", "--device", "--seed"}
    short = [w for i, w in enumerate(tiny) if w in keep or (i and tiny[i - 1] in keep)]
    short += ["--resolution", "8", "--train_batch_size", "4", "--max_train_steps", "2"]
    short += ["--eval_batch_size", "2", "--ddpm_num_inference_steps", "2"]
    with caplog.at_level(logging.WARNING):
        assert script.main(guide + short) == 0
    out = tmp_path / "out"
    for path in ("model_index.json", "unet/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json"):
        assert (out / path).is_file(), path
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2"]
    assert (out / "samples" / "step_000002.png").is_file()
    run_config = json.loads((out / "checkpoint-2" / "config.json").read_text())["run"]
    assert run_config["use_ema"] and run_config["center_crop"] and run_config["random_flip"]
    if name == "multi_gpu":
        state = read_torch_state(out / "checkpoint-2" / "training_state.pt")
        assert state["grad_scaler"]["scale"] > 0  # fp16 ran with a GradScaler
        assert list((out / "logs" / "wandb").glob("*run-*")), "no wandb run folder"  # offline (see conftest)
    else:
        assert list((out / "logs" / "train_unconditional").glob("events.out.tfevents.*"))


def test_exported_pipeline_loads_in_diffusers_with_the_ema_weights(tmp_path, tiny_train_args):
    import diffusers

    result = run([*tiny_train_args, "--use_ema", "--max_train_steps", "2"])
    pipeline = diffusers.DDPMPipeline.from_pretrained(tmp_path / "run")
    theirs = pipeline.unet.state_dict()
    assert_same_tensors({k: theirs[k] for k in result.ema.shadow}, result.ema.shadow)
    assert pipeline.scheduler.config.num_train_timesteps == 100


def test_ema_weights_never_leak_into_the_live_model(tmp_path, make_train_args):
    """diffusers #2321: sampling a grid and exporting with the EMA weights must leave the live weights as they were.

    5 steps, 4 per epoch: after epoch 0 a grid is sampled and the pipeline exported with the EMA swapped in, then
    step 5 trains on, and the run ends with another grid and export. The live weights must equal, bit for bit, those
    of the same run without EMA (EMA updates draw no random numbers and the grids use their own generator).
    """
    args = ["--max_train_steps", "5", "--checkpointing_steps", "100"]
    args += ["--save_images_epochs", "1", "--save_model_epochs", "1"]
    plain = run([*make_train_args(tmp_path / "plain"), *args])
    with_ema = run([*make_train_args(tmp_path / "ema"), *args, "--use_ema"])
    assert sorted(p.name for p in (tmp_path / "ema" / "samples").iterdir()) == ["step_000004.png", "step_000005.png"]
    # step 5 trained the live weights, not the EMA swapped in at epoch 0's end; the end of the run left them too
    saved = read_safetensors(tmp_path / "ema" / "checkpoint-5" / "model.safetensors")
    assert_same_tensors(saved, read_safetensors(tmp_path / "plain" / "checkpoint-5" / "model.safetensors"))
    live, shadow = with_ema.unet.state_dict(), with_ema.ema.shadow
    assert_same_tensors(live, plain.unet.state_dict())
    assert any(not torch.equal(live[k], v) for k, v in shadow.items())  # so a leak would show
    exported = read_safetensors(tmp_path / "ema" / "unet" / "diffusion_pytorch_model.safetensors")
    assert_same_tensors({k: exported[k] for k in shadow}, shadow)  # the export did use the EMA


# ---------------------------------------------------------------------------------------------------- maths


def test_accumulation_of_half_batches_equals_one_full_batch(tmp_path, make_train_args, capsys):
    full = make_train_args(tmp_path / "full")
    run(full)
    run([*make_train_args(tmp_path / "accum"), "--train_batch_size", "2", "--gradient_accumulation_steps", "2"])
    assert "Total train batch size (w. parallel, distributed & accumulation) = 4 (2 x 1" in capsys.readouterr().err
    for name in ("checkpoint-2", "checkpoint-4"):
        one = read_safetensors(tmp_path / "full" / name / "model.safetensors")
        two = read_safetensors(tmp_path / "accum" / name / "model.safetensors")
        assert_same_tensors(one, two, exact=False)
    # warm-up and schedule length are counted in optimizer steps, whatever the accumulation
    assert [m["lr"] for m in read_metrics(tmp_path / "full")] == [m["lr"] for m in read_metrics(tmp_path / "accum")]
    loss_full = [m["loss"] for m in read_metrics(tmp_path / "full")]
    assert loss_full == pytest.approx([m["loss"] for m in read_metrics(tmp_path / "accum")], rel=1e-5)


@pytest.fixture(scope="module")
def dropout_unet_json(tmp_path_factory):
    """The tiny UNet with dropout 0.1: its training draws from the torch RNG, which a resume must restore."""
    path = tmp_path_factory.mktemp("models") / "tiny_unet_dropout.json"
    path.write_text(json.dumps({**TINY_UNET, "dropout": 0.1}))
    return path


@pytest.mark.parametrize(
    "use_ema, accum, dropout",
    [
        pytest.param(False, 1, False, id="accum1-no_ema"),
        pytest.param(True, 1, False, id="accum1-ema"),
        pytest.param(False, 2, False, id="accum2-no_ema"),
        pytest.param(True, 2, False, id="accum2-ema"),
        pytest.param(True, 2, True, id="accum2-ema-dropout"),
    ],
)
def test_resume_is_bit_exact(tmp_path, make_train_args, dropout_unet_json, use_ema, accum, dropout):
    """Steps 3-4 of a run resumed from checkpoint-2 (copied elsewhere) equal the uninterrupted run's, bit for bit.

    With dropout, steps 3-4 draw their masks from the torch RNG: only restoring its saved state makes them equal.
    """
    args = ["--train_batch_size", str(4 // accum), "--gradient_accumulation_steps", str(accum)]
    args += ["--use_ema"] if use_ema else []
    args += ["--model_config_name_or_path", str(dropout_unet_json)] if dropout else []
    run([*make_train_args(tmp_path / "straight"), *args])
    elsewhere = tmp_path / "elsewhere" / "saved"
    shutil.copytree(tmp_path / "straight" / "checkpoint-2", elsewhere)
    resumed = run([*make_train_args(tmp_path / "resumed"), *args, "--resume_from_checkpoint", str(elsewhere)])
    assert resumed.global_step == 4
    dropouts = [m.p for m in resumed.unet.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts and set(dropouts) == {0.1 if dropout else 0.0}
    a, b = tmp_path / "straight" / "checkpoint-4", tmp_path / "resumed" / "checkpoint-4"
    assert_same_tensors(read_safetensors(a / "model.safetensors"), read_safetensors(b / "model.safetensors"))
    assert_same_tensors(optimizer_tensors(a), optimizer_tensors(b))
    assert (a / "ema.safetensors").is_file() == use_ema
    if use_ema:
        assert_same_tensors(read_safetensors(a / "ema.safetensors"), read_safetensors(b / "ema.safetensors"))
    pipeline_a = tmp_path / "straight" / "unet" / "diffusion_pytorch_model.safetensors"
    pipeline_b = tmp_path / "resumed" / "unet" / "diffusion_pytorch_model.safetensors"
    assert_same_tensors(read_safetensors(pipeline_a), read_safetensors(pipeline_b))
    assert untimed(read_metrics(tmp_path / "straight"))[2:] == untimed(read_metrics(tmp_path / "resumed"))


def untimed(records):
    return [
        {k: v for k, v in r.items() if k not in ("img_s", "sec_per_step", "data_wait", "peak_mem_gb")} for r in records
    ]


def test_resume_refuses_another_model_or_schedule(tmp_path, tiny_train_args):
    run([*tiny_train_args, "--max_train_steps", "2"])
    with pytest.raises(ValueError, match=r"the schedule config differs \(num_train_timesteps: checkpoint 100, now 50"):
        run([*tiny_train_args, "--resume_from_checkpoint", "latest", "--ddpm_num_steps", "50"])


def test_resume_with_another_global_batch_continues_from_the_samples_seen(tmp_path, tiny_train_args, caplog):
    run([*tiny_train_args, "--max_train_steps", "2"])  # 2 steps x 4 images
    with caplog.at_level(logging.WARNING):
        result = run(
            [
                *tiny_train_args,
                "--train_batch_size",
                "2",
                "--max_train_steps",
                "6",
                "--resume_from_checkpoint",
                "latest",
            ]
        )
    assert "global batch changed from 4 to 2: resuming after 8 samples seen, at optimizer step 4" in caplog.text
    assert result.global_step == 6
    assert [m["step"] for m in read_metrics(tmp_path / "run")] == [1, 2, 5, 6]


def test_resume_with_another_global_batch_still_trains_every_step_of_the_run(tmp_path, tiny_train_args):
    # 16 images: batch 12 drops 4 of them per epoch, so 2 epochs of it (24 samples) are 6 steps of batch 4, half an
    # epoch behind on the epoch grid; the run must still reach its 12 steps, not stop when 3 epochs are done
    run([*tiny_train_args, "--train_batch_size", "12", "--max_train_steps", "2"])
    resume = [*tiny_train_args, "--max_train_steps", "12", "--resume_from_checkpoint", "latest"]
    assert run(resume).global_step == 12
    assert [m["step"] for m in read_metrics(tmp_path / "run")][-6:] == [7, 8, 9, 10, 11, 12]
    assert (tmp_path / "run" / "checkpoint-12").is_dir()


def test_resuming_past_the_end_of_the_run_names_the_flag(tmp_path, tiny_train_args):
    run(tiny_train_args)
    with pytest.raises(ValueError, match=r"checkpoint-4 is at optimizer step 4, past this run's 2 steps: raise "):
        run([*tiny_train_args, "--max_train_steps", "2", "--resume_from_checkpoint", "latest"])


@pytest.fixture(scope="module")
def fp32_losses(make_train_args, tmp_path_factory):
    """The losses of the 2-step float32 run that the mixed-precision runs shadow."""
    output_dir = tmp_path_factory.mktemp("fp32") / "run"
    run([*make_train_args(output_dir), "--max_train_steps", "2"])
    return [m["loss"] for m in read_metrics(output_dir)]


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_steps_run_and_the_grad_scaler_state_is_restored(
    tmp_path, tiny_train_args, fp32_losses, precision
):
    result = run([*tiny_train_args, "--mixed_precision", precision, "--max_train_steps", "2"])
    assert all(p.dtype == torch.float32 for p in result.unet.parameters())  # master weights stay fp32
    losses = [m["loss"] for m in read_metrics(tmp_path / "run")]
    # The network really ran in reduced precision (an ignored flag gives float32's losses bit for bit), and only
    # rounding changed: the same batches and noise, losses ~1.1 within 1e-2 (measured: 5e-4 bf16, 1e-4 fp16).
    assert all(a != b for a, b in zip(losses, fp32_losses, strict=True)), (losses, fp32_losses)
    assert losses == pytest.approx(fp32_losses, abs=1e-2)
    checkpoint = tmp_path / "run" / "checkpoint-2"
    state = read_torch_state(checkpoint / "training_state.pt")
    if precision == "bf16":
        assert state["grad_scaler"] == {}  # bf16 needs no scaler
        return
    assert state["grad_scaler"]["scale"] == 2.0**16
    state["grad_scaler"]["scale"] = 1024.0  # a value only a restored scaler can have
    torch.save(state, checkpoint / "training_state.pt")
    run(
        [
            *tiny_train_args,
            "--mixed_precision",
            precision,
            "--max_train_steps",
            "3",
            "--resume_from_checkpoint",
            "latest",
        ]
    )
    resumed = read_torch_state(tmp_path / "run" / "checkpoint-3" / "training_state.pt")["grad_scaler"]
    assert resumed["scale"] == 1024.0 and resumed["_growth_tracker"] == state["grad_scaler"]["_growth_tracker"] + 1
    assert read_metrics(tmp_path / "run")[-1]["loss_scale"] == 1024.0


@pytest.mark.parametrize("native", [True, False], ids=["native_bf16", "no_native_bf16"])
def test_auto_precision_trains_in_bf16_where_the_device_computes_it_natively(
    tmp_path, make_train_args, monkeypatch, capsys, native
):
    """--mixed_precision auto is bf16 on a device with bfloat16 arithmetic of its own and float32 elsewhere: the
    weights of the explicit choice, bit for bit (bf16's differ from float32's: the mixed-precision test above), and
    the header line says what it chose."""
    import ddpm.runtime.precision as precision_module

    monkeypatch.setattr(precision_module, "computes_bf16_natively", lambda device: native)
    chosen = "bf16" if native else "no"
    steps = ["--max_train_steps", "2"]
    auto = run([*make_train_args(tmp_path / "auto"), "--mixed_precision", "auto", *steps])
    assert f"; precision {chosen} (auto); " in capsys.readouterr().err
    explicit = run([*make_train_args(tmp_path / "explicit"), "--mixed_precision", chosen, *steps])
    assert_same_tensors(auto.unet.state_dict(), explicit.unet.state_dict())


def _poison_training_loss(monkeypatch: pytest.MonkeyPatch, nonfinite: Callable[[int], bool]) -> None:
    """Make the training loss NaN on the calls (from 1: one per optimizer step here) that ``nonfinite`` picks."""
    original = NoiseSchedule.training_loss
    calls = []

    def poisoned(self, *args, **kwargs):
        calls.append(1)
        loss = original(self, *args, **kwargs)
        return loss * float("nan") if nonfinite(len(calls)) else loss

    monkeypatch.setattr(NoiseSchedule, "training_loss", poisoned)


def test_nonfinite_steps_in_a_row_between_log_ticks_still_stop_the_run(tmp_path, tiny_train_args, monkeypatch):
    _poison_training_loss(monkeypatch, lambda step: 2 <= step <= 4)  # fine again from step 5 on
    args = [*tiny_train_args, "--max_train_steps", "8", "--max_nonfinite_steps", "3", "--logging_steps", "6"]
    with pytest.raises(TrainingDiverged, match=r"3 optimizer steps in a row \(by step 6\)"):
        run(args)


def test_nonfinite_steps_are_skipped_counted_and_stop_the_run(tmp_path, tiny_train_args, monkeypatch):
    _poison_training_loss(monkeypatch, lambda step: step > 2)
    args = [*tiny_train_args, "--max_train_steps", "10", "--max_nonfinite_steps", "3"]
    with pytest.raises(TrainingDiverged, match=r"3 optimizer steps in a row \(by step 5\) had non-finite gradients"):
        run(args)
    records = read_metrics(tmp_path / "run")
    assert [m["skipped_steps"] for m in records] == [0, 0, 1, 2, 3]
    checkpoint = load_training_checkpoint(tmp_path / "run" / "checkpoint-4")
    before = read_safetensors(tmp_path / "run" / "checkpoint-2" / "model.safetensors")
    assert_same_tensors(before, checkpoint.model_state)  # skipped steps left the weights alone
    assert checkpoint.training_state["skipped_steps"] == 2


# ---------------------------------------------------------------------------------------------------- files


def test_rotation_keeps_the_newest_limit(tmp_path, tiny_train_args):
    run([*tiny_train_args, "--max_train_steps", "6", "--checkpoints_total_limit", "2"])
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["checkpoint-4", "checkpoint-6"]


def test_rotation_after_resuming_an_older_checkpoint_keeps_the_one_just_saved(tmp_path, tiny_train_args, caplog):
    run([*tiny_train_args, "--max_train_steps", "6", "--checkpoints_total_limit", "3"])
    resume = [*tiny_train_args, "--max_train_steps", "3", "--checkpoints_total_limit", "3"]
    resume += ["--checkpointing_steps", "1"]
    with caplog.at_level(logging.WARNING):
        run([*resume, "--resume_from_checkpoint", str(tmp_path / "run" / "checkpoint-2")])
    assert "checkpoint-4, checkpoint-6 in" in caplog.text and "newer than the checkpoint resumed from" in caplog.text
    # by step alone checkpoint-3 would be among the oldest; the oldest *other* one goes instead
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["checkpoint-3", "checkpoint-4", "checkpoint-6"]


def test_a_previous_run_is_refused_unless_resumed_or_overwritten(tmp_path, tiny_train_args):
    run([*tiny_train_args, "--max_train_steps", "4"])
    (tmp_path / "run" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="already holds a training run .* --overwrite_output_dir to start over"):
        run(tiny_train_args)
    run([*tiny_train_args, "--max_train_steps", "2", "--overwrite_output_dir"])
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["checkpoint-2"]
    assert [m["step"] for m in read_metrics(tmp_path / "run")] == [1, 2]
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"  # only what a run writes is removed


@pytest.mark.parametrize("name_it", [lambda path: path.name, str], ids=["bare name", "full path"])
def test_overwrite_never_deletes_the_checkpoint_it_would_resume_from(tmp_path, tiny_train_args, monkeypatch, name_it):
    run([*tiny_train_args, "--max_train_steps", "4"])
    checkpoint = tmp_path / "run" / "checkpoint-2"
    monkeypatch.chdir(tmp_path)  # a bare name is found in --output_dir, not in the working directory
    with pytest.raises(ValueError, match="--overwrite_output_dir would delete the checkpoint"):
        run([*tiny_train_args, "--overwrite_output_dir", "--resume_from_checkpoint", name_it(checkpoint)])
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["checkpoint-2", "checkpoint-4"]
    assert load_training_checkpoint(checkpoint).step == 2


def test_resume_latest_without_a_checkpoint_starts_fresh(tmp_path, tiny_train_args, caplog):
    with caplog.at_level(logging.WARNING):
        result = run([*tiny_train_args, "--max_train_steps", "2", "--resume_from_checkpoint", "latest"])
    assert "Checkpoint 'latest' does not exist. Starting a new training run." in caplog.text
    assert result.global_step == 2


def test_metrics_log_and_sample_grids(tmp_path, tiny_train_args):
    run([*tiny_train_args, "--use_ema", "--logging_steps", "2", "--max_train_steps", "8", "--save_images_epochs", "1"])
    records = read_metrics(tmp_path / "run")
    assert [m["step"] for m in records] == [2, 4, 6, 8]
    for key in ("loss", "lr", "grad_norm", "img_s", "sec_per_step", "data_wait", "ema_decay", "skipped_steps", "epoch"):
        assert all(key in m for m in records), key
    assert all(0 <= m["data_wait"] <= 1 for m in records)
    assert records[-1]["ema_decay"] == pytest.approx(1 - (1 + 7) ** -0.75)
    grids = sorted(p.name for p in (tmp_path / "run" / "samples").iterdir())
    assert grids == ["step_000004.png", "step_000008.png"]  # after each of the 2 epochs


def test_an_export_shows_only_a_grid_of_its_own_weights(tmp_path, tiny_train_args, monkeypatch):
    """Grids every 2 epochs, exports every epoch (3 epochs): the export of epoch 1 has no grid, rather than epoch 0's
    passing for samples of the weights it publishes; the others show the grid sampled just before them."""
    import ddpm.training.artifacts as artifacts_module

    real_export, shown = artifacts_module.export_pipeline, []

    def export_pipeline(*args, sample_grid=None, model_card=None, **kwargs):
        shown.append((sample_grid.name if sample_grid is not None else None, "![Samples](samples.png)" in model_card))
        return real_export(*args, sample_grid=sample_grid, model_card=model_card, **kwargs)

    monkeypatch.setattr(artifacts_module, "export_pipeline", export_pipeline)
    run([*tiny_train_args, "--max_train_steps", "12", "--save_images_epochs", "2", "--save_model_epochs", "1"])
    assert shown == [("step_000004.png", True), (None, False), ("step_000012.png", True)]
    out = tmp_path / "run"
    assert (out / "samples.png").read_bytes() == (out / "samples" / "step_000012.png").read_bytes()


def test_data_wait_is_the_share_of_the_tick_spent_waiting_for_images(tmp_path, tiny_train_args, monkeypatch):
    """Images that take 50 ms each (4 per step) against a step of a few ms: the loader sets the pace."""
    from ddpm.data.datasets import ImageDataset

    fast = ImageDataset.resized  # what the per-sample and the batched reads both go through

    def slow(self, index):
        time.sleep(0.05)
        return fast(self, index)

    monkeypatch.setattr(ImageDataset, "resized", slow)
    run([*tiny_train_args, "--logging_steps", "2"])
    assert all(m["data_wait"] > 0.5 for m in read_metrics(tmp_path / "run"))


def test_pretrained_weights_are_the_starting_point(tmp_path, make_train_args):
    source = run([*make_train_args(tmp_path / "source"), "--max_train_steps", "2"])
    args = without(make_train_args(tmp_path / "tuned"), "--model_config_name_or_path")
    args += ["--pretrained_model_name_or_path", str(tmp_path / "source")]
    tuned = run([*args, "--learning_rate", "1e-12", "--max_train_steps", "1"])
    for name, value in source.unet.state_dict().items():
        torch.testing.assert_close(tuned.unet.state_dict()[name], value, rtol=0, atol=1e-9)


def without(args, flag):
    i = args.index(flag)
    return args[:i] + args[i + 2 :]


def test_gradient_checkpointing_and_channels_last_keep_the_maths(tmp_path, make_train_args):
    base = run([*make_train_args(tmp_path / "base"), "--max_train_steps", "2"])
    args = [
        *make_train_args(tmp_path / "other"),
        "--max_train_steps",
        "2",
        "--gradient_checkpointing",
        "--channels_last",
    ]
    other = run(args)
    assert_same_tensors(base.unet.state_dict(), other.unet.state_dict(), exact=False)


@pytest.mark.parametrize(
    ("flags", "widths", "device", "expected"),
    [
        ([], [32, 64, 64], "cpu", False),  # the quick-start model: narrow levels run faster contiguous on a CPU
        ([], [128, 256, 256, 256], "cpu", True),  # the CIFAR-10 model: channels-last pays on a CPU
        (["--channels_last"], [32, 64, 64], "cpu", True),
        (["--no-channels_last"], [128, 256, 256, 256], "cpu", False),
        ([], [32, 64, 64], "cuda", False),  # float32 on a GPU
        (["--mixed_precision", "bf16"], [32, 64, 64], "cuda", True),  # tensor cores
    ],
)
def test_the_default_memory_format_follows_the_measurements(tiny_train_args, flags, widths, device, expected):
    from ddpm.models.unet import UNetConfig
    from ddpm.training.setup import use_channels_last

    config = load_script("train").parse_args([*tiny_train_args, *flags])
    unet_config = UNetConfig(
        block_out_channels=widths,
        down_block_types=["DownBlock2D"] * len(widths),
        up_block_types=["UpBlock2D"] * len(widths),
    )
    assert use_channels_last(config, unet_config, torch.device(device)) is expected


@pytest.mark.parametrize(
    ("probes", "expected"),
    [
        ({"_is_avx512_bf16_supported": True, "_is_amx_tile_supported": False}, True),  # AMD Zen 4, Cooper Lake
        ({"_is_avx512_bf16_supported": False, "_is_amx_tile_supported": True}, True),  # Sapphire Rapids
        ({"_is_avx512_bf16_supported": False, "_is_amx_tile_supported": False}, False),  # AVX2 / AVX-512 only
        ({}, False),  # a torch without the probes
    ],
)
def test_a_cpu_computes_bf16_natively_with_avx512_bf16_or_amx(monkeypatch, probes, expected):
    from ddpm.runtime.precision import computes_bf16_natively

    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.delattr(torch.cpu, name, raising=False)
    for name, value in probes.items():
        monkeypatch.setattr(torch.cpu, name, lambda value=value: value, raising=False)
    assert computes_bf16_natively(torch.device("cpu")) is expected


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_on_a_gpu_runs_channels_last_when_it_means_bf16(tiny_train_args, monkeypatch, native):
    import ddpm.runtime.precision as precision_module
    from ddpm.models.unet import UNetConfig
    from ddpm.training.setup import use_channels_last

    monkeypatch.setattr(precision_module, "computes_bf16_natively", lambda device: native)
    config = load_script("train").parse_args([*tiny_train_args, "--mixed_precision", "auto"])
    unet_config = UNetConfig(
        block_out_channels=[32, 64], down_block_types=["DownBlock2D"] * 2, up_block_types=["UpBlock2D"] * 2
    )
    assert use_channels_last(config, unet_config, torch.device("cuda")) is native


def test_push_to_hub_creates_the_private_repo_first_then_uploads_each_export(tmp_path, tiny_train_args, fake_hub):
    token = "hf_TrainTestToken0123456789"
    args = ["--push_to_hub", "--hub_private_repo", "--hub_model_id", "me/tiny-ddpm", "--hub_token", token]
    run([*tiny_train_args, *args, "--max_train_steps", "2"])
    assert fake_hub.calls[0][0] == "create_repo"  # at the start: a bad repo id or token fails before training
    assert {(c["repo_id"], c["private"]) for c in fake_hub.calls_to("create_repo")} == {("me/tiny-ddpm", True)}
    (upload,) = fake_hub.calls_to("upload_folder")
    assert (upload["repo_id"], upload["commit_message"]) == ("me/tiny-ddpm", "Step 2 (epoch 0)")
    assert fake_hub.tokens and all(t == token for t in fake_hub.tokens)
    (uploaded,) = fake_hub.uploads
    assert "unet/diffusion_pytorch_model.safetensors" in uploaded
    assert not [f for f in uploaded if f.startswith(("checkpoint-", "logs/", "samples/"))]
    for path in (tmp_path / "run").rglob("*"):
        assert not path.is_file() or token.encode() not in path.read_bytes(), path


def test_hub_uploads_run_in_the_background_from_a_snapshot_of_each_export(
    tmp_path, tiny_train_args, fake_hub, monkeypatch
):
    """The first export's upload is held until the run has trained on and exported again: training did not wait for
    it, and it still sent the first export (its snapshot), not the files the second export wrote meanwhile."""
    import threading

    import ddpm.training.uploads as uploads

    release, sent = threading.Event(), []
    real_push = uploads.push_folder

    def slow_push(folder, repo_id, **kwargs):
        if not sent:
            assert release.wait(timeout=300)
        card = (Path(folder) / "README.md").read_text().splitlines()
        sent.append(next(line for line in card if "Optimizer steps" in line))
        return real_push(folder, repo_id, **kwargs)

    def release_at_the_second_export():
        while not (tmp_path / "run" / "checkpoint-8").exists():
            threading.Event().wait(0.05)
        release.set()

    monkeypatch.setattr(uploads, "push_folder", slow_push)
    threading.Thread(target=release_at_the_second_export, daemon=True).start()
    args = ["--push_to_hub", "--hub_model_id", "me/tiny", "--hub_token", "hf_x", "--save_model_epochs", "1"]
    run([*tiny_train_args, *args, "--max_train_steps", "8"])  # 2 epochs of 4 steps: 2 exports
    assert [c["commit_message"] for c in fake_hub.calls_to("upload_folder")] == ["Step 4 (epoch 0)", "Step 8 (epoch 1)"]
    assert ["| 4 |" in sent[0], "| 8 |" in sent[1]] == [True, True], sent
    assert not list((tmp_path / "run").glob(".tmp-push-*"))  # the snapshots are gone


@pytest.mark.parametrize(
    "tracker, module, install",
    [
        ("tensorboard", "torch.utils.tensorboard", "pip install tensorboard"),
        ("wandb", "wandb", 'pip install -e ".[wandb]"'),
    ],
)
def test_a_missing_tracker_stops_the_run_at_start_saying_what_to_install(
    tmp_path, tiny_train_args, monkeypatch, capsys, tracker, module, install
):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed (whether it is or not)
    with pytest.raises(SystemExit) as exit_info:
        script.main([*tiny_train_args, "--logger", tracker])
    assert exit_info.value.code == 2  # a usage error: the flag asks for what is not there
    line = f"train.py: error: --logger {tracker}: the {tracker} package is not installed: {install}"
    assert capsys.readouterr().err.startswith(line)
    config = script.parse_args(tiny_train_args)
    config.logger = tracker
    with pytest.raises(ValueError, match=re.escape(install)):  # the Python API checks it too
        train(config)
    assert not (tmp_path / "run").exists()  # before anything was written


def test_tensorboard_is_a_dependency_of_the_package():
    """The README's main command (``pip install -e .``) installs the default --logger's package."""
    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    dependencies = text.split("dependencies = [", 1)[1].split("]", 1)[0]
    assert '"tensorboard>=' in dependencies


@pytest.mark.skipif(not WANDB_INSTALLED, reason="wandb is not installed (its absence is tested above)")
def test_wandb_receives_the_metrics_and_the_sample_grids(tmp_path, tiny_train_args, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logged = []
    real_init = wandb.init

    def init(**kwargs):
        wandb_run = real_init(**kwargs)
        real_log = wandb_run.log

        def log(data, step=None, **rest):
            logged.append((step, data))
            return real_log(data, step=step, **rest)

        wandb_run.log = log
        return wandb_run

    monkeypatch.setattr(wandb, "init", init)
    run([*tiny_train_args, "--logger", "wandb", "--max_train_steps", "2", "--use_ema"])
    records = read_metrics(tmp_path / "run")
    scalars = [(step, data) for step, data in logged if "train/loss" in data]
    assert [step for step, _ in scalars] == [1, 2]
    assert [data["train/loss"] for _, data in scalars] == [m["loss"] for m in records]
    assert all(data["train/ema_decay"] == m["ema_decay"] for (_, data), m in zip(scalars, records, strict=True))
    grids = [data["test_samples"] for _, data in logged if "test_samples" in data]
    assert len(grids) == 1 and len(grids[0]) == 4  # one grid (the end of the run) of --eval_batch_size images
    (folder,) = (tmp_path / "run" / "logs" / "wandb").glob("offline-run-*")
    assert len(list((folder / "files" / "media" / "images").glob("test_samples_*.png"))) == 4
    # What reaches the offline run file (what `wandb sync` uploads). wandb >= 0.19 has no Python reader of it: the
    # protobuf records are looked for as bytes, which works while no record straddles a 32 KiB block of the file.
    (run_file,) = folder.glob("run-*.wandb")
    # wandb's service process may write the file's block after finish() returns (seen once in CI under load: only
    # the file's 7-byte header yet), so wait for it a while before reading
    deadline = time.monotonic() + 60
    while b"test_samples" not in (data := run_file.read_bytes()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(data) < 32768
    assert b"train/loss" in data and b"test_samples" in data
    for record in records:
        assert json.dumps(record["loss"]).encode() in data

    # Resumed, the run logs to the same wandb run: its id is in the checkpoints.
    run_id = folder.name.rsplit("-", 1)[1]
    assert read_torch_state(tmp_path / "run" / "checkpoint-2" / "training_state.pt")["wandb_run_id"] == run_id
    run(
        [
            *tiny_train_args,
            "--logger",
            "wandb",
            "--max_train_steps",
            "4",
            "--use_ema",
            "--resume_from_checkpoint",
            "latest",
        ]
    )
    folders = sorted((tmp_path / "run" / "logs" / "wandb").glob("offline-run-*"))
    # (a folder started in the same second as the first gets a "-1" suffix)
    assert len(folders) == 2 and all(f"-{run_id}" in f.name for f in folders)
    assert read_torch_state(tmp_path / "run" / "checkpoint-4" / "training_state.pt")["wandb_run_id"] == run_id
    assert [step for step, data in logged if "train/loss" in data] == [1, 2, 3, 4]


def test_tensorboard_receives_the_scalars_and_the_sample_grids(tmp_path, tiny_train_args):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run([*tiny_train_args, "--logger", "tensorboard", "--max_train_steps", "2"])
    events = EventAccumulator(str(tmp_path / "run" / "logs" / "train_unconditional"), size_guidance={"images": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2]
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx(
        [m["loss"] for m in read_metrics(tmp_path / "run")]
    )
    (grid,) = events.Images("test_samples")  # the end-of-run sample grid (add_images tiles the batch)
    assert grid.step == 0 and grid.width >= 8 and grid.height >= 8
