"""Side-by-side speed benchmark: this project's UNet against diffusers' UNet2DModel, same weights, same process.

    python scripts/benchmark.py --quick                                   # seconds, CPU: the CI smoke run
    python scripts/benchmark.py --config all --device cpu --json bench.json
    python scripts/benchmark.py --config ddpm-cifar10-32 --device cuda --dtype bf16 --batch_size 128 \\
        --channels_last --compile --gradient_checkpointing --samplers --e2e --json h100.json

Rows ("variants") are a model plus levers: ``diffusers`` is UNet2DModel run the way train_unconditional.py runs it
(float32 weights, ``torch.autocast`` for bf16/fp16 with a GradScaler for fp16, eager, ``torch.optim.AdamW`` with
its default implementation, betas 0.95/0.999, weight decay 1e-6, gradient clipping at 1.0); ``ours`` is this
project's UNet with exactly that treatment; ``+fused`` uses fused AdamW (what scripts/train.py uses),
``+channels_last``, ``+compile`` (``torch.compile``), ``+cudagraphs`` (compile mode ``reduce-overhead``),
``+gc`` (gradient checkpointing), ``+foreach`` (foreach AdamW). All rows of a run get the same weights, inputs,
device, dtype and batch; their timings are interleaved (each repeat runs every row once, in rotating order) so that
load from other processes hits all rows alike. Figures are medians over the repeats.

- train img/s: forward + loss + backward + clipping + optimizer step (+ zero_grad), ``batch / seconds``.
- sample img/s: one forward pass without autograd (``torch.no_grad``, eval mode), ``batch / seconds``.
- peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` during the phase minus what other rows hold; on CPU,
  each row runs alone in a fresh subprocess (peak RSS only grows within a process), which reports its peak
  resident memory above the RSS it had before building the model (the peak is reset after the model is built,
  via /proc/self/clear_refs, so transient construction memory is not counted); the sampling phase runs first,
  then the training phase, whose figure is the process peak after both (training holds strictly more).
- MFU (CUDA): model FLOPs (``torch.utils.flop_counter``; matmuls, convolutions and attention of the plain model,
  so recomputation by gradient checkpointing does not count) per second over the device's dense peak for the
  dtype (float32 counts against the TF32 peak when cuDNN may use TF32, PyTorch's default for convolutions). The
  FLOPs are this project's UNet's, the same for every row: its upsampling layers do 16 of the 36 multiply-adds of
  diffusers' (``ddpm.models.unet.Upsample``), so a diffusers training step does 6-11% more FLOPs (64 px to the
  quick start's model) than its row's MFU counts.

``--samplers`` times DDIM (50 steps) against DDPM (1000 steps) per image; ``--e2e`` runs scripts/train.py on a
generated image folder and compares its logged img/s with the raw step throughput of the same model and levers.
The last line printed is the JSON document written to ``--json``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ddpm.evaluation.benchmark import (
    ALL_CONFIGS,
    CLOCKS,
    QUICK_CONFIG,
    BenchmarkOptions,
    ReferenceUNet,
    resolve_options,
    run_benchmark,
)
from ddpm.runtime.cli import ScriptParser, user_errors
from ddpm.runtime.precision import DTYPES

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "configs" / "models"
TRAIN_SCRIPT = ROOT / "scripts" / "train.py"

FLAGS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("--config", dict(action="append", help=f"model config: a name in configs/models, a JSON path, or 'all' "
     f"({', '.join(ALL_CONFIGS)}); repeatable. Default: {QUICK_CONFIG} with --quick, else ddpm-cifar10-32")),
    ("--device", dict(choices=("cpu", "cuda"), help="default: cuda when available")),
    ("--dtype", dict(nargs="+", choices=tuple(DTYPES), help="default: bf16 on CUDA, fp32 on CPU")),
    ("--batch_size", dict(type=int, help="default: 2 with --quick, 128 on CUDA, 8 on CPU")),
    ("--quick", dict(action="store_true", help="tiny run (CI): 1 warm-up, 2 repeats, batch 2")),
    ("--json", dict(type=Path, help="also write the results here")),
    ("--variants", dict(help="comma-separated rows, e.g. diffusers,ours+fused+channels_last")),
    ("--channels_last", dict(action="store_true", help="add a channels_last row")),
    ("--compile", dict(action="store_true", help="add a torch.compile row")),
    ("--cudagraphs", dict(action="store_true", help="add a compile row with CUDA graphs")),
    ("--gradient_checkpointing", dict(action="store_true", help="add gradient-checkpointing rows")),
    ("--warmup", dict(type=int, help="warm-up steps per row and phase (default 3, 1 with --quick)")),
    ("--repeats", dict(type=int, help="timed repeats (default 5, 2 with --quick)")),
    ("--min_time", dict(type=float, help="seconds per timed repeat (steps are repeated up to it; default 0.5)")),
    ("--max_grad_norm", dict(type=float, default=1.0, help="gradient clipping, 0 = off")),
    ("--clock", dict(choices=tuple(CLOCKS), default="wall",
                     help="wall time, or this process's CPU time (CPU only: not charged for other processes' load)")),
    ("--threads", dict(type=int, help="torch CPU threads (default: torch's choice)")),
    ("--tf32", dict(action="store_true", help="allow TF32 matmuls and convolutions (CUDA, all rows)")),
    ("--no_memory", dict(dest="memory", action="store_false", help="skip the CPU memory subprocesses")),
    ("--samplers", dict(action="store_true", help="time DDIM 50 steps against DDPM 1000 steps")),
    ("--e2e", dict(action="store_true", help="also time scripts/train.py on a generated image folder")),
    ("--e2e_steps", dict(type=int, help="optimizer steps of the e2e run (default 60, 12 with --quick)")),
    ("--e2e_images", dict(type=int, default=256, help="images in the generated folder")),
    ("--e2e_workers", dict(type=int, help="--dataloader_num_workers of the e2e run (default: 4 on CUDA, 0 on CPU)")),
    ("--peak_tflops", dict(type=float, help="device peak TFLOP/s for MFU (default: built-in table)")),
    ("--json_only", dict(action="store_true", help="print only the JSON document")),
    ("--memory_child", dict(help=argparse.SUPPRESS)),  # the subprocess measuring one row's memory
)  # fmt: skip


def diffusers_reference() -> ReferenceUNet | None:
    """diffusers' UNet2DModel as the benchmark's yardstick, or None when diffusers is not installed (the package never
    imports diffusers: this script hands it in)."""
    try:
        import diffusers
    except ImportError:
        return None

    def build(config: dict[str, Any], gradient_checkpointing: bool) -> diffusers.UNet2DModel:
        model = diffusers.UNet2DModel(**config)
        if gradient_checkpointing:
            model.enable_gradient_checkpointing()
        return model

    return ReferenceUNet(diffusers.__version__, build, prediction=lambda output: output.sample)


def parse_args(argv: list[str] | None) -> BenchmarkOptions:
    """The flags, resolved (defaults that depend on --quick and the device); a bad one exits with a usage error."""
    parser = ScriptParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for flag, kwargs in FLAGS:
        parser.add_argument(flag, **kwargs)
    args = parser.parse_args(argv)
    command = " ".join(["python", "scripts/benchmark.py", *(sys.argv[1:] if argv is None else argv)])
    paths = dict(script=Path(__file__).resolve(), train_script=TRAIN_SCRIPT, config_dir=CONFIG_DIR)
    try:
        return resolve_options(dict(vars(args), command=command, reference=diffusers_reference(), **paths))
    except ValueError as e:
        parser.error(str(e))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns (and prints last) the JSON document."""
    options = parse_args(argv)
    with user_errors("benchmark.py", ValueError):  # a diffusers row without diffusers installed
        return run_benchmark(options)


if __name__ == "__main__":
    main()
