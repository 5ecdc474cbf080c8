"""Prepared datasets (scripts/prepare_dataset.py, ddpm.data.prepared): the same tensors as decoding the source,
hence the same trained weights; a folder is complete or absent; flags that disagree with it are refused."""

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import SCRIPTS, assert_same_tensors, load_script, subprocess_env
from PIL import Image

from ddpm.data.datasets import ImageDataset, load_image_dataset
from ddpm.data.prepared import MANIFEST_NAME, PreparedImages, is_prepared, prepare_dataset
from ddpm.data.transforms import ImageTransform
from ddpm.io.files import read_json, read_safetensors
from ddpm.training.loop import train

pytestmark = pytest.mark.usefixtures("one_thread")
prepare_script = load_script("prepare_dataset")
train_script = load_script("train")


def _prepare(source_args: list[str], output_dir: Path, *extra: str) -> None:
    prepare_script.main([*source_args, "--output_dir", str(output_dir), *extra])


@pytest.mark.parametrize("center_crop", [True, False], ids=["center-crop", "random-crop"])
def test_prepared_images_are_the_decoded_images(tiny_image_dir, datasets_cache, tmp_path, center_crop):
    """Every sample, random crops and flips included, equals the source's; the parallel preparation writes the
    same bytes as the serial one."""
    data, column = load_image_dataset(train_data_dir=str(tiny_image_dir), cache_dir=str(datasets_cache))
    source = ImageDataset(data, column, ImageTransform(8, 3, center_crop, random_flip=True))
    serial = prepare_dataset(source, tmp_path / "serial", {"train_data_dir": "x"}, num_proc=1, progress=False)
    parallel = prepare_dataset(source, tmp_path / "parallel", {"train_data_dir": "x"}, num_proc=2, progress=False)
    assert serial["sha256"] == parallel["sha256"] and serial["count"] == len(source) == 16
    prepared = PreparedImages(tmp_path / "parallel", source.transform)
    shapes = {tuple(prepared.resized(i).shape) for i in range(len(prepared))}
    assert shapes == {(8, 8, 3)} if center_crop else len(shapes) > 1  # random crops are drawn at read time
    keys = [(index, aug_seed) for index in range(len(source)) for aug_seed in (0, 1, 12345)]
    expected = torch.stack([source[key] for key in keys])
    assert torch.equal(torch.stack([prepared[key] for key in keys]), expected)
    assert torch.equal(prepared.__getitems__(keys), expected)  # the DataLoader's batched read


def test_training_from_the_prepared_folder_gives_the_same_weights(tmp_path, make_train_args, tiny_image_dir):
    """Random crops, flips and 2 DataLoader workers: bit-identical weights, EMA and logged losses."""
    extra = ["--random_flip", "--use_ema", "--dataloader_num_workers", "2", "--max_train_steps", "5"]
    train(train_script.parse_args(make_train_args(tmp_path / "from-source") + extra))
    _prepare(["--train_data_dir", str(tiny_image_dir), "--resolution", "8"], tmp_path / "prepared", "--num_proc", "2")
    assert is_prepared(tmp_path / "prepared")
    args = make_train_args(tmp_path / "from-prepared") + extra + ["--train_data_dir", str(tmp_path / "prepared")]
    train(train_script.parse_args(args))
    for name in ("model.safetensors", "ema.safetensors"):
        assert_same_tensors(
            read_safetensors(tmp_path / "from-source" / "checkpoint-5" / name),
            read_safetensors(tmp_path / "from-prepared" / "checkpoint-5" / name),
        )


def test_the_builtin_digits_prepare_by_dataset_name(tmp_path):
    _prepare(["--dataset_name", "builtin:digits", "--resolution", "16", "--center_crop", "--channels", "1"], tmp_path)
    manifest = read_json(tmp_path / MANIFEST_NAME)
    assert (manifest["count"], manifest["resolution"], manifest["channels"], manifest["center_crop"]) == (
        1437,
        16,
        1,
        True,
    )
    assert manifest["bytes"] == 1437 * 16 * 16 == (tmp_path / "pixels.bin").stat().st_size
    assert manifest["source"]["dataset_name"] == "builtin:digits"


