"""torchrun --nproc_per_node=2 on CPU (gloo): same weights on every rank, and the same as one process.

This file is also the worker torchrun starts (see ``__main__`` below): it trains, then each rank writes its own live
weights to ``--worker-out``, which only rank 0's checkpoints would not show.
"""

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import assert_same_tensors, load_script, read_metrics, subprocess_env, wait_for_metrics

ROOT = Path(__file__).resolve().parents[1]


# One intra-op thread for the in-process runs, as the torchrun workers (helpers.subprocess_env): on 2 shared cores.
pytestmark = pytest.mark.usefixtures("one_thread")


def torchrun_command(worker_out: Path, args: list[str]) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    return [*launcher, __file__, "--worker-out", str(worker_out), *args, "--ddp_timeout", "120"]


# Processes summing a batch in another order than one process: equal within 1e-6 (helpers.assert_same_tensors
# leaves out the attention key biases, whose zero true gradient AdamW turns into full steps of rounding noise).
ROUNDING = {"exact": False, "rtol": 0, "atol": 1e-6}


def test_two_processes_equal_one_process_with_the_same_global_batch(tmp_path, make_train_args):
    from ddpm.io.files import read_safetensors
    from ddpm.io.images import read_png
    from ddpm.training.loop import train

    script = load_script("train")
    common = ["--use_ema", "--max_train_steps", "4"]  # global batch 8 = 16 images: 2 steps per epoch, 2 epochs
    ddp_args = [*make_train_args(tmp_path / "ddp"), *common, "--train_batch_size", "2"]
    ddp_args += ["--gradient_accumulation_steps", "2"]
    done = subprocess.run(
        torchrun_command(tmp_path / "ranks", ddp_args),
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-5000:]
    assert "Total train batch size (w. parallel, distributed & accumulation) = 8 (2 x 2 processes x 2)" in done.stderr

    rank0 = read_safetensors(tmp_path / "ranks" / "rank0.safetensors")
    rank1 = read_safetensors(tmp_path / "ranks" / "rank1.safetensors")
    assert_same_tensors(rank0, rank1)

    single = train(script.parse_args([*make_train_args(tmp_path / "single"), *common, "--train_batch_size", "8"]))
    assert_same_tensors(rank0, single.unet.state_dict(), **ROUNDING)
    for name in ("model.safetensors", "ema.safetensors"):
        for step in (2, 4):
            ddp = read_safetensors(tmp_path / "ddp" / f"checkpoint-{step}" / name)
            assert_same_tensors(ddp, read_safetensors(tmp_path / "single" / f"checkpoint-{step}" / name), **ROUNDING)
    assert sorted(p.name for p in (tmp_path / "ddp" / "samples").iterdir()) == ["step_000002.png", "step_000004.png"]
    # The ranks sampled a grid image each (of 4, interleaved): the grid is the one-process run's.
    for grid in ("step_000002.png", "step_000004.png"):
        ddp_grid, single_grid = (read_png(tmp_path / run / "samples" / grid).astype(int) for run in ("ddp", "single"))
        assert np.abs(ddp_grid - single_grid).max() <= 1
    assert (tmp_path / "ddp" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert sorted(p.name for p in (tmp_path / "ddp" / "checkpoint-4").glob("rng_state_*.pt")) == [
        "rng_state_0.pt",
        "rng_state_1.pt",
    ]

    # The 2-process checkpoint resumes on 1 process (same global batch: same step counter) to the same weights.
    resumed_args = [*make_train_args(tmp_path / "resumed"), *common, "--train_batch_size", "8"]
    resumed_args += ["--resume_from_checkpoint", str(tmp_path / "ddp" / "checkpoint-2")]
    resumed = train(script.parse_args(resumed_args))
    assert resumed.global_step == 4
    assert_same_tensors(resumed.unet.state_dict(), single.unet.state_dict(), **ROUNDING)


def test_sigterm_to_torchrun_stops_every_rank_at_the_same_step_with_a_checkpoint(tmp_path, make_train_args):
    from ddpm.io.checkpoint import list_checkpoints
    from ddpm.io.files import read_safetensors

    out = tmp_path / "run"
    args = [*make_train_args(out), "--train_batch_size", "2", "--max_train_steps", "100000"]
    args += ["--checkpointing_steps", "100000", "--save_images_epochs", "100000", "--save_model_epochs", "100000"]
    process = subprocess.Popen(
        torchrun_command(tmp_path / "ranks", args),
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for_metrics(out, 3, [process])
    process.send_signal(signal.SIGTERM)  # torchrun forwards it to both workers
    _, stderr = process.communicate(timeout=300)
    checkpoints = list_checkpoints(out)
    assert len(checkpoints) == 1, stderr[-5000:]
    step = int(checkpoints[0].name.split("-")[1])
    rank0 = read_safetensors(tmp_path / "ranks" / "rank0.safetensors")
    rank1 = read_safetensors(tmp_path / "ranks" / "rank1.safetensors")
    assert_same_tensors(rank0, rank1)  # both ranks stopped after the same step...
    assert_same_tensors(rank0, read_safetensors(checkpoints[0] / "model.safetensors"))  # ...the saved one
    assert f"Stopped by a signal after optimizer step {step}" in stderr


def test_fid_of_two_processes_equals_one_process(tmp_path, make_train_args, random_weights):
    """The FID samples are split across ranks (5 samples: 3 on rank 0, 2 on rank 1) and so is the reference."""
    from ddpm.training.loop import train

    common = ["--use_ema", "--max_train_steps", "2", "--inception_weights", str(random_weights), "--fid_every_steps"]
    common += ["2", "--fid_num_samples", "5", "--fid_inference_steps", "3", "--fid_batch_size", "2"]
    ddp_args = [*make_train_args(tmp_path / "ddp"), *common, "--train_batch_size", "2"]
    done = subprocess.run(
        torchrun_command(tmp_path / "ranks", ddp_args),
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-5000:]
    train(load_script("train").parse_args([*make_train_args(tmp_path / "single"), *common, "--train_batch_size", "4"]))

    def fid(run: str) -> list[dict]:
        return [record for record in read_metrics(tmp_path / run) if "fid" in record]

    (ddp,), (single,) = fid("ddp"), fid("single")
    assert ddp["step"] == single["step"] == 2 and ddp["fid_num_samples"] == single["fid_num_samples"] == 5
    # the two runs' weights differ by float rounding (~1e-7), so do the samples
    assert ddp["fid"] == pytest.approx(single["fid"], rel=1e-4)
    ddp_cache, single_cache = (next((tmp_path / run).glob("fid_reference-*.npz")) for run in ("ddp", "single"))
    assert ddp_cache.name == single_cache.name  # the same key: it names the data, not the layout
    # (statistics of per-rank batches: float32 convolutions round differently at another batch size)
    for key in ("mu", "sigma"):
        np.testing.assert_allclose(np.load(ddp_cache)[key], np.load(single_cache)[key], rtol=0, atol=1e-6)


def test_compiled_step_under_ddp_with_accumulation_and_checkpointing_equals_eager(tmp_path, make_train_args):
    """--compile captures the whole forward pass (noising, the UNet in DDP, the loss) and its backward, under
    no_sync on the first micro-step and with gradient checkpointing: the graphs give the eager run's weights, with
    no recompilation after the first step. The backend is aot_eager (graph capture and autograd without code
    generation: seconds, not minutes, on a CPU); inductor's code is checked against eager in test_benchmark."""
    from ddpm.io.files import read_safetensors

    common = ["--max_train_steps", "3", "--gradient_checkpointing", "--gradient_accumulation_steps", "2"]
    common += ["--train_batch_size", "1"]

    def torchrun(name: str, *extra: str) -> str:
        done = subprocess.run(
            torchrun_command(tmp_path / name, [*make_train_args(tmp_path / f"{name}-run"), *common, *extra]),
            env=subprocess_env(DDPM_TEST_COMPILE_BACKEND="aot_eager", TORCH_LOGS="recompiles"),
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stderr[-5000:]
        return done.stderr

    stderr = torchrun("compiled", "--compile")
    assert stderr.count("compiling training_loss with aot_eager") == 2  # the whole forward pass, on each rank
    assert "Recompiling" not in stderr
    torchrun("eager")
    for rank in (0, 1):
        compiled = read_safetensors(tmp_path / "compiled" / f"rank{rank}.safetensors")
        assert_same_tensors(compiled, read_safetensors(tmp_path / "eager" / f"rank{rank}.safetensors"), **ROUNDING)


def test_one_process_under_torchrun_trains_in_ddp_to_the_weights_of_a_plain_process(tmp_path, make_train_args):
    """torchrun --nproc_per_node=1 forms a process group and wraps the UNet in DDP (so one GPU can check the
    multi-GPU path); an all-reduce over one process changes nothing, so the weights equal a plain process's, bit for
    bit. A plain process has no group (the header line says which)."""
    from ddpm.io.files import read_safetensors

    common = ["--max_train_steps", "2", "--gradient_accumulation_steps", "2", "--train_batch_size", "2"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
    logs = {}
    for name, prefix in (("torchrun", launcher), ("plain", [sys.executable])):
        command = [*prefix, str(ROOT / "scripts" / "train.py"), *make_train_args(tmp_path / name), *common]
        done = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-5000:]
        logs[name] = done.stderr
    assert "; DDP over gloo" in logs["torchrun"] and "DDP over" not in logs["plain"]
    assert "(2 x 1 processes x 2)" in logs["torchrun"]
    weights = {name: read_safetensors(tmp_path / name / "checkpoint-2" / "model.safetensors") for name in logs}
    assert_same_tensors(weights["torchrun"], weights["plain"])


def _worker() -> None:
    """torchrun entry point: train with the given flags, then write this rank's live weights."""
    from ddpm.io.files import write_safetensors
    from ddpm.training.loop import train

    backend = os.environ.get("DDPM_TEST_COMPILE_BACKEND")
    if backend:  # --compile with this backend
        import torch

        compile_ = torch.compile

        def compile_with_backend(model, **kwargs):
            print(f"compiling {model.__name__} with {backend}", file=sys.stderr)
            return compile_(model, **{**kwargs, "backend": backend})

        torch.compile = compile_with_backend

    out = Path(sys.argv[sys.argv.index("--worker-out") + 1])
    argv = sys.argv[1:]
    i = argv.index("--worker-out")
    config = load_script("train").parse_args(argv[:i] + argv[i + 2 :])
    result = train(config)
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(result.unet.state_dict(), out / f"rank{os.environ['RANK']}.safetensors")


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.INFO)
    _worker()
