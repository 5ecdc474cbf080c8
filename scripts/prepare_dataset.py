"""Prepare a training dataset once: decode, convert, resize and crop every image, and write a folder that
scripts/train.py reads without decoding (memory-mapped; see ddpm/data/prepared.py for the format).

    python scripts/prepare_dataset.py --dataset_name huggan/flowers-102-categories --resolution 64 --center_crop \\
        --output_dir data/flowers-64 --num_proc 8
    torchrun --nproc_per_node=4 scripts/train.py --train_data_dir data/flowers-64 --resolution 64 --center_crop ...

The data flags are train.py's, with the same names, defaults and meanings. Training from the prepared folder gives
the same weights, bit for bit, as training from its source with the same flags; --random_flip stays a training flag
(flips are drawn per sample at read time). --resolution, --center_crop, --preserve_input_precision and the channels
must then match the folder's.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import fields

from ddpm.data.datasets import ImageDataset, load_image_dataset
from ddpm.data.prepared import check_output_dir, describe, prepare_dataset
from ddpm.data.transforms import ImageTransform
from ddpm.runtime.cli import ScriptParser, user_errors
from ddpm.training.config import TrainConfig

DATA_FLAGS = (
    "dataset_name",
    "dataset_config_name",
    "train_data_dir",
    "image_column",
    "cache_dir",
    "resolution",
    "center_crop",
    "skip_corrupt_images",
    "preserve_input_precision",
)


def build_parser() -> argparse.ArgumentParser:
    parser = ScriptParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    for f in fields(TrainConfig):
        if f.name in DATA_FLAGS:
            kind = {"resolution": int}.get(f.name, str)
            if isinstance(f.default, bool):
                parser.add_argument(f"--{f.name}", action="store_true", help=f.metadata["help"])
            else:
                parser.add_argument(f"--{f.name}", type=kind, default=f.default, help=f.metadata["help"])
    parser.add_argument(
        "--channels", type=int, choices=(1, 3), default=3, help="Channels of the stored images: the model's in_channels"
    )
    parser.add_argument("--output_dir", required=True, help="The prepared folder to write (replaced atomically)")
    parser.add_argument(
        "--num_proc", type=int, default=os.cpu_count(), help="Processes that decode in parallel (default: every core)"
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.num_proc < 1:
        parser.error(f"--num_proc={args.num_proc}: must be a positive integer")
    if args.resolution < 1:
        parser.error(f"--resolution={args.resolution}: must be a positive integer")
    fixed = ("resolution", "center_crop", "preserve_input_precision")  # in the manifest already
    source = {name: getattr(args, name) for name in DATA_FLAGS if name not in fixed}
    with user_errors("prepare_dataset.py"):  # no such folder or dataset, an unreadable image (named), a full disk
        check_output_dir(args.output_dir)  # before the source is loaded, which may take long
        data, column = load_image_dataset(
            args.dataset_name, args.dataset_config_name, args.train_data_dir, args.cache_dir, args.image_column
        )
        transform = ImageTransform(
            args.resolution, args.channels, args.center_crop, preserve_precision=args.preserve_input_precision
        )
        images = ImageDataset(data, column, transform, skip_corrupt_images=args.skip_corrupt_images)
        manifest = prepare_dataset(images, args.output_dir, source, num_proc=min(args.num_proc, len(images)))
    print(f"Wrote {describe(manifest)} to {args.output_dir}")


if __name__ == "__main__":
    main()
