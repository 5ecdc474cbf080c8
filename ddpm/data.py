"""Training data: image datasets, per-sample transforms, and a sampler that shards global batches exactly.

Loading (:func:`load_image_dataset`) mirrors train_unconditional's ``--dataset_name`` / ``--train_data_dir``:
a Hub id or a local dataset folder goes through ``datasets.load_dataset(..., split="train")``, an image folder
through the ``imagefolder`` builder, and on top of that a ``save_to_disk`` folder is read with
``datasets.load_from_disk`` and ``builtin:digits[:split]`` is the UCI digits set shipped in ``ddpm/assets``
(8x8 grayscale, no download), for smoke tests and CI.

Transforms (:class:`ImageTransform`) are train_unconditional's ``Resize(res, bilinear)`` (shorter side) ->
``CenterCrop``/``RandomCrop`` -> optional horizontal flip -> ``ToTensor`` -> ``Normalize([0.5], [0.5])``, on the
image converted to the model's channel count. Unlike ``image.convert("RGB")``, 16-bit and float images are
rescaled to 8 bits instead of clipped (see :func:`convert_image`). Images are decoded here rather than by
``datasets`` so that an unreadable file raises an error naming it, or is skipped and counted on request.

Randomness and sharding (:class:`GlobalBatchSampler`). Every epoch is one fixed stream of samples: a
permutation of the dataset drawn from ``(seed, epoch)``, cut into global batches of
``G = per_device_batch * world_size * grad_accum`` samples, one global batch per optimizer step. Within global
batch ``k``, micro-step ``m`` of rank ``r`` takes stream positions ``k*G + (m*world_size + r)*B`` up to ``+B``.
Each sample's augmentation (crop offset, flip) comes from a ``torch.Generator`` seeded from
``(seed, epoch, stream position)``, and the sampler hands ``(index, aug_seed)`` pairs to :class:`ImageDataset`.
Hence the set of images and their exact pixels in optimizer step ``k`` depend only on ``(seed, epoch, k, G)``:
not on the number of processes, the accumulation split, the number of DataLoader workers, the global RNG, or
whether the run was resumed (``set_epoch(epoch, start_step)`` starts the same stream at step ``start_step``).
A run on 1 process with batch ``G`` and a run on N processes x accumulation therefore average gradients over the
same samples, and a resumed run continues exactly where the interrupted one stopped.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

import datasets
import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch.utils.data import DataLoader, Sampler
from torchvision.transforms import InterpolationMode

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
# Stream tags so that the permutation and the augmentations never share a seed.
_PERMUTATION_STREAM = 0
_AUGMENTATION_STREAM = 1
_MASK64 = (1 << 64) - 1


# ---------------------------------------------------------------------------------------------------- seeds


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def derive_seed(*values: int) -> int:
    """A 63-bit seed that depends on every value and their order (SplitMix64 chain).

    Pure integer arithmetic, so it is the same on every platform and library version; 63 bits so that it is a
    valid ``torch.Generator.manual_seed`` / NumPy seed.
    """
    h = 0
    for v in values:
        h = _splitmix64(h ^ (int(v) & _MASK64))
    return h >> 1


# ---------------------------------------------------------------------------------------------------- builtin


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


def find_image_column(dataset: datasets.Dataset, image_column: str = "image", source: str = "the dataset") -> str:
    """``image_column`` if the dataset has it, else its first ``datasets.Image`` column; ValueError if none."""
    if image_column in dataset.column_names:
        feature = dataset.features[image_column]
        if not isinstance(feature, datasets.Image):
            raise ValueError(f"Column {image_column!r} of {source} holds {feature}, not images (datasets.Image)")
        return image_column
    for name, feature in dataset.features.items():
        if isinstance(feature, datasets.Image):
            return name
    raise ValueError(
        f"{source} has no image column: no column {image_column!r} and no column of type datasets.Image; "
        f"columns: {', '.join(f'{n} ({f})' for n, f in dataset.features.items())}"
    )


def load_image_dataset(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_data_dir: str | None = None,
    cache_dir: str | None = None,
    image_column: str = "image",
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
        if dataset_name.startswith(BUILTIN_PREFIX):
            dataset = _load_builtin(dataset_name, dataset_config_name)
        elif os.path.isdir(dataset_name) and _is_saved_to_disk(dataset_name):
            dataset = _load_from_disk(dataset_name, dataset_config_name)
        else:
            dataset = _load_with_datasets(source, dataset_name, dataset_config_name, cache_dir=cache_dir)
    if len(dataset) == 0:
        raise ValueError(f"{source} is empty: it has no training images")
    return dataset, find_image_column(dataset, image_column, source)


# ---------------------------------------------------------------------------------------------------- transforms


def convert_image(image: Image.Image, channels: int) -> Image.Image:
    """``image`` as 8-bit ``"L"`` (``channels=1``) or ``"RGB"`` (``channels=3``).

    16-bit modes (``"I;16*"``, and ``"I"``, which is how PIL reads some 16-bit files) are scaled from 0..65535 to
    0..255 (``round(v * 255 / 65535)``; ``"I"`` values outside 0..65535 are clipped) instead of being clipped at
    255 as ``convert`` does. ``"F"`` is taken to hold 0..1, as torchvision's ``ToTensor`` assumes. Every other mode
    uses PIL's ``convert``, like train_unconditional's ``image.convert("RGB")``: alpha is dropped (the stored
    colour of transparent pixels is kept, not composited on a background), palettes are looked up.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels={channels} is not supported: images can be converted to 1 or 3 channels")
    if image.mode.startswith("I"):
        values = np.clip(np.asarray(image, dtype=np.float64), 0, 65535) * (255 / 65535)
        image = Image.fromarray(np.round(values).astype(np.uint8))
    elif image.mode == "F":
        image = Image.fromarray(np.round(np.clip(np.asarray(image, dtype=np.float64), 0, 1) * 255).astype(np.uint8))
    target = "L" if channels == 1 else "RGB"
    return image if image.mode == target else image.convert(target)


