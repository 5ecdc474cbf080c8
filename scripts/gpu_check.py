"""Every check that needs a CUDA GPU, in one run of a few minutes, with one JSON report (CI has no GPU).

    python scripts/gpu_check.py --output_dir gpu-check        # writes gpu-check/report.json, prints a summary

Checks, each timed and recorded as passed / failed (with the end of its output), never stopping at a failure:
  tests       the CUDA tests (pytest -m gpu): no host sync in optimizer steps or sampling loops, the CUDA benchmark
  precision   fp32 / fp16 / bf16 trainings of 6 steps, and their resume from step 3: bit-exact on the same GPU
  ddp         one-process NCCL group through torchrun with --compile --channels_last --gradient_checkpointing
              --gradient_accumulation_steps 2: finishes, no stride warnings, no recompiles after warm-up
  benchmark   scripts/benchmark.py at batch 128 bf16 on ddpm-cifar10-32 and train-unconditional-64, with diffusers
  loader      images/s of a 500x600 JPEG folder and its prepared copy at 64 px, with 4, 8 and 14 workers
Without CUDA it exits at once (status 2).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = ROOT / "configs" / "models" / "quickstart-digits-16.json"
TRAIN = [sys.executable, str(ROOT / "scripts" / "train.py")]


def run(command: list[str], timeout: float, env: dict[str, str] | None = None) -> tuple[bool, str]:
    """Run ``command``; (exit status 0, the end of its output)."""
    try:
        done = subprocess.run(
            command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
        )
    except subprocess.TimeoutExpired as e:
        return False, f"timed out after {timeout} s\n{(e.stderr or '')[-3000:] if isinstance(e.stderr, str) else ''}"
    return done.returncode == 0, (done.stdout + done.stderr)[-4000:]


def tiny_training(output_dir: Path, *extra: str) -> list[str]:
    return [
        *TRAIN, "--dataset_name", "builtin:digits", "--resolution", "16", "--center_crop",
        "--model_config_name_or_path", str(TINY_MODEL), "--output_dir", str(output_dir), "--train_batch_size", "64",
        "--max_train_steps", "6", "--checkpointing_steps", "3", "--save_images_epochs", "100",
        "--save_model_epochs", "100", "--logging_steps", "1", "--logger", "none", "--seed", "0", "--device", "cuda",
        "--dataloader_num_workers", "2", *extra,
    ]  # fmt: skip


def check_tests(out: Path) -> dict:
    ok, tail = run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-rs", "tests"], 300)
    return {"passed": ok and " passed" in tail and "skipped" not in tail.split("\n")[-2], "output": tail}


def check_precision(out: Path) -> dict:
    from ddpm.io.checkpoint import checkpoint_differences

    results = {}
    for precision in ("no", "fp16", "bf16"):
        straight, resumed = out / f"train-{precision}", out / f"resume-{precision}"
        ok, tail = run(tiny_training(straight, "--mixed_precision", precision), 240)
        if ok:
            args = ["--mixed_precision", precision, "--resume_from_checkpoint", str(straight / "checkpoint-3")]
            ok, tail = run(tiny_training(resumed, *args), 240)
        differences = checkpoint_differences(straight / "checkpoint-6", resumed / "checkpoint-6") if ok else None
        results[precision] = {"ran": ok, "bit_exact_resume": differences == [], "differences": differences}
        if not ok:
            results[precision]["output"] = tail
    return {"passed": all(r["bit_exact_resume"] for r in results.values()), **results}


def check_ddp(out: Path) -> dict:
    levers = ["--compile", "--channels_last", "--gradient_checkpointing", "--gradient_accumulation_steps", "2"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", *TRAIN[1:]]
    args = tiny_training(out / "ddp", *levers, "--mixed_precision", "bf16", "--max_train_steps", "12")[2:]
    ok, tail = run([*command, *args], 420, env={"TORCH_LOGS": "recompiles"})
    recompiles = tail.count("Recompiling function")
    stride_warnings = tail.count("stride") + tail.count("Grad strides do not match")
    return {"passed": ok and recompiles == 0 and stride_warnings == 0, "recompiles": recompiles,
            "stride_warnings": stride_warnings, "output": tail}  # fmt: skip


def check_benchmark(out: Path) -> dict:
    report = out / "benchmark.json"
    command = [sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--config", "ddpm-cifar10-32",
               "--config", "train-unconditional-64", "--device", "cuda", "--dtype", "bf16", "--batch_size", "128",
               "--json", str(report), "--json_only"]  # fmt: skip
    ok, tail = run(command, 420)
    return {"passed": ok, "report": json.loads(report.read_text()) if report.is_file() else None, "output": tail}


def check_loader(out: Path) -> dict:
    from ddpm.evaluation.benchmark.loader import loader_rates, make_photo_folder

    photos = make_photo_folder(out / "photos", count=2048)
    return {"passed": True, **loader_rates(photos, out / "photos-64", resolution=64, workers=(4, 8, 14))}


CHECKS = {"tests": check_tests, "precision": check_precision, "ddp": check_ddp, "benchmark": check_benchmark,
          "loader": check_loader}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--output_dir", required=True, help="Where the report and the runs' folders go")
    parser.add_argument("--checks", default=",".join(CHECKS), help=f"Comma-separated subset of {', '.join(CHECKS)}")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(f"{parser.prog}: CUDA is not available here: nothing to check (this script needs a GPU)", file=sys.stderr)
        return 2
    unknown = set(args.checks.split(",")) - set(CHECKS)
    if unknown:
        parser.error(f"--checks: unknown {', '.join(sorted(unknown))}; choose from {', '.join(CHECKS)}")
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "checks": {}}
    for name in args.checks.split(","):
        start = time.perf_counter()
        try:
            result = CHECKS[name](out)
        except Exception as e:  # a broken check is a failed check, reported, and the others still run
            result = {"passed": False, "error": f"{type(e).__name__}: {e}"}
        result["seconds"] = round(time.perf_counter() - start, 1)
        report["checks"][name] = result
        print(f"{name:10s} {'PASSED' if result['passed'] else 'FAILED'}  ({result['seconds']} s)", flush=True)
        (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    failed = [name for name, result in report["checks"].items() if not result["passed"]]
    print(f"report: {out / 'report.json'}; " + (f"FAILED: {', '.join(failed)}" if failed else "all passed"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
