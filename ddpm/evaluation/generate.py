"""Generate many images reproducibly: one noise stream per image, resumable PNG folders, work split over ranks.

Image ``i`` of a run with seed ``s`` draws its initial noise and every step's noise from its own ``torch.Generator``
seeded by :func:`image_seed` ``(s, i)`` (CPU generators, so the noise is the same on every device). Its noise thus
does not depend on the batch it lands in, on the batch size or on the number of processes, and a run that was
killed can continue where it stopped. What can still differ is float rounding inside the network: CPU and GPU
kernels may round differently for different batch sizes, which moves pixels by a level now and then (chaotic
samplers on random networks, e.g. DDIM with ``eta=0``, amplify it). Within one batch size, images are
bit-for-bit independent of which other images share their batch.

Layout of an output folder::

    images/000000.png ...   one PNG per image, written atomically (a PNG present is a finished image)
    sampling.json           the settings the images were made with; a resumed run must use the same
    grid.png                the first (up to) 64 images
    samples.npz             optional: uint8 [N, H, W, C] under the key ``images`` (for ``scripts/evaluate.py``)
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..diffusion.sampling import sample
from ..diffusion.schedule import NoiseSchedule
from ..io.files import atomic_write_file, read_json, write_json
from ..io.images import read_png, save_grid, save_png, to_uint8
from ..models.ema import EMA
from ..models.unet import UNet
from ..runtime.distributed import DistributedContext, broadcast_module

IMAGES_FOLDER = "images"
SETTINGS_NAME = "sampling.json"
GRID_NAME = "grid.png"
NPZ_NAME = "samples.npz"
GRID_MAX_IMAGES = 64
# Settings kept for the record only: they do not change the images.
_INFORMATIVE_SETTINGS = ("model",)


def image_seed(seed: int, index: int) -> int:
    """The 64-bit seed of image ``index`` of a run seeded ``seed`` (a hash: nearby runs share no streams)."""
    if seed < 0 or index < 0:
        raise ValueError(f"seed={seed} and index={index} must be >= 0")
    return int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0])


def image_generators(seed: int, indices: Sequence[int], device: str | torch.device = "cpu") -> list[torch.Generator]:
    """One generator per image on ``device``, seeded by :func:`image_seed`. CPU generators give the same images on
    every device; generators on the sampling device draw the noise there (no copy to it at each step), but their
    numbers are the device's own."""
    return [torch.Generator(device).manual_seed(image_seed(seed, i)) for i in indices]


def share_sampling_weights(ctx: DistributedContext, unet: UNet, ema: EMA | None, into: UNet) -> None:
    """Every rank at once: ``into`` receives rank 0's EMA weights, or ``unet``'s own without EMA (only rank 0 keeps
    an EMA), so that every rank can sample its share of a set of images with the same weights."""
    if ctx.is_main:
        with torch.no_grad():
            if ema is not None:
                ema.copy_to(into)
            else:
                into.load_state_dict(unet.state_dict())
    broadcast_module(ctx, into)


class Autocast(nn.Module):
    """``model`` run under ``torch.autocast(dtype)``, its output handed back in float32.

    The samplers take their dtype from the parameters (float32 here) and do their arithmetic in it, so only the
    network runs in reduced precision.
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype, config: Any = None):
        super().__init__()
        self.model = model
        self.dtype = dtype
        self.config = config if config is not None else model.config

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        with torch.autocast(sample.device.type, dtype=self.dtype):
            return self.model(sample, timestep).float()


def sample_images(
    model: nn.Module,
    schedule: NoiseSchedule,
    indices: Sequence[int],
    *,
    seed: int,
    sampler: str = "ddpm",
    num_inference_steps: int | None = None,
    eta: float = 0.0,
    generator_device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Images number ``indices`` of the run seeded ``seed``, as one batch in [-1, 1] ``[B, C, H, W]``.

    ``num_inference_steps`` defaults to :func:`~ddpm.diffusion.sampling.default_inference_steps`: every training
    step for DDPM, 50 for DDIM, 20 for DPM-Solver++. ``generator_device``: see :func:`image_generators`.
    """
    return sample(
        model,
        schedule,
        len(indices),
        sampler=sampler,
        num_inference_steps=num_inference_steps,
        eta=eta,
        generator=image_generators(seed, indices, generator_device),
    )


