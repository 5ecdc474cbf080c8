"""FID during training (``--fid_every_steps``): samples of the EMA weights against cached reference statistics.

Every evaluation draws the same ``num_samples`` images (``--fid_sampler``, DDIM by default; per-image seeds of
:mod:`ddpm.evaluation.generate`, so the curve follows the model, not the noise), split across the ranks: rank ``r``
samples images ``r, r + W, r + 2W, ...``, computes their Inception pool3 features and the features' sum and sum of
outer products; all-reducing those gives the statistics of the whole set
(:meth:`~ddpm.evaluation.metrics.FeatureStats.from_sums`).
The images, and so the FID, do not depend on the number of processes. The weights are rank 0's EMA (only rank 0
keeps one), broadcast into a separate evaluation copy of the UNet on every rank: the training model, its RNG streams
and its data are untouched, so a run with FID evaluations trains exactly the same weights as one without.

The reference is ``--fid_reference`` (a statistics ``.npz``, an image folder, a ``.npz`` of images or a dataset, as
``scripts/evaluate.py --reference`` reads them) or, by default, the training images as the model sees them
(resized and cropped to ``--resolution``, never flipped, rounded to uint8 like the samples): at most
:data:`MAX_REFERENCE_IMAGES`, evenly spaced through the dataset. Its statistics are computed once, also split across
ranks, and cached in ``output_dir`` under a name that hashes what they were computed from, so a resumed run reuses
them. FID from a few thousand samples is biased upwards against the usual 50k-sample figure: compare curves of one
run, or runs with the same ``--fid_num_samples``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from ..data.datasets import ImageDataset
from ..data.prepared import PreparedImages
from ..diffusion.schedule import NoiseSchedule
from ..io.images import to_uint8
from ..models.ema import EMA
from ..models.unet import UNet
from ..runtime.distributed import DistributedContext, all_reduce_sum, broadcast_object
from .generate import Autocast, sample_images, share_sampling_weights, weights_digest
from .inception import NUM_FEATURES, load_inception
from .metrics import FeatureStats, compute_features, frechet_distance, load_source

logger = logging.getLogger(__name__)

MAX_REFERENCE_IMAGES = 50_000
SAMPLE_SEED = 0  # the same images at every evaluation
CACHE_PREFIX = "fid_reference"


class _TrainingImages(Dataset):
    """Training images as uint8 [H, W, C] arrays: the training transform without the flip (random crops drawn with
    seed 0), rounded like the samples."""

    def __init__(self, dataset: ImageDataset | PreparedImages, indices: np.ndarray) -> None:
        self.dataset, self.indices = dataset, indices
        self.transform = dataclasses.replace(dataset.transform, random_flip=False)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> np.ndarray:
        pixels = self.dataset.resized(int(self.indices[i]))
        return to_uint8(self.transform.augment(pixels, torch.Generator().manual_seed(0))[None])[0]


class FIDMonitor:
    """Computes the FID of the EMA (or live) weights' samples; call :meth:`evaluate` on every rank at once."""

    def __init__(
        self,
        ctx: DistributedContext,
        eval_unet: UNet,
        schedule: NoiseSchedule,
        *,
        num_samples: int,
        sampler: str,
        num_inference_steps: int,
        batch_size: int,
        reference: str | None,
        training_images: ImageDataset | PreparedImages,
        training_source: dict[str, Any],
        cache_dir: Path,
        inception_weights: str | None = None,
        amp_dtype: torch.dtype | None = None,
    ) -> None:
        self.ctx = ctx
        self.device = ctx.device
        self.schedule = schedule
        self.num_samples = num_samples
        self.sampler = sampler
        self.num_inference_steps = num_inference_steps
        self.batch_size = batch_size
        # Fail now, not after hours of training, when the weights are missing.
        self.inception = load_inception(inception_weights, self.device)
        self.eval_unet = eval_unet  # the run's sampling copy of the UNet: the training weights stay untouched
        self.sampler_model = Autocast(self.eval_unet, amp_dtype) if amp_dtype is not None else self.eval_unet
        self.reference = self._reference_stats(reference, training_images, training_source, cache_dir)

    # ------------------------------------------------------------------ reference

    def _reference_stats(
        self,
        reference: str | None,
        training_images: ImageDataset | PreparedImages,
        training_source: dict[str, Any],
        cache_dir: Path,
    ) -> FeatureStats:
        if reference is not None:
            source = load_source(reference)
            if isinstance(source, FeatureStats):
                return source
            what: dict[str, Any] = {"reference": str(Path(reference).expanduser().resolve()), "images": len(source)}
        else:
            indices = np.linspace(0, len(training_images) - 1, min(len(training_images), MAX_REFERENCE_IMAGES))
            source = _TrainingImages(training_images, np.unique(indices.round().astype(np.int64)))
            what = {**training_source, "images": len(source), "dataset_images": len(training_images)}
        what["inception"] = weights_digest(self.inception.state_dict())  # other --inception_weights: other statistics
        key = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:12]
        cache = cache_dir / f"{CACHE_PREFIX}-{key}.npz"
        # Rank 0's view decides: every rank must take the same branch, or the others would wait in the all-reduce.
        if broadcast_object(self.ctx, cache.is_file()):
            return FeatureStats.load(cache)
        start = time.perf_counter()
        mine = Subset(source, range(self.ctx.rank, len(source), self.ctx.world_size))
        stats = self._all_ranks_stats(self._features(mine))
        if self.ctx.is_main:
            stats.save(cache)
            logger.info(
                "FID reference: statistics of %d images in %.0f s, cached in %s",
                stats.num_images,
                time.perf_counter() - start,
                cache,
            )
        return stats

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, unet: UNet, ema: EMA | None) -> dict[str, float | int]:
        """FID of ``num_samples`` samples of rank 0's EMA weights (``unet``'s own without EMA), on every rank."""
        start = time.perf_counter()
        share_sampling_weights(self.ctx, unet, ema, self.eval_unet)
        indices = list(range(self.ctx.rank, self.num_samples, self.ctx.world_size))
        features = [np.zeros((0, NUM_FEATURES), np.float32)]  # a rank may have no share (more ranks than images)
        with torch.no_grad():
            for lo in range(0, len(indices), self.batch_size):
                batch = sample_images(
                    self.sampler_model,
                    self.schedule,
                    indices[lo : lo + self.batch_size],
                    seed=SAMPLE_SEED,
                    sampler=self.sampler,
                    num_inference_steps=self.num_inference_steps,
                    generator_device=self.device,
                )
                features.append(self._features(to_uint8(batch)))
        stats = self._all_ranks_stats(np.concatenate(features))
        fid = frechet_distance(stats.mu, stats.sigma, self.reference.mu, self.reference.sigma)
        return {"fid": fid, "fid_num_samples": stats.num_images, "fid_seconds": time.perf_counter() - start}

    # ------------------------------------------------------------------ helpers

    def _features(self, images: Dataset | np.ndarray) -> np.ndarray:
        if len(images) == 0:  # a rank with no share (more ranks than images)
            return np.zeros((0, NUM_FEATURES), np.float32)
        features, _ = compute_features(images, self.inception, batch_size=self.batch_size, progress=False)
        return features

    def _all_ranks_stats(self, features: np.ndarray) -> FeatureStats:
        """Statistics of every rank's features together (all-reduces of the float64 sums, not the features)."""
        f = torch.from_numpy(features).to(self.device, torch.float64)
        count = torch.tensor([len(f)], dtype=torch.float64, device=self.device)
        total, outer = f.sum(dim=0), f.T @ f
        for tensor in (count, total, outer):
            all_reduce_sum(self.ctx, tensor)
        return FeatureStats.from_sums(int(count.item()), total.cpu().numpy(), outer.cpu().numpy())
