"""Training flags that change the maths, each checked in real (one-step) training runs against an independent
computation: --max_grad_norm against a clip done by hand, --prediction_type and --ddpm_beta_schedule against the loss
diffusers' DDPMScheduler gives, --ddpm_variance_type against DDPMPipeline sampling the exported model, and how these
flags merge with a pretrained model's schedule."""

import json
import math
import os
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import load_script, read_metrics
from PIL import Image

from ddpm import UNet, ddpm_sample, load_model
from ddpm.diffusion.schedule import NoiseSchedule
from ddpm.evaluation.generate import image_generators
from ddpm.io.files import read_torch_state
from ddpm.io.images import to_uint8
from ddpm.training.loop import train

script = load_script("train")
pytestmark = pytest.mark.usefixtures("one_thread")

ONE_STEP = ["--max_train_steps", "1"]


def run(args):
    return train(script.parse_args(args))


def exported_schedule(output_dir) -> dict:
    """The exported scheduler's config as diffusers reads it."""
    return dict(diffusers.DDPMScheduler.from_pretrained(Path(output_dir) / "scheduler").config)


def checkpoint_schedule(checkpoint_dir) -> dict:
    """The schedule a resume of this checkpoint continues with."""
    return json.loads((Path(checkpoint_dir) / "config.json").read_text())["schedule"]


# ---------------------------------------------------------------------------------------------------- clipping


def first_moment(checkpoint_dir) -> torch.Tensor:
    """AdamW's first moment after one step, (1 - beta1) x the (clipped) gradient it stepped with, as one vector."""
    state = read_torch_state(Path(checkpoint_dir) / "training_state.pt")["optimizer"]["state"]
    return torch.cat([state[i]["exp_avg"].flatten() for i in sorted(state)])


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def unclipped(make_train_args, tmp_path_factory):
    """(first moment, gradient norm) of a one-step float32 run whose --max_grad_norm never clips."""
    output_dir = tmp_path_factory.mktemp("unclipped") / "run"
    run([*make_train_args(output_dir), *ONE_STEP, "--max_grad_norm", "1e9"])
    moment = first_moment(output_dir / "checkpoint-1")
    gradient_norm = (moment / (1 - 0.95)).norm().item()  # --adam_beta1 defaults to 0.95
    # the logged norm is the one before clipping
    assert read_metrics(output_dir)[0]["grad_norm"] == pytest.approx(gradient_norm, rel=1e-5)
    return moment, gradient_norm


@pytest.mark.parametrize("precision", ["no", "fp16"])
def test_max_grad_norm_clips_the_unscaled_gradient(tmp_path, make_train_args, unclipped, precision):
    """The step uses the gradient scaled by max_norm / (norm + 1e-6) (clip_grad_norm_'s rule), computed here from the
    unclipped run. With fp16 the clip must come after GradScaler.unscale_: clipping the 65536x scaled gradient would
    leave it 65536x too small (and log a 65536x norm); rounding in fp16 changes it by ~1e-3 only."""
    moment, gradient_norm = unclipped
    max_norm = 0.25
    assert gradient_norm > 4 * max_norm  # the clip is active
    args = ["--max_grad_norm", str(max_norm), "--mixed_precision", precision]
    run([*make_train_args(tmp_path / "run"), *ONE_STEP, *args])
    expected = moment * (max_norm / (gradient_norm + 1e-6))
    tolerance = 1e-5 if precision == "no" else 0.02
    assert relative_error(first_moment(tmp_path / "run" / "checkpoint-1"), expected) < tolerance
    assert read_metrics(tmp_path / "run")[0]["grad_norm"] == pytest.approx(gradient_norm, rel=tolerance)


# ---------------------------------------------------------------------------------------------------- training loss


def diffusers_loss(scheduler, model, x0, timesteps, noise) -> torch.Tensor:
    """train_unconditional's loss (plus v-prediction's MSE to the velocity) with diffusers' noising and targets."""
    x_t = scheduler.add_noise(x0, noise, timesteps)
    prediction = model(x_t, timesteps).float()
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return F.mse_loss(prediction, noise.float())
    if kind == "v_prediction":
        return F.mse_loss(prediction, scheduler.get_velocity(x0, noise, timesteps).float())
    alpha_t = scheduler.alphas_cumprod[timesteps].reshape(-1, 1, 1, 1)
    return (alpha_t / (1 - alpha_t) * F.mse_loss(prediction, x0.float(), reduction="none")).mean()