@dataclass
class ImageTransform:
    """train_unconditional's augmentations, with every random choice drawn from an explicit generator.

    ``resolution``: output size; the shorter side is resized to it (bilinear, antialiased; smaller images are
    upscaled), then a ``resolution`` square is cropped: centred if ``center_crop``, else at a random offset.
    ``random_flip``: flip horizontally with probability 0.5. ``channels``: 1 or 3 (see :func:`convert_image`).
    Output: float32 ``(channels, resolution, resolution)`` in [-1, 1] (``(x/255 - 0.5) / 0.5``).
    """

    resolution: int
    channels: int = 3
    center_crop: bool = False
    random_flip: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.resolution, int) or self.resolution < 1:
            raise ValueError(f"resolution={self.resolution!r} must be a positive integer")
        if self.channels not in (1, 3):
            raise ValueError(f"channels={self.channels!r} must be 1 or 3")

    def __call__(self, image: Image.Image, generator: torch.Generator) -> torch.Tensor:
        """Transform one image; random draws, in order: crop row, crop column (random crop), flip (if enabled)."""
        res = self.resolution
        image = TF.resize(convert_image(image, self.channels), res, interpolation=InterpolationMode.BILINEAR)
        if self.center_crop:
            image = TF.center_crop(image, [res, res])
        elif image.size != (res, res):  # like torchvision's RandomCrop, draw nothing when there is no room
            top = int(torch.randint(0, image.height - res + 1, (1,), generator=generator))
            left = int(torch.randint(0, image.width - res + 1, (1,), generator=generator))
            image = TF.crop(image, top, left, res, res)
        if self.random_flip and float(torch.rand(1, generator=generator)) < 0.5:
            image = TF.hflip(image)
        return TF.to_tensor(image).sub_(0.5).div_(0.5)


class CorruptImageError(ValueError):
    """An image that cannot be read or decoded; the message names the file (or the dataset index)."""