def image_path(images_dir: str | Path, index: int) -> Path:
    return Path(images_dir) / f"{index:06d}.png"


def pending_indices(images_dir: str | Path, num_images: int) -> list[int]:
    """Indices in ``[0, num_images)`` whose PNG is not there yet."""
    images_dir = Path(images_dir)
    done = set(os.listdir(images_dir)) if images_dir.is_dir() else set()
    return [i for i in range(num_images) if image_path(images_dir, i).name not in done]


def generate_images(
    model: nn.Module,
    schedule: NoiseSchedule,
    images_dir: str | Path,
    indices: Sequence[int],
    *,
    seed: int,
    sampler: str = "ddpm",
    num_inference_steps: int | None = None,
    eta: float = 0.0,
    batch_size: int = 64,
    on_batch: Callable[[int], None] | None = None,
) -> None:
    """Sample images ``indices`` in batches of ``batch_size`` and write each as ``images_dir/NNNNNN.png``.

    ``on_batch(n)`` is called after each batch's ``n`` PNGs are written (progress bars).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    images_dir = Path(images_dir)
    images_dir.mkdir(parents=True, exist_ok=True)
    for start in range(0, len(indices), batch_size):
        batch = list(indices[start : start + batch_size])
        images = sample_images(
            model, schedule, batch, seed=seed, sampler=sampler, num_inference_steps=num_inference_steps, eta=eta
        )
        for index, image in zip(batch, to_uint8(images), strict=True):
            save_png(image, image_path(images_dir, index))
        if on_batch is not None:
            on_batch(len(batch))


def iter_images(images_dir: str | Path, num_images: int) -> Iterator[np.ndarray]:
    """Images ``0 .. num_images-1`` read back from their PNGs, checked to share one shape."""
    shape = None
    for i in range(num_images):
        image = read_png(image_path(images_dir, i))
        if shape is not None and image.shape != shape:
            raise ValueError(f"{image_path(images_dir, i)} is shaped {list(image.shape)}, the first {list(shape)}")
        shape = image.shape
        yield image


def write_grid(images_dir: str | Path, num_images: int, path: str | Path) -> Path:
    """A grid PNG of the first ``min(num_images, 64)`` images."""
    return save_grid(np.stack(list(iter_images(images_dir, min(num_images, GRID_MAX_IMAGES)))), path)


def write_npz(images_dir: str | Path, num_images: int, path: str | Path) -> Path:
    """Write ``images_dir``'s first ``num_images`` PNGs as a uint8 ``[N, H, W, C]`` array ``images`` in a .npz.

    The array is streamed into the archive image by image (the file ``np.savez`` would write, without holding 50k
    images in memory), to a temporary file renamed into place.
    """
    path = Path(path)
    images = iter_images(images_dir, num_images)
    first = next(images)
    header = {"descr": "|u1", "fortran_order": False, "shape": (num_images, *first.shape)}
    with atomic_write_file(path) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
            with archive.open("images.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array_header_1_0(f, header)
                f.write(first.tobytes())
                for image in images:
                    f.write(image.tobytes())
    return path


def weights_digest(state_dict: dict[str, torch.Tensor]) -> str:
    """SHA-256 of the names, dtypes, shapes and bytes of the weights: which model made a set of images."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = state_dict[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{list(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_settings(path: str | Path, settings: dict[str, Any]) -> None:
    """Refuse to add images to a folder whose ``sampling.json`` records other settings (a mixed set of samples)."""
    path = Path(path)
    if not path.is_file():
        return
    recorded = read_json(path)
    differ = sorted(
        key
        for key in set(recorded) | set(settings)
        if key not in _INFORMATIVE_SETTINGS and recorded.get(key) != settings.get(key)
    )
    if differ:
        changes = ", ".join(f"{k}: {recorded.get(k)!r} there, {settings.get(k)!r} now" for k in differ)
        raise ValueError(
            f"{path}: the images in this folder were made with other settings ({changes}); "
            "use another --output_dir, or delete the folder to start over"
        )


def write_settings(path: str | Path, settings: dict[str, Any]) -> None:
    """Write ``sampling.json`` atomically."""
    with atomic_write_file(path) as tmp:
        write_json(settings, tmp)
