"""Checkpoints written in the background (ddpm.io.background): a snapshot the training cannot change, one write in
flight at a time, failures raised where the training can stop, the run ending only once the last one is on disk."""

import errno
import os
import threading
import time

import pytest
import torch
from helpers import load_script

from ddpm.io.background import BackgroundWriter, host_copy
from ddpm.training.errors import ExportError


def test_host_copy_is_a_snapshot():
    weights = {"w": torch.ones(3), "nested": [torch.zeros(2), (torch.arange(2), 5)], "name": "x"}
    snapshot = host_copy(weights)
    weights["w"].add_(1)
    weights["nested"][0].add_(1)
    weights["nested"][1][0].add_(1)
    assert torch.equal(snapshot["w"], torch.ones(3)) and torch.equal(snapshot["nested"][0], torch.zeros(2))
    assert torch.equal(snapshot["nested"][1][0], torch.arange(2)) and snapshot["nested"][1][1] == 5
    assert snapshot["name"] == "x"


def test_one_write_in_flight_and_errors_surface_at_the_next_wait():
    writer, events, release = BackgroundWriter(), [], threading.Event()

    def slow(name):
        def write():
            events.append(f"start {name}")
            release.wait(5)
            events.append(f"end {name}")

        return write

    writer.submit(slow("a"))
    assert writer.busy
    threading.Timer(0.2, release.set).start()
    writer.submit(slow("b"))  # waits for "a" first
    writer.wait()
    assert events == ["start a", "end a", "start b", "end b"]

    def broken():
        raise OSError("disk full")

    writer.submit(broken)
    with pytest.raises(OSError, match="disk full"):
        writer.submit(slow("c"))  # the failure of the previous write, before anything else is written
    writer.wait()  # raised once only
    assert "start c" not in events


def test_training_continues_while_a_checkpoint_is_written(tmp_path, tiny_train_args, monkeypatch):
    """The write of checkpoint-4 lasts until step 5 has begun (up to 30 s: a training that waited for it would then
    take step 5 after it), the last one 1 s: the steps after a save run while it is written, and the run returns
    only after the last checkpoint is complete."""
    import ddpm.training.loop as loop_module
    import ddpm.training.state as state_module

    real_save, real_step, events = state_module.save_training_checkpoint, loop_module.optimizer_step, []
    step_5_began = threading.Event()

    def slow_save(path, **kwargs):
        events.append(f"write {path.name}")
        if path.name == "checkpoint-4":
            step_5_began.wait(timeout=30)  # not a fixed time: the epoch-end grid may take long on a busy machine
        else:
            time.sleep(1.0)
        real_save(path, **kwargs)
        events.append(f"wrote {path.name}")

    def step(run, batches, index):
        events.append(f"step {index + 1}")
        if index + 1 == 5:
            step_5_began.set()
        return real_step(run, batches, index)

    monkeypatch.setattr(state_module, "save_training_checkpoint", slow_save)
    monkeypatch.setattr(loop_module, "optimizer_step", step)
    args = [*tiny_train_args, "--max_train_steps", "8", "--checkpointing_steps", "4"]
    result = loop_module.train(load_script("train").parse_args(args + ["--save_model_epochs", "100"]))
    written = events.index("wrote checkpoint-4")
    assert events.index("write checkpoint-4") < events.index("step 5") < written  # trained during the write
    assert events[-2:] == ["write checkpoint-8", "wrote checkpoint-8"]  # the end waited for the last write
    assert result.last_checkpoint.name == "checkpoint-8"
    assert (tmp_path / "run" / "checkpoint-8" / "model.safetensors").is_file()


def test_training_continues_while_the_pipeline_is_exported(tmp_path, tiny_train_args, monkeypatch):
    """The epoch-end export is written from a snapshot of the weights while the next steps run: what it writes is
    the weights of the epoch's end (equal to that step's checkpoint), and the run returns after the last export."""
    import ddpm.training.artifacts as artifacts_module
    import ddpm.training.loop as loop_module
    from ddpm.io.files import read_safetensors

    real_export, real_step, events, exported = artifacts_module.export_pipeline, loop_module.optimizer_step, [], []
    step_5_began = threading.Event()

    def slow_export(unet_config, schedule_config, weights, output_dir, **kwargs):
        events.append("export")
        if not exported:  # the first lasts until step 5 has begun (up to 30 s), the last one 1 s
            step_5_began.wait(timeout=30)
        else:
            time.sleep(1.0)
        exported.append({name: tensor.clone() for name, tensor in weights.items()})
        folder = real_export(unet_config, schedule_config, weights, output_dir, **kwargs)
        events.append("exported")
        return folder

    def step(run, batches, index):
        events.append(f"step {index + 1}")
        if index + 1 == 5:
            step_5_began.set()
        return real_step(run, batches, index)

    monkeypatch.setattr(artifacts_module, "export_pipeline", slow_export)
    monkeypatch.setattr(loop_module, "optimizer_step", step)
    args = [*tiny_train_args, "--max_train_steps", "8", "--checkpointing_steps", "4", "--save_model_epochs", "1"]
    loop_module.train(load_script("train").parse_args(args))
    assert events.index("export") < events.index("step 5") < events.index("exported")  # trained during the write
    assert events[-2:] == ["export", "exported"]  # the end waited for the last export
    for written, checkpoint in zip(exported, ("checkpoint-4", "checkpoint-8"), strict=True):
        saved = read_safetensors(tmp_path / "run" / checkpoint / "model.safetensors")
        assert written.keys() == saved.keys() and all(torch.equal(written[k], saved[k]) for k in saved)
    assert (tmp_path / "run" / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def test_a_failed_export_stops_the_run_at_the_next_export_with_a_clear_error(tmp_path, tiny_train_args, monkeypatch):
    import ddpm.training.artifacts as artifacts_module
    import ddpm.training.loop as loop_module

    def broken_export(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "unet/diffusion_pytorch_model.safetensors")

    monkeypatch.setattr(artifacts_module, "export_pipeline", broken_export)
    args = [*tiny_train_args, "--max_train_steps", "12", "--save_model_epochs", "1"]
    steps = []
    real_step = loop_module.optimizer_step
    monkeypatch.setattr(loop_module, "optimizer_step", lambda run, b, i: steps.append(i) or real_step(run, b, i))
    with pytest.raises(ExportError) as failure:
        loop_module.train(load_script("train").parse_args(args))
    assert len(steps) == 8  # the first export failed in the background; the second one raised it, after epoch 1
    message = str(failure.value)  # what train.py prints as its one line: what failed, what is left, what to do
    assert message.startswith(f"could not save the pipeline to {tmp_path / 'run'} (the disk is full): [Errno 28]")
    assert "the previous export, if any, is intact; free some space" in message
