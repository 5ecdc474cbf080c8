"""SIGTERM/SIGINT: finish the step, save a checkpoint, exit 0; the checkpoint resumes exactly; a 2nd signal kills."""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import assert_same_tensors, read_metrics, subprocess_env, wait_for_metrics

from ddpm.io.checkpoint import list_checkpoints
from ddpm.io.files import read_safetensors

ROOT = Path(__file__).resolve().parents[1]


def start_training(args: list[str]) -> subprocess.Popen:
    """scripts/train.py in a new process (and process group, as a terminal's foreground job), on one thread: two
    of them run at once on the two shared cores."""
    return subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "train.py"), *args],
        cwd=ROOT,
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


@pytest.mark.parametrize(
    "signum, workers",
    [(signal.SIGTERM, 0), (signal.SIGINT, 2)],
    ids=["SIGTERM", "Ctrl-C_with_dataloader_workers"],
)
def test_signal_saves_a_checkpoint_that_resumes_exactly(tmp_path, make_train_args, signum, workers):
    # A constant learning rate makes the total length irrelevant, so the stopped-and-resumed run can be compared
    # with an uninterrupted run of the same number of steps, wherever the signal landed.
    common = ["--lr_scheduler", "constant", "--use_ema", "--checkpointing_steps", "100000"]
    common += ["--save_images_epochs", "100000", "--save_model_epochs", "100000"]
    out = tmp_path / "stopped"
    args = [*make_train_args(out), *common, "--max_train_steps", "100000", "--dataloader_num_workers", str(workers)]
    process = start_training(args)
    wait_for_metrics(out, 3, [process])
    # Ctrl-C signals the whole foreground group: the DataLoader workers too, which must not die of it.
    os.killpg(process.pid, signum)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr[-3000:]
    assert f"{signal.Signals(signum).name} received: finishing the current step" in stderr
    checkpoints = list_checkpoints(out)
    assert len(checkpoints) == 1, checkpoints
    stopped_at = int(checkpoints[0].name.split("-")[1])
    assert stopped_at >= 3 and f"Stopped by a signal after optimizer step {stopped_at}" in stderr

    # Every run in a fresh process, as a user would run them (and independent of this test process's state).
    total = str(stopped_at + 2)
    straight = tmp_path / "straight"
    runs = [
        start_training(
            [*make_train_args(out), *common, "--max_train_steps", total, "--resume_from_checkpoint", "latest"]
        ),
        start_training([*make_train_args(straight), *common, "--max_train_steps", total]),
    ]
    for run in runs:
        _, stderr = run.communicate(timeout=300)
        assert run.returncode == 0, stderr[-3000:]
    for name in ("model.safetensors", "ema.safetensors"):
        assert_same_tensors(
            read_safetensors(out / f"checkpoint-{total}" / name),
            read_safetensors(straight / f"checkpoint-{total}" / name),
        )
    steps = [record["step"] for record in read_metrics(out)]
    assert steps[-2:] == [stopped_at + 1, stopped_at + 2]


def test_a_second_signal_exits_at_once():
    code = textwrap.dedent(
        """
        import os, signal, time
        import ddpm.runtime.distributed as d
        d.DUPLICATE_SIGNAL_WINDOW_S = 0.0
        with d.GracefulStop() as stop:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
            assert stop.requested and stop.signal_name == "SIGTERM"
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
        print("not reached")
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 128 + signal.SIGINT, done.stderr
    assert "received again: exiting now without saving" in done.stderr and "not reached" not in done.stdout


def test_a_forwarded_copy_of_the_signal_is_not_a_second_request():
    code = textwrap.dedent(
        """
        import os, signal, time
        from ddpm.runtime.distributed import GracefulStop
        with GracefulStop() as stop:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGTERM)  # as torchrun forwards it right after the terminal's Ctrl-C
            time.sleep(0.05)
        print("requested", stop.requested)
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "requested True" in done.stdout, done.stderr
