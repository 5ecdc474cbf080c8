"""ddpm.data: built-in digits, dataset loading and its errors, image modes, transforms, corrupt files, sharding."""

import gzip
import hashlib
from collections import Counter

import datasets
import huggingface_hub.constants
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from ddpm.data.datasets import CorruptImageError, ImageDataset, load_builtin_dataset, load_image_dataset
from ddpm.data.sampler import GlobalBatchSampler, build_dataloader, derive_seed
from ddpm.data.transforms import ImageTransform, convert_image

# ---------------------------------------------------------------------------------------------------- helpers


def _pixels(ds: datasets.Dataset) -> list[bytes]:
    return [np.asarray(img).tobytes() for img in ds["image"]]


def _load_folder(folder, tmp_path, **kwargs):
    return load_image_dataset(train_data_dir=str(folder), cache_dir=str(tmp_path / "hf-cache"), **kwargs)


def _index_by_name(ds: datasets.Dataset, column: str = "image") -> dict[str, int]:
    cells = ds.cast_column(column, datasets.Image(decode=False))[column]
    return {cell["path"].rsplit("/", 1)[-1]: i for i, cell in enumerate(cells)}


def _random_images(n: int, size=(12, 9), seed: int = 0) -> datasets.Dataset:
    """In-memory dataset of random non-square RGB images (so random crops have room to move)."""
    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]
    return datasets.Dataset.from_dict({"image": images}, features=datasets.Features({"image": datasets.Image()}))


# ---------------------------------------------------------------------------------------------------- builtin


def test_builtin_digits_splits_are_fixed_disjoint_and_stratified():
    train, test, full = (load_builtin_dataset("digits", s) for s in ("train", "test", "all"))
    assert (len(train), len(test), len(full)) == (1437, 360, 1797)
    assert train.column_names == ["image", "label"]
    image = train[0]["image"]
    assert (image.mode, image.size) == ("L", (8, 8))
    # Disjoint and complete: train + test is exactly the full set (as a multiset of (pixels, label) rows).
    rows = lambda ds: Counter(zip(_pixels(ds), ds["label"], strict=True))  # noqa: E731
    assert rows(train) + rows(test) == rows(full)
    # Stratified: every digit has its share of the 20 % test split.
    counts = Counter(test["label"])
    assert sorted(counts) == list(range(10)) and all(35 <= c <= 38 for c in counts.values())
    # Pinned: the split must never change (it is what FID against builtin:digits:test is computed on).
    digest = hashlib.sha256(b"".join(_pixels(test)) + bytes(test["label"])).hexdigest()
    assert digest == "9ce65c8d70b54752c69ed492dbba771d1026d3643beadd6960eb7f16e2a4b86d"


def test_builtin_digits_pixels_scale_0_16_to_0_255():
    from importlib import resources

    with (resources.files("ddpm") / "assets" / "digits.csv.gz").open("rb") as raw, gzip.open(raw, "rt") as f:
        first = np.array(f.readline().split(","), dtype=np.int64)
    full = load_builtin_dataset("digits", "all")
    np.testing.assert_array_equal(np.asarray(full[0]["image"]), np.round(first[:64] * 255 / 16).reshape(8, 8))
    assert full[0]["label"] == first[64]
    assert np.asarray(full[0]["image"]).max() <= 255


def test_builtin_via_dataset_name_and_errors():
    ds, column = load_image_dataset(dataset_name="builtin:digits")
    assert (len(ds), column) == (1437, "image")
    assert len(load_image_dataset(dataset_name="builtin:digits:test")[0]) == 360
    with pytest.raises(ValueError, match="Unknown built-in dataset 'mnist'"):
        load_image_dataset(dataset_name="builtin:mnist")
    with pytest.raises(ValueError, match="Unknown split 'val'"):
        load_image_dataset(dataset_name="builtin:digits:val")
    with pytest.raises(ValueError, match="--dataset_config_name"):
        load_image_dataset(dataset_name="builtin:digits", dataset_config_name="test")


# ---------------------------------------------------------------------------------------------------- loading


@pytest.mark.parametrize(
    "kwargs, expected", [({}, "got neither"), ({"dataset_name": "builtin:digits", "train_data_dir": "x"}, "got both")]
)
def test_exactly_one_source(kwargs, expected):
    with pytest.raises(ValueError, match=rf"--dataset_name and --train_data_dir \({expected}\)"):
        load_image_dataset(**kwargs)


