"""Input-pipeline benchmark: a folder of JPEG photographs against its prepared copy (scripts/prepare_dataset.py).

    python scripts/benchmark_data.py --work_dir /tmp/data-bench --sources china.jpg flower.jpg --json data.json

1. The training DataLoader's images/s at --resolution (random flip, per-sample seeds) for each --workers count.
2. With --train: scripts/train.py with a tiny UNet at 16 px (a step small beside decoding, as on a fast GPU) from
   the folder and from its prepared copy: img/s, data_wait, and whether the trained weights are identical.
The folder holds --count 600x500 JPEGs cut from --sources (e.g. the two photographs scikit-learn ships: see the
README), or synthetic photograph-like images without any. The last line printed is the JSON document.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from ddpm.evaluation.benchmark.loader import loader_rates, make_photo_folder, train_rates

TRAIN_SCRIPT = Path(__file__).resolve().parent / "train.py"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--work_dir", type=Path, required=True, help="Where the folders are made (kept, reused)")
    parser.add_argument("--sources", nargs="*", default=[], help="Photographs to cut the JPEGs from")
    parser.add_argument("--count", type=int, default=512, help="JPEGs in the folder")
    parser.add_argument("--resolution", type=int, default=64, help="Training resolution of the loader figures")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DataLoader worker counts")
    parser.add_argument("--batch_size", type=int, default=128, help="Images per loader batch (--train: up to 32)")
    parser.add_argument("--batches", type=int, default=40, help="Timed batches from the prepared copy")
    parser.add_argument("--train", action="store_true", help="Also time scripts/train.py from both (16 px)")
    parser.add_argument("--train_steps", type=int, default=40, help="Optimizer steps of each --train run")
    parser.add_argument("--num_proc", type=int, default=os.cpu_count(), help="Processes preparing the copies")
    parser.add_argument("--json", type=Path, help="Also write the results here")
    args = parser.parse_args(argv)
    if args.count < args.batch_size:
        parser.error(f"--count={args.count}: at least one batch (--batch_size {args.batch_size})")
    photos = make_photo_folder(args.work_dir / "photos", args.count, args.sources)
    document = {
        "loader": loader_rates(
            photos,
            args.work_dir / f"prepared-{args.resolution}",
            resolution=args.resolution,
            workers=args.workers,
            batch_size=args.batch_size,
            batches=args.batches,
            num_proc=args.num_proc,
        )
    }
    for row in document["loader"]["rows"]:
        print(
            f"{row['workers']} workers: folder {row['folder_img_s']:,.0f} img/s, prepared "
            f"{row['prepared_img_s']:,.0f} img/s ({row['speedup']:.1f}x)"
        )
    if args.train:
        document["train"] = train_rates(
            photos,
            args.work_dir / "prepared-16-random",
            TRAIN_SCRIPT,
            args.work_dir,
            steps=args.train_steps,
            batch_size=min(args.batch_size, 32),
        )
        t = document["train"]
        print(
            f"train.py, tiny UNet at 16 px: folder {t['folder']['img_s']:.0f} img/s (data_wait "
            f"{t['folder']['data_wait']:.0%}), prepared {t['prepared']['img_s']:.0f} img/s (data_wait "
            f"{t['prepared']['data_wait']:.0%}): {t['speedup']:.1f}x, identical weights: {t['identical_weights']}"
        )
    if args.json is not None:
        args.json.write_text(json.dumps(document, indent=2))
    print(json.dumps(document))
    return document


if __name__ == "__main__":
    main()
