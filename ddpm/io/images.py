"""Samples as pictures: [-1, 1] tensors to uint8 arrays, grids, PNG files (written atomically)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .files import atomic_write_file

# Grids of images narrower than SMALL_IMAGE px are scaled up (nearest neighbour, whole pixels) to about
# MIN_GRID_WIDTH px: 16 samples of 16 px would otherwise make a grid of 74 px, too small to judge by eye.
SMALL_IMAGE = 64
MIN_GRID_WIDTH = 512


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] ``[B, C, H, W]`` tensors to uint8 ``[B, H, W, C]`` arrays, rounded as ``DDPMPipeline`` does."""
    x = (images.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    return (x * 255).round().astype(np.uint8)


def make_grid(
    images: np.ndarray, nrow: int | None = None, padding: int = 2, min_width: int = MIN_GRID_WIDTH
) -> Image.Image:
    """A PIL image tiling uint8 NHWC ``images`` in rows of ``nrow`` (default: a near-square grid).

    Images narrower than :data:`SMALL_IMAGE` px are first scaled up by the whole factor that makes a row of them at
    least ``min_width`` px wide (nearest neighbour: every pixel a visible square); ``min_width=0`` keeps their size.
    """
    nrow = nrow or math.ceil(math.sqrt(len(images)))
    if images.shape[2] < SMALL_IMAGE and min_width > 0:
        scale = math.ceil(min_width / (min(nrow, len(images)) * images.shape[2]))
        images = images.repeat(scale, axis=1).repeat(scale, axis=2)
    n, h, w, c = images.shape
    rows = math.ceil(n / nrow)
    grid = np.zeros((rows * (h + padding) + padding, nrow * (w + padding) + padding, c), dtype=np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, nrow)
        y, x = padding + r * (h + padding), padding + col * (w + padding)
        grid[y : y + h, x : x + w] = img
    return Image.fromarray(grid[..., 0] if c == 1 else grid)


def save_grid(
    images: torch.Tensor | np.ndarray, path: str | Path, nrow: int | None = None, min_width: int = MIN_GRID_WIDTH
) -> Path:
    """Write a PNG grid of [-1, 1] tensors or uint8 NHWC arrays (small images scaled up, see :func:`make_grid`);
    returns the path."""
    array = to_uint8(images) if isinstance(images, torch.Tensor) else images
    with atomic_write_file(path) as tmp:
        make_grid(array, nrow, min_width=min_width).save(tmp, format="PNG")
    return Path(path)


def save_png(image: np.ndarray, path: str | Path) -> None:
    """Write a uint8 ``[H, W, C]`` image (C = 1, 3 or 4) atomically: a PNG that exists is complete."""
    path = Path(path)
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        raise ValueError(f"{path}: PNG images need 1, 3 or 4 channels, got an image shaped {list(image.shape)}")
    with atomic_write_file(path) as tmp:
        Image.fromarray(image[..., 0] if image.shape[2] == 1 else image).save(tmp, format="PNG")


def read_png(path: str | Path) -> np.ndarray:
    """A PNG as uint8 ``[H, W, C]`` (grayscale gets C = 1)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"missing image {path} (on several nodes, --output_dir must be a shared folder)")
    with Image.open(path) as image:
        array = np.asarray(image)
    return array[..., None] if array.ndim == 2 else array
