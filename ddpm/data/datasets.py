"""Training images: where they come from and how one is read.

Loading (:func:`load_image_dataset`) mirrors train_unconditional's ``--dataset_name`` / ``--train_data_dir``:
a Hub id or a local dataset folder goes through ``datasets.load_dataset(..., split="train")``, an image folder
through the ``imagefolder`` builder, and on top of that a ``save_to_disk`` folder is read with
``datasets.load_from_disk`` and ``builtin:digits[:split]`` is the UCI digits set shipped in ``ddpm/assets``
(8x8 grayscale, no download), for smoke tests and CI.

:class:`ImageDataset` decodes images itself rather than through ``datasets``, so that an unreadable file raises an
error naming it, or is skipped and counted on request; it applies a :class:`ddpm.data.transforms.ImageTransform`
seeded per sample by the :class:`ddpm.data.sampler.GlobalBatchSampler`.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
from collections.abc import Sequence
from functools import lru_cache
from importlib import resources

import datasets
import numpy as np
import torch
from PIL import Image

from .transforms import ImageTransform

logger = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"
BUILTIN_DATASETS = ("digits",)
BUILTIN_SPLITS = ("train", "test", "all")
DIGITS_TEST_SIZE = 360
# Errors PIL (or datasets' decoder) raises for a missing, truncated or otherwise unreadable image.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)
# Stop looking for a readable replacement after this many unreadable samples in a row: the dataset is broken.
_MAX_CONSECUTIVE_CORRUPT = 100
# Slots of the shared skip counter: this process plus up to 63 DataLoader workers (more would share slots).
_COUNTER_SLOTS = 64


@lru_cache(maxsize=1)
def _read_digits() -> tuple[np.ndarray, np.ndarray]:
    path = resources.files("ddpm") / "assets" / "digits.csv.gz"
    with path.open("rb") as raw, gzip.open(raw, "rt") as text:
        table = np.loadtxt(text, delimiter=",", dtype=np.int64)
    if table.shape != (1797, 65):
        raise ValueError(f"{path}: expected 1797 rows of 65 values, found shape {table.shape}")
    pixels = np.round(table[:, :64] * (255 / 16)).astype(np.uint8).reshape(-1, 8, 8)
    return pixels, table[:, 64]


def _stratified_test_indices(labels: np.ndarray, test_size: int) -> np.ndarray:
    """A fixed stratified split: per class, a quota of test rows by largest remainder, picked by a hash order.

    Hashing (not a library RNG) keeps the split identical across NumPy/PyTorch versions.
    """
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * test_size / len(labels)
    quota = np.floor(exact).astype(np.int64)
    remainders = exact - quota
    for c in np.argsort(-remainders, kind="stable")[: test_size - quota.sum()]:
        quota[c] += 1
    test = []
    for c, k in zip(classes, quota, strict=True):
        members = np.flatnonzero(labels == c).tolist()
        members.sort(key=lambda i: hashlib.sha256(f"ddpm-digits-split-{i}".encode()).digest())
        test.extend(members[:k])
    return np.sort(np.asarray(test, dtype=np.int64))


def load_builtin_dataset(name: str = "digits", split: str = "train") -> datasets.Dataset:
    """A dataset shipped with the package: columns ``image`` (PIL ``"L"``) and ``label``.

    ``digits``: the 1797 UCI handwritten digits (8x8, pixel ``round(v * 255 / 16)`` for ``v`` in 0..16) split into
    1437 ``"train"`` / 360 ``"test"`` images (stratified by label, fixed, disjoint); ``"all"`` is every image.
    """
    if name not in BUILTIN_DATASETS:
        raise ValueError(f"Unknown built-in dataset {name!r}; available: {', '.join(BUILTIN_DATASETS)}")
    if split not in BUILTIN_SPLITS:
        raise ValueError(f"Unknown split {split!r} of built-in dataset {name!r}; splits: {', '.join(BUILTIN_SPLITS)}")
    pixels, labels = _read_digits()
    if split == "all":
        rows = np.arange(len(labels))
    else:
        is_test = np.zeros(len(labels), dtype=bool)
        is_test[_stratified_test_indices(labels, DIGITS_TEST_SIZE)] = True
        rows = np.flatnonzero(is_test if split == "test" else ~is_test)
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=[str(d) for d in range(10)])}
    )
    return datasets.Dataset.from_dict(
        {"image": [Image.fromarray(pixels[i]) for i in rows], "label": labels[rows].tolist()}, features=features
    )


# ---------------------------------------------------------------------------------------------------- loading


def _is_saved_to_disk(path: str) -> bool:
    """Whether ``path`` is a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``."""
    return os.path.isfile(os.path.join(path, "state.json")) or os.path.isfile(os.path.join(path, "dataset_dict.json"))


def _load_builtin(spec: str, dataset_config_name: str | None) -> datasets.Dataset:
    if dataset_config_name is not None:
        raise ValueError(
            f"--dataset_config_name does not apply to --dataset_name {spec!r}; choose a split with "
            f"'{BUILTIN_PREFIX}NAME:SPLIT' (splits: {', '.join(BUILTIN_SPLITS)})"
        )
    name, _, split = spec[len(BUILTIN_PREFIX) :].partition(":")
    return load_builtin_dataset(name, split or "train")


def _load_from_disk(path: str, dataset_config_name: str | None) -> datasets.Dataset:
    if dataset_config_name is not None:
        raise ValueError(f"--dataset_config_name does not apply to the save_to_disk folder {path!r}")
    loaded = datasets.load_from_disk(path)
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise ValueError(f"Dataset folder {path!r} has no 'train' split; it has: {', '.join(loaded)}")
        loaded = loaded["train"]
    return loaded


def _load_with_datasets(source: str, *args, **kwargs) -> datasets.Dataset:
    """``datasets.load_dataset(...)``, with its errors re-raised as a ValueError that names the source."""
    try:
        return datasets.load_dataset(*args, split="train", **kwargs)
    except (OSError, ValueError) as err:  # not found, empty, offline, bad config: all EmptyDatasetError, ...
        hint = ""
        if datasets.config.HF_HUB_OFFLINE:
            hint = (
                " Offline mode is on (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE) and a Hub dataset must already be in the"
                " cache: download it once online, or pass a local folder."
            )
        raise ValueError(f"Could not load {source}: {type(err).__name__}: {err}.{hint}") from err


DEFAULT_IMAGE_COLUMN = "image"


def find_image_column(
    dataset: datasets.Dataset, image_column: str = DEFAULT_IMAGE_COLUMN, source: str = "the dataset"
) -> str:
    """``image_column`` if the dataset has it; for the default name only, else its first ``datasets.Image`` column
    (a column named explicitly is never replaced by another: a misspelt one is an error); ValueError if none."""
    columns = ", ".join(f"{n} ({f})" for n, f in dataset.features.items())
    if image_column in dataset.column_names:
        feature = dataset.features[image_column]
        if not isinstance(feature, datasets.Image):
            raise ValueError(f"Column {image_column!r} of {source} holds {feature}, not images (datasets.Image)")
        return image_column
    if image_column != DEFAULT_IMAGE_COLUMN:
        raise ValueError(f"--image_column {image_column!r}: {source} has no such column; columns: {columns}")
    for name, feature in dataset.features.items():
        if isinstance(feature, datasets.Image):
            return name
    raise ValueError(
        f"{source} has no image column: no column {image_column!r} and no column of type datasets.Image; "
        f"columns: {columns}"
    )


def load_image_dataset(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_data_dir: str | None = None,
    cache_dir: str | None = None,
    image_column: str = DEFAULT_IMAGE_COLUMN,
) -> tuple[datasets.Dataset, str]:
    """The training images and the name of their column (see :func:`find_image_column`).

    Exactly one of ``dataset_name`` (``builtin:NAME[:SPLIT]``, a ``save_to_disk`` folder, a local dataset folder
    or a Hub id; its ``"train"`` split) and ``train_data_dir`` (a folder of images, read by ``imagefolder``).
    """
    if (dataset_name is None) == (train_data_dir is None):
        got = "both" if dataset_name is not None else "neither"
        raise ValueError(f"Give exactly one of --dataset_name and --train_data_dir (got {got})")
    if train_data_dir is not None:
        source = f"--train_data_dir {train_data_dir!r}"
        if not os.path.isdir(train_data_dir):
            raise FileNotFoundError(f"{source}: no such folder")
        dataset = _load_with_datasets(source, "imagefolder", data_dir=train_data_dir, cache_dir=cache_dir)
    else:
        source = f"--dataset_name {dataset_name!r}"
        if is_builtin(dataset_name):
            dataset = _load_builtin(dataset_name, dataset_config_name)
        elif os.path.isdir(dataset_name) and _is_saved_to_disk(dataset_name):
            dataset = _load_from_disk(dataset_name, dataset_config_name)
        else:
            dataset = _load_with_datasets(source, dataset_name, dataset_config_name, cache_dir=cache_dir)
    if len(dataset) == 0:
        raise ValueError(f"{source} is empty: it has no training images")
    return dataset, find_image_column(dataset, image_column, source)


def is_builtin(dataset_name: str | None) -> bool:
    """Whether ``--dataset_name`` names a dataset shipped with the package (``builtin:NAME[:SPLIT]``)."""
    return dataset_name is not None and dataset_name.startswith(BUILTIN_PREFIX)


def _sample_key(key: int | tuple[int, int]) -> tuple[int, int]:
    """``(index, aug_seed)`` of a dataset key: a :class:`~ddpm.data.sampler.GlobalBatchSampler` pair, or a plain
    index (``aug_seed`` 0, meant for evaluation with a centre crop)."""
    index, aug_seed = (key, 0) if isinstance(key, int) else key
    return int(index), int(aug_seed)


class AugmentedImages(torch.utils.data.Dataset):
    """A training dataset as the loader reads it: key ``(index, aug_seed)`` -> image ``index`` as :meth:`resized`
    gives it, through ``transform.augment`` with a generator seeded by ``aug_seed``; one key at a time or a whole
    batch (:meth:`__getitems__`, the same values). Subclasses set ``transform`` and define :meth:`resized`."""

    transform: ImageTransform

    def resized(self, index: int) -> np.ndarray:
        """Image ``index`` through ``transform.resize``: ``(H, W, C)``."""
        raise NotImplementedError

    def __getitem__(self, key: int | tuple[int, int]) -> torch.Tensor:
        index, aug_seed = _sample_key(key)
        return self.transform.augment(self.resized(index), torch.Generator().manual_seed(aug_seed))

    def __getitems__(self, keys: Sequence[int | tuple[int, int]]) -> torch.Tensor:
        """A whole batch (DataLoader calls this instead of ``__getitem__`` per sample): the same values, stacked."""
        indices, aug_seeds = zip(*map(_sample_key, keys), strict=True)
        return self.transform.augment_batch([self.resized(index) for index in indices], aug_seeds)


class CorruptImageError(ValueError):
    """An image that cannot be read or decoded; the message names the file (or the dataset index)."""


class ImageDataset(AugmentedImages):
    """A map-style dataset over ``(index, aug_seed)`` keys (as :class:`GlobalBatchSampler` yields them).

    ``dataset[(index, aug_seed)]`` decodes image ``index`` of ``dataset`` and transforms it with a generator seeded
    by ``aug_seed``; a plain ``dataset[index]`` uses ``aug_seed=0`` (meant for evaluation with a centre crop).

    An unreadable image raises :class:`CorruptImageError` naming the file, or, with ``skip_corrupt_images``, is
    replaced by the next readable image (``index+1``, ``index+2``, ..., with the same ``aug_seed``, so the
    replacement is deterministic) and counted in :attr:`num_corrupt_skipped`.

    ``keep_resized``: each image is decoded and resized once, then kept in memory (in each DataLoader worker): for
    small datasets such as the built-in ones, where decoding each access would cost more than the model's step.
    """

    def __init__(
        self,
        dataset: datasets.Dataset,
        image_column: str,
        transform: ImageTransform,
        *,
        skip_corrupt_images: bool = False,
        keep_resized: bool = False,
    ) -> None:
        if len(dataset) == 0:
            raise ValueError("ImageDataset: the dataset is empty")
        find_image_column(dataset, image_column)
        # decode=False yields {"bytes", "path"}: we decode ourselves to know which file failed.
        self._rows = dataset.select_columns([image_column]).cast_column(image_column, datasets.Image(decode=False))
        self._decoder = datasets.Image()
        self.image_column = image_column
        self.transform = transform
        self.skip_corrupt_images = skip_corrupt_images
        # Shared memory, so that skips counted inside DataLoader worker processes (fork, spawn or forkserver)
        # are visible here; one slot per process (slot 0: this one) so that no increment needs a lock.
        self._corrupt_counts = torch.zeros(_COUNTER_SLOTS, dtype=torch.int64).share_memory_()
        self._kept: dict[int, np.ndarray] | None = {} if keep_resized else None

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def num_corrupt_skipped(self) -> int:
        """How many times an unreadable image was replaced (a bad file counts again each time it is drawn)."""
        return int(self._corrupt_counts.sum())

    def load_image(self, index: int) -> Image.Image:
        """Decode image ``index``; :class:`CorruptImageError` naming its file if it cannot be read."""
        cell = self._rows[index][self.image_column]
        path = cell.get("path") if isinstance(cell, dict) else None
        where = f"image file {path!r} (dataset index {index})" if path else f"image at dataset index {index}"
        if cell is None:
            raise CorruptImageError(f"Missing {where}")
        try:
            return self._decoder.decode_example(cell)
        except _DECODE_ERRORS as err:
            raise CorruptImageError(f"Cannot read {where}: {type(err).__name__}: {err}") from err

    def resized(self, index: int) -> np.ndarray:
        """Image ``index`` (or its replacement) through ``transform.resize``: uint8 ``(H, W, C)``."""
        if self._kept is None:
            return self.transform.resize(self.load_or_replace(index))
        pixels = self._kept.get(index)
        if pixels is None:
            pixels = self._kept[index] = self.transform.resize(self.load_or_replace(index))
            pixels.setflags(write=False)  # shared by every later access: nothing may write into it
        return pixels

    def load_or_replace(self, index: int) -> Image.Image:
        """Decode image ``index``, or with ``skip_corrupt_images`` the next readable one (see the class docstring)."""
        if not self.skip_corrupt_images:
            try:
                return self.load_image(index)
            except CorruptImageError as err:
                raise CorruptImageError(
                    f"{err}. Repair or remove the file, or pass --skip_corrupt_images to skip unreadable images"
                ) from err.__cause__
        attempts = min(len(self), _MAX_CONSECUTIVE_CORRUPT)
        for offset in range(attempts):
            try:
                image = self.load_image((index + offset) % len(self))
            except CorruptImageError as err:
                logger.warning("Skipping unreadable image: %s", err)
                worker = torch.utils.data.get_worker_info()
                self._corrupt_counts[0 if worker is None else 1 + worker.id % (_COUNTER_SLOTS - 1)] += 1
                continue
            return image
        raise CorruptImageError(
            f"{attempts} consecutive unreadable images from dataset index {index} on: the dataset looks broken"
        )
