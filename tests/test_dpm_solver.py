"""DPM-Solver++ against diffusers' DPMSolverMultistepScheduler swapped into DDPMPipeline, as the model card says."""

import json

import diffusers
import numpy as np
import pytest
import torch
from unet_configs import CONFIG_DIR, TINY

from ddpm import NoiseSchedule, ScheduleConfig, UNet, UNetConfig, dpm_solver_sample
from ddpm.diffusion.dpm_solver import dpm_solver_timesteps
from ddpm.diffusion.sampling import SAMPLERS, default_inference_steps, sample, sampler_timesteps
from ddpm.evaluation.generate import image_generators
from ddpm.io.diffusers_format import schedule_config_from_diffusers, unet_config_from_diffusers
from ddpm.io.export import export_pipeline, make_model_card

pytestmark = pytest.mark.usefixtures("one_thread")

# The quick start's own architecture (1 channel, 16 px) besides the tiny 3-channel one.
CONFIGS = {"tiny": TINY, "quickstart": json.loads((CONFIG_DIR / "quickstart-digits-16.json").read_text())}


@pytest.fixture(scope="module")
def unets():
    """name -> (diffusers UNet2DModel, our UNet with the same weights)."""
    out = {}
    for name, config in CONFIGS.items():
        torch.manual_seed(0)
        reference = diffusers.UNet2DModel(**config).eval()
        ours = UNet(unet_config_from_diffusers(dict(reference.config))).eval()
        ours.load_state_dict(reference.state_dict())
        out[name] = reference, ours
    return out


class _DiffusersModel(torch.nn.Module):
    """diffusers' UNet behind our calling convention: the comparison is then about the sampler alone (the
    deterministic solver on a random network amplifies the 1e-6 differences between two UNet implementations)."""

    def __init__(self, unet):
        super().__init__()
        self.unet, self.config = unet, unet.config

    def forward(self, x, t):
        return self.unet(x, t).sample


def _export_config(**kwargs):
    """A DDPMScheduler config with every key explicit, as an export writes it. It matters: ``from_config`` keeps
    DPM-Solver's own default for a key left implicit (``DDPMScheduler().config`` would sample "linspace", not the
    "leading" it records)."""
    return diffusers.DDPMScheduler(**ScheduleConfig(**kwargs).to_dict()).config


def _pipeline_images(unet, config, steps, generator, **scheduler_kwargs):
    """DDPMPipeline with its scheduler swapped for DPM-Solver by ``from_config``, as the model card shows."""
    scheduler = diffusers.DPMSolverMultistepScheduler.from_config(config, **scheduler_kwargs)
    pipeline = diffusers.DDPMPipeline(unet=unet, scheduler=scheduler)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline(batch_size=2, generator=generator, num_inference_steps=steps, output_type="np").images


def _as_pipeline_output(images):
    return (images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [1, 10, 20, 50, 999])
def test_timesteps_equal_diffusers(spacing, steps):
    config = _export_config(timestep_spacing=spacing)
    reference = diffusers.DPMSolverMultistepScheduler.from_config(config)
    reference.set_timesteps(steps)
    assert dpm_solver_timesteps(ScheduleConfig(timestep_spacing=spacing), steps) == reference.timesteps.tolist()


