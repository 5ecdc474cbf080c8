"""Sample images from a trained model: numbered PNGs (resumable), a grid, and optionally a .npz for the metrics.

    python scripts/sample.py --model outputs/run --output_dir samples --num_images 64
    python scripts/sample.py --model outputs/quickstart --output_dir fast --num_images 512 --sampler sde-dpmsolver++
    python scripts/sample.py --model google/ddpm-cifar10-32 --output_dir cifar --num_images 50000 \\
        --sampler ddim --num_inference_steps 100 --batch_size 256 --save_npz
    torchrun --nproc_per_node 8 scripts/sample.py --model outputs/run/checkpoint-5000 --output_dir s --num_images 50000

``--model``: a training checkpoint folder (EMA weights unless --no_ema), a run's output folder, a diffusers DDPM
folder or a Hub id. Writes ``OUTPUT_DIR/images/000000.png ...``, ``OUTPUT_DIR/grid.png`` (first 64 images) and with
--save_npz ``OUTPUT_DIR/samples.npz`` (uint8 [N, H, W, C] under ``images``). Rerunning the same command skips the
images already written, so a killed run continues; the same --seed gives the same images whatever --batch_size and
the number of processes (up to the network's float rounding, see ``ddpm.evaluation.generate``). Under ``torchrun``
the images
are split across the ranks (a shared --output_dir is needed on several nodes).
"""

from __future__ import annotations

import argparse
import logging

from ddpm.diffusion.sampling import SAMPLERS
from ddpm.diffusion.schedule import TIMESTEP_SPACINGS
from ddpm.evaluation.generate import NPZ_NAME
from ddpm.evaluation.sampling_run import SamplingOptions, prepare_sampling, sample_to_folder
from ddpm.runtime.cli import ScriptParser, user_errors
from ddpm.runtime.distributed import init_distributed, shutdown
from ddpm.runtime.precision import MIXED_PRECISION_CHOICES


def parse_args(argv: list[str] | None = None) -> SamplingOptions:
    parser = ScriptParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="checkpoint folder, run folder, diffusers folder or Hub id")
    parser.add_argument("--output_dir", required=True, help="where the images go (reused to resume)")
    parser.add_argument("--num_images", type=int, required=True, help="how many images in all")
    parser.add_argument("--batch_size", type=int, default=64, help="images per forward pass, per process")
    parser.add_argument("--sampler", choices=SAMPLERS, default="ddpm")
    parser.add_argument(
        "--num_inference_steps",
        type=int,
        default=None,
        help="default: every training step (ddpm), 50 (ddim), 20 (dpmsolver++, sde-dpmsolver++)",
    )
    parser.add_argument("--eta", type=float, default=None, help="DDIM noise scale (0: deterministic DDIM; default 0)")
    parser.add_argument(
        "--timestep_spacing", choices=TIMESTEP_SPACINGS, default=None, help="default: the model's scheduler config"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save_npz", action="store_true", help=f"also write OUTPUT_DIR/{NPZ_NAME}")
    parser.add_argument(
        "--mixed_precision",
        choices=MIXED_PRECISION_CHOICES,
        default="no",
        help="the network's autocast dtype (auto: bf16 where the device computes bfloat16 natively, else no)",
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile the network (CUDA: as a CUDA graph)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--no_ema", action="store_true", help="the live weights of a checkpoint, not its EMA")
    parser.add_argument("--cache_dir", default=None, help="Hugging Face cache folder for Hub ids")
    args = parser.parse_args(argv)
    for flag, minimum in (("num_images", 1), ("batch_size", 1), ("seed", 0), ("num_inference_steps", 1)):
        value = getattr(args, flag)
        if value is not None and value < minimum:
            parser.error(f"--{flag} must be >= {minimum}, got {value}")
    if args.eta is not None and args.sampler != "ddim":
        parser.error("--eta only applies to --sampler ddim")
    if args.eta is not None and args.eta < 0:
        parser.error(f"--eta must be >= 0, got {args.eta}")
    args.eta = args.eta or 0.0
    return SamplingOptions(**vars(args))


def main(argv: list[str] | None = None) -> None:
    options = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with user_errors("sample.py"):  # a missing model, steps it lacks, another run's images in --output_dir
        ctx = init_distributed(options.device)
        try:
            prepared = prepare_sampling(options, ctx.device)
            summary = sample_to_folder(options, prepared, ctx)
            if summary is not None:
                print(summary)
        finally:
            shutdown(ctx)


if __name__ == "__main__":
    main()
