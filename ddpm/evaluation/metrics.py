"""Sample-quality metrics: FID, Inception Score and KID on the TensorFlow FID Inception-v3
(``ddpm.evaluation.inception``).

Conventions follow pytorch-fid / torch-fidelity so the numbers are comparable with published ones:

* images are uint8 RGB (grayscale repeated to 3 channels), divided by 255, resized bilinearly to 299x299 and scaled
  to [-1, 1] inside the network; cuDNN's TF32 is switched off so features are full float32;
* FID uses the 2048 pool3 features, statistics with ``np.cov`` (unbiased) and float64 maths;
* IS uses the unbiased 1008-way logits, 10 splits, samples shuffled with seed 2020 (torch-fidelity's defaults);
* KID uses the cubic polynomial kernel, 100 subsets of min(1000, N) samples, seed 2020 (torch-fidelity's defaults).

Image sources (``load_source``): a folder of images (searched recursively; in ``scripts/sample.py``'s output folder,
its ``images/``), a ``.npz`` with uint8 ``images``
[N, H, W, C] (or ``arr_0``, as OpenAI's sample batches), a Hugging Face dataset (``builtin:NAME[:SPLIT]``, a
``save_to_disk`` folder or a Hub id), or a statistics ``.npz`` (``mu``, ``sigma``, ``num_images``) as written by
``FeatureStats.save`` and by pytorch-fid's ``--save-stats``.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..io.files import atomic_write_file
from .generate import IMAGES_FOLDER, SETTINGS_NAME
from .inception import FIDInceptionV3

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
IS_SPLITS = 10
KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
SEED = 2020  # torch-fidelity's rng_seed, used for the IS shuffle and the KID subsets


# ----------------------------------------------------------------------------------------------------- statistics


def check_stats_path(path: str | os.PathLike) -> Path:
    """``path`` as a Path, if it names a statistics file (``.npz``: numpy would add the suffix otherwise)."""
    path = Path(path)
    if path.suffix != ".npz":
        raise ValueError(f"statistics file name must end in .npz, got {path}")
    return path


@dataclass(frozen=True)
class FeatureStats:
    """Mean and covariance of Inception pool3 features: all that FID needs of a set of images."""

    mu: np.ndarray
    sigma: np.ndarray
    num_images: int

    def __post_init__(self) -> None:
        if self.mu.ndim != 1 or self.sigma.shape != (self.mu.size, self.mu.size):
            raise ValueError(f"mu must be [D] and sigma [D, D], got {self.mu.shape} and {self.sigma.shape}")

    @classmethod
    def from_features(cls, features: np.ndarray) -> FeatureStats:
        """Statistics of [N, D] features (N >= 2), computed in float64."""
        features = np.asarray(features, dtype=np.float64)
        if features.ndim != 2 or len(features) < 2:
            raise ValueError(f"need [N, D] features with N >= 2 to estimate a covariance, got {features.shape}")
        return cls(features.mean(axis=0), np.cov(features, rowvar=False), len(features))

    @classmethod
    def from_sums(cls, count: int, total: np.ndarray, outer: np.ndarray) -> FeatureStats:
        """Statistics from ``count`` features' sum [D] and sum of outer products [D, D] (float64): partial sums of
        several processes add up, so a set split across ranks needs one all-reduce, not its features."""
        if count < 2:
            raise ValueError(f"need at least 2 features to estimate a covariance, got {count}")
        mu = np.asarray(total, dtype=np.float64) / count
        sigma = (np.asarray(outer, dtype=np.float64) - count * np.outer(mu, mu)) / (count - 1)
        return cls(mu, sigma, int(count))

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``mu``, ``sigma``, ``num_images`` to a ``.npz`` atomically (exactly at ``path``); returns it."""
        path = check_stats_path(path)
        # shared: every rank of a run may cache the same reference statistics
        with atomic_write_file(path, shared=True) as tmp, open(tmp, "wb") as f:
            np.savez(f, mu=self.mu, sigma=self.sigma, num_images=np.int64(self.num_images))  # np.savez(name) adds .npz
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> FeatureStats:
        """Read a statistics ``.npz``; ``num_images`` may be missing (pytorch-fid's files), it is then 0."""
        with np.load(path, allow_pickle=False) as data:
            missing = {"mu", "sigma"} - set(data.files)
            if missing:
                raise ValueError(f"{path}: not a statistics file, missing key(s) {sorted(missing)}")
            num_images = int(data["num_images"]) if "num_images" in data.files else 0
            try:
                return cls(data["mu"].astype(np.float64), data["sigma"].astype(np.float64), num_images)
            except ValueError as e:
                raise ValueError(f"{path}: {e}") from None


