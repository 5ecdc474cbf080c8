"""Prepared datasets: every image decoded, converted, resized and cropped once, then read without decoding.

Decoding dominates the input pipeline (about 2.5 ms per 500x600 JPEG on one core, against a few ms of GPU work per
*batch* of 64 px images), so :func:`prepare_dataset` (``scripts/prepare_dataset.py``) runs the deterministic part of
the training transform (:meth:`ddpm.data.transforms.ImageTransform.resize`) once, in parallel, and writes a folder::

    manifest.json   {"format": "ddpm-prepared-images", "version": 1, "source": {...the data flags...},
                     "resolution", "center_crop", "channels", "preserve_input_precision", "dtype", "count",
                     "bytes", "sha256", ...}
    pixels.bin      every image's (H, W, C) pixels, one after the other: uint8, or float32 in [0, 1] when prepared
                    with --preserve_input_precision
    shapes.npy      (count, 2) int64: each image's H and W

With ``center_crop`` every image is ``resolution`` square (``resolution**2 * channels`` bytes: 12,288 at 64 px RGB,
so ImageNet-64's 1.28 M images take 15.7 GB); without it the shorter side is ``resolution`` and the random crop is
drawn at read time. :class:`PreparedImages` memory-maps ``pixels.bin`` (its memory does not grow with the dataset:
pages come and go with the OS cache) and applies the random part of the transform
(:meth:`~ddpm.data.transforms.ImageTransform.augment`) seeded per sample exactly as :class:`ImageDataset` does, so
training from a prepared folder gives bit for bit the weights of training from its source.
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..io.files import atomic_write_dir, read_json, write_json
from .datasets import AugmentedImages, ImageDataset
from .transforms import ImageTransform

logger = logging.getLogger(__name__)

FORMAT = "ddpm-prepared-images"
VERSION = 1
MANIFEST_NAME = "manifest.json"
PIXELS_NAME = "pixels.bin"
SHAPES_NAME = "shapes.npy"
# The transform settings a prepared folder fixes (manifest key: ImageTransform attribute); the training's must agree.
FIXED_SETTINGS = {
    "resolution": "resolution",
    "center_crop": "center_crop",
    "channels": "channels",
    "preserve_input_precision": "preserve_precision",
}
# Who sets each of them in a training run, for error messages.
_SET_BY = {"channels": "the model's in_channels"}


def is_prepared(path: str | os.PathLike | None) -> bool:
    """Whether ``path`` is a folder written by :func:`prepare_dataset`."""
    if path is None or not os.path.isfile(os.path.join(path, MANIFEST_NAME)):
        return False
    try:
        return read_json(Path(path) / MANIFEST_NAME).get("format") == FORMAT
    except ValueError:
        return False


# ---------------------------------------------------------------------------------------------------- writing


def check_output_dir(output_dir: str | os.PathLike) -> None:
    """A ValueError unless ``output_dir`` may be written: absent, empty, or a prepared folder (which is replaced).

    Any other folder would be replaced wholesale, with whatever it holds (the source images, a folder of datasets).
    """
    path = Path(output_dir)
    if path.exists() and not is_prepared(path) and (not path.is_dir() or any(path.iterdir())):
        raise ValueError(
            f"--output_dir {path} exists and is not a prepared folder: writing there would delete what it holds; "
            "choose a new or empty folder"
        )


_worker_images: ImageDataset | None = None  # each preparation worker's dataset (set by its initializer)


def _init_worker(images: ImageDataset) -> None:
    global _worker_images
    torch.set_num_threads(1)  # the parallelism is the processes
    _worker_images = images


def _resize_rows(indices: Sequence[int]) -> list[np.ndarray]:
    return [_worker_images.resized(i) for i in indices]


def _resized_images(images: ImageDataset, num_proc: int, chunk: int = 64) -> Iterator[np.ndarray]:
    """Every image through ``images.transform.resize``, in dataset order, on ``num_proc`` processes."""
    chunks = [range(lo, min(lo + chunk, len(images))) for lo in range(0, len(images), chunk)]
    if num_proc == 1:
        _init_worker(images)
        for rows in chunks:
            yield from _resize_rows(rows)
        return
    with multiprocessing.get_context("fork").Pool(num_proc, _init_worker, (images,)) as pool:
        for resized in pool.imap(_resize_rows, chunks):  # in order, a few chunks ahead
            yield from resized


def prepare_dataset(
    images: ImageDataset,
    output_dir: str | os.PathLike,
    source: dict[str, Any],
    *,
    num_proc: int = 1,
    progress: bool = True,
) -> dict[str, Any]:
    """Write ``images`` (their transform's :meth:`~ddpm.data.transforms.ImageTransform.resize` output) as a prepared
    folder at ``output_dir``, atomically (a failure leaves any previous folder there intact); returns the manifest.
    ``output_dir`` must be absent, empty or a prepared folder (:func:`check_output_dir`).

    ``source`` describes where the images came from (the data flags), for the manifest. ``images.transform``'s
    ``random_flip`` is not applied: flips are drawn at read time.
    """
    from tqdm import tqdm

    check_output_dir(output_dir)
    transform = images.transform
    digest = hashlib.sha256()
    shapes = np.zeros((len(images), 2), dtype=np.int64)
    with atomic_write_dir(output_dir) as tmp:
        with open(tmp / PIXELS_NAME, "wb") as out:
            bar = tqdm(total=len(images), unit="img", desc="prepare", disable=not progress, dynamic_ncols=True)
            for i, pixels in enumerate(_resized_images(images, num_proc)):
                data = pixels.tobytes()
                out.write(data)
                digest.update(data)
                shapes[i] = pixels.shape[:2]
                bar.update(1)
            bar.close()
        np.save(tmp / SHAPES_NAME, shapes)
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "source": source,
            "resolution": transform.resolution,
            "center_crop": transform.center_crop,
            "channels": transform.channels,
            "preserve_input_precision": transform.preserve_precision,
            "dtype": _dtype(transform.preserve_precision).name,
            "layout": "pixels.bin: each image's (H, W, C) bytes in turn; shapes.npy: (count, 2) H, W",
            "count": len(images),
            "bytes": int(sum(int(h) * int(w) for h, w in shapes) * transform.channels)
            * _dtype(transform.preserve_precision).itemsize,
            "sha256": digest.hexdigest(),
            "corrupt_images_skipped": images.num_corrupt_skipped,
        }
        write_json(manifest, tmp / MANIFEST_NAME)  # last: a folder with a manifest is complete
    return manifest


# ---------------------------------------------------------------------------------------------------- reading


def check_prepared(path: str | os.PathLike, flag: str, **settings: Any) -> dict[str, Any]:
    """The manifest of the prepared folder ``path``; a ValueError naming ``flag`` and both values when one of the
    ``settings`` (manifest keys of :data:`FIXED_SETTINGS`; ``None``: not known yet, not checked) differs."""
    manifest = read_json(Path(path) / MANIFEST_NAME)
    where = f"{flag} {str(path)!r}"
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ValueError(f"{where}: not a prepared dataset of format {FORMAT} version {VERSION}")
    for name, wanted in settings.items():
        if wanted is not None and manifest[name] != wanted:
            raise ValueError(
                f"{where} was prepared with {name}={manifest[name]!r}, but {_SET_BY.get(name, '--' + name)} is "
                f"{wanted!r}: prepare it again with these settings, or train with its own"
            )
    return manifest


def _dtype(preserve_precision: bool) -> np.dtype:
    return np.dtype(np.float32 if preserve_precision else np.uint8)


class PreparedImages(AugmentedImages):
    """A prepared folder as a training dataset: the same interface and the same tensors as :class:`ImageDataset`
    over its source, without decoding.

    ``dataset[(index, aug_seed)]`` is image ``index`` through ``transform.augment`` with a generator seeded by
    ``aug_seed``. ``transform``'s resolution, crop and channels must be the folder's (ValueError naming both
    values otherwise); its ``random_flip`` is the training's choice.
    """

    def __init__(self, path: str | os.PathLike, transform: ImageTransform, flag: str = "--train_data_dir") -> None:
        self.path = Path(path)
        settings = {name: getattr(transform, attribute) for name, attribute in FIXED_SETTINGS.items()}
        self.manifest = check_prepared(path, flag, **settings)
        self.dtype = _dtype(transform.preserve_precision)
        where = f"{flag} {str(path)!r}"
        self.transform = transform
        self.shapes = np.load(self.path / SHAPES_NAME)
        sizes = self.shapes[:, 0] * self.shapes[:, 1] * transform.channels
        self.offsets = np.concatenate([[0], np.cumsum(sizes)])  # in pixels values, not bytes
        size = os.path.getsize(self.path / PIXELS_NAME)
        if len(self.shapes) != self.manifest["count"] or self.offsets[-1] * self.dtype.itemsize != size:
            raise ValueError(f"{where}: {PIXELS_NAME} or {SHAPES_NAME} does not match {MANIFEST_NAME} (truncated?)")
        self._pixels: np.memmap | None = None  # opened lazily, so that each DataLoader worker maps it itself

    def __len__(self) -> int:
        return len(self.shapes)

    @property
    def num_corrupt_skipped(self) -> int:
        """Always 0: unreadable images were dealt with when the folder was prepared."""
        return 0

    def resized(self, index: int) -> np.ndarray:
        """Image ``index`` as stored: ``(H, W, C)``, a read-only view of the memory map."""
        if self._pixels is None:
            self._pixels = np.memmap(self.path / PIXELS_NAME, dtype=self.dtype, mode="r")
        height, width = self.shapes[index]
        lo, hi = self.offsets[index], self.offsets[index + 1]
        return self._pixels[lo:hi].reshape(height, width, self.transform.channels)

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers (spawn) map the file themselves
        return {**self.__dict__, "_pixels": None}


def describe(manifest: dict[str, Any]) -> str:
    """One line about a prepared folder, for logs."""
    fixed = ", ".join(f"{name}={manifest[name]}" for name in FIXED_SETTINGS)
    return f"{manifest['count']} prepared images ({fixed}; {manifest['bytes'] / 2**20:.1f} MiB)"
