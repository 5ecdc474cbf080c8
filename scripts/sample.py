"""Sample images from a trained model: numbered PNGs (resumable), a grid, and optionally a .npz for the metrics.

    python scripts/sample.py --model outputs/run --output_dir samples --num_images 64
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
import dataclasses
import logging
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ddpm.diffusion.samplers import inference_timesteps
from ddpm.diffusion.schedule import TIMESTEP_SPACINGS, NoiseSchedule
from ddpm.evaluation.generate import (
    GRID_NAME,
    IMAGES_FOLDER,
    NPZ_NAME,
    SAMPLERS,
    SETTINGS_NAME,
    Autocast,
    check_settings,
    generate_images,
    pending_indices,
    weights_digest,
    write_grid,
    write_npz,
    write_settings,
)
from ddpm.io.pretrained import load_model
from ddpm.models.unet import UNet
from ddpm.runtime.distributed import DistributedContext, barrier, init_distributed, shutdown

MIXED_PRECISION = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="checkpoint folder, run folder, diffusers folder or Hub id")
    parser.add_argument("--output_dir", required=True, help="where the images go (reused to resume)")
    parser.add_argument("--num_images", type=int, required=True, help="how many images in all")
    parser.add_argument("--batch_size", type=int, default=64, help="images per forward pass, per process")
    parser.add_argument("--sampler", choices=SAMPLERS, default="ddpm")
    parser.add_argument(
        "--num_inference_steps", type=int, default=None, help="default: every training step (ddpm), 50 (ddim)"
    )
    parser.add_argument("--eta", type=float, default=None, help="DDIM noise scale (0: deterministic DDIM; default 0)")
    parser.add_argument(
        "--timestep_spacing", choices=TIMESTEP_SPACINGS, default=None, help="default: the model's scheduler config"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save_npz", action="store_true", help=f"also write OUTPUT_DIR/{NPZ_NAME}")
    parser.add_argument("--mixed_precision", choices=sorted(MIXED_PRECISION), default="no", help="network only")
    parser.add_argument("--compile", action="store_true", help="torch.compile the network")
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
    return args


def build_model(args: argparse.Namespace, device: torch.device) -> tuple[torch.nn.Module, NoiseSchedule, dict]:
    """The network (on ``device``, wrapped for --compile / --mixed_precision), its schedule and the run settings."""
    unet_config, schedule_config, state_dict = load_model(args.model, use_ema=not args.no_ema, cache_dir=args.cache_dir)
    if unet_config.in_channels not in (1, 3, 4):
        raise ValueError(f"{args.model}: the model makes {unet_config.in_channels}-channel images; PNG needs 1, 3 or 4")
    if args.timestep_spacing is not None:
        schedule_config = dataclasses.replace(schedule_config, timestep_spacing=args.timestep_spacing)
    num_steps = args.num_inference_steps or (schedule_config.num_train_timesteps if args.sampler == "ddpm" else 50)
    try:
        inference_timesteps(schedule_config, num_steps)
    except ValueError as e:
        raise ValueError(f"--num_inference_steps: {e}") from None
    unet = UNet(unet_config)
    unet.load_state_dict(state_dict)
    unet.requires_grad_(False).eval().to(device)
    model: torch.nn.Module = torch.compile(unet) if args.compile else unet
    dtype = MIXED_PRECISION[args.mixed_precision]
    if dtype is not None:
        model = Autocast(model, dtype, config=unet_config)
    # Everything that changes the images (and only that): a resumed run must match it.
    settings = {
        "model": str(Path(args.model).resolve()) if Path(args.model).exists() else args.model,
        "weights_sha256": weights_digest(state_dict),
        "unet": unet_config.to_dict(),
        "schedule": schedule_config.to_dict(),
        "sampler": args.sampler,
        "num_inference_steps": num_steps,
        "eta": args.eta,
        "seed": args.seed,
        "mixed_precision": args.mixed_precision,
    }
    return model, NoiseSchedule(schedule_config), settings


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ctx = init_distributed(args.device)
    try:
        run(args, ctx)
    finally:
        shutdown(ctx)


def run(args: argparse.Namespace, ctx: DistributedContext) -> None:
    """Sample this rank's share of the missing images; rank 0 then writes the grid and the .npz."""
    output_dir = Path(args.output_dir)
    images_dir = output_dir / IMAGES_FOLDER
    try:
        model, schedule, settings = build_model(args, ctx.device)
        check_settings(output_dir / SETTINGS_NAME, settings)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}") from e
    images_dir.mkdir(parents=True, exist_ok=True)
    if ctx.is_main and not (output_dir / SETTINGS_NAME).is_file():
        write_settings(output_dir / SETTINGS_NAME, settings)
    pending = pending_indices(images_dir, args.num_images)
    barrier(ctx)  # every rank has listed the folder before any writes to it, so all agree on `pending`
    mine = pending[ctx.rank :: ctx.world_size]

    bar = tqdm(total=len(pending), unit="img", desc="sampling", disable=not ctx.is_main or not pending)

    def on_batch(n: int) -> None:
        # Round-robin shards advance in step, so rank 0's progress times the world size is everyone's.
        if ctx.is_main:
            bar.update(min(n * ctx.world_size, len(pending) - bar.n))

    with bar:
        generate_images(
            model,
            schedule,
            images_dir,
            mine,
            seed=args.seed,
            sampler=args.sampler,
            num_inference_steps=settings["num_inference_steps"],
            eta=args.eta,
            batch_size=args.batch_size,
            on_batch=on_batch,
        )
    barrier(ctx)
    if not ctx.is_main:
        return
    write_grid(images_dir, args.num_images, output_dir / GRID_NAME)
    written = [f"{args.num_images} images in {images_dir} ({len(pending)} new)", f"grid {output_dir / GRID_NAME}"]
    if args.save_npz:
        written.append(f"array {write_npz(images_dir, args.num_images, output_dir / NPZ_NAME)}")
    print("wrote " + "; ".join(written))


if __name__ == "__main__":
    main()
