"""Shared fixtures: offline Hub access, a fake Hub client, a tiny image folder, a tiny UNet config, a tiny training
command line, a randomly initialised FID Inception network (and its weights file)."""

import inspect
import json
import os
from pathlib import Path

# Before anything imports datasets / huggingface_hub, which read these once: tests never touch the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
# numpy's OpenBLAS, read once when numpy loads: on the 2 shared cores a second BLAS thread makes the 2048x2048
# eigendecompositions of every FID ~5x slower (helpers.subprocess_env's OMP_NUM_THREADS does this for subprocesses).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

# A 2-block UNet small enough to train a few steps in a second on one CPU core.
TINY_UNET = {
    "sample_size": 8,
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": [16, 32],
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "attention_head_dim": 8,
}


@pytest.fixture(scope="session")
def tiny_image_dir(tmp_path_factory):
    """16 small RGB PNGs of different sizes and aspect ratios (so resize and crop both have work to do)."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(16):
        height, width = 10 + i % 3, 12 + i % 4
        pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img_{i:02d}.png")
    return folder


@pytest.fixture(scope="session")
def tiny_unet_json(tmp_path_factory):
    """Path of a JSON file with :data:`TINY_UNET` (our config format; diffusers' is accepted too)."""
    path = tmp_path_factory.mktemp("models") / "tiny_unet.json"
    path.write_text(json.dumps(TINY_UNET))
    return path


@pytest.fixture(scope="session")
def datasets_cache(tmp_path_factory):
    """A ``--cache_dir`` shared by the session, so the image folder is converted to Arrow once."""
    return tmp_path_factory.mktemp("hf_cache")


@pytest.fixture(scope="session")
def make_train_args(tiny_image_dir, tiny_unet_json, datasets_cache):
    """``make_train_args(output_dir)``: a fast, deterministic command line of scripts/train.py writing there.

    8x8 images, batch 4 (4 steps per epoch), 4 steps, no tracker, checkpoints every 2 steps, 4-step DDIM sample
    grids of 4 images. argparse keeps the last value of a flag, so tests append what they change.
    """

    def make(output_dir):
        return [
            "--train_data_dir", str(tiny_image_dir),
            "--cache_dir", str(datasets_cache),
            "--model_config_name_or_path", str(tiny_unet_json),
            "--output_dir", str(output_dir),
            "--resolution", "8",
            "--train_batch_size", "4",
            "--max_train_steps", "4",
            "--checkpointing_steps", "2",
            "--logging_steps", "1",
            "--lr_warmup_steps", "1",
            "--learning_rate", "1e-3",
            "--eval_batch_size", "4",
            "--ddpm_num_steps", "100",
            "--ddpm_num_inference_steps", "4",
            "--sampler", "ddim",
            "--logger", "none",
            "--seed", "0",
            "--device", "cpu",
        ]  # fmt: skip

    return make


@pytest.fixture
def tiny_train_args(make_train_args, tmp_path):
    """:func:`make_train_args` writing into ``tmp_path / "run"``."""
    return make_train_args(tmp_path / "run")


@pytest.fixture(scope="session")
def random_model():
    """The real architecture with variance-preserving random weights (PyTorch's default init makes the 94
    stacked convolutions shrink the features to ~1e-8, which would make every distance look alike)."""
    import torch
    from torch import nn

    from ddpm.evaluation.inception import FIDInceptionV3

    torch.manual_seed(0)
    model = FIDInceptionV3()
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    return model.eval()


@pytest.fixture(scope="session")
def random_weights(random_model, tmp_path_factory):
    from ddpm.io.files import write_safetensors

    path = tmp_path_factory.mktemp("inception") / "random.safetensors"
    write_safetensors(random_model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a whole module (``pytestmark = pytest.mark.usefixtures("one_thread")``): tiny models
    and one-thread subprocesses, where thread hand-offs on 2 shared cores cost more than the maths."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def small_inputs(monkeypatch):
    """The FID Inception network fed 75x75 instead of 299x299 inputs: ~15x faster on CPU, the same code paths."""
    from ddpm.evaluation.inception import FIDInceptionV3

    monkeypatch.setattr(FIDInceptionV3, "input_size", 75)


class FakeHub:
    """What the code under test sent through ``huggingface_hub.HfApi`` (see :func:`fake_hub`)."""

    def __init__(self) -> None:
        self.clients: list = []  # one per ``HfApi(...)``; each has the ``token`` it was given
        self.calls: list[tuple[str, dict]] = []  # (method, every argument by name, defaults included)
        self.uploads: list[set[str]] = []  # per ``upload_folder`` call: the files the real client would send
        self.fail_with: Exception | None = None  # raised by ``upload_folder`` (a network or permission failure)
        self.repos: dict[str, set[str]] = {}  # each repo's files after the uploads (and their deletions)

    @property
    def tokens(self) -> list:
        return [client.token for client in self.clients]

    def calls_to(self, method: str) -> list[dict]:
        return [arguments for name, arguments in self.calls if name == method]


@pytest.fixture
def fake_hub(monkeypatch):
    """``huggingface_hub.HfApi`` replaced by a recorder (the one Hub fake of the suite), online and without a token.

    The code under test decides nothing here: each call is bound to the real ``HfApi`` method's signature (a wrong
    argument fails as it would against the Hub), and ``upload_folder`` lists the files the real client would send,
    with huggingface_hub's own ``filter_repo_objects`` applied to the patterns actually passed plus the client's
    ``DEFAULT_IGNORE_PATTERNS`` (``HfApi.upload_folder`` does the same): no ``allow_patterns`` uploads everything.
    ``repos`` holds each repo's files as the commits leave them (``delete_patterns`` as ``HfApi`` applies them).
    """
    import huggingface_hub
    from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects

    real = huggingface_hub.HfApi
    hub = FakeHub()

    def bind(method: str, client, args: tuple, kwargs: dict) -> dict:
        bound = inspect.signature(getattr(real, method)).bind(client, *args, **kwargs)
        bound.apply_defaults()
        return {name: value for name, value in bound.arguments.items() if name != "self"}

    class FakeHfApi:
        def __init__(self, *args, **kwargs) -> None:
            self.token = bind("__init__", self, args, kwargs)["token"]
            hub.clients.append(self)

        def create_repo(self, *args, **kwargs) -> str:
            arguments = bind("create_repo", self, args, kwargs)
            hub.calls.append(("create_repo", arguments))
            return f"https://huggingface.co/{arguments['repo_id']}"

        def upload_folder(self, *args, **kwargs) -> str:
            arguments = bind("upload_folder", self, args, kwargs)
            hub.calls.append(("upload_folder", arguments))
            if hub.fail_with is not None:
                raise hub.fail_with
            folder = Path(arguments["folder_path"]).expanduser().resolve()
            files = [p.relative_to(folder).as_posix() for p in sorted(folder.glob("**/*")) if p.is_file()]
            ignore = arguments["ignore_patterns"] or []
            ignore = [ignore] if isinstance(ignore, str) else list(ignore)
            ignore += DEFAULT_IGNORE_PATTERNS
            allow = arguments["allow_patterns"]
            uploaded = set(filter_repo_objects(files, allow_patterns=allow, ignore_patterns=ignore))
            hub.uploads.append(uploaded)
            # the commit: the repo's files matching delete_patterns go (never .gitattributes), the uploaded ones come
            repo = hub.repos.setdefault(arguments["repo_id"], {".gitattributes"})
            delete_patterns = arguments["delete_patterns"]
            if delete_patterns is not None:
                repo -= set(filter_repo_objects(sorted(repo), allow_patterns=delete_patterns)) - {".gitattributes"}
            repo |= uploaded
            return "commit-info"

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    return hub