def test_empty_and_missing_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="--train_data_dir .*empty"):
        _load_folder(tmp_path / "empty", tmp_path)
    with pytest.raises(FileNotFoundError, match="--train_data_dir .*nowhere"):
        _load_folder(tmp_path / "nowhere", tmp_path)
    empty = datasets.Dataset.from_dict({"image": []}, features=datasets.Features({"image": datasets.Image()}))
    empty.save_to_disk(str(tmp_path / "saved-empty"), num_shards=1)  # 0 shards: datasets cannot reload it
    with pytest.raises(ValueError, match="saved-empty' is empty"):
        load_image_dataset(dataset_name=str(tmp_path / "saved-empty"))


def test_save_to_disk_folders(tmp_path):
    digits = load_builtin_dataset("digits", "test").select(range(5)).rename_column("image", "img")
    digits.save_to_disk(str(tmp_path / "single"))
    ds, column = load_image_dataset(dataset_name=str(tmp_path / "single"))
    assert (len(ds), column) == (5, "img")  # no "image" column: the first datasets.Image column is used
    datasets.DatasetDict({"train": digits, "test": digits.select(range(2))}).save_to_disk(str(tmp_path / "dict"))
    ds, _ = load_image_dataset(dataset_name=str(tmp_path / "dict"))
    assert len(ds) == 5
    datasets.DatasetDict({"validation": digits}).save_to_disk(str(tmp_path / "no-train"))
    with pytest.raises(ValueError, match="no 'train' split; it has: validation"):
        load_image_dataset(dataset_name=str(tmp_path / "no-train"))
    with pytest.raises(ValueError, match="--dataset_config_name does not apply"):
        load_image_dataset(dataset_name=str(tmp_path / "single"), dataset_config_name="x")


def test_local_folder_via_dataset_name(tmp_path):
    folder = tmp_path / "pictures"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((4, 4), i, np.uint8)).save(folder / f"{i}.png")
    ds, column = load_image_dataset(dataset_name=str(folder), cache_dir=str(tmp_path / "hf-cache"))
    assert (len(ds), column) == (3, "image")


def test_image_column_errors(tmp_path):
    datasets.Dataset.from_dict({"label": [1, 2], "caption": ["a", "b"]}).save_to_disk(str(tmp_path / "no-images"))
    with pytest.raises(ValueError, match=r"no image column.*columns: label \(.*\), caption"):
        load_image_dataset(dataset_name=str(tmp_path / "no-images"))
    with pytest.raises(ValueError, match="Column 'label' .* not images"):
        load_image_dataset(dataset_name=str(tmp_path / "no-images"), image_column="label")
    # a column named explicitly is never replaced by another one: the two-image-column dataset's "target" misspelt
    pixels = [Image.fromarray(np.full((4, 4), i, np.uint8)) for i in range(2)]
    two = datasets.Dataset.from_dict({"input": pixels, "target": pixels}).cast_column("input", datasets.Image())
    two.cast_column("target", datasets.Image()).save_to_disk(str(tmp_path / "two"))
    with pytest.raises(ValueError, match=r"--image_column 'targte': .* has no such column; columns: input \(Image"):
        load_image_dataset(dataset_name=str(tmp_path / "two"), image_column="targte")
    assert load_image_dataset(dataset_name=str(tmp_path / "two"), image_column="target")[1] == "target"
    assert load_image_dataset(dataset_name=str(tmp_path / "two"))[1] == "input"  # the default name: the first one


def test_offline_uncached_hub_id_names_the_dataset(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match="'someone/not-cached-images'.*Offline mode is on"):
        load_image_dataset(dataset_name="someone/not-cached-images", cache_dir=str(tmp_path))


# ---------------------------------------------------------------------------------------------------- modes


