"""FID during training (``--fid_every_steps``): what is logged equals an independent computation, evaluations do not
change the training, bad settings fail before training. The 2-process case is in test_distributed.py.

A randomly initialised Inception network of the real architecture stands in for the FID weights, with 75x75 inputs
(see test_metrics.py): the figures are meaningless, the code paths are the real ones.
"""

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import load_script, read_metrics
from PIL import Image

from ddpm.data.transforms import ImageTransform
from ddpm.diffusion.schedule import NoiseSchedule
from ddpm.evaluation.fid_monitor import CACHE_PREFIX, SAMPLE_SEED
from ddpm.evaluation.generate import sample_images
from ddpm.evaluation.metrics import FeatureStats, compute_features, frechet_distance, load_source
from ddpm.io.files import read_safetensors, write_safetensors
from ddpm.io.images import to_uint8
from ddpm.io.pretrained import load_model
from ddpm.models.unet import UNet
from ddpm.training.config import TrainConfig
from ddpm.training.loop import train

ROOT = Path(__file__).resolve().parents[1]
script = load_script("train")

# One intra-op thread: tiny UNets and the Inception network on 2 shared cores (more threads only add hand-offs).
pytestmark = pytest.mark.usefixtures("one_thread")

FID_ARGS = ["--fid_every_steps", "2", "--fid_num_samples", "6", "--fid_inference_steps", "3", "--fid_batch_size", "4"]


def fid_records(output_dir: Path) -> list[dict]:
    return [record for record in read_metrics(output_dir) if "fid" in record]


@pytest.mark.parametrize("sampler", ["sde-dpmsolver++"])  # not the default (ddim): the flag must take effect
def test_logged_fid_equals_an_independent_computation(
    tmp_path, tiny_train_args, tiny_image_dir, random_model, random_weights, small_inputs, sampler
):
    out = tmp_path / "run"
    args = [*tiny_train_args, "--use_ema", *FID_ARGS, "--inception_weights", str(random_weights)]
    args += ["--fid_sampler", sampler]
    args += ["--logger", "tensorboard"]
    train(script.parse_args(args))

    records = fid_records(out)
    assert [r["step"] for r in records] == [2, 4]
    assert all(r["fid_num_samples"] == 6 and r["fid"] > 0 and r["fid_seconds"] > 0 for r in records)
    assert records[0]["fid"] != records[1]["fid"]  # the model moved between the evaluations

    # Reference: the 16 training images, resized to 8 and cropped as for training (random crops drawn with seed 0).
    caches = list(out.glob(f"{CACHE_PREFIX}-*.npz"))
    assert len(caches) == 1
    transform = ImageTransform(resolution=8, channels=3)
    source = load_source(tiny_image_dir)
    real = np.stack(
        [to_uint8(transform(Image.fromarray(source[i]), torch.Generator().manual_seed(0))[None])[0] for i in range(16)]
    )
    reference = FeatureStats.from_features(compute_features(real, random_model, progress=False)[0])
    cached = FeatureStats.load(caches[0])
    # (float32 convolutions round differently at another batch size: features agree to ~1e-7)
    np.testing.assert_allclose(cached.mu, reference.mu, rtol=0, atol=1e-6)
    np.testing.assert_allclose(cached.sigma, reference.sigma, rtol=0, atol=1e-6)

    # Samples: the exported EMA weights (step 4), the same per-image seeds, --fid_sampler and its steps.
    unet_config, schedule_config, weights = load_model(out)
    unet = UNet(unet_config).eval()
    unet.load_state_dict(weights)
    with torch.no_grad():
        images = sample_images(unet, NoiseSchedule(schedule_config), range(6), seed=SAMPLE_SEED, sampler=sampler,
                               num_inference_steps=3)  # fmt: skip
    samples = FeatureStats.from_features(compute_features(to_uint8(images), random_model, progress=False)[0])
    expected = frechet_distance(samples.mu, samples.sigma, reference.mu, reference.sigma)
    assert records[-1]["fid"] == pytest.approx(expected, rel=1e-5)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "logs" / "train_unconditional")).Reload()
    logged = [(e.step, e.value) for e in events.Scalars("eval/fid")]
    assert [step for step, _ in logged] == [2, 4]
    assert logged[-1][1] == pytest.approx(records[-1]["fid"], rel=1e-6)


