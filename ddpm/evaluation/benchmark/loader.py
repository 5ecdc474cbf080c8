"""The input pipeline's speed: images/s of the training DataLoader over a folder of JPEG photographs against its
prepared copy (:mod:`ddpm.data.prepared`), at a training resolution and a number of worker processes.

:func:`make_photo_folder` writes the test folder: ~500x600 JPEGs (the size of the guide's flower photographs) cut
from given photographs (e.g. the two that scikit-learn ships, see the README), or, without any, from synthetic
photograph-like images (smooth shading plus fine texture, so that JPEG decoding costs what it costs for a photo).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ...data.datasets import ImageDataset, load_image_dataset
from ...data.prepared import PreparedImages, is_prepared, prepare_dataset
from ...data.sampler import GlobalBatchSampler, build_dataloader
from ...data.transforms import ImageTransform

PHOTO_SIZE = (600, 500)  # width, height


def make_photo_folder(
    folder: str | Path, count: int = 512, sources: Sequence[str | Path] = (), seed: int = 0, quality: int = 90
) -> Path:
    """``count`` 600x500 JPEGs in ``folder`` (kept if already there): random crops, scaled 1-1.6x and maybe flipped,
    of the ``sources`` photographs, or synthetic ones."""
    folder = Path(folder)
    if folder.is_dir() and len(list(folder.glob("*.jpg"))) >= count:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    photos = [Image.open(s).convert("RGB") for s in sources]
    width, height = PHOTO_SIZE
    for i in range(count):
        if photos:
            photo = photos[i % len(photos)]
            scale = max(width / photo.width, height / photo.height) * rng.uniform(1.0, 1.6)
            photo = photo.resize((round(photo.width * scale) + 1, round(photo.height * scale) + 1), Image.BICUBIC)
            left, top = rng.integers(0, photo.width - width + 1), rng.integers(0, photo.height - height + 1)
            image = photo.crop((left, top, left + width, top + height))
            if rng.random() < 0.5:
                image = image.transpose(Image.FLIP_LEFT_RIGHT)
        else:
            image = _synthetic_photo(rng, width, height)
        image.save(folder / f"photo_{i:05d}.jpg", quality=quality)
    return folder


def _synthetic_photo(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    base = np.stack([np.sin(rng.uniform(2, 9) * x + rng.uniform(1, 7) * y + rng.uniform(0, 6)) for _ in range(3)], -1)
    texture = rng.normal(0, 0.25, (height, width, 3))
    pixels = np.clip((base * 0.35 + 0.5 + texture * 0.3) * 255, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def loader_rate(dataset: Any, workers: int, batch_size: int = 128, batches: int = 20, warmup: int = 2) -> float:
    """Images/s of the training DataLoader (random crops and flips, seeded per sample) over ``dataset``, after
    ``warmup`` batches (worker start-up and first reads)."""
    sampler = GlobalBatchSampler(len(dataset), batch_size, seed=0, drop_last=False)
    sampler.set_epoch(0, 0, epochs=(warmup + batches) // sampler.steps_per_epoch + 1)
    loader = build_dataloader(dataset, sampler, batch_size, workers, pin_memory=False)
    iterator = iter(loader)
    for _ in range(warmup):
        next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches * batch_size / (time.perf_counter() - start)


def loader_rates(
    photos: str | Path,
    prepared: str | Path,
    *,
    resolution: int = 64,
    workers: Sequence[int] = (0, 2),
    batch_size: int = 128,
    batches: int = 20,
    num_proc: int | None = None,
) -> dict[str, Any]:
    """Images/s from the JPEG folder ``photos`` and from its prepared copy at ``prepared`` (made if missing), at
    ``resolution`` (random crop and flip), for each number of ``workers``; and the seconds the preparation took."""
    data, column = load_image_dataset(train_data_dir=str(photos))
    transform = ImageTransform(resolution, 3, center_crop=True, random_flip=True)
    folder = ImageDataset(data, column, transform)
    seconds = None
    if not is_prepared(prepared):
        start = time.perf_counter()
        prepare_dataset(folder, prepared, {"train_data_dir": str(photos)}, num_proc=num_proc or 1, progress=False)
        seconds = time.perf_counter() - start
    fast = PreparedImages(prepared, transform)
    rows = []
    for n in workers:
        row = {"workers": n, "folder_img_s": loader_rate(folder, n, batch_size, max(2, batches // 4))}
        row["prepared_img_s"] = loader_rate(fast, n, batch_size, batches)
        row["speedup"] = row["prepared_img_s"] / row["folder_img_s"]
        rows.append(row)
    return {"images": len(folder), "resolution": resolution, "prepare_seconds": seconds, "rows": rows}
