"""Soak test (not in CI): kill training with SIGKILL at random moments, resume each time, end bit-equal.

CI runs one such kill, inside a checkpoint write, and the bit-exact comparison: tests/test_reliability.py::
test_kill_9_during_a_checkpoint_write_keeps_the_previous_one_and_latest_resumes_bit_exactly.

    python scripts/soak.py --minutes 5 --seed 0

1. For --minutes, start scripts/train.py (CPU, built-in digits, a tiny UNet with EMA, checkpoints every
   --checkpointing_steps steps, the newest 2 kept) with --resume_from_checkpoint latest, and SIGKILL it after a random
   delay drawn from --seed: kills land during start-up, training steps, checkpoint writes and rotations alike. A share
   of the kills (--save_kill_fraction) waits, after its delay, for the next checkpoint save to start and lands in it.
2. Resume once more, uninterrupted, to step N = the last checkpoint's step + --checkpointing_steps.
3. Train a fresh, uninterrupted run to step N.
The two checkpoint-N folders must hold the same live weights, EMA weights, optimizer state and data position, bit for
bit. The learning rate is constant after its warm-up, so the killed runs (aimed at an open-ended step count) and the
final runs follow the same schedule.

Prints one summary line and a JSON report (also written to --report); exits 0 when the runs are equal. The training
output is appended to OUTPUT_DIR/train.log.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ddpm.io.checkpoint import checkpoint_step, list_checkpoints, load_training_checkpoint

TRAIN_SCRIPT = Path(__file__).resolve().parent / "train.py"
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
POSITION = ("global_step", "epoch", "step_in_epoch", "samples_seen", "skipped_steps")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1])
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--minutes", type=float, default=5.0, help="how long to keep killing and resuming")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill delays and of the training runs")
    parser.add_argument("--min_delay", type=float, default=1.0, help="shortest time (s) a run lives before its kill")
    parser.add_argument("--max_delay", type=float, default=20.0, help="longest time (s) a run lives before its kill")
    parser.add_argument(
        "--save_kill_fraction",
        type=float,
        default=0.5,
        help="share of the kills that, after their delay, wait for the next checkpoint save to start and land in it",
    )
    parser.add_argument("--checkpointing_steps", type=int, default=10, help="checkpoint interval of the runs")
    parser.add_argument("--output_dir", help="where the runs go (default: a temporary folder, deleted if all is well)")
    parser.add_argument("--report", help="also write the JSON report to this file")
    args = parser.parse_args(argv)
    if not args.minutes > 0 or not 0 < args.min_delay <= args.max_delay or args.checkpointing_steps < 1:
        parser.error("need --minutes > 0, 0 < --min_delay <= --max_delay and --checkpointing_steps >= 1")
    if not 0 <= args.save_kill_fraction <= 1:
        parser.error("--save_kill_fraction must be in [0, 1]")
    return args


def train_command(output_dir: Path, unet_json: Path, seed: int, checkpointing_steps: int, steps: int) -> list[str]:
    return [
        sys.executable, str(TRAIN_SCRIPT),
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
    found = list_checkpoints(output_dir)
    return checkpoint_step(found[-1]) if found else 0


def compare(a: Path, b: Path) -> list[str]:
    """What differs between two checkpoints (empty: bit-equal weights, EMA, optimizer state and position)."""
    ca, cb = load_training_checkpoint(a), load_training_checkpoint(b)
    differences = []
    for what, ta, tb in (("model", ca.model_state, cb.model_state), ("ema", ca.ema_state, cb.ema_state)):
        if ta.keys() != tb.keys():
            differences.append(f"{what}: different keys")
        differences += [f"{what}.{k}" for k in ta if k in tb and not torch.equal(ta[k], tb[k])]
    sa, sb = ca.training_state["optimizer"]["state"], cb.training_state["optimizer"]["state"]
    if sa.keys() != sb.keys():
        differences.append("optimizer: different parameters")
    differences += [
        f"optimizer.{i}.{k}" for i in sa.keys() & sb.keys() for k in sa[i] if not torch.equal(sa[i][k], sb[i][k])
    ]
    differences += [k for k in POSITION if ca.training_state.get(k) != cb.training_state.get(k)]
    return differences


def run_to_completion(command: list[str], log: Any) -> float:
    start = time.monotonic()
    done = subprocess.run(command, stdout=log, stderr=log)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited with {done.returncode}; see {log.name}")
    return time.monotonic() - start


def soak(args: argparse.Namespace, output_dir: Path) -> dict[str, Any]:
    output_dir.mkdir(parents=True, exist_ok=True)
    unet_json = output_dir / "unet.json"
    unet_json.write_text(json.dumps(UNET))
    interrupted, reference = output_dir / "interrupted", output_dir / "reference"
    rng = random.Random(args.seed)
    kills: list[dict[str, Any]] = []
    command = train_command(interrupted, unet_json, args.seed, args.checkpointing_steps, OPEN_ENDED)
    command += ["--resume_from_checkpoint", "latest"]
    with open(output_dir / "train.log", "a") as log:
        chaos_end = time.monotonic() + args.minutes * 60
        while time.monotonic() < chaos_end:
            delay = rng.uniform(args.min_delay, args.max_delay)
            aim_at_save = rng.random() < args.save_kill_fraction
            before = newest_step(interrupted)
            process = subprocess.Popen(command, stdout=log, stderr=log)
            try:
                process.wait(timeout=delay)
                raise RuntimeError(f"a training run exited by itself with {process.returncode}; see {log.name}")
            except subprocess.TimeoutExpired:
                if aim_at_save:
                    wait_for_a_save(interrupted, process, args.max_delay)
                process.send_signal(signal.SIGKILL)
                process.wait()
            log.write(f"\n===== soak: SIGKILL after {delay:.2f} s{' and a save start' if aim_at_save else ''}\n")
            log.flush()
            during_save = any(interrupted.glob(".tmp-checkpoint-*"))  # only a killed save or rotation leaves one
            kills.append({"delay_s": round(delay, 2), "aimed_at_a_save": aim_at_save, "step_before": before})
            kills[-1].update(step_after=newest_step(interrupted), during_checkpoint_write=during_save)
        steps = newest_step(interrupted) + args.checkpointing_steps
        final = train_command(interrupted, unet_json, args.seed, args.checkpointing_steps, steps)
        resume_s = run_to_completion([*final, "--resume_from_checkpoint", "latest"], log)
        fresh = train_command(reference, unet_json, args.seed, args.checkpointing_steps, steps)
        reference_s = run_to_completion(fresh, log)
    differences = compare(interrupted / f"checkpoint-{steps}", reference / f"checkpoint-{steps}")
    return {
        "minutes": args.minutes,
        "seed": args.seed,
        "kills": len(kills),
        "kills_during_checkpoint_write": sum(k["during_checkpoint_write"] for k in kills),
        "kills_without_progress": sum(k["step_after"] == k["step_before"] for k in kills),
        "steps": steps,
        "checkpointing_steps": args.checkpointing_steps,
        "equal": not differences,
        "differences": differences,
        "final_resume_s": round(resume_s, 1),
        "reference_run_s": round(reference_s, 1),
        "kill_log": kills,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # the training processes: one core each, deterministic
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    output_dir = Path(args.output_dir) if args.output_dir else Path(tempfile.mkdtemp(prefix="ddpm-soak-"))
    report = soak(args, output_dir)
    print(
        f"soak: {report['kills']} SIGKILLs survived ({report['kills_during_checkpoint_write']} during a checkpoint "
        f"write, {report['kills_without_progress']} before a new checkpoint), {report['steps']} steps, "
        f"{'bit-equal to' if report['equal'] else 'DIFFERENT from'} an uninterrupted run"
    )
    text = json.dumps(report, indent=2)
    print(text)
    if args.report:
        Path(args.report).write_text(text + "\n")
    if report["equal"] and not args.output_dir:
        shutil.rmtree(output_dir, ignore_errors=True)
    return 0 if report["equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
