"""Sample quality on the built-in digits, measured by a small digit classifier instead of ImageNet's Inception.

Inception FID says little about 16x16 gray digits. This module trains a small CNN on the ``train`` split of
``builtin:digits`` (as the training pipeline feeds it: 8x8 upscaled bilinearly to 16x16, one channel) and scores a
set of generated digits with it:

* ``classifier_fid``: Fréchet distance between the classifier's penultimate (128-d) features of the samples and of
  the 360 held-out ``test`` digits. The estimate is biased by the number of samples: compare sets of equal size
  (512 is the convention, see :func:`real_floor`).
* ``class_entropy``: entropy, in nats, of the histogram of predicted classes; ``log(10) = 2.303`` when all ten
  digits are equally frequent, lower when some dominate (mode collapse) or are missing.
* ``confident_share``: share of samples whose top class probability exceeds 0.9, i.e. that look like one clean
  digit. The classifier was also shown noise images with a uniform target (outlier exposure) so that noise, smudges
  and blends are not confidently called a digit.
* ``class_histogram``: how many samples were assigned to each digit 0..9.
* ``background_level`` and ``chroma`` (0..1): the mean brightness of each image's darkest quarter of pixels (0 for
  the data's black backgrounds) and the mean spread ``max - min`` over RGB channels (0 for gray images). The classifier
  sees grayscale only (RGB samples are converted with ITU-R 601 luma, as PIL's ``convert("L")``), so these two report
  grey backgrounds and colour casts.

The classifier trains in a few seconds on one CPU thread, deterministically (fixed seeds and data order, one thread),
and is cached in ``~/.cache/ddpm/digits-classifier-v1.safetensors``.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.datasets import load_builtin_dataset
from ..data.transforms import ImageTransform
from ..io.files import atomic_write_file, read_safetensors, write_safetensors
from .metrics import FeatureStats, ImageFolderSource, frechet_distance, load_source

logger = logging.getLogger(__name__)

RESOLUTION = 16
NUM_CLASSES = 10
CONFIDENCE_THRESHOLD = 0.9
FLOOR_NUM_IMAGES = 512
# Bump when the architecture or the training recipe changes, so that stale cached weights are never used.
CLASSIFIER_VERSION = 1
DEFAULT_CACHE_DIR = "~/.cache/ddpm"
_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, PIL's convert("L")

# Training recipe: Adam with a one-cycle LR, random +-1 pixel shifts, and outlier exposure (noise images pushed
# towards the uniform prediction, Hendrycks et al. 2019) so that confidence means "a clean digit".
_EPOCHS = 15
_BATCH_SIZE = 64
_LEARNING_RATE = 2e-3
_OUTLIER_WEIGHT = 0.5
_SEED = 0

_classifiers: dict[str, DigitClassifier] = {}


class DigitClassifier(nn.Module):
    """A 3-convolution CNN for 1x16x16 images in [-1, 1]: ``features`` (128-d, after ReLU) then a linear head."""

    feature_dim = 128

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(2 * width * (RESOLUTION // 4) ** 2, self.feature_dim),
            nn.ReLU(),
        )
        self.head = nn.Linear(self.feature_dim, NUM_CLASSES)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


# ---------------------------------------------------------------------------------------------------- data


@lru_cache(maxsize=4)
def real_digits(split: str = "test") -> tuple[np.ndarray, np.ndarray]:
    """The built-in digits of ``split`` as the training pipeline sees them: uint8 [N, 16, 16, 1] and labels [N].

    The images go through :class:`~ddpm.data.transforms.ImageTransform`
    (``resolution=16``, one channel, centre crop) and back
    to uint8 as :func:`ddpm.io.images.to_uint8` rounds samples, so real and generated digits are quantised alike.
    The arrays are cached and read-only.
    """
    dataset = load_builtin_dataset("digits", split)
    transform = ImageTransform(RESOLUTION, channels=1, center_crop=True)
    x = torch.stack([transform(image, torch.Generator()) for image in dataset["image"]])
    images = ((x / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    labels = np.asarray(dataset["label"], dtype=np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def _as_nhwc(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 [N, H, W] or [N, H, W, C] (C = 1 or 3) as a float [N, H, W, C] tensor in 0..255, checked."""
    array = images.cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if array.dtype != np.uint8:
        raise ValueError(f"digit samples must be uint8 images, got dtype {array.dtype}")
    if array.ndim == 3:
        array = array[..., None]
    if array.ndim != 4 or array.shape[3] not in (1, 3):
        raise ValueError(f"digit samples must be [N, H, W] or [N, H, W, C] with C in (1, 3), got {array.shape}")
    if array.shape[1] != array.shape[2]:
        raise ValueError(f"digit samples must be square, got {array.shape[1]}x{array.shape[2]}")
    if len(array) < 2:
        raise ValueError(f"need at least 2 digit samples to estimate feature statistics, got {len(array)}")
    return torch.from_numpy(array.astype(np.float32))  # a copy: cached inputs are read-only


