"""Every check that needs a CUDA GPU, in one run of a few minutes, with one JSON report (CI has no GPU).

    python scripts/gpu_check.py --output_dir gpu-check        # writes gpu-check/report.json, prints a summary

Checks, each timed and recorded as passed / failed (with the end of its output), never stopping at a failure, all
within --budget_s (a check the budget no longer covers is reported as not run, a failure):
  environment the packages the others import (ddpm, torch, datasets, diffusers, ...): their versions, or what is missing
  tests       the CUDA tests (pytest -m gpu): no host sync in optimizer steps or sampling loops, the CUDA benchmark
  precision   fp32 / fp16 / bf16 trainings of 6 steps with --deterministic, and their resume from step 3: bit-exact
  ddp         torchrun with one process (a real NCCL group and DDP) with --compile --channels_last
              --gradient_checkpointing --gradient_accumulation_steps 2: finishes in DDP, no stride warning, no
              recompile after the warm-up steps
  benchmark   scripts/benchmark.py at batch 128 bf16 on ddpm-cifar10-32 and train-unconditional-64, against diffusers
  loader      images/s of a 500x600 JPEG folder and its prepared copy at 64 px, with 4, 8 and 14 workers (figures)
Without CUDA it exits at once (status 2). It needs no install of this project (it puts this checkout first on the
path, its subprocesses too). For a GPU machine that cannot reach a package registry but has torch, carry the wheels
of the packages such an image lacks, at the versions installed here, fetched beforehand on a machine that can:

    python scripts/gpu_check.py --download_wheels .whl                     # here: ~8 MB of pure-Python wheels
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site && \
        python3 scripts/gpu_check.py --output_dir "$OUT/gpu-check"         # there
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from importlib import import_module
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's ddpm, installed or not
TINY_MODEL = ROOT / "configs" / "models" / "quickstart-digits-16.json"
TRAIN = [sys.executable, str(ROOT / "scripts" / "train.py")]
PACKAGES = ("ddpm", "torch", "torchvision", "datasets", "diffusers", "safetensors", "einops", "huggingface_hub")
# The packages a GPU image with torch (and numpy, pandas, pyarrow, ...) may lack: --download_wheels fetches them.
CARRIED = ("datasets", "diffusers", "huggingface_hub", "fsspec", "dill", "multiprocess", "importlib_metadata",
           "lazy-importer", "httpx2", "httpcore2", "truststore")  # fmt: skip
# What DDP prints when a gradient's layout differs from its bucket's (each step would then copy it).
STRIDE_WARNING = "Grad strides do not match bucket view strides"
BENCHMARK_CONFIGS = ("ddpm-cifar10-32", "train-unconditional-64")  # the CIFAR-10 paper model and the guide's 64 px
TERM_GRACE_S = 15.0  # after a timeout: how long SIGTERM may take (torchrun's workers checkpoint) before SIGKILL


class Budget:
    """The run's time budget: each command gets what is left of it, at most its own timeout."""

    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux /proc), found before any is killed: torchrun starts its workers in new
    sessions, so killing torchrun's group would not reach them."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def _kill(*pids: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run(command: list[str], timeout: float, budget: Budget, env: dict[str, str] | None = None) -> tuple[bool, str]:
    """Run ``command`` with at most ``timeout`` seconds (less if the budget has less); (exit status 0, its whole
    output, stdout and stderr in the order written). On a timeout the command and every process it started end."""
    if budget.left() < 10:
        return False, "not run: the time budget (--budget_s) is spent"
    timeout = min(timeout, budget.left())
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    offline = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}  # the GPU machine reaches no network
    env = {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1", **offline, **(env or {})}
    process = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True
    )
    try:
        output, _ = process.communicate(timeout=timeout)
        return process.returncode == 0, output
    except subprocess.TimeoutExpired:
        below = _descendants(process.pid)
        process.send_signal(signal.SIGTERM)  # torchrun forwards it to its workers, which checkpoint and stop
        try:
            output, _ = process.communicate(timeout=TERM_GRACE_S)  # EOF once every process holding its output has ended
        except subprocess.TimeoutExpired:
            _kill_group(process.pid)  # its own process group (it leads a new session), reparented members too
            _kill(*below)
            try:
                output, _ = process.communicate(timeout=TERM_GRACE_S)
            except subprocess.TimeoutExpired:  # something unknown still holds its output: give up on the rest
                output = ""
        else:
            _kill(*below)  # whatever outlived the SIGTERM (a worker in its own session would keep the GPU)
        return False, f"{output}\ntimed out after {timeout:.0f} s"