@pytest.mark.parametrize(
    "prediction_type, beta_schedule", [("v_prediction", "scaled_linear"), ("sample", "squaredcos_cap_v2")]
)
def test_the_training_loss_follows_prediction_type_and_beta_schedule(
    tmp_path, make_train_args, monkeypatch, prediction_type, beta_schedule
):
    """Each micro-batch's loss equals the one diffusers' DDPMScheduler configured by the flags gives on the same
    images, timesteps and noise (and the same network, before the step), and the checkpoint and the export carry the
    flags."""
    scheduler = diffusers.DDPMScheduler(
        num_train_timesteps=100, beta_schedule=beta_schedule, prediction_type=prediction_type
    )
    losses = []
    original = NoiseSchedule.training_loss

    def recording(self, model, x0, t, noise, **kwargs):
        loss = original(self, model, x0, t, noise, **kwargs)
        with torch.no_grad():
            losses.append((loss.item(), diffusers_loss(scheduler, model, x0, t, noise).item()))
        return loss

    monkeypatch.setattr(NoiseSchedule, "training_loss", recording)
    args = ["--prediction_type", prediction_type, "--ddpm_beta_schedule", beta_schedule]
    run([*make_train_args(tmp_path / "run"), *ONE_STEP, *args])
    assert len(losses) == 1
    ours, theirs = losses[0]
    assert ours == pytest.approx(theirs, rel=1e-5)
    expected = {"beta_schedule": beta_schedule, "prediction_type": prediction_type}
    for schedule in (checkpoint_schedule(tmp_path / "run" / "checkpoint-1"), exported_schedule(tmp_path / "run")):
        assert {k: schedule[k] for k in expected} == expected


# ---------------------------------------------------------------------------------------------------- training levers


