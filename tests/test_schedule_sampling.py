"""Noise schedule, training losses and samplers against diffusers' DDPMScheduler / DDPMPipeline / DDIMScheduler."""

import diffusers
import numpy as np
import pytest
import torch
from unet_configs import TINY

from ddpm import NoiseSchedule, ScheduleConfig, UNet, ddim_sample, ddpm_sample, inference_timesteps
from ddpm.diffusion.dpm_solver import dpm_solver_timesteps
from ddpm.diffusion.schedule import BETA_SCHEDULES, offset_noise
from ddpm.io.diffusers_format import schedule_config_from_diffusers, unet_config_from_diffusers
from ddpm.io.images import save_grid, to_uint8

# Every model here is tiny: with several threads, hand-offs on shared cores cost more than the maths (the 1000-step
# sampling below took minutes instead of seconds).
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("beta_schedule", BETA_SCHEDULES)  # every one DDPMScheduler accepts
@pytest.mark.parametrize("zero_snr", [False, True])
def test_schedule_arrays_equal_diffusers(beta_schedule, zero_snr):
    reference = diffusers.DDPMScheduler(beta_schedule=beta_schedule, rescale_betas_zero_snr=zero_snr)
    ours = NoiseSchedule(ScheduleConfig(beta_schedule=beta_schedule, rescale_betas_zero_snr=zero_snr))
    assert torch.equal(ours.betas, reference.betas)
    assert torch.equal(ours.alphas, reference.alphas)
    assert torch.equal(ours.alphas_cumprod, reference.alphas_cumprod)


def test_add_noise_velocity_snr_equal_diffusers():
    reference = diffusers.DDPMScheduler()
    ours = NoiseSchedule()
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    assert torch.equal(ours.add_noise(x0, noise, t), reference.add_noise(x0, noise, t))
    assert torch.equal(ours.velocity(x0, noise, t), reference.get_velocity(x0, noise, t))
    ab = reference.alphas_cumprod[t]
    torch.testing.assert_close(ours.snr(t), ab / (1 - ab))


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [1000, 50, 10, 3])
def test_inference_timesteps_equal_diffusers(spacing, steps):
    reference = diffusers.DDPMScheduler(timestep_spacing=spacing)
    reference.set_timesteps(steps)
    assert inference_timesteps(ScheduleConfig(timestep_spacing=spacing), steps) == reference.timesteps.tolist()


def test_inference_timesteps_rejects_too_many_steps():
    with pytest.raises(ValueError, match="num_inference_steps"):
        inference_timesteps(ScheduleConfig(), 1001)


@pytest.mark.parametrize(("offset", "steps", "fits"), [(1, 1000, 999), (2, 500, 400)])
def test_a_steps_offset_that_would_pass_the_last_timestep_is_refused(offset, steps, fits):
    """Leading spacing shifted by ``steps_offset`` (as DDIM-made scheduler configs have) can start past the last
    timestep, where diffusers' schedulers fail indexing their tables: refused, for DDPM/DDIM's timesteps and for
    DPM-Solver's; a count that fits gives diffusers' timesteps."""
    reference = diffusers.DDPMScheduler(steps_offset=offset)
    reference.set_timesteps(steps)
    config = ScheduleConfig(steps_offset=offset)
    assert reference.timesteps[0] >= 1000  # where diffusers' step() would index past alphas_cumprod
    message = rf"steps_offset={offset} would start at timestep \d+, past the last one \(999\): use fewer steps$"
    with pytest.raises(ValueError, match=message):
        inference_timesteps(config, steps)
    with pytest.raises(ValueError, match=message):
        dpm_solver_timesteps(config, steps - 1)  # DPM-Solver's leading grid has steps + 1 parts
    reference.set_timesteps(fits)
    assert inference_timesteps(config, fits) == reference.timesteps.tolist()


