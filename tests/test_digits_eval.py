"""ddpm.evaluation.digits and scripts/evaluate_digits.py: the digit-classifier metrics of the built-in digits."""

import json
import math

import numpy as np
import pytest
import torch
from helpers import load_script
from PIL import Image

from ddpm.evaluation import digits as digits_eval
from ddpm.evaluation.digits import (
    classifier_accuracy,
    classifier_path,
    evaluate_digits,
    load_classifier,
    real_digits,
    real_floor,
    to_classifier_input,
    train_classifier,
)

cli = load_script("evaluate_digits")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("ddpm-cache")


@pytest.fixture(scope="module")
def classifier(cache_dir):
    return load_classifier(cache_dir)  # trains (a few seconds) and writes the cache file


def _same(a, b):
    """Two results agree: equal histograms and sizes, figures equal up to float rounding."""
    assert a.keys() == b.keys()
    assert a["class_histogram"] == b["class_histogram"] and a["num_images"] == b["num_images"]
    floats = lambda r: {k: v for k, v in r.items() if k not in ("class_histogram", "num_images")}  # noqa: E731
    assert floats(a) == pytest.approx(floats(b))
    return True


def _noise(n=512, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 16, 16, 1), dtype=np.uint8)


def test_real_digits_are_the_training_pipelines_images():
    images, labels = real_digits("test")
    assert images.shape == (360, 16, 16, 1) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [36, 37, 35, 37, 36, 36, 36, 36, 35, 36]
    assert not images.flags.writeable  # cached: nobody may change them
    assert (images == 0).mean() > 0.25 and images.max() == 255  # white strokes on a black background


def test_classifier_is_accurate_and_confident_on_held_out_digits(classifier):
    assert classifier_accuracy(classifier) > 0.97
    result = evaluate_digits(real_digits("test")[0], classifier)
    assert result["num_images"] == 360
    assert result["confident_share"] > 0.85
    assert result["class_entropy"] == pytest.approx(math.log(10), abs=0.01)
    assert sum(result["class_histogram"]) == 360 and min(result["class_histogram"]) >= 30
    assert result["classifier_fid"] == pytest.approx(0.0, abs=1e-6)  # the reference set itself
    assert result["chroma"] == 0.0 and result["background_level"] < 0.01


def test_noise_scores_low_and_far(classifier):
    noise, floor = evaluate_digits(_noise(), classifier), real_floor(classifier=classifier)
    assert noise["confident_share"] < 0.05 < 0.85 < floor["confident_share"]
    assert floor["class_entropy"] > 2.25 and floor["num_images"] == 512
    assert floor["classifier_fid"] < 20 < 200 < noise["classifier_fid"]
    assert noise["background_level"] > 0.05


def test_blank_and_blended_images_are_not_confident_digits(classifier):
    images = real_digits("test")[0]
    blends = ((images.astype(np.float32) + np.roll(images, 1, axis=0)) / 2).round().astype(np.uint8)
    gray = np.full((64, 16, 16, 1), 128, dtype=np.uint8)
    real = evaluate_digits(images, classifier)
    assert evaluate_digits(blends, classifier)["confident_share"] < real["confident_share"] - 0.3
    assert evaluate_digits(gray, classifier)["confident_share"] == 0.0


def test_rgb_is_scored_on_luma_and_colour_is_reported(classifier):
    gray = real_digits("test")[0][:100]
    rgb = np.repeat(gray, 3, axis=3)
    assert _same(evaluate_digits(rgb, classifier), evaluate_digits(gray, classifier))
    assert _same(evaluate_digits(gray[..., 0], classifier), evaluate_digits(gray, classifier))  # [N, H, W]
    tinted = rgb.copy()
    tinted[..., 0] = np.clip(tinted[..., 0].astype(int) + 60, 0, 255)
    result = evaluate_digits(tinted, classifier)
    assert result["chroma"] > 0.15 and result["background_level"] > 0.05
    # luma of pure red equals PIL's convert("L")
    red = np.zeros((2, 16, 16, 3), dtype=np.uint8)
    red[..., 0] = 200
    pil = np.asarray(Image.fromarray(red[0]).convert("L"), dtype=np.float32)
    assert (to_classifier_input(red)[0, 0] + 1) * 127.5 == pytest.approx(torch.from_numpy(pil), abs=0.5)


def test_other_sizes_are_resized():
    images = np.zeros((2, 32, 32, 1), dtype=np.uint8)
    assert to_classifier_input(images).shape == (2, 1, 16, 16)


@pytest.mark.parametrize(
    "images, match",
    [
        (np.zeros((4, 16, 16, 1), dtype=np.float32), "uint8"),
        (np.zeros((4, 16, 16, 4), dtype=np.uint8), "C in"),
        (np.zeros((4, 16, 12, 1), dtype=np.uint8), "square"),
        (np.zeros((1, 16, 16, 1), dtype=np.uint8), "at least 2"),
    ],
)
def test_bad_samples_are_refused(images, match):
    with pytest.raises(ValueError, match=match):
        to_classifier_input(images)


def test_training_is_deterministic_and_cached(classifier, cache_dir, monkeypatch):
    path = classifier_path(cache_dir)
    assert path.is_file()
    monkeypatch.setattr(digits_eval, "_classifiers", {})  # forget the in-process copy: load the file
    loaded = load_classifier(cache_dir)
    assert loaded is not classifier
    # Trained again under another thread count and global RNG state: the weights must not depend on either, and the
    # training (one thread, its own seed) must hand both back as it found them.
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        torch.manual_seed(12345)
        rng_state = torch.get_rng_state()
        again = train_classifier()
        assert torch.get_num_threads() == threads + 1
        assert torch.equal(torch.get_rng_state(), rng_state)
    finally:
        torch.set_num_threads(threads)
    for (name, a), b, c in zip(
        classifier.state_dict().items(), loaded.state_dict().values(), again.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b) and torch.equal(a, c), name


def test_a_corrupt_cache_file_is_named(cache_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(digits_eval, "_classifiers", {})
    classifier_path(tmp_path).write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="digits-classifier"):
        load_classifier(tmp_path)


def test_cli_scores_a_folder_and_an_npz(classifier, cache_dir, tmp_path, capsys):
    images = real_digits("test")[0][:40]
    np.savez(tmp_path / "samples.npz", images=images)
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image[..., 0]).save(folder / f"{i:03d}.png")
    from_npz = cli.main(["--samples", str(tmp_path / "samples.npz"), "--cache_dir", str(cache_dir)])
    from_folder = cli.main(["--samples", str(folder), "--cache_dir", str(cache_dir), "--num_images", "40"])
    assert _same(from_npz, from_folder)
    assert _same(json.loads(capsys.readouterr().out.strip().splitlines()[-1]), from_folder)
    assert from_npz["num_images"] == 40 and from_npz["classifier_test_accuracy"] > 0.97


def test_cli_real_floor(cache_dir, capsys):
    result = cli.main(["--real_floor", "--num_images", "100", "--cache_dir", str(cache_dir)])
    assert result["num_images"] == 100 and result["confident_share"] > 0.85
    assert "class entropy" in capsys.readouterr().out


def test_cli_rejects_bad_arguments(cache_dir, tmp_path):
    with pytest.raises(SystemExit):
        cli.main(["--samples", "x", "--real_floor"])
    with pytest.raises(SystemExit, match="no image files"):  # the module's cache: no second training of the classifier
        cli.main(["--samples", str(tmp_path), "--cache_dir", str(cache_dir)])