def to_classifier_input(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 [N, H, W(, C)] images to the classifier's float [N, 1, 16, 16] in [-1, 1].

    RGB is converted to luma; other sizes are resized to 16x16 (bilinear, antialiased).
    """
    x = _as_nhwc(images)
    if x.shape[3] == 3:
        x = x @ torch.tensor(_LUMA)[:, None]
    x = x.permute(0, 3, 1, 2) / 127.5 - 1
    if x.shape[-1] != RESOLUTION:
        x = F.interpolate(x, size=(RESOLUTION, RESOLUTION), mode="bilinear", antialias=True, align_corners=False)
    return x.clamp(-1, 1)


# ---------------------------------------------------------------------------------------------------- classifier


@contextmanager
def _deterministic_cpu(seed: int) -> Iterator[None]:
    """One thread (a fixed reduction order, and no fight over cores with other jobs) and a seeded global RNG for
    the weight initialisation; both restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield
    finally:
        torch.set_num_threads(threads)


def _outliers(n: int, generator: torch.Generator) -> torch.Tensor:
    """Non-digit images: pixel-uniform noise, Gaussian noise and smooth (4x4 upsampled) noise, a third each."""
    k = n // 3
    uniform = torch.rand(k, 1, RESOLUTION, RESOLUTION, generator=generator) * 2 - 1
    gaussian = (torch.randn(k, 1, RESOLUTION, RESOLUTION, generator=generator) * 0.5).clamp(-1, 1)
    coarse = torch.rand(n - 2 * k, 1, 4, 4, generator=generator) * 2 - 1
    smooth = F.interpolate(coarse, size=(RESOLUTION, RESOLUTION), mode="bilinear", align_corners=False)
    return torch.cat([uniform, gaussian, smooth])


def _shift(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Translate the batch by -1..1 pixels in each direction, filling with the black background."""
    dy, dx = torch.randint(-1, 2, (2,), generator=generator).tolist()
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)
    return padded[:, :, 1 + dy : 1 + dy + RESOLUTION, 1 + dx : 1 + dx + RESOLUTION]


def train_classifier(seed: int = _SEED) -> DigitClassifier:
    """Train the digit classifier on the ``train`` split (a few seconds on one CPU thread); returns it in eval mode."""
    images, labels = real_digits("train")
    x, y = to_classifier_input(images), torch.tensor(labels)
    with _deterministic_cpu(seed):
        model = DigitClassifier()
        generator = torch.Generator().manual_seed(seed)
        steps = _EPOCHS * math.ceil(len(x) / _BATCH_SIZE)
        optimizer = torch.optim.Adam(model.parameters(), lr=_LEARNING_RATE)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, _LEARNING_RATE, total_steps=steps)
        for _ in range(_EPOCHS):
            order = torch.randperm(len(x), generator=generator)
            for batch in order.split(_BATCH_SIZE):
                loss = F.cross_entropy(model(_shift(x[batch], generator)), y[batch])
                outlier_logp = model(_outliers(len(batch) // 2, generator)).log_softmax(dim=1)
                loss = loss + _OUTLIER_WEIGHT * -outlier_logp.mean()  # cross-entropy to the uniform distribution
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
    return model.eval().requires_grad_(False)


def classifier_path(cache_dir: str | os.PathLike = DEFAULT_CACHE_DIR) -> Path:
    return Path(cache_dir).expanduser() / f"digits-classifier-v{CLASSIFIER_VERSION}.safetensors"


def load_classifier(cache_dir: str | os.PathLike | None = DEFAULT_CACHE_DIR, retrain: bool = False) -> DigitClassifier:
    """The digit classifier: from the cache file if there is one (and not ``retrain``), else trained and cached.

    ``cache_dir=None`` trains without touching the disk. A cache that cannot be written only logs a warning.
    """
    key = "" if cache_dir is None else str(classifier_path(cache_dir))
    if not retrain and key in _classifiers:
        return _classifiers[key]
    path = classifier_path(cache_dir) if cache_dir is not None else None
    if path is not None and path.is_file() and not retrain:
        model = DigitClassifier()
        try:
            model.load_state_dict(read_safetensors(path))
        except (ValueError, RuntimeError) as e:
            raise ValueError(f"{path}: not a digit classifier of version {CLASSIFIER_VERSION} ({e}); delete it") from e
        model.eval().requires_grad_(False)
    else:
        model = train_classifier()
        if path is not None:
            try:
                with atomic_write_file(path, shared=True) as tmp:  # shared: processes may train it at once
                    write_safetensors(model.state_dict(), tmp)
            except OSError as e:
                logger.warning("Could not cache the digit classifier in %s: %s", path, e)
    _classifiers[key] = model
    return model


@torch.no_grad()
def _run(classifier: DigitClassifier, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Penultimate features (float64) and class probabilities of classifier inputs."""
    features = torch.cat([classifier.features(chunk) for chunk in x.split(1024)])
    probs = classifier.head(features).softmax(dim=1)
    return features.double().numpy(), probs.double().numpy()


def classifier_accuracy(classifier: DigitClassifier | None = None) -> float:
    """Accuracy of the classifier on the held-out ``test`` split."""
    classifier = classifier or load_classifier()
    images, labels = real_digits("test")
    _, probs = _run(classifier, to_classifier_input(images))
    return float((probs.argmax(axis=1) == labels).mean())


# ---------------------------------------------------------------------------------------------------- metrics


def read_samples(source: str, num_images: int | None = None) -> np.ndarray:
    """uint8 [N, H, W, 3] images of an image folder or a .npz (as ``scripts/evaluate.py`` reads them), the first
    ``num_images`` of them when given; ValueError for statistics files and images of different sizes."""
    dataset = ImageFolderSource(source) if Path(source).is_dir() else load_source(source)
    if isinstance(dataset, FeatureStats):
        raise ValueError(f"{source}: a statistics file holds no images; give the samples themselves")
    n = len(dataset) if num_images is None else min(num_images, len(dataset))
    images = [dataset[i] for i in range(n)]
    if len({image.shape for image in images}) > 1:
        raise ValueError(f"{source}: the images have different sizes: {sorted({image.shape for image in images})}")
    return np.stack(images)


def evaluate_digits(
    images: np.ndarray | torch.Tensor, classifier: DigitClassifier | None = None
) -> dict[str, float | int | list[int]]:
    """Score generated digits (uint8 [N, H, W(, C)], C = 1 or 3); see the module docstring for each figure.

    Returns ``classifier_fid``, ``class_entropy`` (nats, at most log 10), ``confident_share``, ``class_histogram``
    (counts per digit), ``background_level``, ``chroma`` and ``num_images``.
    """
    classifier = classifier or load_classifier()
    pixels = _as_nhwc(images) / 255
    features, probs = _run(classifier, to_classifier_input(images))
    real_features, _ = _run(classifier, to_classifier_input(real_digits("test")[0]))
    ref, gen = FeatureStats.from_features(real_features), FeatureStats.from_features(features)
    histogram = np.bincount(probs.argmax(axis=1), minlength=NUM_CLASSES)
    shares = histogram[histogram > 0] / len(probs)
    gray = pixels @ torch.tensor(_LUMA)[:, None] if pixels.shape[3] == 3 else pixels
    darkest = gray.flatten(1).sort(dim=1).values[:, : max(1, gray[0].numel() // 4)]
    return {
        "classifier_fid": frechet_distance(gen.mu, gen.sigma, ref.mu, ref.sigma),
        "class_entropy": float(-(shares * np.log(shares)).sum()),
        "confident_share": float((probs.max(axis=1) > CONFIDENCE_THRESHOLD).mean()),
        "class_histogram": histogram.tolist(),
        "background_level": float(darkest.mean()),
        "chroma": float((pixels.amax(dim=3) - pixels.amin(dim=3)).mean()),
        "num_images": len(probs),
    }


def real_floor(
    num_images: int = FLOOR_NUM_IMAGES, seed: int = 0, classifier: DigitClassifier | None = None
) -> dict[str, float | int | list[int]]:
    """:func:`evaluate_digits` of ``num_images`` real training digits (a seeded random choice): the best a model
    of the training data can expect with that many samples."""
    images, _ = real_digits("train")
    if not 2 <= num_images <= len(images):
        raise ValueError(f"num_images={num_images} must be in [2, {len(images)}] (the training split's size)")
    chosen = np.random.default_rng(seed).choice(len(images), size=num_images, replace=False)
    return evaluate_digits(images[np.sort(chosen)], classifier)