def test_training_losses_match_train_unconditional_formulas():
    schedule = NoiseSchedule(ScheduleConfig(prediction_type="sample"))
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 3, 8, 8, generator=g), torch.randn(3, 3, 8, 8, generator=g)
    t = torch.tensor([1, 300, 900])
    output = torch.randn(3, 3, 8, 8, generator=g)
    seen = {}

    def model(x_t, timesteps):
        seen["x_t"], seen["t"] = x_t, timesteps
        return output

    # sample prediction: SNR-weighted MSE to x0, exactly as train_unconditional computes it
    ab = schedule.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    expected = (ab / (1 - ab) * torch.nn.functional.mse_loss(output, x0, reduction="none")).mean()
    torch.testing.assert_close(schedule.training_loss(model, x0, t, noise), expected)
    torch.testing.assert_close(seen["x_t"], schedule.add_noise(x0, noise, t))
    eps = NoiseSchedule(ScheduleConfig(prediction_type="epsilon"))
    torch.testing.assert_close(eps.training_loss(model, x0, t, noise), torch.nn.functional.mse_loss(output, noise))
    v = NoiseSchedule(ScheduleConfig(prediction_type="v_prediction"))
    target = diffusers.DDPMScheduler().get_velocity(x0, noise, t)
    torch.testing.assert_close(v.training_loss(model, x0, t, noise), torch.nn.functional.mse_loss(output, target))


@pytest.mark.parametrize("zero_snr", [False, True])
@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_min_snr_weights_equal_diffusers_scripts(prediction_type, zero_snr):
    from diffusers.training_utils import compute_snr

    reference = diffusers.DDPMScheduler(prediction_type=prediction_type, rescale_betas_zero_snr=zero_snr)
    ours = NoiseSchedule(ScheduleConfig(prediction_type=prediction_type, rescale_betas_zero_snr=zero_snr))
    t = torch.tensor([0, 1, 100, 500, 900, 998, 999])
    snr = compute_snr(reference, t)
    expected = torch.stack([snr, 5.0 * torch.ones_like(t)], dim=1).min(dim=1)[0]  # train_text_to_image.py
    if prediction_type == "epsilon":
        expected = expected / snr
    elif prediction_type == "v_prediction":
        expected = expected / (snr + 1)
    weights = ours.min_snr_weights(t, 5.0)
    if zero_snr and prediction_type == "epsilon":  # 0 / 0 in the scripts; the limit 1 here
        assert torch.isnan(expected[-1]) and weights[-1] == 1
        weights, expected = weights[:-1], expected[:-1]
    torch.testing.assert_close(weights, expected)