def test_image_modes_from_png_files(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(np.full((6, 10), 255, np.uint8)).save(folder / "gray.png")
    Image.fromarray(np.array([[[255, 0, 0, 0], [0, 0, 255, 255]]] * 2, np.uint8), "RGBA").save(folder / "rgba.png")
    palette = Image.new("P", (4, 4))
    palette.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    palette.paste(1, (0, 0, 4, 4))
    palette.save(folder / "palette.png")
    Image.fromarray(np.array([[65535, 0], [32768, 257]], np.uint16)).save(folder / "deep.png")
    assert Image.open(folder / "deep.png").mode == "I;16"
    ds, column = _load_folder(folder, tmp_path)
    where = _index_by_name(ds)
    rgb = ImageDataset(ds, column, ImageTransform(resolution=2, channels=3, center_crop=True))
    gray = ImageDataset(ds, column, ImageTransform(resolution=2, channels=1, center_crop=True))

    assert torch.equal(rgb[where["gray.png"]], torch.ones(3, 2, 2))
    assert torch.equal(gray[where["gray.png"]], torch.ones(1, 2, 2))
    # RGBA: alpha is dropped (as image.convert("RGB") in train_unconditional), colour kept.
    rgba = Image.open(folder / "rgba.png")
    assert torch.equal(
        rgb[where["rgba.png"]], transforms.Normalize([0.5], [0.5])(transforms.ToTensor()(rgba.convert("RGB")))
    )
    assert rgb[where["rgba.png"]][:, 0, 0].tolist() == [1.0, -1.0, -1.0]
    assert torch.equal(rgb[where["palette.png"]], torch.tensor([-1.0, 1.0, -1.0]).view(3, 1, 1).expand(3, 2, 2))
    # 16 bits: 65535 -> +1, 0 -> -1, 32768 -> round(127.5) = 128, 257 -> 1 (scaled, not clipped at 255).
    expected = torch.tensor([[255, 0], [128, 1]]) / 255 * 2 - 1
    torch.testing.assert_close(gray[where["deep.png"]][0], expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(rgb[where["deep.png"]], expected.expand(3, 2, 2), rtol=0, atol=1e-6)


def test_preserve_input_precision_keeps_16_bit_and_float_pixels(tmp_path):
    """--preserve_input_precision: a 16-bit PNG's values that 8 bits would merge (1000 and 1001 both -> 4) stay
    apart, exactly v / 65535; float images are kept as they are; the resize and crop run on the float image."""
    folder = tmp_path / "images"
    folder.mkdir()
    deep = np.array([[1000, 1001, 65535, 0], [32768, 257, 40000, 12345]] * 2, np.uint16)
    Image.fromarray(deep).save(folder / "deep.png")
    assert Image.open(folder / "deep.png").mode == "I;16"
    ds, column = _load_folder(folder, tmp_path)
    exact = torch.from_numpy(deep.astype(np.float64) / 65535 * 2 - 1).float()
    for channels in (1, 3):
        full = ImageDataset(ds, column, ImageTransform(4, channels, center_crop=True, preserve_precision=True))[0]
        torch.testing.assert_close(full, exact.expand(channels, 4, 4), rtol=0, atol=1e-6)
        eight_bits = ImageDataset(ds, column, ImageTransform(4, channels, center_crop=True))[0]
        assert eight_bits[0, 0, 0] == eight_bits[0, 0, 1]  # 1000 and 1001: the same 8-bit value
        assert full[0, 0, 0] < full[0, 0, 1] and (eight_bits - full).abs().max() > 1e-3

    as_float = Image.fromarray(np.array([[0.25, 0.3333], [0.5, 0.9]], np.float32), "F")
    out = ImageTransform(2, 1, center_crop=True, preserve_precision=True)(as_float, torch.Generator())
    torch.testing.assert_close(out[0], torch.tensor([[0.25, 0.3333], [0.5, 0.9]]) * 2 - 1, rtol=0, atol=1e-6)
    # a resize on the float image: 8x8 of 16-bit values down to 4x4, still between 8-bit levels
    big = Image.fromarray(np.full((8, 8), 1001, np.uint16))
    small = ImageTransform(4, 1, center_crop=True, preserve_precision=True)(big, torch.Generator())
    torch.testing.assert_close(small, torch.full((1, 4, 4), 1001 / 65535 * 2 - 1), rtol=0, atol=1e-6)


def test_convert_image_int32_and_float_modes():
    int32 = Image.fromarray(np.array([[0, 65535, 70000, -5]], np.int32), "I")
    assert np.asarray(convert_image(int32, 1)).tolist() == [[0, 255, 255, 0]]
    as_float = Image.fromarray(np.array([[0.0, 0.5, 1.0, 2.0]], np.float32), "F")
    assert np.asarray(convert_image(as_float, 1)).tolist() == [[0, 128, 255, 255]]
    assert convert_image(as_float, 3).mode == "RGB"
    with pytest.raises(ValueError, match="channels=4"):
        convert_image(as_float, 4)


# ---------------------------------------------------------------------------------------------------- transforms


@pytest.mark.parametrize("channels", [1, 3])
def test_transform_shape_and_range_upscales_small_images(channels):
    ds, column = load_image_dataset(dataset_name="builtin:digits")
    data = ImageDataset(ds, column, ImageTransform(resolution=16, channels=channels, random_flip=True))
    batch = torch.stack([data[(i, i)] for i in range(8)])
    assert batch.shape == (8, channels, 16, 16) and batch.dtype == torch.float32
    assert batch.min() >= -1 and batch.max() <= 1
    assert batch.min() == -1 and batch.max() > 0.9


@pytest.mark.parametrize("preserve_precision", [False, True])
def test_batched_and_kept_reads_equal_decoding_each_sample(preserve_precision):
    """The DataLoader's batched read (``__getitems__``) and ``keep_resized`` (the built-in sets in training) give
    exactly the tensors of decoding and transforming each sample; the kept pixels cannot be written to."""
    ds = _random_images(6, size=(13, 9))
    transform = ImageTransform(8, random_flip=True, preserve_precision=preserve_precision)
    each, kept = ImageDataset(ds, "image", transform), ImageDataset(ds, "image", transform, keep_resized=True)
    keys = [(i % 6, seed) for i, seed in enumerate(range(100, 112))]  # every image twice, other crops and flips
    expected = torch.stack([each[key] for key in keys])
    assert torch.equal(each.__getitems__(keys), expected)
    assert torch.equal(kept.__getitems__(keys), expected)
    assert torch.equal(torch.stack([kept[key] for key in keys]), expected)
    assert kept.resized(0) is kept.resized(0) and not kept.resized(0).flags.writeable
    assert each.resized(0) is not each.resized(0)


def test_transform_equals_torchvision_pipeline():
    """Same pixels as train_unconditional's Compose, and the same draws as RandomCrop/RandomHorizontalFlip."""
    image = _random_images(1, size=(13, 9))[0]["image"]
    normalize = [transforms.ToTensor(), transforms.Normalize([0.5], [0.5])]
    resize = transforms.Resize(8, interpolation=transforms.InterpolationMode.BILINEAR)
    center = transforms.Compose([resize, transforms.CenterCrop(8), *normalize])
    assert torch.equal(ImageTransform(8, center_crop=True)(image, torch.Generator()), center(image.convert("RGB")))
    random = transforms.Compose([resize, transforms.RandomCrop(8), transforms.RandomHorizontalFlip(), *normalize])
    seen = set()
    for seed in range(6):
        torch.manual_seed(seed)
        reference = random(image)
        ours = ImageTransform(8, random_flip=True)(image, torch.Generator().manual_seed(seed))
        assert torch.equal(ours, reference)
        seen.add(ours.sum().item())
    assert len(seen) > 1  # the augmentation really varies with the seed


# ---------------------------------------------------------------------------------------------------- corrupt


def test_truncated_png_raises_with_file_name_or_is_skipped(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(4):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(folder / f"ok{i}.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / "bad.png")
    data = (folder / "bad.png").read_bytes()
    (folder / "bad.png").write_bytes(data[: len(data) // 2])
    ds, column = _load_folder(folder, tmp_path)
    bad = _index_by_name(ds)["bad.png"]
    transform = ImageTransform(resolution=8, center_crop=True)

    strict = ImageDataset(ds, column, transform)
    with pytest.raises(CorruptImageError, match=r"bad\.png.*dataset index"):
        strict[(bad, 0)]

    lenient = ImageDataset(ds, column, transform, skip_corrupt_images=True)
    assert torch.equal(lenient[(bad, 3)], strict[((bad + 1) % len(ds), 3)])  # deterministic replacement
    assert lenient.num_corrupt_skipped == 1
    # The count is shared with DataLoader worker processes.
    loader = build_dataloader(lenient, [(i, 0) for i in range(len(ds))], batch_size=5, num_workers=2)
    assert next(iter(loader)).shape == (5, 3, 8, 8)
    assert lenient.num_corrupt_skipped == 2


# ---------------------------------------------------------------------------------------------------- sampling


def _chunks(pairs, size):
    return [pairs[i : i + size] for i in range(0, len(pairs), size)]


@pytest.mark.parametrize("world_size, grad_accum", [(2, 2), (4, 1), (1, 3), (3, 2)])
def test_global_batches_do_not_depend_on_world_size_or_accumulation(world_size, grad_accum):
    n, batch, seed, epoch = 50, 2, 7, 3
    global_batch = batch * world_size * grad_accum
    single = GlobalBatchSampler(n, global_batch, seed=seed)
    single.set_epoch(epoch)
    reference = _chunks(list(single), global_batch)
    ranks = []
    for rank in range(world_size):
        sampler = GlobalBatchSampler(n, batch, world_size, rank, grad_accum, seed=seed)
        sampler.set_epoch(epoch)
        assert sampler.steps_per_epoch == single.steps_per_epoch == n // global_batch
        assert len(sampler) == sampler.steps_per_epoch * grad_accum * batch
        ranks.append(_chunks(list(sampler), batch * grad_accum))  # one chunk per optimizer step
    for step, expected in enumerate(reference):
        merged = []
        for micro in range(grad_accum):
            for rank in range(world_size):
                merged += _chunks(ranks[rank][step], batch)[micro]
        assert merged == expected


def test_sampler_epochs_padding_and_resume():
    sampler = GlobalBatchSampler(23, 5, seed=1)
    sampler.set_epoch(0)
    epoch0 = list(sampler)
    assert len(epoch0) == len(sampler) == 20 and sampler.steps_per_epoch == 4
    assert len({index for index, _ in epoch0}) == 20  # no repeats within an epoch
    assert list(sampler) == epoch0  # same epoch, same stream
    sampler.set_epoch(1)
    assert [i for i, _ in sampler] != [i for i, _ in epoch0]
    sampler.set_epoch(0, start_step=3)
    assert len(sampler) == 5 and list(sampler) == epoch0[15:]
    with pytest.raises(ValueError, match="start_step=5"):
        sampler.set_epoch(0, start_step=5)

    padded = GlobalBatchSampler(23, 5, seed=1, drop_last=False)
    stream = list(padded)
    assert padded.steps_per_epoch == 5 and len(stream) == 25
    assert stream[:20] == epoch0 and [i for i, _ in stream[23:]] == [i for i, _ in stream[:2]]
    assert sorted({i for i, _ in stream}) == list(range(23))


def test_sampler_argument_errors():
    with pytest.raises(ValueError, match=r"10 images, fewer than one global batch of 12 .*4 x world_size 3 x grad"):
        GlobalBatchSampler(10, 4, world_size=3)
    with pytest.raises(ValueError, match="rank=2"):
        GlobalBatchSampler(100, 4, world_size=2, rank=2)
    with pytest.raises(ValueError, match="grad_accum=0"):
        GlobalBatchSampler(100, 4, grad_accum=0)
    with pytest.raises(ValueError, match="batch_size=3 must equal"):
        build_dataloader(_random_images(1), GlobalBatchSampler(100, 4), batch_size=3)


def test_derive_seed_is_fixed():
    assert derive_seed(0, 1, 2) == derive_seed(0, 1, 2) != derive_seed(0, 2, 1)
    assert 0 <= derive_seed(-1, 2**70) < 2**63
    assert derive_seed(1, 2, 3) == 7510213797696614745  # pinned: resuming across versions must give the same data


def test_dataloader_batches_identical_across_workers_ranks_and_global_rng():
    dataset = ImageDataset(_random_images(24), "image", ImageTransform(resolution=8, random_flip=True))

    def batches(world_size=1, rank=0, grad_accum=2, num_workers=0):
        sampler = GlobalBatchSampler(len(dataset), 3, world_size, rank, grad_accum, seed=5)
        sampler.set_epoch(2)
        return list(build_dataloader(dataset, sampler, batch_size=3, num_workers=num_workers))

    torch.manual_seed(123)
    in_process = batches()
    after = torch.rand(1)
    torch.manual_seed(123)
    assert torch.equal(after, torch.rand(1))  # iterating the loader did not consume the global RNG
    with_workers = batches(num_workers=2)
    assert len(in_process) == len(with_workers) == 8
    assert all(torch.equal(a, b) for a, b in zip(in_process, with_workers, strict=True))
    # Two ranks without accumulation see the same 6-image global batches, with the same augmentations.
    rank0, rank1 = batches(2, 0, grad_accum=1), batches(2, 1, grad_accum=1)
    assert len(rank0) == len(rank1) == 4
    for step in range(4):
        merged = torch.cat([rank0[step], rank1[step]])
        assert torch.equal(merged, torch.cat(in_process[2 * step : 2 * step + 2]))
