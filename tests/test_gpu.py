"""CUDA only (``-m gpu``; skipped elsewhere, run by scripts/gpu_check.py): the training step and the sampling loop
never wait for the GPU. ``torch.cuda.set_sync_debug_mode("error")`` turns any host synchronisation into an error."""

import pytest
import torch
from helpers import load_script

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture
def no_host_sync():
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    yield
    torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("precision", ["no", "fp16", "bf16"])
def test_optimizer_steps_make_no_host_sync(tmp_path, make_train_args, precision):
    from ddpm.runtime.distributed import init_distributed
    from ddpm.training.setup import build_run
    from ddpm.training.state import TrainState
    from ddpm.training.step import optimizer_step

    args = [*make_train_args(tmp_path / "run"), "--device", "cuda", "--mixed_precision", precision, "--use_ema"]
    args += ["--dataloader_num_workers", "2", "--max_train_steps", "8", "--gradient_accumulation_steps", "2"]
    args += ["--train_batch_size", "2"]
    config = load_script("train").parse_args(args)
    run, _ = build_run(config, init_distributed("cuda", 60))
    state = TrainState.start(run.device)
    run.sampler.set_epoch(0, 0, epochs=2)
    batches = iter(run.loader)
    for step in range(2):  # warm-up: cuDNN autotuning, the fused optimizer's first step, the allocator
        state.advance(optimizer_step(run, batches, step), run.global_batch)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(2, 6):
            state.advance(optimizer_step(run, batches, step), run.global_batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert state.global_step == 6 and torch.isfinite(state.skipped_steps.float())


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_the_sampling_loop_makes_no_host_sync(no_host_sync, sampler):
    from conftest import TINY_UNET

    from ddpm.diffusion.schedule import NoiseSchedule, ScheduleConfig
    from ddpm.evaluation.generate import sample_images
    from ddpm.models.unet import UNet, UNetConfig

    torch.cuda.set_sync_debug_mode("default")  # building the model copies its weights: allowed
    model = UNet(UNetConfig.from_dict(TINY_UNET)).cuda().eval()
    schedule = NoiseSchedule(ScheduleConfig(num_train_timesteps=50))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    with torch.no_grad():
        images = sample_images(model, schedule, range(4), seed=0, sampler=sampler, generator_device="cuda")
    assert images.shape == (4, 3, 8, 8)
