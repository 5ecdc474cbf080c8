"""Score generated digits with a small digit classifier (built-in digits dataset only; see ddpm/evaluation/digits.py).

    python scripts/sample.py --model outputs/quickstart --output_dir outputs/quickstart/eval --num_images 512 \\
        --sampler ddim --save_npz
    python scripts/evaluate_digits.py --samples outputs/quickstart/eval/samples.npz
    python scripts/evaluate_digits.py --real_floor          # 512 real training digits: the best to hope for

--samples: a folder of images (searched recursively) or a .npz with uint8 ``images`` [N, H, W(, C)]; RGB is
converted to grayscale, other sizes resized to 16x16. Compare sets of the same size (512 by convention): the
classifier FID falls as the number of samples grows. The last line printed is a JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import logging
import math

from ddpm.evaluation.digits import (
    CONFIDENCE_THRESHOLD,
    DEFAULT_CACHE_DIR,
    FLOOR_NUM_IMAGES,
    classifier_accuracy,
    evaluate_digits,
    load_classifier,
    read_samples,
    real_floor,
)
from ddpm.runtime.cli import ScriptParser, user_errors


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ScriptParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--samples", help="generated digits: an image folder or a .npz with uint8 'images'")
    what.add_argument("--real_floor", action="store_true", help="score real training digits instead of samples")
    parser.add_argument(
        "--num_images",
        type=int,
        default=None,
        help=f"use the first N samples (--real_floor: N random training digits, default {FLOOR_NUM_IMAGES})",
    )
    parser.add_argument("--seed", type=int, default=0, help="--real_floor: which training digits are drawn")
    parser.add_argument("--cache_dir", default=DEFAULT_CACHE_DIR, help="where the classifier's weights are cached")
    parser.add_argument("--retrain", action="store_true", help="train the classifier again (and re-cache it)")
    args = parser.parse_args(argv)
    if args.num_images is not None and args.num_images < 2:
        parser.error(f"--num_images must be >= 2, got {args.num_images}")
    return args


def main(argv: list[str] | None = None) -> dict:
    """Run the evaluation; returns the figures printed on the last line."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    classifier = load_classifier(args.cache_dir, retrain=args.retrain)
    if args.real_floor:
        result = real_floor(args.num_images or FLOOR_NUM_IMAGES, seed=args.seed, classifier=classifier)
        source = f"{result['num_images']} real training digits (seed {args.seed})"
    else:
        with user_errors("evaluate_digits.py", ValueError):
            images = read_samples(args.samples, args.num_images)
            result = evaluate_digits(images, classifier)
        source = args.samples
    result["classifier_test_accuracy"] = classifier_accuracy(classifier)
    histogram = " ".join(f"{d}:{n}" for d, n in enumerate(result["class_histogram"]))
    print(f"Digits evaluation of {source} ({result['num_images']} images) against the 360 held-out test digits")
    print(f"  classifier FID     {result['classifier_fid']:.3f}")
    print(f"  class entropy      {result['class_entropy']:.4f} nats (uniform over 10 digits: {math.log(10):.4f})")
    print(f"  confident share    {result['confident_share']:.4f} (top class probability > {CONFIDENCE_THRESHOLD})")
    print(f"  class histogram    {histogram}")
    print(f"  background level   {result['background_level']:.4f} (darkest quarter of pixels; 0 = black)")
    print(f"  chroma             {result['chroma']:.4f} (mean RGB spread; 0 = gray)")
    print(f"  (classifier accuracy on the test digits: {result['classifier_test_accuracy']:.4f})")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