def _drop_roundoff(eigenvalues: np.ndarray) -> np.ndarray:
    """Zero the eigenvalues of a PSD matrix that are below round-off (tiny negative or positive ones alike).

    Covariances of fewer images than feature dimensions are singular; round-off makes their zero eigenvalues
    +-1e-16 * max, whose square roots (1e-8 * sqrt(max), times 2048) would otherwise dominate a near-zero FID.
    """
    tolerance = np.abs(eigenvalues).max(initial=0.0) * len(eigenvalues) * np.finfo(np.float64).eps
    return np.where(eigenvalues > tolerance, eigenvalues, 0.0)


def _sqrtm_psd(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix."""
    eigenvalues, eigenvectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (eigenvectors * np.sqrt(_drop_roundoff(eigenvalues))) @ eigenvectors.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

    d = |mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2)).  The trace term is computed as the
    sum of square roots of the eigenvalues of sqrt(sigma1) sigma2 sqrt(sigma1), which is symmetric and has the same
    eigenvalues as sigma1 sigma2: unlike ``scipy.linalg.sqrtm(sigma1 @ sigma2)`` it needs no epsilon for singular
    covariances (fewer images than feature dimensions) and never returns complex values.
    """
    mu1, mu2 = np.asarray(mu1, dtype=np.float64), np.asarray(mu2, dtype=np.float64)
    sigma1, sigma2 = np.asarray(sigma1, dtype=np.float64), np.asarray(sigma2, dtype=np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(
            f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}"
        )
    sqrt1 = _sqrtm_psd(sigma1)
    product = sqrt1 @ sigma2 @ sqrt1
    eigenvalues = np.linalg.eigvalsh((product + product.T) / 2)
    trace_covmean = np.sqrt(_drop_roundoff(eigenvalues)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_covmean)


def inception_score(
    logits: np.ndarray | torch.Tensor, splits: int = IS_SPLITS, seed: int = SEED
) -> tuple[float, float]:
    """Inception Score (mean, std over ``splits``) of [N, C] classifier logits, as torch-fidelity computes it."""
    logits = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    n = len(logits)
    if logits.ndim != 2 or n < splits:
        raise ValueError(f"need [N, C] logits with N >= splits={splits}, got {tuple(logits.shape)}")
    log_p = torch.log_softmax(logits[np.random.RandomState(seed).permutation(n)], dim=1)
    scores = []
    for i in range(splits):
        chunk = log_p[i * n // splits : (i + 1) * n // splits]
        log_marginal = torch.logsumexp(chunk, dim=0) - math.log(len(chunk))
        kl = (chunk.exp() * (chunk - log_marginal)).sum(dim=1).mean()
        scores.append(math.exp(kl.item()))
    return float(np.mean(scores)), float(np.std(scores))


def _polynomial_mmd2(x: torch.Tensor, y: torch.Tensor) -> float:
    """Unbiased MMD^2 with the kernel k(a, b) = (a.b / D + 1)^3 (KID's kernel)."""
    m, dim = x.shape
    k_xx = (x @ x.T / dim + 1) ** 3
    k_yy = (y @ y.T / dim + 1) ** 3
    k_xy = (x @ y.T / dim + 1) ** 3
    within = (k_xx.sum() - k_xx.diagonal().sum() + k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))
    return (within - 2 * k_xy.sum() / (m * m)).item()


def kernel_inception_distance(
    features1: np.ndarray,
    features2: np.ndarray,
    subset_size: int = KID_SUBSET_SIZE,
    num_subsets: int = KID_SUBSETS,
    seed: int = SEED,
    device: str | torch.device = "cpu",
) -> tuple[float, float]:
    """KID (mean, std over ``num_subsets`` random subsets) between two [N, D] feature sets, in float64.

    Subsets are drawn like torch-fidelity (one ``RandomState(seed)``, without replacement, set 1 then set 2); the
    subset size is lowered to the smaller set's size when a set is smaller than ``subset_size``.
    """
    n1, n2 = len(features1), len(features2)
    size = min(subset_size, n1, n2)
    if size < 2:
        raise ValueError(f"KID needs at least 2 images per set, got {n1} and {n2}")
    if size < subset_size:
        logger.warning("KID subset size lowered from %d to %d (the smaller set's size)", subset_size, size)
    x_all = torch.as_tensor(np.asarray(features1), dtype=torch.float64, device=device)
    y_all = torch.as_tensor(np.asarray(features2), dtype=torch.float64, device=device)
    rng = np.random.RandomState(seed)
    mmds = []
    for _ in range(num_subsets):
        x = x_all[torch.from_numpy(rng.choice(n1, size, replace=False)).to(device)]
        y = y_all[torch.from_numpy(rng.choice(n2, size, replace=False)).to(device)]
        mmds.append(_polynomial_mmd2(x, y))
    return float(np.mean(mmds)), float(np.std(mmds))


# -------------------------------------------------------------------------------------------------- image sources


def _to_rgb_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] from a PIL image (any mode, converted as pytorch-fid does) or a uint8 [H, W(, 1|3)] array."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    if image.ndim == 2:
        image = image[..., None]
    return np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image


