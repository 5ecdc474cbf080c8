"""FID, Inception Score and KID of generated images against a reference set.

    python scripts/evaluate.py --samples outputs/samples --reference builtin:digits
    python scripts/evaluate.py --reference path/to/real_images --save_stats real_stats.npz   # statistics only
    python scripts/evaluate.py --samples samples.npz --reference real_stats.npz --no_kid

Sources: an image folder (searched recursively), a .npz with uint8 ``images`` [N, H, W(, C)], a dataset
(``builtin:NAME[:SPLIT]``, a ``save_to_disk`` folder or a Hub id) or a statistics .npz from ``--save_stats``.
The last line printed is a JSON object with every figure (null for those not computed).
"""

from __future__ import annotations

import argparse
import json
import logging

import torch

from ddpm.evaluation.inception import load_inception
from ddpm.evaluation.metrics import KID_SUBSET_SIZE, check_stats_path, evaluate
from ddpm.runtime.cli import ScriptParser, user_errors


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ScriptParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", help="generated images (omit to only compute --save_stats of the reference)")
    parser.add_argument("--reference", required=True, help="real images, a dataset or a statistics .npz")
    parser.add_argument("--inception_weights", help="FID Inception weights (.pth or .safetensors); default: search")
    parser.add_argument("--save_stats", help="write the reference statistics to this .npz (reusable as --reference)")
    parser.add_argument("--batch_size", type=int, default=50)
    parser.add_argument("--num_workers", type=int, default=0, help="image decoding worker processes")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--kid_subset_size", type=int, default=KID_SUBSET_SIZE)
    parser.add_argument("--no_is", action="store_true", help="skip the Inception Score")
    parser.add_argument("--no_kid", action="store_true", help="skip KID")
    parser.add_argument("--no_progress", action="store_true", help="hide the progress bars")
    args = parser.parse_args(argv)
    if args.samples is None and args.save_stats is None:
        parser.error("give --samples (to compare) or --save_stats (to only compute reference statistics)")
    for flag in ("batch_size", "kid_subset_size"):
        if getattr(args, flag) < (2 if flag == "kid_subset_size" else 1):
            parser.error(f"--{flag} is too small: {getattr(args, flag)}")
    if args.num_workers < 0:
        parser.error(f"--num_workers must be >= 0, got {args.num_workers}")
    if args.save_stats is not None:  # refused now, not after the features
        try:
            check_stats_path(args.save_stats)
        except ValueError as e:
            parser.error(f"--save_stats: {e}")
    return args


def main(argv: list[str] | None = None) -> dict:
    """Run the evaluation; returns the figures printed on the last line."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    model = load_inception(args.inception_weights, device=args.device)
    result = evaluate(
        args.samples,
        args.reference,
        model,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        compute_is=not args.no_is,
        compute_kid=not args.no_kid,
        kid_subset_size=args.kid_subset_size,
        save_stats=args.save_stats,
        progress=not args.no_progress,
    )
    print(f"reference images: {result['num_reference']}")
    if result["num_samples"] is not None:
        print(f"sample images:    {result['num_samples']}")
        print(f"FID:              {result['fid']:.4f}")
    if result["is_mean"] is not None:
        print(f"Inception Score:  {result['is_mean']:.4f} ± {result['is_std']:.4f}")
    if result["kid_mean"] is not None:
        print(f"KID:              {result['kid_mean']:.6f} ± {result['kid_std']:.6f}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    with user_errors("evaluate.py"):  # missing weights or images, a bad source: one line
        main()
