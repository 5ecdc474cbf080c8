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
import shutil
import sys
import tempfile
from pathlib import Path

from ddpm.evaluation.soak import SoakSettings, soak
from ddpm.runtime.cli import ScriptParser

TRAIN_SCRIPT = Path(__file__).resolve().parent / "train.py"


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, SoakSettings]:
    """The flags, and the soak settings they make; a bad one exits with a usage error."""
    parser = ScriptParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1])
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument(
        "--minutes", type=float, default=SoakSettings.minutes, help="how long to keep killing and resuming"
    )
    parser.add_argument(
        "--seed", type=int, default=SoakSettings.seed, help="seed of the kill delays and of the training runs"
    )
    parser.add_argument(
        "--min_delay", type=float, default=SoakSettings.min_delay, help="shortest time (s) a run lives before its kill"
    )
    parser.add_argument(
        "--max_delay", type=float, default=SoakSettings.max_delay, help="longest time (s) a run lives before its kill"
    )
    parser.add_argument(
        "--save_kill_fraction",
        type=float,
        default=SoakSettings.save_kill_fraction,
        help="share of the kills that, after their delay, wait for the next checkpoint save to start and land in it",
    )
    parser.add_argument(
        "--checkpointing_steps",
        type=int,
        default=SoakSettings.checkpointing_steps,
        help="checkpoint interval of the runs",
    )
    parser.add_argument("--output_dir", help="where the runs go (default: a temporary folder, deleted if all is well)")
    parser.add_argument("--report", help="also write the JSON report to this file")
    args = parser.parse_args(argv)
    try:
        settings = SoakSettings(
            train_script=TRAIN_SCRIPT,
            minutes=args.minutes,
            seed=args.seed,
            min_delay=args.min_delay,
            max_delay=args.max_delay,
            save_kill_fraction=args.save_kill_fraction,
            checkpointing_steps=args.checkpointing_steps,
        )
    except ValueError as e:
        parser.error(str(e))
    return args, settings


def main(argv: list[str] | None = None) -> int:
    args, settings = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # the training processes: one core each, deterministic
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    output_dir = Path(args.output_dir) if args.output_dir else Path(tempfile.mkdtemp(prefix="ddpm-soak-"))
    report = soak(settings, output_dir)
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
