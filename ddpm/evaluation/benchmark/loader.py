"""The input pipeline's speed: images/s of the training DataLoader over a folder of JPEG photographs against its
prepared copy (:mod:`ddpm.data.prepared`), at a training resolution and a number of worker processes.

:func:`make_photo_folder` writes the test folder: ~500x600 JPEGs (the size of the guide's flower photographs) cut
from given photographs (e.g. the two that scikit-learn ships, see the README), or, without any, from synthetic
photograph-like images (smooth shading plus fine texture, so that JPEG decoding costs what it costs for a photo).
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ...data.datasets import ImageDataset, load_image_dataset
from ...data.prepared import PreparedImages, is_prepared, prepare_dataset
from ...data.sampler import GlobalBatchSampler, build_dataloader
from ...data.transforms import ImageTransform
from ...io.files import read_safetensors

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


# A 2-block UNet whose step is small beside decoding, as the 64 px model's is on a fast GPU.
TINY_UNET = {
    "in_channels": 3, "out_channels": 3, "block_out_channels": [16, 32], "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D"], "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
    "norm_num_groups": 8, "attention_head_dim": 8,
}  # fmt: skip


def train_rates(
    photos: str | Path,
    prepared: str | Path,
    train_script: str | Path,
    work_dir: str | Path,
    *,
    resolution: int = 16,
    steps: int = 40,
    batch_size: int = 32,
    workers: int = 0,
) -> dict[str, Any]:
    """``train_script`` with a tiny UNet at ``resolution`` from the JPEG folder and from its prepared copy (made at
    that resolution if missing): wall time, steady img/s (median logged interval after the first), ``data_wait``, and
    whether the two runs' final weights are identical."""
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    model = work_dir / "tiny_unet.json"
    model.write_text(json.dumps(TINY_UNET))
    if not is_prepared(prepared):
        data, column = load_image_dataset(train_data_dir=str(photos))
        images = ImageDataset(data, column, ImageTransform(resolution, 3))
        prepare_dataset(images, prepared, {"train_data_dir": str(photos)}, progress=False)
    runs: dict[str, Any] = {}
    for name, source in (("folder", photos), ("prepared", prepared)):
        output_dir = work_dir / name
        shutil.rmtree(output_dir, ignore_errors=True)
        command = [
            sys.executable, str(train_script), "--train_data_dir", str(source), "--cache_dir", str(work_dir / "cache"),
            "--model_config_name_or_path", str(model), "--resolution", str(resolution), "--random_flip",
            "--train_batch_size", str(batch_size), "--max_train_steps", str(steps), "--logging_steps", "5",
            "--checkpointing_steps", str(steps), "--eval_batch_size", "1", "--ddpm_num_inference_steps", "1",
            "--dataloader_num_workers", str(workers), "--logger", "none", "--seed", "0", "--output_dir",
            str(output_dir),
        ]  # fmt: skip
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        records = [json.loads(line) for line in (output_dir / "logs" / "metrics.jsonl").read_text().splitlines()]
        runs[name] = {
            "seconds": time.perf_counter() - start,
            "img_s": batch_size / statistics.median(r["sec_per_step"] for r in records[1:]),
            "data_wait": statistics.median(r["data_wait"] for r in records[1:]),
        }
    weights = [read_safetensors(work_dir / name / f"checkpoint-{steps}" / "model.safetensors") for name in runs]
    identical = weights[0].keys() == weights[1].keys() and all(
        torch.equal(weights[0][k], weights[1][k]) for k in weights[0]
    )
    return {**runs, "speedup": runs["prepared"]["img_s"] / runs["folder"]["img_s"], "identical_weights": identical}
