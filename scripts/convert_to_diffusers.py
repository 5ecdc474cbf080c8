"""Export a training checkpoint (or a run folder's latest checkpoint) as a diffusers DDPMPipeline folder.

    python scripts/convert_to_diffusers.py --checkpoint runs/cifar/checkpoint-5000 --output_dir ddpm-cifar
    python scripts/convert_to_diffusers.py --checkpoint runs/cifar --output_dir ddpm-cifar --no_ema --dtype fp16

The folder loads with ``DDPMPipeline.from_pretrained(output_dir)`` (``variant="fp16"`` for ``--dtype fp16``).
"""

from __future__ import annotations

import argparse
import logging

from ddpm.io.export import export_checkpoint
from ddpm.runtime.cli import ScriptParser, user_errors
from ddpm.runtime.precision import DTYPES


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ScriptParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a checkpoint-N folder, or a run folder (latest one)")
    parser.add_argument("--output_dir", required=True, help="where to write the pipeline (other content is kept)")
    parser.add_argument("--no_ema", action="store_true", help="export the live weights, not the EMA weights")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default="fp32", help="fp16/bf16 write the fp16/bf16 variant file instead"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with user_errors("convert_to_diffusers.py"):
        out = export_checkpoint(args.checkpoint, args.output_dir, use_ema=not args.no_ema, dtype=DTYPES[args.dtype])
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