def test_evaluations_leave_the_training_unchanged_and_the_reference_is_cached(
    tmp_path, make_train_args, random_weights, small_inputs
):
    common = ["--use_ema", "--max_train_steps", "3"]
    plain = train(script.parse_args([*make_train_args(tmp_path / "plain"), *common]))
    fid_args = [*make_train_args(tmp_path / "fid"), *common, *FID_ARGS, "--inception_weights", str(random_weights)]
    with_fid = train(script.parse_args(fid_args))
    for key, value in plain.unet.state_dict().items():
        assert torch.equal(value, with_fid.unet.state_dict()[key]), key
    for key, value in plain.ema.shadow.items():
        assert torch.equal(value, with_fid.ema.shadow[key]), key
    assert [r["step"] for r in fid_records(tmp_path / "fid")] == [2, 3]  # every 2 steps, and at the end

    # Resuming reuses the cached reference statistics (a changed cache would change the FID).
    cache = next((tmp_path / "fid").glob(f"{CACHE_PREFIX}-*.npz"))
    stats = FeatureStats.load(cache)
    FeatureStats(stats.mu + 100, stats.sigma, stats.num_images).save(cache)
    resume = [*fid_args, "--max_train_steps", "4", "--resume_from_checkpoint", "latest"]
    train(script.parse_args(resume))
    records = fid_records(tmp_path / "fid")
    assert [r["step"] for r in records] == [2, 3, 4]
    assert records[-1]["fid"] > 2048 * 50**2 > 10 * records[1]["fid"]  # the shift of the means dominates

    # ...but not under other Inception weights: their statistics are computed (and cached) anew.
    other = {k: v * 1.01 if v.is_floating_point() else v for k, v in read_safetensors(random_weights).items()}
    write_safetensors(other, tmp_path / "other-inception.safetensors")
    resume = [*resume, "--max_train_steps", "5", "--inception_weights", str(tmp_path / "other-inception.safetensors")]
    train(script.parse_args(resume))
    assert len(list((tmp_path / "fid").glob(f"{CACHE_PREFIX}-*.npz"))) == 2
    assert fid_records(tmp_path / "fid")[-1]["fid"] < 2048 * 50**2 / 10


def test_an_explicit_reference_statistics_file_is_used(tmp_path, tiny_train_args, random_weights, small_inputs):
    dim = 2048
    far = FeatureStats(np.full(dim, 1e4), np.eye(dim), 10).save(tmp_path / "far.npz")
    args = [*tiny_train_args, *FID_ARGS, "--inception_weights", str(random_weights), "--fid_reference", str(far)]
    train(script.parse_args(args))
    assert all(r["fid"] > dim * 9e3**2 for r in fid_records(tmp_path / "run"))  # features are far below 1e3
    assert not list((tmp_path / "run").glob(f"{CACHE_PREFIX}-*.npz"))  # statistics are not cached again


def test_missing_inception_weights_fail_before_any_step(tmp_path, tiny_train_args):
    missing = tmp_path / "nowhere" / "inception.safetensors"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        train(script.parse_args([*tiny_train_args, *FID_ARGS, "--inception_weights", str(missing)]))
    assert not list((tmp_path / "run").glob("checkpoint-*"))


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("fid_every_steps", -1, "--fid_every_steps=-1: must be an integer >= 0"),
        ("fid_num_samples", 1, "--fid_num_samples=1: must be an integer >= 2"),
        ("fid_inference_steps", 0, "--fid_inference_steps=0: must be a positive integer"),
        ("fid_inference_steps", 2000, "--fid_inference_steps=2000: must be <= --ddpm_num_steps=1000"),
        ("fid_batch_size", 0, "--fid_batch_size=0: must be a positive integer"),
    ],
)
def test_bad_fid_settings_name_the_flag(flag, value, message):
    with pytest.raises(ValueError, match=message.replace("+", r"\+")):
        TrainConfig(dataset_name="builtin:digits", device="cpu", **{flag: value})