def tail(output: str) -> str:
    return output[-4000:]


def tiny_training(output_dir: Path, *extra: str) -> list[str]:
    shutil.rmtree(output_dir, ignore_errors=True)  # a rerun into the same --output_dir starts afresh
    return [
        *TRAIN, "--dataset_name", "builtin:digits", "--resolution", "16", "--center_crop",
        "--model_config_name_or_path", str(TINY_MODEL), "--output_dir", str(output_dir), "--train_batch_size", "64",
        "--max_train_steps", "6", "--checkpointing_steps", "3", "--save_images_epochs", "100",
        "--save_model_epochs", "100", "--sampler", "ddim", "--ddpm_num_inference_steps", "10",
        "--eval_batch_size", "16", "--logging_steps", "1", "--logger", "none", "--seed", "0", "--device", "cuda",
        "--dataloader_num_workers", "2", *extra,
    ]  # fmt: skip


def check_environment(out: Path, budget: Budget) -> dict:
    versions, missing = {}, {}
    for name in PACKAGES:
        try:
            versions[name] = getattr(import_module(name), "__version__", "?")
        except Exception as e:  # ImportError, or a package that fails to import on this machine
            missing[name] = f"{type(e).__name__}: {e}"
    return {"passed": not missing, "versions": versions, "missing": missing}


def check_tests(out: Path, budget: Budget) -> dict:
    files = [str(ROOT / "tests" / name) for name in ("test_gpu.py", "test_benchmark.py")]  # the files with gpu marks
    ok, output = run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-rs", "-p", "no:cacheprovider", *files], 240,
                     budget)  # fmt: skip
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|skipped|errors?)\b", output[-400:])}
    passed = ok and counts.get("passed", 0) > 0 and not counts.get("skipped") and not counts.get("failed")
    return {"passed": passed, "counts": counts, "output": tail(output)}


def check_precision(out: Path, budget: Budget) -> dict:
    from ddpm.io.checkpoint import checkpoint_differences

    results = {}
    for precision in ("no", "fp16", "bf16"):
        straight, resumed = out / f"train-{precision}", out / f"resume-{precision}"
        flags = ["--mixed_precision", precision, "--deterministic"]
        ok, output = run(tiny_training(straight, *flags), 120, budget)
        if ok:
            ok, output = run(tiny_training(resumed, *flags, "--resume_from_checkpoint", str(straight / "checkpoint-3")),
                             120, budget)  # fmt: skip
        differences = checkpoint_differences(straight / "checkpoint-6", resumed / "checkpoint-6") if ok else None
        results[precision] = {"ran": ok, "bit_exact_resume": differences == [], "differences": differences}
        if not ok or differences:
            results[precision]["output"] = tail(output)
    return {"passed": all(r["bit_exact_resume"] for r in results.values()), **results}