class ImageDataset(torch.utils.data.Dataset):
    """A map-style dataset over ``(index, aug_seed)`` keys (as :class:`GlobalBatchSampler` yields them).

    ``dataset[(index, aug_seed)]`` decodes image ``index`` of ``dataset`` and transforms it with a generator seeded
    by ``aug_seed``; a plain ``dataset[index]`` uses ``aug_seed=0`` (meant for evaluation with a centre crop).

    An unreadable image raises :class:`CorruptImageError` naming the file, or, with ``skip_corrupt_images``, is
    replaced by the next readable image (``index+1``, ``index+2``, ..., with the same ``aug_seed``, so the
    replacement is deterministic) and counted in :attr:`num_corrupt_skipped`.
    """

    def __init__(
        self,
        dataset: datasets.Dataset,
        image_column: str,
        transform: ImageTransform,
        *,
        skip_corrupt_images: bool = False,
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

    def __getitem__(self, key: int | tuple[int, int]) -> torch.Tensor:
        index, aug_seed = (key, 0) if isinstance(key, int) else key
        image = self.load_or_replace(int(index))
        return self.transform(image, torch.Generator().manual_seed(int(aug_seed)))

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


# ---------------------------------------------------------------------------------------------------- sampling


class GlobalBatchSampler(Sampler[tuple[int, int]]):
    """This rank's share of each epoch's global batches, as ``(dataset index, augmentation seed)`` pairs.

    See the module docstring for the layout. Per optimizer step the rank yields ``grad_accum * per_device_batch``
    pairs: micro-batch after micro-batch, so a DataLoader with ``batch_size=per_device_batch`` gives exactly
    ``grad_accum`` micro-batches per step. ``drop_last=True`` drops the incomplete last global batch;
    ``drop_last=False`` completes it with the first samples of the epoch's permutation (each once). Call
    :meth:`set_epoch` before each epoch.
    """

    def __init__(
        self,
        dataset_len: int,
        per_device_batch: int,
        world_size: int = 1,
        rank: int = 0,
        grad_accum: int = 1,
        seed: int = 0,
        drop_last: bool = True,
    ) -> None:
        for field, value in (
            ("dataset_len", dataset_len),
            ("per_device_batch", per_device_batch),
            ("world_size", world_size),
            ("grad_accum", grad_accum),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{field}={value!r} must be a positive integer")
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank={rank!r} must be in [0, world_size={world_size})")
        self.dataset_len = dataset_len
        self.per_device_batch = per_device_batch
        self.world_size = world_size
        self.rank = rank
        self.grad_accum = grad_accum
        self.seed = seed
        self.drop_last = drop_last
        self.global_batch_size = per_device_batch * world_size * grad_accum
        if dataset_len < self.global_batch_size:
            raise ValueError(
                f"The dataset has {dataset_len} images, fewer than one global batch of {self.global_batch_size} "
                f"(per_device_batch {per_device_batch} x world_size {world_size} x grad_accum {grad_accum}); "
                "lower the batch size or the gradient accumulation"
            )
        self.epoch = 0
        self.start_step = 0

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps (global batches) per epoch."""
        full, rest = divmod(self.dataset_len, self.global_batch_size)
        return full + int(rest > 0 and not self.drop_last)

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Iterate epoch ``epoch`` from its optimizer step ``start_step`` on (non-zero only when resuming)."""
        if not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch={epoch!r} must be a non-negative integer")
        if not isinstance(start_step, int) or not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(f"start_step={start_step!r} must be in [0, steps_per_epoch={self.steps_per_epoch}]")
        self.epoch = epoch
        self.start_step = start_step

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_step) * self.grad_accum * self.per_device_batch

    def __iter__(self) -> Iterator[tuple[int, int]]:
        generator = torch.Generator().manual_seed(derive_seed(self.seed, _PERMUTATION_STREAM, self.epoch))
        order = torch.randperm(self.dataset_len, generator=generator).tolist()
        batch = self.per_device_batch
        for step in range(self.start_step, self.steps_per_epoch):
            for micro in range(self.grad_accum):
                first = step * self.global_batch_size + (micro * self.world_size + self.rank) * batch
                for position in range(first, first + batch):
                    aug_seed = derive_seed(self.seed, _AUGMENTATION_STREAM, self.epoch, position)
                    yield order[position % self.dataset_len], aug_seed


def build_dataloader(
    dataset: torch.utils.data.Dataset,
    sampler: Sampler,
    batch_size: int,
    num_workers: int = 0,
    pin_memory: bool | None = None,
    prefetch_factor: int = 2,
) -> DataLoader:
    """A DataLoader drawing ``batch_size`` samples at a time from ``sampler`` (keep ``drop_last`` off: a
    :class:`GlobalBatchSampler` yields whole micro-batches).

    Workers are persistent (no restart cost each epoch; ``set_epoch`` still applies since the sampler runs in this
    process); ``pin_memory`` defaults to whether CUDA is available. The loader gets its own generator, so creating
    an iterator never consumes the global torch RNG (the training noise stays independent of the data pipeline).
    """
    if isinstance(sampler, GlobalBatchSampler) and batch_size != sampler.per_device_batch:
        raise ValueError(
            f"batch_size={batch_size} must equal the sampler's per_device_batch={sampler.per_device_batch}"
        )
    if num_workers < 0:
        raise ValueError(f"num_workers={num_workers} must be >= 0")
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        persistent_workers=num_workers > 0,
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
        generator=torch.Generator().manual_seed(0),
    )