class ImageFolderSource(Dataset):
    """Every image file under ``root`` (recursively, sorted by path) as uint8 [H, W, 3] arrays."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not self.files:
            raise ValueError(f"{self.root}: no image files ({', '.join(IMAGE_EXTENSIONS)}) found in this folder")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> np.ndarray:
        path = self.files[index]
        try:
            with Image.open(path) as image:
                return _to_rgb_array(image)
        except OSError as e:
            raise ValueError(f"cannot read image {path}: {e}") from e


class ArraySource(Dataset):
    """A uint8 [N, H, W], [N, H, W, 1] or [N, H, W, 3] array as uint8 [H, W, 3] images."""

    def __init__(self, images: np.ndarray, name: str = "array") -> None:
        channels_ok = images.ndim == 3 or (images.ndim == 4 and images.shape[3] in (1, 3))
        if images.dtype != np.uint8 or not channels_ok:
            raise ValueError(
                f"{name}: expected uint8 images [N, H, W] or [N, H, W, C] with C in (1, 3), "
                f"got {images.dtype} {images.shape}"
            )
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> np.ndarray:
        return _to_rgb_array(self.images[index])


class HFImageSource(Dataset):
    """The image column of a Hugging Face ``datasets.Dataset`` as uint8 [H, W, 3] arrays."""

    def __init__(self, dataset: Any, column: str) -> None:
        self.dataset = dataset.select_columns([column])
        self.column = column

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> np.ndarray:
        return _to_rgb_array(self.dataset[index][self.column])


def load_source(source: str | os.PathLike) -> FeatureStats | Dataset:
    """Open an image source (see the module docstring): a statistics file gives ``FeatureStats``, anything else a
    Dataset of uint8 [H, W, 3] arrays.  Datasets are read like ``train.py --dataset_name`` reads them (its "train"
    split; ``builtin:NAME:SPLIT`` for another split of a built-in one)."""
    source = str(source)
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix != ".npz":
            raise ValueError(f"{path}: expected an image folder, a .npz file or a dataset, not this file")
        with np.load(path, allow_pickle=False) as data:
            if "mu" in data.files and "sigma" in data.files:
                return FeatureStats.load(path)
            key = next((k for k in ("images", "arr_0") if k in data.files), None)
            if key is None:
                raise ValueError(f"{path}: expected key 'images' (or 'mu' and 'sigma'), found {data.files}")
            return ArraySource(data[key], name=f"{path}[{key!r}]")
    if path.is_dir() and (path / SETTINGS_NAME).is_file() and (path / IMAGES_FOLDER).is_dir():
        # scripts/sample.py's output folder: its samples, not the grid of them beside
        logger.info("%s holds scripts/sample.py's output: reading its samples in %s/", path, IMAGES_FOLDER)
        path = path / IMAGES_FOLDER
    if path.is_dir() and any(p.suffix.lower() in IMAGE_EXTENSIONS for p in path.rglob("*")):
        return ImageFolderSource(path)
    from ..data.datasets import load_image_dataset  # datasets is slow to import; only dataset sources need it

    try:
        dataset, column = load_image_dataset(dataset_name=source)
    except (OSError, ValueError) as e:
        raise ValueError(f"{source!r} is no image folder, .npz file or loadable dataset: {e}") from e
    return HFImageSource(dataset, column)


# ------------------------------------------------------------------------------------------------------- features


def _collate(images: list[np.ndarray]) -> torch.Tensor | list[torch.Tensor]:
    """Stack same-sized images into uint8 [B, H, W, 3]; images of mixed sizes stay a list."""
    if all(image.shape == images[0].shape for image in images):
        return torch.from_numpy(np.stack(images))
    return [torch.from_numpy(np.array(image)) for image in images]


def _to_network_input(batch: torch.Tensor | list[torch.Tensor], device: torch.device, size: int) -> torch.Tensor:
    """uint8 NHWC images to float [B, 3, H, W] in [0, 1] on ``device``; a list of images of mixed sizes is resized
    image by image to the network's input size (what the network would do to each of them anyway)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device).permute(0, 3, 1, 2).float() / 255
    resized = [
        F.interpolate(
            _to_network_input(image[None], device, size), size=(size, size), mode="bilinear", align_corners=False
        )
        for image in batch
    ]
    return torch.cat(resized)


