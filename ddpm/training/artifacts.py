"""What a run leaves at the end of an epoch: a sample grid, the exported diffusers pipeline with its model card, and
its upload to the Hub.

Rank 0 makes them while the other ranks wait (an error is raised on every rank). Both use the EMA weights when there
are some; the grid's noise is the same every time, so successive grids show the training's progress.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from pathlib import Path

import torch

from ..diffusion.sampling import sample
from ..io.export import export_pipeline, make_model_card
from ..io.hub import HubError, ensure_repo, hub_id_or_none, push_folder
from ..io.images import save_grid
from ..runtime.distributed import run_on_main
from .config import TrainConfig
from .output_dir import SAMPLES_DIR
from .run import Run
from .state import TrainState

logger = logging.getLogger(__name__)


def end_of_epoch(run: Run, state: TrainState, epoch: int, last: bool) -> None:
    """Every --save_images_epochs a sample grid, every --save_model_epochs an export (both after the last epoch)."""
    if epoch % run.config.save_images_epochs == 0 or last:
        run_on_main(run.ctx, sample_grid, run, state, epoch)
    if epoch % run.config.save_model_epochs == 0 or last:
        run_on_main(run.ctx, export, run, state, epoch)


def sample_grid(run: Run, state: TrainState, epoch: int) -> None:
    """Rank 0: sample --eval_batch_size images into ``samples/step_NNNNNN.png`` and the tracker."""
    config = run.config
    generator = torch.Generator(device=run.device).manual_seed(0)  # the same images' noise every time
    run.unet.eval()
    with run.ema.applied_to(run.unet) if run.ema is not None else nullcontext():
        images = sample(
            run.unet,
            run.sample_schedule,
            config.eval_batch_size,
            sampler=config.sampler,
            num_inference_steps=config.ddpm_num_inference_steps,
            generator=generator,
        )
    run.unet.train()
    state.last_grid = save_grid(images, run.output_dir / SAMPLES_DIR / f"step_{state.global_step:06d}.png")
    run.log.images(images, epoch, state.global_step)
    run.log.write(f"Saved samples {state.last_grid}")


def export(run: Run, state: TrainState, epoch: int) -> None:
    """Rank 0: the diffusers pipeline and its model card into --output_dir, then (--push_to_hub) to the Hub."""
    config = run.config
    weights = run.ema.shadow if run.ema is not None else run.unet.state_dict()
    name = repo_id(config)
    card = make_model_card(
        run.unet_config,
        run.schedule_config,
        name=name,
        num_parameters=run.unet.num_parameters(),
        training_info={
            "command": run.command,
            "Optimizer steps": state.global_step,
            "Epochs": epoch + 1,
            "Images seen": state.samples_seen,
            "Global batch size": run.global_batch,
            "Weights": "EMA" if run.ema is not None else "live (no EMA)",
        },
        sample_grid="samples.png" if state.last_grid is not None else None,
        repo_id=name if config.push_to_hub else None,
        # Hub metadata: only Hub ids, not local paths or built-in datasets
        base_model=hub_id_or_none(config.pretrained_model_name_or_path),
        dataset=hub_id_or_none(config.dataset_name),
    )
    export_pipeline(
        run.unet_config, run.schedule_config, weights, run.output_dir, model_card=card, sample_grid=state.last_grid
    )
    run.log.write(f"Exported the pipeline to {run.output_dir}")
    if config.push_to_hub:
        try:
            private, message = config.hub_private_repo, f"Step {state.global_step} (epoch {epoch})"
            push_folder(run.output_dir, name, token=config.hub_token, private=private, commit_message=message)
        except HubError as e:  # a network hiccup must not end the run: the next export pushes again
            logger.warning("push to the Hub failed (training goes on): %s", e)


def repo_id(config: TrainConfig) -> str:
    """The Hub repo of --push_to_hub: --hub_model_id, else the name of --output_dir."""
    return config.hub_model_id or Path(config.output_dir).resolve().name


def create_repo(config: TrainConfig) -> None:
    """Rank 0, before training: a missing token or a wrong repo id fails now, not after hours of training."""
    url = ensure_repo(repo_id(config), token=config.hub_token, private=config.hub_private_repo)
    logger.info("pushing exports to %s", url)
