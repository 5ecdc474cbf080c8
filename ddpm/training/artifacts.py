"""What a run leaves at the end of an epoch: a sample grid, the exported diffusers pipeline with its model card, and
its upload to the Hub.

Every rank samples its share of the grid. Rank 0 copies the weights to export off the device and writes the export
in the background (:attr:`Run.exports`, one at a time, like the checkpoints), then starts its upload
(:mod:`ddpm.training.uploads`): the other ranks wait only for the copy, never on a collective while rank 0 writes or
uploads. A failed export is raised, on every rank, at the next export or at the end of the run. Both use the EMA
weights when there are some; the grid's noise is the same every time, so successive grids show the training's
progress.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..evaluation.generate import sample_images, share_sampling_weights
from ..io.background import host_copy
from ..io.export import export_pipeline, make_model_card
from ..io.hub import ensure_repo, hub_id_or_none
from ..io.images import save_grid
from ..runtime.distributed import gather_objects, run_on_main
from .config import TrainConfig
from .errors import ExportError, write_failure_message
from .output_dir import SAMPLES_DIR
from .run import Run
from .state import TrainState

logger = logging.getLogger(__name__)


def end_of_epoch(run: Run, state: TrainState, epoch: int, last: bool) -> None:
    """Every --save_images_epochs a sample grid, every --save_model_epochs an export (both after the last epoch)."""
    if epoch % run.config.save_images_epochs == 0 or last:
        sample_grid(run, state, epoch)
    if epoch % run.config.save_model_epochs == 0 or last:
        run_on_main(run.ctx, export, run, state, epoch)


def sample_grid(run: Run, state: TrainState, epoch: int) -> None:
    """Every rank: --eval_batch_size images of the EMA weights into ``samples/step_NNNNNN.png`` and the tracker.

    The ranks share the work: rank ``r`` samples images ``r, r + W, ...``, each with its own generator (seeded by
    its number, on the training device), so the grid is the same whatever the number of processes and every grid
    of a run starts from the same noise; rank 0 puts the images together.
    """
    config, ctx = run.config, run.ctx
    share_sampling_weights(ctx, run.unet, run.ema, run.sampling_unet)
    mine = list(range(ctx.rank, config.eval_batch_size, ctx.world_size))
    images = torch.zeros(0)
    if mine:  # more ranks than images: some have no share
        images = sample_images(
            run.sampling_unet,
            run.sample_schedule,
            mine,
            seed=0,
            sampler=config.sampler,
            num_inference_steps=config.ddpm_num_inference_steps,
            generator_device=run.device,
        ).cpu()
    shares = gather_objects(ctx, images)
    if not ctx.is_main:
        return
    order = sorted(range(config.eval_batch_size), key=lambda i: (i % ctx.world_size, i // ctx.world_size))
    images = torch.empty(config.eval_batch_size, *shares[0].shape[1:])
    images[order] = torch.cat([share for share in shares if len(share)])
    state.last_grid = save_grid(images, _grid_path(run, state.global_step))
    run.log.images(images, epoch, state.global_step)
    run.log.write(f"Saved samples {state.last_grid}")


def _grid_path(run: Run, step: int) -> Path:
    """Where the sample grid of optimizer step ``step`` is saved."""
    return run.output_dir / SAMPLES_DIR / f"step_{step:06d}.png"


def export(run: Run, state: TrainState, epoch: int) -> None:
    """Rank 0: the diffusers pipeline and its model card into --output_dir, then (--push_to_hub) to the Hub, from a
    snapshot of the weights, written in the background (the previous export's error is raised here).

    The export shows a sample grid only if one was sampled from these weights (at this step): a grid of an earlier
    epoch would pass for samples of the model it is published with."""
    config = run.config
    run.exports.wait()  # at most one export in flight
    weights = host_copy(run.ema.shadow if run.ema is not None else run.unet.state_dict())
    grid = state.last_grid if state.last_grid == _grid_path(run, state.global_step) else None
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
        sample_grid="samples.png" if grid is not None else None,
        repo_id=name if config.push_to_hub else None,
        # Hub metadata: only Hub ids, not local paths or built-in datasets
        base_model=hub_id_or_none(config.pretrained_model_name_or_path),
        dataset=hub_id_or_none(config.dataset_name),
    )
    message = f"Step {state.global_step} (epoch {epoch})"

    def write() -> None:  # on the export writer's thread
        try:
            folder = export_pipeline(
                run.unet_config, run.schedule_config, weights, run.output_dir, model_card=card, sample_grid=grid
            )
        except OSError as e:  # disk full, quota, I/O error: the export is staged, so the previous one is whole
            kept = "the previous export, if any, is intact"
            raise ExportError(write_failure_message(f"the pipeline to {run.output_dir}", e, kept)) from e
        run.log.write(f"Exported the pipeline to {folder}")
        if run.uploads is not None:
            run.uploads.push(
                folder, name, token=config.hub_token, private=config.hub_private_repo, commit_message=message
            )

    run.exports.submit(write)


def repo_id(config: TrainConfig) -> str:
    """The Hub repo of --push_to_hub: --hub_model_id, else the name of --output_dir."""
    return config.hub_model_id or Path(config.output_dir).resolve().name


def create_repo(config: TrainConfig) -> None:
    """Rank 0, before training: a missing token or a wrong repo id fails now, not after hours of training."""
    url = ensure_repo(repo_id(config), token=config.hub_token, private=config.hub_private_repo)
    logger.info("pushing exports to %s", url)