@pytest.mark.parametrize("algorithm_type", ["dpmsolver++", "sde-dpmsolver++"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("steps", [10, 20, 50])
def test_sampler_reproduces_pipeline_with_dpm_solver(unets, algorithm_type, prediction_type, steps):
    reference, _ = unets["tiny"]
    config = _export_config(prediction_type=prediction_type)
    expected = _pipeline_images(
        reference, config, steps, torch.Generator().manual_seed(3), algorithm_type=algorithm_type
    )
    schedule = NoiseSchedule(schedule_config_from_diffusers(dict(config)))
    images = dpm_solver_sample(
        _DiffusersModel(reference),
        schedule,
        2,
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(3),
        algorithm_type=algorithm_type,
    )
    assert np.abs(_as_pipeline_output(images) - expected).max() <= 1e-4


@pytest.mark.parametrize("algorithm_type", ["dpmsolver++", "sde-dpmsolver++"])
@pytest.mark.parametrize("solver_order", [1, 3])
@pytest.mark.parametrize(
    "spacing, prediction_type, zero_snr",
    [("leading", "epsilon", False), ("linspace", "sample", False), ("trailing", "v_prediction", True)],
)
def test_orders_spacings_and_zero_snr_reproduce_diffusers(
    unets, algorithm_type, solver_order, spacing, prediction_type, zero_snr
):
    # 20 steps: third order runs in the middle and lower_order_final does not apply (>= 15 steps).
    reference, _ = unets["tiny"]
    config = _export_config(prediction_type=prediction_type, timestep_spacing=spacing, rescale_betas_zero_snr=zero_snr)
    kwargs = dict(algorithm_type=algorithm_type, solver_order=solver_order)
    expected = _pipeline_images(reference, config, 20, torch.Generator().manual_seed(5), **kwargs)
    schedule = NoiseSchedule(schedule_config_from_diffusers(dict(config)))
    generator = torch.Generator().manual_seed(5)
    images = dpm_solver_sample(
        _DiffusersModel(reference), schedule, 2, num_inference_steps=20, generator=generator, **kwargs
    )
    assert np.abs(_as_pipeline_output(images) - expected).max() <= 1e-4


@pytest.mark.parametrize("algorithm_type", ["dpmsolver++", "sde-dpmsolver++"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_exported_quickstart_model_samples_alike_in_diffusers(unets, tmp_path, algorithm_type, prediction_type):
    # Our UNet and sampler against an export loaded by DDPMPipeline.from_pretrained, scheduler swapped.
    _, ours = unets["quickstart"]
    schedule_config = ScheduleConfig(prediction_type=prediction_type)
    folder = export_pipeline(ours.config, schedule_config, ours.state_dict(), tmp_path / "export")
    pipeline = diffusers.DDPMPipeline.from_pretrained(folder, low_cpu_mem_usage=False)
    expected = _pipeline_images(
        pipeline.unet, pipeline.scheduler.config, 20, torch.Generator().manual_seed(1), algorithm_type=algorithm_type
    )
    images = dpm_solver_sample(
        ours,
        NoiseSchedule(schedule_config),
        2,
        num_inference_steps=20,
        generator=torch.Generator().manual_seed(1),
        algorithm_type=algorithm_type,
    )
    assert np.abs(_as_pipeline_output(images) - expected).max() <= 1e-4


def test_model_card_shows_the_scheduler_swap():
    card = make_model_card(UNetConfig.from_dict(TINY), ScheduleConfig(), name="m")
    assert "DPMSolverMultistepScheduler.from_config(" in card
    assert 'pipeline.scheduler.config, algorithm_type="sde-dpmsolver++"' in card


def test_generator_list_draws_image_by_image(unets):
    # One generator per image, as diffusers' pipelines take them: an image does not depend on its batch.
    reference, ours = unets["tiny"]
    config = _export_config()
    schedule = NoiseSchedule(schedule_config_from_diffusers(dict(config)))
    kwargs = dict(num_inference_steps=10, algorithm_type="sde-dpmsolver++")
    expected = _pipeline_images(reference, config, 10, image_generators(0, [0, 1]), algorithm_type="sde-dpmsolver++")
    pair = dpm_solver_sample(_DiffusersModel(reference), schedule, 2, generator=image_generators(0, [0, 1]), **kwargs)
    assert np.abs(_as_pipeline_output(pair) - expected).max() <= 1e-4
    alone = dpm_solver_sample(ours, schedule, 1, generator=image_generators(0, [1]), **kwargs)
    both = dpm_solver_sample(ours, schedule, 2, generator=image_generators(0, [0, 1]), **kwargs)
    # Only the network's float rounding for another batch size differs (its outputs here reach ~10).
    torch.testing.assert_close(both[1:], alone, atol=1e-4, rtol=1e-4)


def test_dispatch_by_name_and_defaults(unets):
    _, ours = unets["tiny"]
    schedule = NoiseSchedule()
    assert [default_inference_steps(s, schedule.config) for s in SAMPLERS] == [1000, 50, 20, 20]
    by_name = sample(ours, schedule, 1, sampler="dpmsolver++", generator=torch.Generator().manual_seed(0))
    direct = dpm_solver_sample(ours, schedule, 1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(by_name, direct)
    assert sampler_timesteps("dpmsolver++", schedule.config, 20) == dpm_solver_timesteps(schedule.config, 20)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(algorithm_type="dpmsolver"), "algorithm_type"),
        (dict(solver_order=4), "solver_order"),
        (dict(num_inference_steps=0), "num_inference_steps"),
        (dict(num_inference_steps=1000), "num_inference_steps"),  # leading: 1000 // 1001 = 0, every timestep 0
    ],
)
def test_bad_arguments_are_refused(unets, kwargs, match):
    _, ours = unets["tiny"]
    with pytest.raises(ValueError, match=match):
        dpm_solver_sample(ours, NoiseSchedule(), 1, **kwargs)


def test_eta_and_unknown_sampler_are_refused(unets):
    _, ours = unets["tiny"]
    with pytest.raises(ValueError, match="eta"):
        sample(ours, NoiseSchedule(), 1, sampler="sde-dpmsolver++", eta=0.5)
    with pytest.raises(ValueError, match="sampler"):
        sample(ours, NoiseSchedule(), 1, sampler="unipc")
