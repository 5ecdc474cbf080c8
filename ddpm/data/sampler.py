"""Randomness and sharding: seeds derived from integers, and a sampler that shards global batches exactly.

Every epoch is one fixed stream of samples: a permutation of the dataset drawn from ``(seed, epoch)``, cut into
global batches of ``G = per_device_batch * world_size * grad_accum`` samples, one global batch per optimizer step.
Within global batch ``k``, micro-step ``m`` of rank ``r`` takes stream positions ``k*G + (m*world_size + r)*B`` up
to ``+B``. Each sample's augmentation (crop offset, flip) comes from a ``torch.Generator`` seeded from
``(seed, epoch, stream position)``, and the sampler hands ``(index, aug_seed)`` pairs to the dataset.
Hence the set of images and their exact pixels in optimizer step ``k`` depend only on ``(seed, epoch, k, G)``:
not on the number of processes, the accumulation split, the number of DataLoader workers, the global RNG, or
whether the run was resumed (``set_epoch(epoch, start_step)`` starts the same stream at step ``start_step``).
A run on 1 process with batch ``G`` and a run on N processes x accumulation therefore average gradients over the
same samples, and a resumed run continues exactly where the interrupted one stopped.
"""

from __future__ import annotations

from collections.abc import Iterator
from enum import IntEnum

import torch
from torch.utils.data import DataLoader, Sampler

_MASK64 = (1 << 64) - 1


class SeedStream(IntEnum):
    """The independent random streams of a run, each seeded with ``derive_seed(seed, stream, ...)``.

    One table, so that no two uses of randomness ever share a seed.
    """

    PERMUTATION = 0  # the epoch's sample order: (seed, stream, epoch)
    AUGMENTATION = 1  # one sample's crop and flip: (seed, stream, epoch, stream position)
    NOISE = 2  # one optimizer step's timesteps and noise: (seed, stream, step)
    PROCESS = 3  # a rank's global torch RNG (dropout): (seed, stream, rank)


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


class GlobalBatchSampler(Sampler[tuple[int, int]]):
    """This rank's share of each epoch's global batches, as ``(dataset index, augmentation seed)`` pairs.

    See the module docstring for the layout. Per optimizer step the rank yields ``grad_accum * per_device_batch``
    pairs: micro-batch after micro-batch, so a DataLoader with ``batch_size=per_device_batch`` gives exactly
    ``grad_accum`` micro-batches per step. ``drop_last=True`` drops the incomplete last global batch;
    ``drop_last=False`` completes it with the first samples of the epoch's permutation (each once). Call
    :meth:`set_epoch` to choose where iteration starts and how many epochs it spans.
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
        self.epochs = 1

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps (global batches) per epoch."""
        full, rest = divmod(self.dataset_len, self.global_batch_size)
        return full + int(rest > 0 and not self.drop_last)

    def micro_slice(self, micro: int) -> slice:
        """This rank's positions in micro-step ``micro`` of a global batch (positions ``0 .. G-1``).

        The training step takes the same slice of the step's global noise and timesteps, so that every image meets
        the same noise whatever the number of processes and the accumulation split.
        """
        start = (micro * self.world_size + self.rank) * self.per_device_batch
        return slice(start, start + self.per_device_batch)

    def set_epoch(self, epoch: int, start_step: int = 0, epochs: int = 1) -> None:
        """Iterate ``epochs`` epochs from epoch ``epoch``'s optimizer step ``start_step`` (non-zero only when resuming)
        on, without a break between epochs: the training loop makes one iterator for the whole run, so the
        DataLoader's prefetching runs across epoch boundaries and through the epoch-end grids and exports."""
        if not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch={epoch!r} must be a non-negative integer")
        if not isinstance(start_step, int) or not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(f"start_step={start_step!r} must be in [0, steps_per_epoch={self.steps_per_epoch}]")
        if not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"epochs={epochs!r} must be a positive integer")
        self.epoch = epoch
        self.start_step = start_step
        self.epochs = epochs

    def __len__(self) -> int:
        steps = self.epochs * self.steps_per_epoch - self.start_step
        return steps * self.grad_accum * self.per_device_batch

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for epoch in range(self.epoch, self.epoch + self.epochs):
            yield from self._epoch(epoch, self.start_step if epoch == self.epoch else 0)

    def _epoch(self, epoch: int, start_step: int) -> Iterator[tuple[int, int]]:
        generator = torch.Generator().manual_seed(derive_seed(self.seed, SeedStream.PERMUTATION, epoch))
        order = torch.randperm(self.dataset_len, generator=generator).tolist()
        for step in range(start_step, self.steps_per_epoch):
            offset = step * self.global_batch_size
            for micro in range(self.grad_accum):
                share = self.micro_slice(micro)
                for position in range(offset + share.start, offset + share.stop):
                    aug_seed = derive_seed(self.seed, SeedStream.AUGMENTATION, epoch, position)
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
        collate_fn=collate,
    )


def stop_workers(loader: DataLoader) -> None:
    """End the worker processes of ``loader`` (persistent ones live as long as the loader) now.

    The training's workers ignore SIGTERM and SIGINT (:func:`ddpm.runtime.distributed.ignore_stop_signals`): when a
    run fails with the loader still referred to (by the error's traceback), the interpreter's exit handler, which
    terminates child processes with SIGTERM and then joins them, would wait for them forever.
    """
    iterator = loader._iterator  # torch keeps the persistent workers' iterator here
    if iterator is not None:
        iterator._shutdown_workers()  # what its __del__ does: tell the workers to leave, join them
        loader._iterator = None


def collate(samples: list[torch.Tensor] | torch.Tensor) -> torch.Tensor:
    """The DataLoader's batching: a dataset that makes whole batches (``__getitems__``) hands over a tensor as is."""
    return samples if isinstance(samples, torch.Tensor) else torch.utils.data.default_collate(samples)
