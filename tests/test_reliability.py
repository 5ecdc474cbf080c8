"""The failure-mode catalogue (issue 7): bad input fails early and clearly, faults lose no work, nothing hangs.

One test per failure, its docstring naming the bullet it covers. Bullets already covered elsewhere are listed here
with the test that covers them, so that this file reads as the whole catalogue:

Bad input
- one line, ``train.py: error: ...``, no traceback (also once under torchrun): test_bad_input_stops_with_one_line_and_
  no_traceback, test_bad_input_under_torchrun_is_reported_once_and_every_rank_exits_by_itself,
  test_an_error_every_rank_meets_is_reported_once_under_torchrun
- a second run on a folder in use, a stale lock: test_a_second_run_on_a_folder_in_use_stops_at_once_and_a_dead_runs_
  lock_is_taken_over
- empty dataset: test_data.py::test_empty_and_missing_folders (and GlobalBatchSampler's "fewer than one global
  batch": test_data.py::test_sampler_argument_errors)
- no image column: test_data.py::test_image_column_errors
- grayscale, RGBA, palette and 16-bit images: test_data.py::test_image_modes_from_png_files
- images smaller than the resolution: test_data.py::test_transform_shape_and_range_upscales_small_images
- both or neither of --dataset_name / --train_data_dir: test_train_cli.py::test_invalid_settings_raise_naming_the_flag,
  test_data.py::test_exactly_one_source
- a resolution the UNet cannot downsample: test_train_cli.py::test_invalid_settings_raise_naming_the_flag,
  test_train_cli.py::test_resolution_must_suit_a_custom_model
- unknown keys in --config: test_train_cli.py::test_bad_config_files_are_refused_naming_the_key,
  test_train_cli.py::test_bad_config_file_is_a_usage_error
- resuming with another noise schedule: test_train.py::test_resume_refuses_another_model_or_schedule
Faults
- non-finite losses stop the run after --max_nonfinite_steps in a row, keeping the last good checkpoint:
  test_train.py::test_nonfinite_steps_are_skipped_counted_and_stop_the_run
- a worker killed under ``torchrun --max-restarts``: the restarted workers resume by themselves:
  test_torchrun_restarts_a_killed_worker_and_the_run_resumes_by_itself_bit_exactly
- SIGTERM / SIGINT save and exit cleanly, a second signal exits at once: test_train_signals.py (all three tests),
  test_distributed.py::test_sigterm_to_torchrun_stops_every_rank_at_the_same_step_with_a_checkpoint
- resuming 2 -> 1 processes with the same global batch: test_distributed.py::
  test_two_processes_equal_one_process_with_the_same_global_batch; another global batch on one process:
  test_train.py::test_resume_with_another_global_batch_continues_from_the_samples_seen
Security
- the Hub token is never written to the output folder when pushing:
  test_train.py::test_push_to_hub_creates_the_private_repo_first_then_uploads_each_export

When run as a script, this file is a training worker for torchrun that first records its pid (see ``__main__``).
"""

import errno
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_UNET
from helpers import (
    PUSHED_FILES,
    assert_same_tensors,
    load_script,
    optimizer_tensors,
    read_metrics,
    subprocess_env,
    wait_for_metrics,
)
from PIL import Image

import ddpm.io.checkpoint as checkpoint_module
from ddpm.data.datasets import CorruptImageError
from ddpm.diffusion.schedule import NoiseSchedule
from ddpm.io.checkpoint import list_checkpoints, load_training_checkpoint
from ddpm.io.files import read_safetensors, read_torch_state
from ddpm.io.lock import LOCK_NAME
from ddpm.models.unet import UNet, UNetConfig
from ddpm.training.config import TrainConfig
from ddpm.training.errors import CheckpointSaveError
from ddpm.training.loop import train
from ddpm.training.setup import check_config

ROOT = Path(__file__).resolve().parents[1]
# No sample grids or exports in the middle of subprocess runs: only training steps and checkpoints.
QUIET = ["--save_images_epochs", "100000", "--save_model_epochs", "100000"]


script = load_script("train")


def run(args):
    return train(script.parse_args(args))