def min_snr_loss(scheduler, model, x0, timesteps, noise, gamma) -> torch.Tensor:
    """diffusers' train_text_to_image.py loss with --snr_gamma: compute_snr, min(SNR, gamma), / SNR (epsilon) or
    / (SNR + 1) (v-prediction), per-image mean squared error times the weights."""
    from diffusers.training_utils import compute_snr

    x_t = scheduler.add_noise(x0, noise, timesteps)
    prediction = model(x_t, timesteps).float()
    kind = scheduler.config.prediction_type
    target = {"epsilon": noise, "sample": x0}.get(kind)
    if target is None:
        target = scheduler.get_velocity(x0, noise, timesteps)
    snr = compute_snr(scheduler, timesteps)
    weights = torch.stack([snr, gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0]
    if kind == "epsilon":
        weights = weights / snr
    elif kind == "v_prediction":
        weights = weights / (snr + 1)
    loss = F.mse_loss(prediction, target.float(), reduction="none")
    return (loss.mean(dim=list(range(1, len(loss.shape)))) * weights).mean()


def recorded_losses(monkeypatch, reference):
    """Patch the training loss to record (ours, ``reference(model, x0, t, noise)``, noise) for every micro-batch."""
    records = []
    original = NoiseSchedule.training_loss

    def recording(self, model, x0, t, noise, **kwargs):
        loss = original(self, model, x0, t, noise, **kwargs)
        with torch.no_grad():
            records.append((loss.item(), reference(model, x0, t, noise).item(), noise.clone()))
        return loss

    monkeypatch.setattr(NoiseSchedule, "training_loss", recording)
    return records


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_training_levers_follow_diffusers_scripts(tmp_path, make_train_args, monkeypatch, prediction_type):
    """--snr_gamma: the loss of diffusers' min-SNR formula on the same inputs; --noise_offset: the noise moves by one
    draw per image and channel; --rescale_betas_zero_snr: in the checkpoint, the export and the run's config."""
    scheduler = diffusers.DDPMScheduler(
        num_train_timesteps=100, prediction_type=prediction_type, rescale_betas_zero_snr=True
    )
    plain = recorded_losses(monkeypatch, lambda *inputs: torch.zeros(()))
    base = ["--prediction_type", prediction_type, "--rescale_betas_zero_snr"]
    run([*make_train_args(tmp_path / "plain"), *ONE_STEP, *base])
    levers = recorded_losses(monkeypatch, lambda *inputs: min_snr_loss(scheduler, *inputs, gamma=5.0))
    run([*make_train_args(tmp_path / "run"), *ONE_STEP, *base, "--snr_gamma", "5", "--noise_offset", "0.1"])
    (ours, theirs, noise), (_, _, plain_noise) = levers[0], plain[0]
    assert ours == pytest.approx(theirs, rel=1e-5)
    offset = noise - plain_noise
    assert torch.allclose(offset, offset[:, :, :1, :1].expand_as(offset), atol=1e-6)  # constant over the pixels
    assert 0.01 < offset.abs().max() < 0.5
    for schedule in (checkpoint_schedule(tmp_path / "run" / "checkpoint-1"), exported_schedule(tmp_path / "run")):
        assert schedule["rescale_betas_zero_snr"] is True
    settings = json.loads((tmp_path / "run" / "checkpoint-1" / "config.json").read_text())["run"]
    assert (settings["snr_gamma"], settings["noise_offset"], settings["rescale_betas_zero_snr"]) == (5.0, 0.1, True)


# ---------------------------------------------------------------------------------------------------- sample grids


def grid_tiles(path, n, size, padding=2) -> np.ndarray:
    """The ``n`` images of a sample grid PNG (near-square rows, ``padding`` px around each), uint8 NHWC, at their
    ``size`` (a grid shows small images scaled up by a whole factor: one pixel of each square is taken)."""
    grid = np.asarray(Image.open(path).convert("RGB"))
    per_row = math.ceil(math.sqrt(n))
    scale = ((grid.shape[1] - padding) // per_row - padding) // size
    tiles = []
    for i in range(n):
        r, c = divmod(i, per_row)
        y, x = padding + r * (size * scale + padding), padding + c * (size * scale + padding)
        tiles.append(grid[y : y + size * scale : scale, x : x + size * scale : scale])
    return np.stack(tiles)


@pytest.fixture(scope="module")
def schedule_run(make_train_args, tmp_path_factory):
    """A one-step run with every schedule flag off its default and DDPM sample grids (no EMA: the grid and the export
    hold the same weights)."""
    output_dir = tmp_path_factory.mktemp("schedule") / "run"
    args = ["--ddpm_variance_type", "fixed_large", "--prediction_type", "v_prediction"]
    args += ["--ddpm_beta_schedule", "scaled_linear", "--sampler", "ddpm"]
    run([*make_train_args(output_dir), *ONE_STEP, *args])
    return output_dir


def test_variance_type_reaches_the_export_and_the_grid_sampler(schedule_run):
    """The grid is the images DDPMPipeline draws from the export (a generator per image, seeded as
    ddpm.evaluation.generate seeds image i of seed 0; --ddpm_num_inference_steps), and
    the export's scheduler is the flags'; the same pipeline with the default variance gives other images."""
    expected = {"beta_schedule": "scaled_linear", "prediction_type": "v_prediction", "variance_type": "fixed_large"}
    for schedule in (checkpoint_schedule(schedule_run / "checkpoint-1"), exported_schedule(schedule_run)):
        assert {k: schedule[k] for k in expected} == expected
    grid = grid_tiles(schedule_run / "samples" / "step_000001.png", 4, 8).astype(int)
    pipeline = diffusers.DDPMPipeline.from_pretrained(schedule_run)

    def pipeline_images(scheduler):
        pipeline.scheduler = scheduler
        generator = image_generators(0, range(4))
        images = pipeline(batch_size=4, generator=generator, num_inference_steps=4, output_type="np").images
        return (images * 255).round().astype(int)

    assert np.abs(grid - pipeline_images(pipeline.scheduler)).max() <= 1
    small = diffusers.DDPMScheduler.from_config(pipeline.scheduler.config, variance_type="fixed_small")
    assert np.abs(grid - pipeline_images(small)).max() > 8


# ---------------------------------------------------------------------------------------------------- pretrained


def from_pretrained(args, source):
    """``args`` training from ``source`` instead of a UNet config."""
    i = args.index("--model_config_name_or_path")
    return [*args[:i], *args[i + 2 :], "--pretrained_model_name_or_path", str(source)]


def test_a_pretrained_schedule_is_kept_unless_a_flag_changes_it(tmp_path, make_train_args, schedule_run):
    """Fine-tuning the export of :func:`schedule_run` with default flags keeps its schedule; a flag given a value
    other than its default overrides that key only."""
    source = checkpoint_schedule(schedule_run / "checkpoint-1")  # every key of the schedule
    assert source["variance_type"] != "fixed_small" and source["beta_schedule"] != "linear"

    run([*from_pretrained(make_train_args(tmp_path / "kept"), schedule_run), *ONE_STEP])
    for schedule in (checkpoint_schedule(tmp_path / "kept" / "checkpoint-1"), exported_schedule(tmp_path / "kept")):
        assert {k: schedule[k] for k in source} == source

    changed = ["--prediction_type", "sample", "--ddpm_beta_schedule", "squaredcos_cap_v2"]
    run([*from_pretrained(make_train_args(tmp_path / "changed"), schedule_run), *ONE_STEP, *changed])
    expected = {**source, "prediction_type": "sample", "beta_schedule": "squaredcos_cap_v2"}
    for schedule in (
        checkpoint_schedule(tmp_path / "changed" / "checkpoint-1"),
        exported_schedule(tmp_path / "changed"),
    ):
        assert {k: schedule[k] for k in expected} == expected


def test_dpm_solver_grid_and_zero_snr_export_sample_as_diffusers(make_train_args, tmp_path):
    """--sampler sde-dpmsolver++ grids are what DDPMPipeline draws from the export with the model card's scheduler
    swap; a --rescale_betas_zero_snr export samples in DDPMPipeline as ddpm_sample samples it."""
    args = ["--rescale_betas_zero_snr", "--prediction_type", "v_prediction", "--sampler", "sde-dpmsolver++"]
    run([*make_train_args(tmp_path / "run"), *ONE_STEP, *args])
    grid = grid_tiles(tmp_path / "run" / "samples" / "step_000001.png", 4, 8).astype(int)
    pipeline = diffusers.DDPMPipeline.from_pretrained(tmp_path / "run")
    ddpm_scheduler = pipeline.scheduler

    def pipeline_images(generator):
        images = pipeline(batch_size=4, generator=generator, num_inference_steps=4, output_type="np").images
        return (images * 255).round().astype(int)

    pipeline.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(
        ddpm_scheduler.config, algorithm_type="sde-dpmsolver++"
    )
    assert np.abs(grid - pipeline_images(image_generators(0, range(4)))).max() <= 1  # the grid's per-image seeds
    pipeline.scheduler = ddpm_scheduler
    unet_config, schedule_config, weights = load_model(tmp_path / "run")
    assert schedule_config.rescale_betas_zero_snr
    model = UNet(unet_config).eval()
    model.load_state_dict(weights)
    ours = ddpm_sample(
        model, NoiseSchedule(schedule_config), 4, num_inference_steps=4, generator=torch.Generator().manual_seed(0)
    )
    assert np.abs(to_uint8(ours).astype(int) - pipeline_images(torch.Generator().manual_seed(0))).max() <= 1


def test_a_step_count_the_grid_sampler_cannot_take_is_refused_before_training(make_train_args, tmp_path):
    # DPM-Solver's "leading" grid over 100 timesteps: 100 // (100 + 1) = 0, every timestep would be 0.
    args = ["--sampler", "dpmsolver++", "--ddpm_num_inference_steps", "100"]
    with pytest.raises(ValueError, match="--ddpm_num_inference_steps=100 with the dpmsolver"):
        run([*make_train_args(tmp_path / "run"), *ONE_STEP, *args])
    assert not list((tmp_path / "run").glob("checkpoint-*"))


@pytest.mark.parametrize("deterministic", [False, True])
def test_deterministic_sets_the_cuda_backends_for_reproducible_kernels(monkeypatch, deterministic):
    """--deterministic: no cuDNN autotuning, deterministic algorithms, a fixed cuBLAS workspace; without it cuDNN
    picks its fastest kernels. The backend switches are set for a CUDA device without touching one (the CUDA run
    is scripts/gpu_check.py's bit-exact resume)."""
    from ddpm.training import setup

    for flag in ("benchmark", "deterministic"):
        monkeypatch.setattr(torch.backends.cudnn, flag, False)
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", "")  # recorded, so that what the setup sets is undone after
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")
    calls = []
    monkeypatch.setattr(torch, "use_deterministic_algorithms", lambda mode, **kw: calls.append((mode, kw)))
    config = script.parse_args(["--dataset_name", "builtin:digits", *(["--deterministic"] if deterministic else [])])
    assert config.deterministic is deterministic
    setup._configure_backends(config, torch.device("cuda", 0))
    assert torch.backends.cudnn.benchmark is not deterministic
    assert torch.backends.cudnn.deterministic is deterministic
    assert calls == ([(True, {"warn_only": True})] if deterministic else [])
    assert (os.environ.get("CUBLAS_WORKSPACE_CONFIG") == ":4096:8") is deterministic
