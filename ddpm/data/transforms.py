"""train_unconditional's per-image transforms, with every random choice drawn from an explicit generator.

:class:`ImageTransform` is ``Resize(res, bilinear)`` (shorter side) -> ``CenterCrop``/``RandomCrop`` -> optional
horizontal flip -> ``ToTensor`` -> ``Normalize([0.5], [0.5])``, on the image converted to the model's channel
count, in two parts: :meth:`~ImageTransform.resize` (deterministic: what a prepared dataset stores) and
:meth:`~ImageTransform.augment` (the random crop and flip, and the scaling). Unlike ``image.convert("RGB")``,
16-bit and float images are rescaled to 8 bits instead of clipped (see :func:`convert_image`), or with
``preserve_precision`` (train_unconditional's ``--preserve_input_precision``) kept at full precision: converted to
float32 first, then resized, cropped and flipped (see :func:`to_float`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode


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


def to_float(image: Image.Image, channels: int) -> torch.Tensor:
    """``image`` as a float32 ``(channels, H, W)`` tensor in [0, 1] without rounding to 8 bits.

    16-bit modes (``"I;16*"``, ``"I"``) are divided by 65535 (``"I"`` clipped to 0..65535 first); ``"F"`` is kept as
    it is (taken to hold 0..1); other modes are converted as by :func:`convert_image` and divided by 255. A
    one-channel image is repeated to 3 channels for a 3-channel model (upstream's ``_ensure_three_channels``).
    """
    if image.mode.startswith("I"):
        array = np.clip(np.asarray(image, dtype=np.float64), 0, 65535) / 65535
    elif image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
    else:
        array = np.asarray(convert_image(image, channels), dtype=np.float64) / 255
    tensor = torch.from_numpy(array.astype(np.float32))
    tensor = tensor[None] if tensor.ndim == 2 else tensor.permute(2, 0, 1)
    if tensor.shape[0] != channels:  # a 16-bit or float grayscale image for an RGB model
        tensor = tensor.expand(channels, -1, -1).contiguous()
    return tensor


@dataclass
class ImageTransform:
    """train_unconditional's augmentations, with every random choice drawn from an explicit generator.

    ``resolution``: output size; the shorter side is resized to it (bilinear, antialiased; smaller images are
    upscaled), then a ``resolution`` square is cropped: centred if ``center_crop``, else at a random offset.
    ``random_flip``: flip horizontally with probability 0.5. ``channels``: 1 or 3 (see :func:`convert_image`).
    ``preserve_precision``: the image becomes float32 before the resize (see :func:`to_float`), so 16-bit and float
    pixels are never rounded to 8 bits. Output: float32 ``(channels, resolution, resolution)`` in [-1, 1]
    (``(x/255 - 0.5) / 0.5``, or ``(x - 0.5) / 0.5`` of the float image).
    """

    resolution: int
    channels: int = 3
    center_crop: bool = False
    random_flip: bool = False
    preserve_precision: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.resolution, int) or self.resolution < 1:
            raise ValueError(f"resolution={self.resolution!r} must be a positive integer")
        if self.channels not in (1, 3):
            raise ValueError(f"channels={self.channels!r} must be 1 or 3")

    def __call__(self, image: Image.Image, generator: torch.Generator) -> torch.Tensor:
        """Transform one image: :meth:`resize`, then :meth:`augment`."""
        return self.augment(self.resize(image), generator)

    def resize(self, image: Image.Image) -> np.ndarray:
        """The deterministic part: ``image`` converted, resized (shorter side to ``resolution``) and, with
        ``center_crop``, cropped; ``(H, W, channels)``, uint8 (float32 in [0, 1] with ``preserve_precision``). What
        a prepared dataset stores (:mod:`ddpm.data.prepared`), so that reading it gives exactly the pixels of
        decoding the source."""
        res = self.resolution
        # a PIL image (8 bits) or, preserving the precision, a float tensor: the same resize and crop
        image = to_float(image, self.channels) if self.preserve_precision else convert_image(image, self.channels)
        image = TF.resize(image, res, interpolation=InterpolationMode.BILINEAR, antialias=True)
        if self.center_crop:
            image = TF.center_crop(image, [res, res])
        if self.preserve_precision:
            return image.permute(1, 2, 0).numpy()
        return np.asarray(image, dtype=np.uint8).reshape(image.height, image.width, self.channels)

    def augment(self, pixels: np.ndarray, generator: torch.Generator) -> torch.Tensor:
        """The random part, on :meth:`resize`'s output: random crop (unless ``center_crop``), flip, scaling to
        [-1, 1] (see :meth:`crop_and_flip`)."""
        return to_model_range(self.crop_and_flip(pixels, generator)[None])[0]

    def augment_batch(self, images: Sequence[np.ndarray], aug_seeds: Sequence[int]) -> torch.Tensor:
        """:meth:`augment` of each image with a generator seeded by its ``aug_seed``, stacked ``(N, C, res, res)``:
        the same values as one call per image, with the per-image cost down to the random draws and a copy."""
        res = self.resolution
        batch = np.empty((len(images), res, res, self.channels), dtype=images[0].dtype)
        for row, (pixels, aug_seed) in enumerate(zip(images, aug_seeds, strict=True)):
            batch[row] = self.crop_and_flip(pixels, torch.Generator().manual_seed(int(aug_seed)))
        return to_model_range(batch)

    def crop_and_flip(self, pixels: np.ndarray, generator: torch.Generator) -> np.ndarray:
        """A view of ``pixels`` (``(H, W, C)``), randomly cropped to ``resolution`` and maybe flipped.
        Random draws, in order: crop row, crop column (only when there is room), flip (if ``random_flip``)."""
        res = self.resolution
        height, width = pixels.shape[:2]
        if (height, width) != (res, res):  # like torchvision's RandomCrop, draw nothing when there is no room
            top = int(torch.randint(0, height - res + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - res + 1, (1,), generator=generator))
            pixels = pixels[top : top + res, left : left + res]
        if self.random_flip and float(torch.rand(1, generator=generator)) < 0.5:
            pixels = pixels[:, ::-1]
        return pixels


# ToTensor's arithmetic (float32, then / 255), then Normalize([0.5], [0.5]), for each of the 256 pixel values: a
# lookup gives every pixel exactly the value of those operations, in one pass instead of four.
_MODEL_RANGE = torch.arange(256, dtype=torch.float32).div(255).sub_(0.5).div_(0.5).numpy()


def to_model_range(pixels: np.ndarray) -> torch.Tensor:
    """``(N, H, W, C)`` pixels -> float32 ``(N, C, H, W)`` in [-1, 1]: uint8 as ToTensor then Normalize([0.5], [0.5]),
    float32 in [0, 1] (``preserve_precision``) as Normalize."""
    pixels = pixels.transpose(0, 3, 1, 2)
    if pixels.dtype == np.uint8:
        return torch.from_numpy(np.take(_MODEL_RANGE, pixels))
    return torch.from_numpy(np.array(pixels, dtype=np.float32)).sub_(0.5).div_(0.5)  # a copy: never the source