def test_a_failed_preparation_leaves_the_previous_folder(tmp_path, tiny_image_dir, monkeypatch):
    _prepare(["--train_data_dir", str(tiny_image_dir), "--resolution", "8"], tmp_path / "out", "--num_proc", "1")
    before = (tmp_path / "out" / "pixels.bin").read_bytes()

    def broken(self, image):
        raise ValueError("disk on fire")

    monkeypatch.setattr(ImageTransform, "resize", broken)
    with pytest.raises(ValueError, match="disk on fire"):
        prepare_dataset(
            ImageDataset(*load_image_dataset(train_data_dir=str(tiny_image_dir)), ImageTransform(4)),
            tmp_path / "out",
            {},
            progress=False,
        )
    assert (tmp_path / "out" / "pixels.bin").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folder left behind


def test_a_folder_that_is_not_a_prepared_one_is_never_replaced(tmp_path, tiny_image_dir):
    """--output_dir naming the source images (or any folder with other files) would have been replaced wholesale:
    it is refused in one line, before any work, and left as it was; a prepared folder is replaced."""
    source = tmp_path / "photos"
    shutil.copytree(tiny_image_dir, source)
    before = sorted(p.name for p in source.iterdir())
    for output_dir in (source, source / "img_00.png"):
        with pytest.raises(SystemExit) as exit_info:
            _prepare(["--train_data_dir", str(source), "--resolution", "8"], output_dir, "--num_proc", "1")
        message = str(exit_info.value.code)
        assert message.startswith(f"prepare_dataset.py: error: --output_dir {output_dir} exists and is not a prepared")
        assert sorted(p.name for p in source.iterdir()) == before
    _prepare(["--train_data_dir", str(source), "--resolution", "8"], tmp_path / "out", "--num_proc", "1")
    _prepare(["--train_data_dir", str(source), "--resolution", "4"], tmp_path / "out", "--num_proc", "1")
    assert read_json(tmp_path / "out" / MANIFEST_NAME)["resolution"] == 4


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--resolution", "16"], "was prepared with resolution=8, but --resolution is 16"),
        (["--center_crop"], "was prepared with center_crop=False, but --center_crop is True"),
    ],
)
def test_flags_that_disagree_with_the_folder_are_a_one_line_error(
    tmp_path, tiny_image_dir, make_train_args, flags, message
):
    _prepare(["--train_data_dir", str(tiny_image_dir), "--resolution", "8"], tmp_path / "prepared", "--num_proc", "1")
    args = make_train_args(tmp_path / "run") + ["--train_data_dir", str(tmp_path / "prepared"), *flags]
    done = subprocess.run(
        [sys.executable, str(SCRIPTS / "train.py"), *args], capture_output=True, text=True, env=subprocess_env()
    )
    assert done.returncode != 0
    assert message in done.stderr and "Traceback" not in done.stderr


def test_channels_must_match_the_model(tmp_path, tiny_image_dir):
    _prepare(
        ["--train_data_dir", str(tiny_image_dir), "--resolution", "8", "--channels", "1"], tmp_path, "--num_proc", "1"
    )
    with pytest.raises(ValueError, match="channels=1, but the model's in_channels is 3"):
        PreparedImages(tmp_path, ImageTransform(8, 3))
    assert np.asarray(PreparedImages(tmp_path, ImageTransform(8, 1)).resized(0)).shape[-1] == 1


def test_full_precision_images_are_prepared_at_full_precision(tmp_path):
    """--preserve_input_precision: 16-bit PNGs are stored as float32 and read back exactly as the source path gives
    them (values an 8-bit path would merge stay apart); a training without the flag is refused."""
    folder = tmp_path / "png16"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(1000, 1300, (12, 10), dtype=np.uint16)).save(folder / f"{i}.png")
    source_args = ["--train_data_dir", str(folder), "--resolution", "8", "--channels", "1"]
    _prepare([*source_args, "--preserve_input_precision"], tmp_path / "prepared", "--num_proc", "1")
    transform = ImageTransform(8, 1, random_flip=True, preserve_precision=True)
    source = ImageDataset(*load_image_dataset(train_data_dir=str(folder), cache_dir=str(tmp_path / "cache")), transform)
    prepared = PreparedImages(tmp_path / "prepared", transform)
    assert prepared.resized(0).dtype == np.float32
    keys = [(i, seed) for i in range(4) for seed in (0, 7)]
    assert torch.equal(prepared.__getitems__(keys), torch.stack([source[key] for key in keys]))
    assert len(torch.unique(prepared[(0, 0)])) > 40  # 8 bits would leave ~5 levels of 1000..1300 / 65535
    with pytest.raises(ValueError, match="preserve_input_precision=True, but --preserve_input_precision is False"):
        PreparedImages(tmp_path / "prepared", ImageTransform(8, 1))