def start(command, **env):
    return subprocess.Popen(
        command, cwd=ROOT, env=subprocess_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_all(processes):
    """Kill what still runs; returns each process's stderr."""
    for p in processes:
        if p.poll() is None:
            p.kill()
    return [p.communicate()[1] for p in processes]


# One intra-op thread, as the subprocesses: on 2 shared cores, more threads make these tiny runs ~10x slower.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, make_train_args):
    """A finished 4-step run with EMA (checkpoint-2, checkpoint-4), for the tests that damage a copy of it."""
    out = tmp_path_factory.mktemp("trained") / "run"
    run([*make_train_args(out), "--use_ema"])
    return out


def resume_args(make_train_args, out, *extra):
    return [*make_train_args(out), "--use_ema", "--resume_from_checkpoint", "latest", *extra]


# ---------------------------------------------------------------------------------------------------- bad input


def images_with_a_truncated_file(folder: Path) -> Path:
    """16 random 12x12 PNGs in ``folder``, of which ``img_07.png`` is cut in half."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(16):
        Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(folder / f"img_{i:02d}.png")
    data = (folder / "img_07.png").read_bytes()
    (folder / "img_07.png").write_bytes(data[: len(data) // 2])
    return folder


def test_a_corrupt_image_stops_the_run_naming_the_file_or_is_skipped_and_counted(tmp_path, make_train_args):
    """Data: a truncated image file gives an error naming it, or is skipped and counted with --skip_corrupt_images."""
    folder = images_with_a_truncated_file(tmp_path / "images")
    args = [*make_train_args(tmp_path / "strict"), "--train_data_dir", str(folder), *QUIET]
    with pytest.raises(SystemExit, match=r"^train\.py: error: .*img_07\.png.*--skip_corrupt_images"):
        script.main(args)
    # Met in a DataLoader worker (which ignores SIGTERM): the message, not the worker's traceback, and the process
    # exits instead of waiting at exit for the worker that the error's traceback kept alive.
    workers = [*args, "--overwrite_output_dir", "--dataloader_num_workers", "1"]
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train.py"), *workers],
        capture_output=True, text=True, env=subprocess_env(), timeout=120,
    )  # fmt: skip
    message = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert re.fullmatch(
        r"train\.py: error: Cannot read image file '[^']*img_07\.png' .* --skip_corrupt_images .*", message
    ), message
    with pytest.raises(CorruptImageError, match=r"img_07\.png"):  # the Python API raises it
        run([*args, "--overwrite_output_dir"])

    # 4 steps of 4 images = one epoch: every image is drawn once, the bad one is replaced once.
    lenient = run([*make_train_args(tmp_path / "lenient"), "--train_data_dir", str(folder), "--skip_corrupt_images"])
    assert lenient.global_step == 4
    assert [m["corrupt_images_skipped"] for m in read_metrics(tmp_path / "lenient")][-1] == 1


@pytest.mark.parametrize(("rank", "prefix"), [("0", ""), ("1", "[rank 1] ")])
def test_an_error_a_dataloader_worker_met_is_its_own_line_with_the_rank(monkeypatch, rank, prefix):
    """Bad input: torch re-raises a worker's error with the worker's traceback as its message; the one line is the
    original message, with the rank of the process that met it (under torchrun, not rank 0)."""
    from torch._utils import ExceptionWrapper  # how the DataLoader hands a worker's error to the main process

    from ddpm.runtime.cli import user_errors

    monkeypatch.setenv("RANK", rank)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    try:
        raise CorruptImageError("Cannot read image file 'a.png' (dataset index 3): OSError: image file is truncated")
    except CorruptImageError:  # the worker's side
        worker_error = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(SystemExit) as exit_info, user_errors("train.py", CorruptImageError):
        worker_error.reraise()
    message = "Cannot read image file 'a.png' (dataset index 3): OSError: image file is truncated"
    assert exit_info.value.code == f"train.py: error: {prefix}{message}"


def finish(command, hf_home):
    """Run ``command`` to its end, with no Hugging Face token anywhere (``hf_home``: an empty folder)."""
    env = subprocess_env(HF_HOME=str(hf_home))
    env.pop("HF_TOKEN", None)
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def error_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith("train.py: error: ")]


@pytest.mark.parametrize(
    "case, status, message",
    [
        ("missing --train_data_dir", 1, "--train_data_dir '{out}/nope': no such folder"),
        ("a second run on a run's folder", 1, "--output_dir {out}/run already holds a training run"),
        ("a bad flag value", 2, "argument --lr_scheduler: invalid choice: 'cosine_annealing'"),
        ("--push_to_hub without a token", 1, "no Hugging Face token: pass --hub_token"),
    ],
)
def test_bad_input_stops_with_one_line_and_no_traceback(trained, tmp_path, make_train_args, case, status, message):
    """Bad input, as a user sees it: ``train.py: error: <message naming the flag or file>`` on one line, a non-zero
    exit status (2 for a usage error, as argparse), no Python traceback."""
    out = tmp_path
    args = make_train_args(out / "run")
    if case == "missing --train_data_dir":
        args += ["--train_data_dir", str(out / "nope")]
    elif case == "a second run on a run's folder":
        shutil.copytree(trained, out / "run")
    elif case == "a bad flag value":
        args += ["--lr_scheduler", "cosine_annealing"]
    else:
        args += ["--push_to_hub", "--hub_model_id", "me/tiny"]
    done = finish([sys.executable, str(ROOT / "scripts" / "train.py"), *args], tmp_path / "hf_home")
    assert done.returncode == status, done.stderr[-4000:]
    assert "Traceback" not in done.stderr, done.stderr[-4000:]
    (line,) = error_lines(done.stderr)
    assert message.format(out=out) in line


@pytest.mark.parametrize("script_name", ["train.py", "sample.py"])
def test_debug_shows_the_traceback_of_an_expected_error(tmp_path, script_name):
    """``--debug`` (every script has it) turns the one-line error back into the exception with its traceback."""
    if script_name == "train.py":
        args = ["--output_dir", str(tmp_path / "run"), "--train_data_dir", str(tmp_path / "nope")]
    else:
        args = ["--model", str(tmp_path / "nope"), "--output_dir", str(tmp_path / "out"), "--num_images", "1"]
    command = [sys.executable, str(ROOT / "scripts" / script_name), *args]
    plain = finish(command, tmp_path / "hf_home")
    debug = finish([*command, "--debug"], tmp_path / "hf_home")
    assert plain.returncode == debug.returncode == 1
    assert "Traceback" not in plain.stderr and f"{script_name}: error: " in plain.stderr, plain.stderr[-4000:]
    assert "Traceback (most recent call last)" in debug.stderr, debug.stderr[-4000:]
    assert str(tmp_path / "nope") in debug.stderr.splitlines()[-1]


def test_bad_input_under_torchrun_is_reported_once_and_every_rank_exits_by_itself(tmp_path, make_train_args):
    """Bad input under ``torchrun --nproc_per_node=2`` (--push_to_hub without a token, found by rank 0 before any
    data is read): the one-line error is printed once, every worker exits with status 1 (no worker killed by a signal,
    no worker traceback). torchrun itself then reports the failed workers, with a traceback of its own launcher."""
    args = [*make_train_args(tmp_path / "run"), "--push_to_hub", "--hub_model_id", "me/tiny"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    done = finish([*launcher, str(ROOT / "scripts" / "train.py"), *args], tmp_path / "hf_home")
    assert done.returncode != 0
    (line,) = error_lines(done.stderr)
    assert "no Hugging Face token: pass --hub_token" in line
    assert re.findall(r"exitcode\s+: (-?\d+)", done.stderr) == ["1", "1"], done.stderr[-4000:]  # no signal death
    assert "ddpm/" not in done.stderr and 'train.py", line' not in done.stderr  # no frame of a worker


def test_an_error_one_rank_meets_ends_the_other_with_one_line_under_torchrun(tmp_path, make_train_args):
    """A corrupt image that only one rank reads: that rank prints the error naming the file; the other, whose
    collective finds the peer gone, ends with one line saying so instead of a traceback; both exit with status 1."""
    folder = images_with_a_truncated_file(tmp_path / "images")
    args = [*make_train_args(tmp_path / "run"), "--train_data_dir", str(folder), "--train_batch_size", "2", *QUIET]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    done = finish([*launcher, str(ROOT / "scripts" / "train.py"), *args], tmp_path / "hf_home")
    found, lost = sorted(error_lines(done.stderr), key=lambda line: "another process" in line)
    assert re.match(r"train\.py: error: \[rank \d\] Cannot read image file .*img_07\.png", found), found
    assert "another process left or stopped answering" in lost and "Connection closed by peer" in lost, lost
    # No signal death: torchrun's agent SIGTERMs the survivor within 0.1 s of the first exit, which ignores it.
    assert re.findall(r"exitcode\s+: (-?\d+)", done.stderr) == ["1", "1"], done.stderr[-4000:]
    assert "ddpm/" not in done.stderr and 'train.py", line' not in done.stderr  # no frame of a worker


def test_an_error_every_rank_meets_is_reported_once_under_torchrun(tmp_path):
    """Bad input that every rank finds by itself (sample.py's --model, checked by each rank): one line from rank 0,
    the other rank exits quietly with status 1 (it sees rank 0 leave on an error too)."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    args = ["--model", str(tmp_path / "nope"), "--output_dir", str(tmp_path / "out"), "--num_images", "2"]
    done = finish([*launcher, str(ROOT / "scripts" / "sample.py"), *args, "--device", "cpu"], tmp_path / "hf")
    lines = [line for line in done.stderr.splitlines() if line.startswith("sample.py: error: ")]
    assert lines == [
        f"sample.py: error: {tmp_path / 'nope'}: no such folder (and not a Hub repo id of the form owner/name)"
    ]
    assert re.findall(r"exitcode\s+: (-?\d+)", done.stderr) == ["1", "1"], done.stderr[-4000:]


def test_a_second_run_on_a_folder_in_use_stops_at_once_and_a_dead_runs_lock_is_taken_over(
    tmp_path, make_train_args, caplog
):
    """One writer per folder: a run started on an --output_dir that a running training holds stops at once with one
    line naming the other run's process; once that run is gone (SIGKILL: its lock stays behind), the next run takes
    the stale lock over with a warning, and releases it when it ends."""
    out = tmp_path / "run"
    train_py = [sys.executable, str(ROOT / "scripts" / "train.py")]
    first = start([*train_py, *make_train_args(out), "--max_train_steps", "100000", "--checkpointing_steps", "100000"])
    try:
        wait_for_metrics(out, 1, [first])
        second = finish([*train_py, *make_train_args(out), "--resume_from_checkpoint", "latest"], tmp_path / "hf")
        assert first.poll() is None  # untouched by the second
    finally:
        kill_all([first])
    assert second.returncode == 1 and "Traceback" not in second.stderr, second.stderr[-4000:]
    (line,) = error_lines(second.stderr)
    assert f"--output_dir {out} is in use by another training run (pid {first.pid} on {socket.gethostname()}" in line
    assert not list(out.glob("checkpoint-*"))  # the second wrote nothing (the first saves no checkpoint)

    assert (out / LOCK_NAME).is_file()  # left behind by the killed run
    with caplog.at_level(logging.WARNING):
        run([*make_train_args(out), "--resume_from_checkpoint", "latest", "--max_train_steps", "2"])
    assert f"taking over the lock of a run that is no longer running (pid {first.pid} on" in caplog.text
    assert not (out / LOCK_NAME).exists()


POSITIVE_INTEGERS = [
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
    "max_train_steps",
    "checkpoints_total_limit",
]
POSITIVE_RATES = ["learning_rate", "adam_epsilon", "ema_inv_gamma", "ema_power", "max_grad_norm", "lr_power"]


@pytest.mark.parametrize(
    "name, value",
    [(n, v) for n in POSITIVE_INTEGERS for v in (0, -1)] + [(n, v) for n in POSITIVE_RATES for v in (0.0, -1e-4)],
)
def test_every_size_step_and_rate_must_be_positive(name, value):
    """Flags: non-positive sizes, steps or rates are refused when the config is built, naming the flag."""
    with pytest.raises(ValueError, match=rf"^--{name}={value!r}: must be"):
        TrainConfig(dataset_name="builtin:digits", **{name: value})


def test_fp16_on_a_device_without_fp16_autocast_is_refused_up_front(monkeypatch):
    """Flags: --mixed_precision fp16 on a device without fp16 support fails when the config is built."""
    check_config(TrainConfig(dataset_name="builtin:digits", mixed_precision="fp16", device="cpu"))  # supported here
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda *args: False)  # as a build / device without fp16
    with pytest.raises(ValueError, match=r"--mixed_precision=fp16: this PyTorch cannot autocast to torch.float16"):
        check_config(TrainConfig(dataset_name="builtin:digits", mixed_precision="fp16", device="cpu"))


@pytest.mark.parametrize(
    "name, damage, message",
    [
        ("model.safetensors", "truncate", "corrupt or truncated weights file .*model.safetensors"),
        ("ema.safetensors", "truncate", "corrupt or truncated weights file .*ema.safetensors"),
        ("training_state.pt", "truncate", "cannot load .*training_state.pt"),
        ("rng_state_0.pt", "garbage", "cannot load .*rng_state_0.pt"),
        ("config.json", "garbage", "cannot read .*config.json"),
        (
            "model.safetensors",
            "delete",
            r"checkpoint-4 is not a complete training checkpoint \(it lacks model.safetensors\)",
        ),
    ],
)
def test_a_damaged_checkpoint_file_is_named(trained, tmp_path, make_train_args, name, damage, message):
    """Checkpoints: a truncated, corrupt or missing file gives an error naming the file, before any training."""
    out = tmp_path / "run"
    shutil.copytree(trained / "checkpoint-4", out / "checkpoint-4")
    target = out / "checkpoint-4" / name
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    elif damage == "garbage":
        target.write_bytes(b"\x00garbage{")
    else:
        target.unlink()
    explicit = [*make_train_args(out), "--use_ema", "--resume_from_checkpoint", str(out / "checkpoint-4")]
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        run(explicit)
    assert not (out / "logs").exists()  # failed before the run started


def test_latest_skips_incomplete_checkpoints_and_clears_the_remains_of_a_crash(
    trained, tmp_path, make_train_args, caplog
):
    """Checkpoints: ``--resume_from_checkpoint latest`` skips incomplete checkpoint folders (warning about each),
    deletes the temporary folder of an interrupted save and cuts a half-written metrics line."""
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    shutil.copytree(out / "checkpoint-4", out / "checkpoint-6")
    (out / "checkpoint-6" / "training_state.pt").unlink()
    shutil.copytree(out / "checkpoint-4", out / "checkpoint-8")
    (out / "checkpoint-8" / "config.json").unlink()
    interrupted = out / ".tmp-checkpoint-10-x1y2z3"
    interrupted.mkdir()
    (interrupted / "model.safetensors").write_bytes(b"half")
    with open(out / "logs" / "metrics.jsonl", "a") as f:
        f.write('{"step": 9, "lo')  # a kill in the middle of a metrics line
    with caplog.at_level(logging.INFO):
        result = run(resume_args(make_train_args, out, "--max_train_steps", "5"))
    assert result.global_step == 5
    assert "skipping the incomplete checkpoint" in caplog.text
    assert "checkpoint-8 (it lacks config.json)" in caplog.text
    assert "checkpoint-6 (it lacks training_state.pt)" in caplog.text
    assert f"resumed from {out / 'checkpoint-4'} at optimizer step 4" in caplog.text
    assert not interrupted.exists() and "remains of an interrupted checkpoint save" in caplog.text
    assert [m["step"] for m in read_metrics(out)] == [1, 2, 3, 4, 5]


def test_a_checkpoint_set_aside_by_a_save_killed_between_its_renames_is_restored(
    trained, tmp_path, make_train_args, caplog
):
    """Checkpoints: a save that replaces ``checkpoint-4`` (a run resumed from an older checkpoint reaches step 4
    again) renames the old folder aside, then the new one in; killed between the two renames it leaves no
    ``checkpoint-4``: the next run puts the old one back, so ``latest`` resumes from step 4, not step 2."""
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    (out / "checkpoint-4").rename(out / ".old-checkpoint-4-12345")  # the first rename of the replacing save
    shutil.copytree(out / "checkpoint-2", out / ".tmp-checkpoint-4-abcdef")  # its new folder, not renamed in
    with caplog.at_level(logging.INFO):
        result = run(resume_args(make_train_args, out, "--max_train_steps", "5"))
    assert f"resumed from {out / 'checkpoint-4'} at optimizer step 4" in caplog.text
    assert result.global_step == 5
    assert not list(out.glob(".old-*")) and not list(out.glob(".tmp-*"))


def test_resuming_another_architecture_lists_the_differing_keys(trained, tmp_path, make_train_args):
    """Checkpoints: resuming with a different model config is refused, listing every differing key."""
    other = tmp_path / "other_unet.json"
    other.write_text(json.dumps({**TINY_UNET, "block_out_channels": [16, 16], "layers_per_block": 2}))
    out = tmp_path / "run"
    shutil.copytree(trained / "checkpoint-4", out / "checkpoint-4")
    args = resume_args(make_train_args, out, "--model_config_name_or_path", str(other))
    expected = (
        "the UNet config differs (block_out_channels: checkpoint [16, 32], now [16, 16]; "
        "layers_per_block: checkpoint 1, now 2)"
    )
    with pytest.raises(ValueError, match=re.escape(expected)):
        run(args)


# ---------------------------------------------------------------------------------------------------- faults


def test_kill_9_during_a_checkpoint_write_keeps_the_previous_one_and_latest_resumes_bit_exactly(
    tmp_path, make_train_args, caplog
):
    """Faults: ``kill -9`` of a real training process while it writes a checkpoint leaves the previous checkpoint
    intact, and ``--resume_from_checkpoint latest`` resumes from it (and removes the half-written folder) to the same
    live weights, EMA weights, optimizer state and data position, bit for bit, as a run never interrupted."""
    out = tmp_path / "run"
    # Batch 1: 16 steps per epoch, so the checkpoint resumed from lies inside an epoch and the position in the epoch's
    # data order matters. A constant LR: the open-ended killed run and the short runs below follow the same schedule.
    common = ["--train_batch_size", "1", "--lr_scheduler", "constant", "--use_ema", "--checkpointing_steps", "1"]
    args = [*make_train_args(out), *common, *QUIET, "--resume_from_checkpoint", "latest"]
    steps_per_epoch = 16
    train_py = [sys.executable, str(ROOT / "scripts" / "train.py")]
    for _attempt in range(5):  # the save must still be running when the signal lands: retry if it had just ended
        process = start([*train_py, *args, "--max_train_steps", "100000"])
        try:
            deadline = time.monotonic() + 300
            while process.poll() is None and time.monotonic() < deadline:
                if list_checkpoints(out) and any(e.name.startswith(".tmp-checkpoint-") for e in os.scandir(out)):
                    os.kill(process.pid, signal.SIGKILL)  # inside a save that follows a complete one
                    break
                time.sleep(0.001)  # far shorter than a save: the kill still lands inside one
        finally:
            (stderr,) = kill_all([process])
        assert process.returncode == -signal.SIGKILL, stderr[-4000:]
        inside_an_epoch = load_training_checkpoint(list_checkpoints(out)[-1]).step % steps_per_epoch != 0
        if list(out.glob(".tmp-checkpoint-*")) and inside_an_epoch:
            break
    else:
        pytest.fail("no kill landed inside a checkpoint write (after a checkpoint inside an epoch) in 5 attempts")

    previous = list_checkpoints(out)[-1]
    step = load_training_checkpoint(previous).step  # intact: every file loads
    end = str(step + 2)
    with caplog.at_level(logging.INFO):
        result = run([*args, "--max_train_steps", end])
    assert f"resumed from {previous} at optimizer step {step}" in caplog.text
    assert result.global_step == step + 2
    assert not list(out.glob(".tmp-*"))

    straight = tmp_path / "straight"
    run([*make_train_args(straight), *common, *QUIET, "--max_train_steps", end])
    resumed, uninterrupted = out / f"checkpoint-{end}", straight / f"checkpoint-{end}"
    for name in ("model.safetensors", "ema.safetensors"):
        assert_same_tensors(read_safetensors(resumed / name), read_safetensors(uninterrupted / name))
    assert_same_tensors(optimizer_tensors(resumed), optimizer_tensors(uninterrupted))
    position = ("global_step", "epoch", "step_in_epoch", "samples_seen", "skipped_steps", "lr_scheduler")
    a, b = (read_torch_state(folder / "training_state.pt") for folder in (resumed, uninterrupted))
    assert {k: a[k] for k in position} == {k: b[k] for k in position}
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    assert a["ema"] == b["ema"]  # the EMA's step count and decay settings


def test_disk_full_while_saving_is_a_clear_error_and_loses_nothing(tmp_path, tiny_train_args, monkeypatch):
    """Faults: ENOSPC while saving gives a clear error, the previous checkpoint stays intact, the temporary folder
    is removed, and ``latest`` resumes from the previous checkpoint."""
    real_write = checkpoint_module.write_safetensors

    def disk_full_at_step_4(tensors, path):
        if Path(path).parent.name.startswith(".tmp-checkpoint-4-"):
            Path(path).write_bytes(b"\x00" * 100)  # what fits before the disk fills up
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real_write(tensors, path)

    monkeypatch.setattr(checkpoint_module, "write_safetensors", disk_full_at_step_4)
    with pytest.raises(SystemExit) as exit_info:
        script.main(tiny_train_args)
    out = tmp_path / "run"
    message = str(exit_info.value.code)
    assert message.startswith("train.py: error: ") and "\n" not in message
    assert "could not save" in message and "checkpoint-4 (the disk is full): [Errno 28]" in message
    assert f"the previous checkpoint {out / 'checkpoint-2'} is intact; free some space" in message
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2"]
    assert not list(out.glob(".tmp-*"))
    assert load_training_checkpoint(out / "checkpoint-2").step == 2

    monkeypatch.setattr(checkpoint_module, "write_safetensors", real_write)  # space freed
    assert run([*tiny_train_args, "--resume_from_checkpoint", "latest"]).global_step == 4
    monkeypatch.setattr(checkpoint_module, "write_safetensors", disk_full_at_step_4)
    with pytest.raises(CheckpointSaveError):  # what the Python API raises
        run([*tiny_train_args, "--overwrite_output_dir"])


@pytest.mark.parametrize(
    ("refused", "limit_in_models", "export_refused"),
    [("model.safetensors", 0.5, True), ("training_state.pt", 1.5, False)],
)
def test_a_write_the_os_refuses_is_the_clear_error_whichever_file_it_hits(
    tmp_path, tiny_train_args, refused, limit_in_models, export_refused
):
    """Faults: a write the operating system refuses, for real (a file-size limit, which fails a write as a full disk
    does), gives train.py's one-line "could not save" error whichever writer of the checkpoint it hits (safetensors
    and torch.save report such a failure in their own exception types), and no checkpoint folder is left."""
    model_bytes = 4 * UNet(UNetConfig.from_dict(TINY_UNET)).num_parameters()
    limit = int(limit_in_models * model_bytes)  # training_state.pt holds two AdamW moments: about 2x the model

    def limit_file_size() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    args = [*tiny_train_args, "--max_train_steps", "2", *QUIET]
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train.py"), *args],
        capture_output=True, text=True, env=subprocess_env(), preexec_fn=limit_file_size, timeout=300,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert "Traceback" not in result.stderr
    assert line.startswith("train.py: error: could not save ") and "[Errno 27] File too large" in line, line
    assert refused in line and "no earlier checkpoint exists; fix the cause, then resume" in line
    # when the final export (the size of the model) fails as well, the checkpoint's error is the one raised (it
    # says how to resume) and the export's is logged
    assert ("the last export write failed too: could not save the pipeline to" in result.stderr) == export_refused
    out = tmp_path / "run"
    assert list_checkpoints(out) == [] and not list(out.glob(".tmp-*"))


@pytest.mark.parametrize(
    "rust_message",
    [
        "Error while serializing: I/O error: No space left on device (os error 28)",  # safetensors >= 0.5
        'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left" })',  # 0.4
    ],
)
def test_a_failed_safetensors_write_is_the_oserror_it_is(tmp_path, monkeypatch, rust_message):
    """Faults: safetensors reports a failed write as a SafetensorError whose message alone holds the OS error, in a
    format that changed between releases: both give the OSError (errno, file) the save messages are built from."""
    from safetensors import SafetensorError

    import ddpm.io.files as files_module

    def full_disk(*args, **kwargs):
        raise SafetensorError(rust_message)

    monkeypatch.setattr(files_module, "save_file", full_disk)
    with pytest.raises(OSError) as failure:
        files_module.write_safetensors({"w": torch.zeros(2)}, tmp_path / "w.safetensors")
    assert failure.value.errno == errno.ENOSPC and failure.value.filename == str(tmp_path / "w.safetensors")


def test_fp16_overflow_steps_skipped_by_the_grad_scaler_are_counted(tmp_path, tiny_train_args, monkeypatch):
    """Faults (non-finite loss): fp16 steps whose gradients overflow are skipped by the GradScaler, counted, and leave
    the weights alone; fewer than --max_nonfinite_steps in a row do not stop the run."""
    original = NoiseSchedule.training_loss
    calls = []

    def overflowing(self, *args, **kwargs):
        calls.append(1)
        loss = original(self, *args, **kwargs)
        return loss * 1e30 if len(calls) in (3, 4) else loss  # fp16 gradients of steps 3 and 4 overflow

    monkeypatch.setattr(NoiseSchedule, "training_loss", overflowing)
    run([*tiny_train_args, "--mixed_precision", "fp16", "--max_train_steps", "6", "--max_nonfinite_steps", "3"])
    records = read_metrics(tmp_path / "run")
    assert [m["skipped_steps"] for m in records] == [0, 0, 1, 2, 2, 2]
    assert [m["loss_scale"] for m in records] == [2.0**16, 2.0**16, 2.0**15, 2.0**14, 2.0**14, 2.0**14]
    two, four = (read_safetensors(tmp_path / "run" / f"checkpoint-{s}" / "model.safetensors") for s in (2, 4))
    assert all(torch.equal(two[k], four[k]) for k in two)  # the skipped steps changed nothing
    assert read_torch_state(tmp_path / "run" / "checkpoint-6" / "training_state.pt")["skipped_steps"] == 2


def test_a_killed_rank_makes_torchrun_fail_fast(tmp_path, make_train_args):
    """Faults: a rank killed with SIGKILL makes the other exit with an error within a bounded time (torchrun)."""
    out = tmp_path / "run"
    args = [*make_train_args(out), "--train_batch_size", "2", "--max_train_steps", "100000"]
    args += ["--checkpointing_steps", "100000", *QUIET, "--ddp_timeout", "600"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    torchrun = start([*launcher, __file__, str(tmp_path / "pids"), *args])
    try:
        wait_for_metrics(out, 3, [torchrun])
        os.kill(int((tmp_path / "pids" / "rank1.pid").read_text()), signal.SIGKILL)
        killed_at = time.monotonic()
        _, stderr = torchrun.communicate(timeout=120)
    finally:
        kill_all([torchrun])
    elapsed = time.monotonic() - killed_at
    assert torchrun.returncode != 0 and elapsed < 60, (elapsed, stderr[-4000:])
    assert "Signal 9 (SIGKILL) received by PID" in stderr


def test_torchrun_restarts_a_killed_worker_and_the_run_resumes_by_itself_bit_exactly(tmp_path, make_train_args):
    """Faults: under ``torchrun --max-restarts 1``, a worker killed with SIGKILL mid-run makes torchrun restart the
    workers; with no resume flag they continue from the latest complete checkpoint and end bit-equal (live and EMA
    weights, optimizer state, data position) to an uninterrupted run of the same command."""
    # 2 processes x batch 2 = 4 steps per epoch: the checkpoints resumed from lie inside epochs as well as at their end
    common = ["--train_batch_size", "2", "--lr_scheduler", "constant", "--use_ema", "--checkpointing_steps", "2"]
    common += [*QUIET, "--max_train_steps", "30", "--ddp_timeout", "60"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    out = tmp_path / "restarted"
    worker = [__file__, str(tmp_path / "pids"), *make_train_args(out), *common]
    torchrun = start([*launcher, "--max-restarts", "1", *worker])
    try:
        wait_for_metrics(out, 5, [torchrun])  # checkpoint-2 and checkpoint-4 are written
        os.kill(int((tmp_path / "pids" / "rank1.pid").read_text()), signal.SIGKILL)
        _, stderr = torchrun.communicate(timeout=300)
    finally:
        kill_all([torchrun])
    assert torchrun.returncode == 0, stderr[-4000:]
    match = re.search(r"torchrun restarted the workers \(restart 1\): resuming from (\S+)", stderr)
    assert match and match.group(1) != "the", stderr[-4000:]
    resumed_step = load_training_checkpoint(match.group(1)).step
    assert 2 <= resumed_step < 30

    straight = tmp_path / "straight"
    done = start([*launcher, str(ROOT / "scripts" / "train.py"), *make_train_args(straight), *common])
    assert done.wait(timeout=600) == 0, done.communicate()[1][-4000:]
    a_dir, b_dir = out / "checkpoint-30", straight / "checkpoint-30"
    for name in ("model.safetensors", "ema.safetensors"):
        assert_same_tensors(read_safetensors(a_dir / name), read_safetensors(b_dir / name))
    assert_same_tensors(optimizer_tensors(a_dir), optimizer_tensors(b_dir))
    position = ("global_step", "epoch", "step_in_epoch", "samples_seen", "skipped_steps", "lr_scheduler", "ema")
    a, b = (read_torch_state(folder / "training_state.pt") for folder in (a_dir, b_dir))
    assert {k: a[k] for k in position} == {k: b[k] for k in position}


def test_a_hung_rank_fails_the_others_after_ddp_timeout(tmp_path, make_train_args):
    """Faults: without torchrun's agent (processes started by hand, as a scheduler may), a rank that stops
    responding (SIGSTOP) makes the other fail after --ddp_timeout seconds instead of hanging."""
    out = tmp_path / "run"
    timeout = 20  # room for a slow start on a busy machine: the timeout also bounds the start-up collectives
    args = [*make_train_args(out), "--train_batch_size", "2", "--max_train_steps", "100000"]
    args += ["--checkpointing_steps", "100000", *QUIET, "--ddp_timeout", str(timeout)]
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}
    ranks = [
        start([sys.executable, str(ROOT / "scripts" / "train.py"), *args], RANK=str(r), LOCAL_RANK=str(r), **env)
        for r in range(2)
    ]
    try:
        wait_for_metrics(out, 3, ranks)
        ranks[1].send_signal(signal.SIGSTOP)
        stopped_at = time.monotonic()
        _, stderr = ranks[0].communicate(timeout=timeout + 120)
        elapsed = time.monotonic() - stopped_at
    finally:
        kill_all(ranks)  # SIGKILL also ends a stopped process
    assert ranks[0].returncode != 0, stderr[-4000:]
    assert elapsed < timeout + 45, elapsed  # the timeout, plus whatever rank 0 was doing alone
    # gloo reports its timeout in one of two words, depending on whether the wait or the connection noticed first
    timed_out = (f"Timed out waiting {timeout * 1000}ms", "Application timeout caused pair closure")
    assert any(message in stderr for message in timed_out), stderr[-4000:]


def test_two_torchrun_nodes_train_together_like_one_process(tmp_path, make_train_args, caplog):
    """Faults / multi-node: two torchrun agents with --nnodes=2 on 127.0.0.1 (c10d rendezvous) train together and
    agree with one process of the same global batch. Then resuming their checkpoint on 1 process with another global
    batch continues from the samples seen (the documented semantics; 2 -> 1 processes)."""
    common = ["--use_ema", "--max_train_steps", "4"]  # global batch 8 = 16 images: 2 steps per epoch
    nodes_out = tmp_path / "nodes"
    port = free_port()
    agents = [
        start(
            [
                *[sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node}"],
                *["--nproc_per_node=1", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}"],
                *[f"--rdzv_id=reliability-{os.getpid()}", str(ROOT / "scripts" / "train.py")],
                *make_train_args(nodes_out),
                *common,
                *["--train_batch_size", "4", "--ddp_timeout", "300"],
            ]
        )
        for node in range(2)
    ]
    try:
        outputs = [agent.communicate(timeout=600) for agent in agents]
    finally:
        kill_all(agents)
    for agent, (_, stderr) in zip(agents, outputs, strict=True):
        assert agent.returncode == 0, stderr[-4000:]
    assert "= 8 (4 x 2 processes x 1)" in "".join(stderr for _, stderr in outputs)

    run([*make_train_args(tmp_path / "single"), *common, "--train_batch_size", "8"])
    for name in ("model.safetensors", "ema.safetensors"):
        nodes = read_safetensors(nodes_out / "checkpoint-4" / name)
        single = read_safetensors(tmp_path / "single" / "checkpoint-4" / name)
        assert_same_tensors(nodes, single, exact=False, rtol=0, atol=1e-6)  # to_k.bias left out: see the helper

    # 2 processes x batch 4 -> 1 process x batch 4: checkpoint-2 has seen 16 samples, i.e. 4 steps of the new batch.
    resumed_args = [*make_train_args(tmp_path / "resumed"), "--use_ema", "--train_batch_size", "4"]
    resumed_args += ["--max_train_steps", "6", "--resume_from_checkpoint", str(nodes_out / "checkpoint-2")]
    with caplog.at_level(logging.WARNING):
        resumed = run(resumed_args)
    assert "global batch changed from 8 to 4: resuming after 16 samples seen, at optimizer step 4" in caplog.text
    assert resumed.global_step == 6
    state = read_torch_state(tmp_path / "resumed" / "checkpoint-6" / "training_state.pt")
    assert (state["samples_seen"], state["world_size"], state["global_batch_size"]) == (24, 1, 4)


# ---------------------------------------------------------------------------------------------------- security


class Payload:
    """Runs code when unpickled: what a malicious ``training_state.pt`` would hold."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


@pytest.mark.parametrize("name", ["training_state.pt", "rng_state_0.pt"])
def test_a_malicious_pickle_in_a_checkpoint_is_refused_without_running_it(trained, tmp_path, make_train_args, name):
    """Security: only plain tensors and containers are unpickled (``weights_only=True``); a checkpoint holding a
    pickled object with ``__reduce__`` is refused naming the file, and the payload never runs."""
    out = tmp_path / "run"
    shutil.copytree(trained / "checkpoint-4", out / "checkpoint-4")
    marker = tmp_path / "pwned"
    torch.save({"optimizer": Payload(marker)}, out / "checkpoint-4" / name)
    with pytest.raises(ValueError, match=rf"cannot load .*{name}.*"):
        run(resume_args(make_train_args, out))
    assert not marker.exists()
    torch.load(out / "checkpoint-4" / name, weights_only=False)  # control: the payload is live when unpickled
    assert marker.read_text() == "pwned"


def test_the_hub_token_never_reaches_logs_configs_cards_metrics_or_checkpoints(
    tmp_path, tiny_train_args, fake_hub, capfd, caplog
):
    """Security: a Hub token given on the command line appears nowhere in the run's output folder (checkpoint
    configs, TensorBoard events, metrics, the exported model card) nor in its console output and logs; it goes to the
    Hub client only, and the push sends the pipeline files only (no checkpoints, logs or optimizer state)."""
    token = "FakeToken-reliability-5f0c2d7e9a"  # not hf_-shaped: only the --hub_token rule can scrub it
    args = [*tiny_train_args, "--logger", "tensorboard", "--push_to_hub", "--hub_model_id", "me/tiny"]
    with caplog.at_level(logging.DEBUG):
        assert script.main([*args, f"--hub_token={token}"]) == 0
    out = tmp_path / "run"
    assert (out / "README.md").is_file() and list((out / "logs").rglob("events.out.tfevents.*"))
    assert "--hub_token=***" in (out / "README.md").read_text()  # the command is recorded, scrubbed
    for path in out.rglob("*"):
        assert not path.is_file() or token.encode() not in path.read_bytes(), path
    console = capfd.readouterr()
    assert token not in console.out + console.err + caplog.text
    assert fake_hub.tokens and all(t == token for t in fake_hub.tokens)
    assert fake_hub.uploads == [PUSHED_FILES]


if __name__ == "__main__":  # a torchrun worker: record this rank's pid for the test, then be scripts/train.py
    pid_dir = Path(sys.argv[1])
    pid_dir.mkdir(parents=True, exist_ok=True)
    (pid_dir / f"rank{os.environ['RANK']}.pid").write_text(str(os.getpid()))
    sys.exit(script.main(sys.argv[2:]))


@pytest.mark.parametrize("world_size, one_line", [("2", True), ("1", False)])
def test_a_lost_peer_is_one_line_only_when_there_is_another_process(monkeypatch, world_size, one_line):
    """A collective that finds its peer gone ends the process with one line; alone under torchrun
    (--nproc_per_node=1, a process group of one) there is no peer to lose, so such an error is a bug: traceback."""
    from ddpm.runtime import cli

    monkeypatch.setenv("WORLD_SIZE", world_size)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    monkeypatch.setattr(cli, "leave_by_the_error", lambda: None)
    error = RuntimeError("Connection closed by peer [127.0.0.1]:29500")
    expected = SystemExit if one_line else RuntimeError
    with pytest.raises(expected) as raised, cli.user_errors("train.py"):
        raise error
    if one_line:
        assert "another process left or stopped answering" in str(raised.value.code)
    else:
        assert raised.value is error
