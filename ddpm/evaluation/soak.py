"""The soak test of resuming (scripts/soak.py): kill training with SIGKILL at random moments, resume each time,
compare bit for bit with an uninterrupted run.

For a while, start the training script (CPU, built-in digits, a tiny UNet with EMA, frequent checkpoints, the newest 2
kept) with ``--resume_from_checkpoint latest`` and SIGKILL it after a random delay, some kills timed to land inside a
checkpoint save; then resume once more to the next checkpoint, train a fresh uninterrupted run to the same step, and
compare the two checkpoints with :func:`~ddpm.io.checkpoint.checkpoint_differences`. The training script's path is
handed in (:class:`SoakSettings`), so the package never imports ``scripts/``.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from ..io.checkpoint import checkpoint_differences, checkpoint_step, list_checkpoints

UNET = {  # a tiny grayscale UNet for the 8x8 digits: ~10 ms per step on one core
    "sample_size": 8,
    "in_channels": 1,
    "out_channels": 1,
    "block_out_channels": [16, 32],
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "attention_head_dim": 8,
}
OPEN_ENDED = 10**7  # --max_train_steps of the killed runs: they never get there


@dataclass(frozen=True)
class SoakSettings:
    """One soak run: scripts/soak.py's flags (see its ``--help``) plus the training script it runs."""

    train_script: Path  # scripts/train.py
    minutes: float = 5.0  # how long to keep killing and resuming
    seed: int = 0  # seed of the kill delays and of the training runs
    min_delay: float = 1.0  # shortest time (s) a run lives before its kill
    max_delay: float = 20.0  # longest time (s) a run lives before its kill
    save_kill_fraction: float = 0.5  # share of the kills that wait for the next checkpoint save and land in it
    checkpointing_steps: int = 10  # checkpoint interval of the runs

    def __post_init__(self) -> None:
        if not self.minutes > 0 or not 0 < self.min_delay <= self.max_delay or self.checkpointing_steps < 1:
            raise ValueError("need --minutes > 0, 0 < --min_delay <= --max_delay and --checkpointing_steps >= 1")
        if not 0 <= self.save_kill_fraction <= 1:
            raise ValueError("--save_kill_fraction must be in [0, 1]")


def train_command(
    train_script: Path, output_dir: Path, unet_json: Path, seed: int, checkpointing_steps: int, steps: int
) -> list[str]:
    """The command line of one soak training run (to ``steps`` steps, into ``output_dir``)."""
    return [
        sys.executable, str(train_script),
        "--dataset_name", "builtin:digits", "--resolution", "8", "--random_flip",
        "--model_config_name_or_path", str(unet_json), "--output_dir", str(output_dir),
        "--train_batch_size", "16", "--use_ema", "--seed", str(seed), "--device", "cpu",
        "--learning_rate", "1e-3", "--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", "20",
        "--checkpointing_steps", str(checkpointing_steps), "--checkpoints_total_limit", "2", "--logging_steps", "10",
        "--save_images_epochs", "100000", "--save_model_epochs", "100000", "--logger", "none",
        "--sampler", "ddim", "--ddpm_num_inference_steps", "10", "--eval_batch_size", "4",
        "--max_train_steps", str(steps),
    ]  # fmt: skip


def wait_for_a_save(output_dir: Path, process: subprocess.Popen, timeout: float) -> None:
    """Return as soon as a checkpoint save's temporary folder exists (or after ``timeout`` s, or if the run ended)."""
    deadline = time.monotonic() + timeout
    while process.poll() is None and time.monotonic() < deadline:
        if output_dir.is_dir() and any(e.name.startswith(".tmp-checkpoint-") for e in os.scandir(output_dir)):
            return
        time.sleep(0.001)  # far shorter than a save, and leaves the core to the training process


def newest_step(output_dir: Path) -> int:
    """The step of the newest complete checkpoint in ``output_dir``; 0 when there is none."""
    found = list_checkpoints(output_dir)
    return checkpoint_step(found[-1]) if found else 0


def run_to_completion(command: list[str], log: IO[str]) -> float:
    """Run ``command`` with its output appended to ``log``; its duration in seconds. A failure raises RuntimeError."""
    start = time.monotonic()
    done = subprocess.run(command, stdout=log, stderr=log)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited with {done.returncode}; see {log.name}")
    return time.monotonic() - start


def soak(settings: SoakSettings, output_dir: Path) -> dict[str, Any]:
    """Kill, resume, finish and compare (see the module docstring) in ``output_dir``; the JSON report.

    The training output is appended to ``output_dir/train.log``; ``report["equal"]`` says whether the resumed run
    ended bit-equal to the uninterrupted one, ``report["differences"]`` what differs otherwise.
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    unet_json = output_dir / "unet.json"
    unet_json.write_text(json.dumps(UNET))
    interrupted, reference = output_dir / "interrupted", output_dir / "reference"
    rng = random.Random(settings.seed)
    kills: list[dict[str, Any]] = []

    def command(folder: Path, steps: int) -> list[str]:
        return train_command(
            settings.train_script, folder, unet_json, settings.seed, settings.checkpointing_steps, steps
        )

    killed = [*command(interrupted, OPEN_ENDED), "--resume_from_checkpoint", "latest"]
    with open(output_dir / "train.log", "a") as log:
        chaos_end = time.monotonic() + settings.minutes * 60
        while time.monotonic() < chaos_end:
            delay = rng.uniform(settings.min_delay, settings.max_delay)
            aim_at_save = rng.random() < settings.save_kill_fraction
            before = newest_step(interrupted)
            process = subprocess.Popen(killed, stdout=log, stderr=log)
            try:
                process.wait(timeout=delay)
                raise RuntimeError(f"a training run exited by itself with {process.returncode}; see {log.name}")
            except subprocess.TimeoutExpired:
                if aim_at_save:
                    wait_for_a_save(interrupted, process, settings.max_delay)
                process.send_signal(signal.SIGKILL)
                process.wait()
            log.write(f"\n===== soak: SIGKILL after {delay:.2f} s{' and a save start' if aim_at_save else ''}\n")
            log.flush()
            during_save = any(interrupted.glob(".tmp-checkpoint-*"))  # only a killed save or rotation leaves one
            kills.append({"delay_s": round(delay, 2), "aimed_at_a_save": aim_at_save, "step_before": before})
            kills[-1].update(step_after=newest_step(interrupted), during_checkpoint_write=during_save)
        steps = newest_step(interrupted) + settings.checkpointing_steps
        resume_s = run_to_completion([*command(interrupted, steps), "--resume_from_checkpoint", "latest"], log)
        reference_s = run_to_completion(command(reference, steps), log)
    differences = checkpoint_differences(interrupted / f"checkpoint-{steps}", reference / f"checkpoint-{steps}")
    return {
        "minutes": settings.minutes,
        "seed": settings.seed,
        "kills": len(kills),
        "kills_during_checkpoint_write": sum(k["during_checkpoint_write"] for k in kills),
        "kills_without_progress": sum(k["step_after"] == k["step_before"] for k in kills),
        "steps": steps,
        "checkpointing_steps": settings.checkpointing_steps,
        "equal": not differences,
        "differences": differences,
        "final_resume_s": round(resume_s, 1),
        "reference_run_s": round(reference_s, 1),
        "kill_log": kills,
    }