def test_offset_noise_is_diffusers_scripts_formula():
    noise = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    expected = noise + 0.1 * torch.randn((3, 2, 1, 1), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(offset_noise(noise, 0.1, torch.Generator().manual_seed(1)), expected)


@pytest.mark.parametrize(
    "key, value",
    [
        ("beta_schedule", "cosine"),
        ("prediction_type", "x0"),
        ("variance_type", "learned_range"),
        ("timestep_spacing", "karras"),
        ("num_train_timesteps", 1),
        ("beta_end", 2.0),
        ("clip_sample_range", 0.0),
        ("trained_betas", [0.1, 0.2]),
        ("thresholding", True),
        ("unknown_key", 1),
    ],
)
def test_invalid_schedule_configs_name_the_key(key, value):
    with pytest.raises(ValueError, match=key):
        schedule_config_from_diffusers({key: value})


def test_schedule_config_round_trips_diffusers_config():
    reference = diffusers.DDPMScheduler(variance_type="fixed_large", prediction_type="v_prediction")
    cfg = schedule_config_from_diffusers(dict(reference.config))
    assert cfg.variance_type == "fixed_large" and cfg.prediction_type == "v_prediction"
    assert ScheduleConfig.from_dict(cfg.to_dict()) == cfg


@pytest.fixture(scope="module")
def tiny_pair():
    torch.manual_seed(0)
    reference = diffusers.UNet2DModel(**TINY).eval()
    ours = UNet(unet_config_from_diffusers(dict(reference.config))).eval()
    ours.load_state_dict(reference.state_dict())
    return reference, ours


def _pipeline_images(pipeline, steps, **kwargs):
    out = pipeline(
        batch_size=2, generator=torch.Generator().manual_seed(3), num_inference_steps=steps, output_type="np", **kwargs
    )
    return out.images


# One run through every training timestep (no respacing; a 250-step schedule, for time); the respaced runs of the
# 1000-step schedule cover both variances and spacings.
@pytest.mark.parametrize(
    "variance_type, steps, spacing, train_steps",
    [("fixed_small", 250, "leading", 250)]
    + [
        (v, *s, 1000)
        for v in ("fixed_small", "fixed_large")
        for s in ((50, "leading"), (50, "trailing"), (10, "linspace"))
    ],
)
def test_ddpm_sampler_reproduces_ddpm_pipeline(tiny_pair, variance_type, steps, spacing, train_steps):
    reference, ours = tiny_pair
    scheduler = diffusers.DDPMScheduler(
        num_train_timesteps=train_steps, variance_type=variance_type, timestep_spacing=spacing
    )
    expected = _pipeline_images(diffusers.DDPMPipeline(unet=reference, scheduler=scheduler), steps)
    schedule = NoiseSchedule(schedule_config_from_diffusers(dict(scheduler.config)))
    images = ddpm_sample(ours, schedule, 2, num_inference_steps=steps, generator=torch.Generator().manual_seed(3))
    got = (images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert np.abs(got - expected).max() <= 1e-4


class _DiffusersModel(torch.nn.Module):
    """diffusers' UNet behind our calling convention, to check the DDIM sampler's arithmetic on its own."""

    def __init__(self, unet):
        super().__init__()
        self.unet, self.config = unet, unet.config

    def forward(self, x, t):
        return self.unet(x, t).sample


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_sampler_reproduces_ddim_pipeline(tiny_pair, eta, prediction_type):
    # Driven by diffusers' own UNet: deterministic DDIM on a random network amplifies the 1e-6 float differences
    # between two UNet implementations, which would hide what this test is about, the sampler.
    reference, _ = tiny_pair
    config = diffusers.DDPMScheduler(prediction_type=prediction_type).config
    scheduler = diffusers.DDIMScheduler.from_config(config)
    expected = _pipeline_images(diffusers.DDIMPipeline(unet=reference, scheduler=scheduler), 20, eta=eta)
    schedule = NoiseSchedule(schedule_config_from_diffusers(dict(config)))
    images = ddim_sample(
        _DiffusersModel(reference),
        schedule,
        2,
        num_inference_steps=20,
        eta=eta,
        generator=torch.Generator().manual_seed(3),
    )
    got = (images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert np.abs(got - expected).max() <= 1e-5


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_ddim_sampler_reproduces_ddim_pipeline_for_every_prediction_and_spacing(tiny_pair, prediction_type, spacing):
    # Driven by diffusers' UNet, as above. 6 steps: 1000 // 6 = 166 is not the spacing of the trailing (999, 832, ...)
    # or linspace (999, 799, ...) grids, so DDIMScheduler's ``prev_t = t - 166`` differs from the next timestep
    # visited there; eta > 0 exercises the variance and its noise too.
    reference, _ = tiny_pair
    config = diffusers.DDPMScheduler(prediction_type=prediction_type, timestep_spacing=spacing).config
    scheduler = diffusers.DDIMScheduler.from_config(config)
    expected = _pipeline_images(diffusers.DDIMPipeline(unet=reference, scheduler=scheduler), 6, eta=0.5)
    schedule = NoiseSchedule(schedule_config_from_diffusers(dict(config)))
    images = ddim_sample(
        _DiffusersModel(reference),
        schedule,
        2,
        num_inference_steps=6,
        eta=0.5,
        generator=torch.Generator().manual_seed(3),
    )
    got = (images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert np.abs(got - expected).max() <= 1e-5


def test_to_uint8_rounds_like_numpy_to_pil_and_grid_is_written(tmp_path):
    images = torch.linspace(-1.2, 1.2, 2 * 3 * 4 * 4).reshape(2, 3, 4, 4)
    expected = ((images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    assert np.array_equal(to_uint8(images), expected)
    from PIL import Image

    path = save_grid(images, tmp_path / "grid.png", nrow=2, min_width=0)  # at their size
    grid = np.asarray(Image.open(path))
    assert grid.shape == (2 + 4 + 2, 2 + 2 * (4 + 2), 3)
    assert np.array_equal(grid[2:6, 2:6], expected[0]) and np.array_equal(grid[2:6, 8:12], expected[1])
    # by default images under 64 px are scaled up (nearest) so that a row is >= 512 px: 4 px x 64
    grid = np.asarray(Image.open(save_grid(images, tmp_path / "big.png", nrow=2)))
    assert grid.shape == (2 + 256 + 2, 2 + 2 * (256 + 2), 3)
    assert np.array_equal(grid[2:258, 2:258], expected[0].repeat(64, axis=0).repeat(64, axis=1))  # 64 px squares
