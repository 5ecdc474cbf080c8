"""scripts/sample.py and ddpm.evaluation.generate:
files written, per-image seeding, resuming, torchrun, diffusers folders.

The test model is a training checkpoint holding a random UNet as its live weights and, as its EMA weights, the same
UNet with a zeroed output layer. A network's batched kernels may round differently for different batch sizes (see
``ddpm.evaluation.generate``);
the zero-output network predicts exactly 0 whatever the batch, so its images depend only on the
per-image noise streams and must agree bit for bit whatever the batch size. The random network checks the rest:
bit-exact where the batch shapes are the same, within a rounding level otherwise.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import load_script, subprocess_env, write_model_checkpoint
from PIL import Image
from unet_configs import TINY

from ddpm import ScheduleConfig, UNet, UNetConfig
from ddpm.diffusion.samplers import ddpm_sample
from ddpm.diffusion.schedule import NoiseSchedule
from ddpm.evaluation.generate import SETTINGS_NAME, image_generators, sample_images
from ddpm.evaluation.metrics import load_source
from ddpm.io.checkpoint import load_checkpoint_model
from ddpm.io.images import to_uint8

ROOT = Path(__file__).resolve().parents[1]
SCHEDULE = ScheduleConfig(num_train_timesteps=100)
STEPS = ["--num_inference_steps", "10"]


sample_script = load_script("sample")


pytestmark = pytest.mark.usefixtures("one_thread")  # as the subprocesses: in-process runs match them


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    config = UNetConfig.from_dict(TINY)
    live = UNet(config).state_dict()
    ema = {k: torch.zeros_like(v) if k.startswith("conv_out.") else v for k, v in live.items()}
    return write_model_checkpoint(tmp_path_factory.mktemp("run") / "checkpoint-3", 3, config, SCHEDULE, live, ema)


def run(model, out, num_images, *extra):
    sample_script.main(
        ["--model", str(model), "--output_dir", str(out), "--num_images", str(num_images), "--device", "cpu"]
        + STEPS
        + [str(x) for x in extra]
    )


def read_images(out, num_images=None):
    files = sorted((Path(out) / "images").glob("*.png"))
    assert num_images is None or [f.name for f in files] == [f"{i:06d}.png" for i in range(num_images)]
    return np.stack([np.asarray(Image.open(f)) for f in files])


def script_command(model, out, num_images, *extra):
    args = ["--model", model, "--output_dir", out, "--num_images", num_images, "--device", "cpu", *STEPS, *extra]
    return [str(x) for x in args]


def test_writes_numbered_pngs_grid_and_npz_with_the_ema_weights(checkpoint, tmp_path):
    run(checkpoint, tmp_path, 5, "--batch_size", 2, "--save_npz")
    images = read_images(tmp_path, 5)
    assert images.shape == (5, 8, 8, 3) and images.dtype == np.uint8
    with np.load(tmp_path / "samples.npz") as data:
        assert data.files == ["images"]
        np.testing.assert_array_equal(data["images"], images)
    # 3 per row, 2 px padding; 8 px images scaled x22 so that a row is >= 512 px. The numbered PNGs keep 8 px.
    assert Image.open(tmp_path / "grid.png").size == (3 * (8 * 22 + 2) + 2, 2 * (8 * 22 + 2) + 2)
    assert not list(tmp_path.rglob(".*tmp"))
    # evaluate.py --samples OUTPUT_DIR reads the samples, not the grid beside them
    from_folder = load_source(tmp_path)
    assert len(from_folder) == 5 and all(np.array_equal(from_folder[i], images[i]) for i in range(5))

    # Each image is the library's image of its index: EMA weights (zero output layer) by default.
    unet_config, _, ema_weights, _ = load_checkpoint_model(checkpoint)
    model = UNet(unet_config).eval()
    model.load_state_dict(ema_weights)
    expected = sample_images(model, NoiseSchedule(SCHEDULE), [3, 4], seed=0, num_inference_steps=10)
    np.testing.assert_array_equal(images[3:], to_uint8(expected))

    run(checkpoint, tmp_path / "live", 5, "--no_ema")
    assert np.abs(read_images(tmp_path / "live").astype(int) - images).mean() > 10


def test_same_images_whatever_the_batch_size(checkpoint, tmp_path):
    runs = {}
    for batch_size in (1, 3, 7):
        run(checkpoint, tmp_path / f"ema{batch_size}", 7, "--batch_size", batch_size)
        runs[batch_size] = read_images(tmp_path / f"ema{batch_size}", 7)
    np.testing.assert_array_equal(runs[1], runs[3])
    np.testing.assert_array_equal(runs[1], runs[7])
    assert len({im.tobytes() for im in runs[1]}) == 7  # every image has its own noise

    # The random network, DDIM with noise: same images up to the kernels' rounding for other batch shapes.
    ddim = ("--no_ema", "--sampler", "ddim", "--eta", 0.5)
    run(checkpoint, tmp_path / "one", 7, "--batch_size", 1, *ddim)
    run(checkpoint, tmp_path / "all", 7, "--batch_size", 7, *ddim)
    one, all_ = read_images(tmp_path / "one", 7).astype(int), read_images(tmp_path / "all", 7).astype(int)
    assert np.abs(one - all_).max() <= 1 and (one != all_).mean() < 0.01


@pytest.mark.parametrize("sampler", ["dpmsolver++", "sde-dpmsolver++"])
def test_dpm_solver_images_are_the_librarys(checkpoint, tmp_path, sampler):
    run(checkpoint, tmp_path, 3, "--no_ema", "--sampler", sampler, "--timestep_spacing", "trailing")
    _, _, live_weights, _ = load_checkpoint_model(checkpoint, use_ema=False)
    model = UNet(UNetConfig.from_dict(TINY)).eval()
    model.load_state_dict(live_weights)
    schedule = NoiseSchedule(dataclasses.replace(SCHEDULE, timestep_spacing="trailing"))
    expected = sample_images(model, schedule, [0, 1, 2], seed=0, sampler=sampler, num_inference_steps=10)
    np.testing.assert_array_equal(read_images(tmp_path, 3), to_uint8(expected))
    with pytest.raises(SystemExit, match="num_inference_steps"):  # "leading": 100 // (100 + 1) = 0, timesteps repeat
        run(checkpoint, tmp_path / "out", 2, "--sampler", sampler, "--num_inference_steps", 100)


def test_two_processes_give_the_images_of_one(checkpoint, tmp_path):
    # 8 images in batches of 2: both ranks run batches shaped like the single process's, so even the random
    # network's images must agree bit for bit.
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    args = script_command(checkpoint, tmp_path / "ddp", 8, "--no_ema", "--batch_size", 2, "--save_npz")
    done = subprocess.run(
        [*launcher, str(ROOT / "scripts" / "sample.py"), *args],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-5000:]
    run(checkpoint, tmp_path / "single", 8, "--no_ema", "--batch_size", 2)
    ddp = read_images(tmp_path / "ddp", 8)
    np.testing.assert_array_equal(ddp, read_images(tmp_path / "single", 8))
    with np.load(tmp_path / "ddp" / "samples.npz") as data:
        np.testing.assert_array_equal(data["images"], ddp)
    assert (tmp_path / "ddp" / "grid.png").is_file()


def test_resumes_after_a_kill(checkpoint, tmp_path):
    out, n = tmp_path / "killed", 30
    args = script_command(checkpoint, out, n, "--no_ema", "--batch_size", 1, "--num_inference_steps", 20)
    process = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "sample.py"), *args], env=subprocess_env())
    try:
        deadline = time.monotonic() + 120
        while len(list((out / "images").glob("*.png"))) < 2 and process.poll() is None:
            assert time.monotonic() < deadline, "no image written in time"
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    done_before = sorted((out / "images").glob("*.png"))
    assert 2 <= len(done_before) < n, "the run ended before it could be killed"
    missing = n - 1
    assert not (out / "images" / f"{missing:06d}.png").exists()
    (out / "images" / f".{missing:06d}.png.tmp").write_bytes(b"\x89PNG truncated")  # a kill mid-write
    first_written = done_before[0].stat().st_mtime_ns

    subprocess.run([sys.executable, str(ROOT / "scripts" / "sample.py"), *args], env=subprocess_env(), check=True)
    assert done_before[0].stat().st_mtime_ns == first_written  # finished images are not redone
    run(checkpoint, tmp_path / "uninterrupted", n, "--no_ema", "--batch_size", 1, "--num_inference_steps", 20)
    np.testing.assert_array_equal(read_images(out, n), read_images(tmp_path / "uninterrupted", n))
    assert not list(out.rglob(".*tmp"))


def test_resuming_with_other_settings_is_refused_and_more_images_extend_the_set(checkpoint, tmp_path):
    run(checkpoint, tmp_path, 3)
    first = read_images(tmp_path, 3)
    with pytest.raises(SystemExit, match="seed: 0 there, 1 now"):
        run(checkpoint, tmp_path, 3, "--seed", 1)
    with pytest.raises(SystemExit, match="weights_sha256"):
        run(checkpoint, tmp_path, 3, "--no_ema")
    run(checkpoint, tmp_path, 5, "--batch_size", 2)
    np.testing.assert_array_equal(read_images(tmp_path, 5)[:3], first)


def test_diffusers_pipeline_folder_gives_the_pipelines_images(tmp_path):
    import diffusers

    torch.manual_seed(1)
    pipeline = diffusers.DDPMPipeline(
        unet=diffusers.UNet2DModel(**TINY), scheduler=diffusers.DDPMScheduler(num_train_timesteps=100)
    )
    pipeline.save_pretrained(tmp_path / "pipeline")
    run(tmp_path / "pipeline", tmp_path / "out", 3, "--batch_size", 3)
    # Image i is what DDPMPipeline draws with image i's generator (diffusers takes one generator per image too).
    expected = pipeline(
        batch_size=3, generator=image_generators(0, range(3)), num_inference_steps=10, output_type="np"
    ).images
    got = read_images(tmp_path / "out", 3).astype(int)
    assert np.abs(got - (expected * 255).round()).max() <= 1


def test_mixed_precision_runs_the_network_in_bf16(checkpoint, tmp_path):
    run(checkpoint, tmp_path / "bf16", 2, "--no_ema", "--mixed_precision", "bf16")
    run(checkpoint, tmp_path / "fp32", 2, "--no_ema")
    bf16, fp32 = read_images(tmp_path / "bf16", 2).astype(int), read_images(tmp_path / "fp32", 2).astype(int)
    difference = np.abs(bf16 - fp32)
    # Rounded differently (an ignored flag gives float32's images bit for bit), yet the same noise made both:
    # measured mean 0.17, max 2 grey levels; other noise (another seed) gives a mean of ~100.
    assert difference.mean() > 0
    assert difference.mean() < 1 and difference.max() <= 8


@pytest.mark.parametrize("native", [True, False], ids=["native_bf16", "no_native_bf16"])
def test_auto_precision_samples_as_its_choice(checkpoint, tmp_path, monkeypatch, native):
    """--mixed_precision auto makes the images of bf16 on a device with bfloat16 arithmetic of its own and of float32
    elsewhere, bit for bit (the two differ: the test above), and records its choice, so that rerunning with the
    explicit choice continues the same folder."""
    import ddpm.runtime.precision as precision_module

    monkeypatch.setattr(precision_module, "computes_bf16_natively", lambda device: native)
    chosen = "bf16" if native else "no"
    run(checkpoint, tmp_path / "auto", 2, "--no_ema", "--mixed_precision", "auto")
    run(checkpoint, tmp_path / "explicit", 2, "--no_ema", "--mixed_precision", chosen)
    np.testing.assert_array_equal(read_images(tmp_path / "auto", 2), read_images(tmp_path / "explicit", 2))
    assert json.loads((tmp_path / "auto" / SETTINGS_NAME).read_text())["mixed_precision"] == chosen
    run(checkpoint, tmp_path / "auto", 3, "--no_ema", "--mixed_precision", chosen)  # accepted: the same settings
    read_images(tmp_path / "auto", 3)


def test_a_precision_the_device_cannot_autocast_to_is_refused_in_one_line(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda *args: False)  # as a build / device without fp16
    with pytest.raises(SystemExit, match=r"^sample.py: error: --mixed_precision=fp16: this PyTorch cannot autocast"):
        run(checkpoint, tmp_path / "out", 2, "--mixed_precision", "fp16")
    assert not (tmp_path / "out" / "images").exists()  # refused before any image


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--num_images", "0"], "--num_images"),
        (["--eta", "0.5"], "--eta"),
        (["--sampler", "ddim", "--eta", "-1"], "--eta"),
        (["--seed", "-1"], "--seed"),
    ],
)
def test_bad_flags_are_refused(checkpoint, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        run(checkpoint, tmp_path, 2, *extra)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_bad_model_or_steps_name_the_culprit(checkpoint, tmp_path):
    with pytest.raises(SystemExit, match="no-such-folder"):
        run(tmp_path / "no-such-folder", tmp_path / "out", 2)
    with pytest.raises(SystemExit, match="num_inference_steps"):
        run(checkpoint, tmp_path / "out", 2, "--num_inference_steps", 500)  # > 100 training steps
    assert not (tmp_path / "out" / "images").exists()


def test_samplers_take_one_generator_per_image():
    model = UNet(UNetConfig.from_dict(TINY)).eval()
    schedule = NoiseSchedule(SCHEDULE)
    with pytest.raises(ValueError, match="one per image"):
        ddpm_sample(model, schedule, 3, num_inference_steps=2, generator=image_generators(0, range(2)))
    # a one-element list is the single generator it holds (diffusers' randn_tensor semantics)
    single = ddpm_sample(model, schedule, 1, num_inference_steps=3, generator=torch.Generator().manual_seed(5))
    listed = ddpm_sample(model, schedule, 1, num_inference_steps=3, generator=[torch.Generator().manual_seed(5)])
    assert torch.equal(single, listed)