@contextmanager
def _full_fp32_convolutions() -> Iterator[None]:
    # cuDNN runs float32 convolutions in TF32 by default on recent GPUs, which shifts FID in the second decimal.
    previous = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = previous


@torch.no_grad()
def compute_features(
    images: Dataset | np.ndarray,
    model: FIDInceptionV3,
    batch_size: int = 50,
    num_workers: int = 0,
    progress: bool = True,
    desc: str = "Inception features",
) -> tuple[np.ndarray, np.ndarray | None]:
    """Inception pool3 features [N, 2048] (float32) and unbiased logits [N, 1008] (None if the network has no
    classifier) of a Dataset of uint8 [H, W, 3] images or a uint8 [N, H, W(, C)] array, on the model's device."""
    if isinstance(images, np.ndarray):
        images = ArraySource(images)
    if len(images) == 0:
        raise ValueError("no images to compute features of")
    device = next(model.parameters()).device
    loader = DataLoader(images, batch_size=batch_size, num_workers=num_workers, collate_fn=_collate)
    features, logits = [], []
    model.eval()
    with _full_fp32_convolutions(), tqdm(total=len(images), desc=desc, unit="img", disable=not progress) as bar:
        for batch in loader:
            pool3, batch_logits = model(_to_network_input(batch, device, model.input_size))
            features.append(pool3.cpu())
            if batch_logits is not None:
                logits.append(batch_logits.cpu())
            bar.update(len(batch))
    return torch.cat(features).numpy(), (torch.cat(logits).numpy() if logits else None)


# ----------------------------------------------------------------------------------------------------- evaluation


def _statistics(
    source: Dataset | FeatureStats, desc: str, **kwargs: Any
) -> tuple[FeatureStats, np.ndarray | None, np.ndarray | None]:
    """A loaded source's statistics, with its features and logits when it holds images (None for statistics)."""
    if isinstance(source, FeatureStats):
        return source, None, None
    features, logits = compute_features(source, desc=desc, **kwargs)
    return FeatureStats.from_features(features), features, logits


def evaluate(
    samples: str | os.PathLike | None,
    reference: str | os.PathLike,
    model: FIDInceptionV3,
    *,
    batch_size: int = 50,
    num_workers: int = 0,
    compute_is: bool = True,
    compute_kid: bool = True,
    kid_subset_size: int = KID_SUBSET_SIZE,
    save_stats: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict[str, float | int | None]:
    """FID between ``samples`` and ``reference`` (any ``load_source`` source), IS of the samples, KID between both.

    Returns ``{"fid", "is_mean", "is_std", "kid_mean", "kid_std", "num_samples", "num_reference"}``; a metric that
    cannot be computed (IS without a classifier or sample images, KID against statistics) or was turned off is None.
    ``save_stats`` writes the reference statistics (reusable as ``reference`` later); ``samples`` may then be None.
    """
    kwargs = {"model": model, "batch_size": batch_size, "num_workers": num_workers, "progress": progress}
    ref_stats, ref_features, _ = _statistics(load_source(reference), "reference", **kwargs)
    if save_stats is not None:
        logger.info("saved reference statistics to %s", ref_stats.save(save_stats))
    result: dict[str, float | int | None] = dict.fromkeys(("fid", "is_mean", "is_std", "kid_mean", "kid_std"))
    result.update(num_samples=None, num_reference=ref_stats.num_images)
    if samples is None:
        return result

    sample_stats, sample_features, sample_logits = _statistics(load_source(samples), "samples", **kwargs)
    result["num_samples"] = sample_stats.num_images
    result["fid"] = frechet_distance(sample_stats.mu, sample_stats.sigma, ref_stats.mu, ref_stats.sigma)
    if compute_is:
        result["is_mean"], result["is_std"] = _inception_score_if_possible(sample_features, sample_logits)
    if compute_kid:
        if sample_features is None or ref_features is None:
            logger.warning("KID skipped: it needs the features of both sets, not statistics")
        else:
            device = next(model.parameters()).device
            result["kid_mean"], result["kid_std"] = kernel_inception_distance(
                sample_features, ref_features, subset_size=kid_subset_size, device=device
            )
    return result


def _inception_score_if_possible(
    features: np.ndarray | None, logits: np.ndarray | None
) -> tuple[float | None, float | None]:
    """The samples' Inception Score, or (None, None) with a warning saying why it cannot be computed."""
    if features is None:
        logger.warning("Inception Score skipped: the samples are statistics, not images")
    elif logits is None:
        logger.warning("Inception Score skipped: the Inception weights have no classifier (fc) layer")
    elif len(logits) < IS_SPLITS:
        logger.warning("Inception Score skipped: it needs at least %d samples", IS_SPLITS)
    else:
        return inception_score(logits)
    return None, None