def check_ddp(out: Path, budget: Budget) -> dict:
    levers = ["--compile", "--channels_last", "--gradient_checkpointing", "--gradient_accumulation_steps", "2"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", *TRAIN[1:]]
    args = tiny_training(out / "ddp", *levers, "--mixed_precision", "bf16", "--max_train_steps", "10")[2:]
    ok, output = run([*command, *args], 300, budget, env={"TORCH_LOGS": "recompiles"})
    in_ddp = "; DDP over nccl" in output
    warmed = re.search(r"step 2/10\b", output)  # the status line of step 2: compilation of both micro-steps is done
    after_warmup = output[warmed.end() :] if warmed else ""
    recompiles = after_warmup.count("Recompiling function")
    stride_warnings = output.count(STRIDE_WARNING)
    passed = ok and in_ddp and warmed is not None and recompiles == 0 and stride_warnings == 0
    return {"passed": passed, "ran_in_ddp": in_ddp, "recompiles_after_step_2": recompiles,
            "recompiles_in_all": output.count("Recompiling function"), "stride_warnings": stride_warnings,
            "output": tail(output)}  # fmt: skip


def check_benchmark(out: Path, budget: Budget) -> dict:
    """One benchmark.py command per config, so that a config that overruns its share of the time leaves the other's
    figures."""
    rows = "diffusers,ours+fused,ours+fused+channels_last,ours+fused+channels_last+compile"
    summary, outputs = {}, {}
    for config in BENCHMARK_CONFIGS:
        report = out / f"benchmark-{config}.json"
        report.unlink(missing_ok=True)
        command = [sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--config", config, "--device", "cuda",
                   "--dtype", "bf16", "--batch_size", "128", "--variants", rows, "--warmup", "3", "--repeats", "3",
                   "--json", str(report), "--json_only"]  # fmt: skip
        ok, output = run(command, 200, budget)
        document = json.loads(report.read_text()) if ok and report.is_file() else None
        if document is None:
            outputs[config] = tail(output)
            continue
        summary |= {
            f"{result['config']} {row['variant']}": {
                phase: {key: row[phase].get(key) for key in ("img_s", "mfu", "peak_mem_mb")} | {
                    "x_diffusers": row["speedup_vs_diffusers"][phase]} for phase in ("train", "sample")
            }
            for result in document["results"] for row in result["rows"]
        }  # fmt: skip
    return {"passed": not outputs, "summary": summary, "failed_output": outputs}


# The loader check's body, run as a command so that the time budget covers it like the others.
LOADER = """
import json, sys
from pathlib import Path
from ddpm.evaluation.benchmark.loader import loader_rates, make_photo_folder
out = Path(sys.argv[1])
photos = make_photo_folder(out / "photos", count=1024)
rates = loader_rates(photos, out / "photos-64", resolution=64, workers=(4, 8, 14))
(out / "loader.json").write_text(json.dumps(rates))
"""


def check_loader(out: Path, budget: Budget) -> dict:
    report = out / "loader.json"
    report.unlink(missing_ok=True)
    ok, output = run([sys.executable, "-c", LOADER, str(out)], 240, budget)
    rates = json.loads(report.read_text()) if ok and report.is_file() else None
    measured = rates is not None and all(v > 0 for row in rates["rows"] for k, v in row.items() if k.endswith("img_s"))
    return {"passed": measured, "rates": rates, "output": tail(output)}


def download_wheels(folder: Path, python_version: str = "3.12") -> int:
    """pip download (no dependencies: the list is the closure) of :data:`CARRIED` at this machine's versions."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        pins = [f"{name}=={version(name)}" for name in CARRIED]
    except PackageNotFoundError as e:
        print(f"gpu_check.py: error: --download_wheels: {e.name} is not installed here (pip install -e '.[test]')")
        return 2
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
               python_version, "--implementation", "cp", "--platform", "manylinux2014_x86_64", "-d", str(folder),
               *pins]  # fmt: skip
    return subprocess.run(command).returncode


CHECKS = {"environment": check_environment, "tests": check_tests, "precision": check_precision, "ddp": check_ddp,
          "benchmark": check_benchmark, "loader": check_loader}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    description, epilog = __doc__.split("\n\n", 1)
    parser = argparse.ArgumentParser(prog=Path(__file__).name, description=description, epilog=epilog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--output_dir", help="Where the report and the runs' folders go (required to check)")
    parser.add_argument("--checks", default=",".join(CHECKS), help=f"Comma-separated subset of {', '.join(CHECKS)}")
    parser.add_argument("--budget_s", type=float, default=470, help="Seconds for all the checks together")
    parser.add_argument("--download_wheels", metavar="DIR", help="Instead of checking: fetch the wheels to carry")
    args = parser.parse_args(argv)
    if args.download_wheels:
        return download_wheels(Path(args.download_wheels))
    if not args.output_dir:
        parser.error("--output_dir is required")
    unknown = set(args.checks.split(",")) - set(CHECKS)
    if unknown:
        parser.error(f"--checks: unknown {', '.join(sorted(unknown))}; choose from {', '.join(CHECKS)}")
    if not torch.cuda.is_available():
        print(f"{parser.prog}: CUDA is not available here: nothing to check (this script needs a GPU)", file=sys.stderr)
        return 2
    out = Path(args.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    budget = Budget(args.budget_s)
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "checks": {}}
    for name in args.checks.split(","):
        start = time.perf_counter()
        if budget.left() < 10:
            result = {"passed": False, "error": "not run: the time budget (--budget_s) is spent"}
        else:
            try:
                result = CHECKS[name](out, budget)
            except Exception as e:  # a broken check is a failed check, reported, and the others still run
                result = {"passed": False, "error": f"{type(e).__name__}: {e}"}
        result["seconds"] = round(time.perf_counter() - start, 1)
        report["checks"][name] = result
        print(f"{name:12s} {'PASSED' if result['passed'] else 'FAILED'}  ({result['seconds']} s)", flush=True)
        (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    failed = [name for name, result in report["checks"].items() if not result["passed"]]
    print(f"report: {out / 'report.json'}; " + (f"FAILED: {', '.join(failed)}" if failed else "all passed"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
