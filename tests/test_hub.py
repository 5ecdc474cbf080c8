"""Pushing to the Hub, with the network replaced at the ``huggingface_hub.HfApi`` boundary (conftest's
``fake_hub``: what would be uploaded is decided by huggingface_hub's own pattern filter, not by our code)."""

import hashlib
import logging
import os
import shutil
from pathlib import Path

import huggingface_hub
import pytest
import torch
from helpers import PUSHED_FILES, load_script
from unet_configs import TINY

from ddpm import ScheduleConfig, UNet, UNetConfig
from ddpm.io.export import export_pipeline
from ddpm.io.hub import HubError, files_to_upload, push_folder, resolve_token
from ddpm.io.pretrained import load_model

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "hf_TestTokenThatMustNeverLeak123"


@pytest.fixture
def run(tmp_path):
    """A run folder: exported pipeline with a grid, checkpoints, logs and an interrupted export's leftovers."""
    folder = tmp_path / "run"
    (folder / "checkpoint-10").mkdir(parents=True)
    (folder / "checkpoint-10" / "training_state.pt").write_bytes(b"optimizer")
    (folder / "checkpoint-10" / "model.safetensors").write_bytes(b"weights")
    (folder / "logs").mkdir()
    (folder / "logs" / "events.out.tfevents").write_bytes(b"events")
    (folder / ".tmp-export-abc" / "unet").mkdir(parents=True)
    (folder / ".tmp-export-abc" / "unet" / "config.json").write_text("{}")
    grid = tmp_path / "grid.png"
    grid.write_bytes(b"png")
    unet_config = UNetConfig.from_dict(TINY)
    torch.manual_seed(0)
    export_pipeline(unet_config, ScheduleConfig(), UNet(unet_config).state_dict(), folder, sample_grid=grid)
    return folder


def _digest(folder):
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("private", [False, True])
def test_push_uploads_exactly_the_pipeline(fake_hub, run, private, caplog):
    with caplog.at_level(logging.DEBUG):
        result = push_folder(run, "me/ddpm-tiny", token=TOKEN, private=private, commit_message="Step 500")
    assert result == "commit-info"
    assert fake_hub.tokens and all(token == TOKEN for token in fake_hub.tokens)
    create, upload = fake_hub.calls_to("create_repo"), fake_hub.calls_to("upload_folder")
    assert [(c["repo_id"], c["private"], c["exist_ok"]) for c in create] == [("me/ddpm-tiny", private, True)]
    assert len(upload) == 1 and upload[0]["repo_id"] == "me/ddpm-tiny"
    assert fake_hub.uploads == [PUSHED_FILES]
    assert set(files_to_upload(run)) == PUSHED_FILES  # what the push logs as its file count
    assert upload[0]["commit_message"] == "Step 500"
    assert TOKEN not in caplog.text


def test_asking_for_more_uploads_more(fake_hub, run):
    push_folder(run, "me/ddpm-tiny", token=TOKEN, allow_patterns=["*"])
    (uploaded,) = fake_hub.uploads
    assert PUSHED_FILES < uploaded and "checkpoint-10/training_state.pt" in uploaded
    assert not any(name.startswith(".tmp-") for name in uploaded)


def test_a_push_leaves_on_the_hub_the_pipeline_of_the_export_and_nothing_older(fake_hub, run):
    """The run folder is pushed (float32 weights, a grid), then exported again in fp16 without a grid and pushed: the
    repo holds this export's pipeline only, not the float32 file from_pretrained would load first nor the old grid;
    a push of other files (allow patterns given) deletes nothing."""
    push_folder(run, "me/ddpm-tiny", token=TOKEN)
    assert fake_hub.repos["me/ddpm-tiny"] == PUSHED_FILES | {".gitattributes"}
    unet_config = UNetConfig.from_dict(TINY)
    export_pipeline(unet_config, ScheduleConfig(), UNet(unet_config).state_dict(), run, dtype=torch.float16)
    push_folder(run, "me/ddpm-tiny", token=TOKEN)
    repo = fake_hub.repos["me/ddpm-tiny"]
    assert repo == set(files_to_upload(run)) | {".gitattributes"}
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in repo
    assert "unet/diffusion_pytorch_model.safetensors" not in repo and "samples.png" not in repo
    push_folder(run, "me/ddpm-tiny", token=TOKEN, allow_patterns=["logs/*"])
    assert fake_hub.repos["me/ddpm-tiny"] == repo | {"logs/events.out.tfevents"}


def test_listing_passes_over_a_folder_deleted_while_it_is_listed(run, monkeypatch):
    """During a run the export lists the run folder for its upload on one thread while a checkpoint rotation deletes
    old checkpoints on another: a folder gone between being listed and being entered is passed over, not an error
    that fails the export."""
    real_scandir = os.scandir

    class Listing:  # os.scandir's iterator, its entries read at once
        def __init__(self, path):
            with real_scandir(path) as entries:
                self.entries = iter(list(entries))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def __iter__(self):
            return self

        def __next__(self):
            return next(self.entries)

        def close(self):
            pass

    rotations = []

    def listing_then_rotation(path="."):  # each listing of the run folder sees a checkpoint that is then deleted
        rotated = not isinstance(path, int) and Path(path) == run
        if rotated:
            (run / "checkpoint-20").mkdir()
            (run / "checkpoint-20" / "model.safetensors").write_bytes(b"weights")
        listing = Listing(path)
        if rotated:
            shutil.rmtree(run / "checkpoint-20")  # listed, not yet entered
            rotations.append(path)
        return listing

    monkeypatch.setattr(os, "scandir", listing_then_rotation)
    assert set(files_to_upload(run)) == PUSHED_FILES
    assert rotations  # the listing did meet the deleted folder


def test_token_resolution_order(monkeypatch):
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "cached")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    assert resolve_token(None) == "cached"
    monkeypatch.setenv("HF_TOKEN", "from-env")
    assert resolve_token(None) == "from-env"
    assert resolve_token("from-flag") == "from-flag"
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    assert resolve_token(None) is None


def test_token_from_env_is_used_and_never_written(fake_hub, run, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    push_folder(run, "me/ddpm-tiny")
    assert fake_hub.tokens and all(token == TOKEN for token in fake_hub.tokens)
    assert not any(TOKEN.encode() in path.read_bytes() for path in run.rglob("*") if path.is_file())


def test_missing_token_fails_clearly_and_leaves_the_export_intact(fake_hub, run):
    before = _digest(run)
    with pytest.raises(HubError, match="no Hugging Face token.*HF_TOKEN"):
        push_folder(run, "me/ddpm-tiny")
    assert fake_hub.clients == []  # nothing was attempted
    assert _digest(run) == before
    load_model(run)  # still a complete, loadable pipeline


@pytest.mark.parametrize(
    "error",
    [ConnectionError("Connection refused"), PermissionError(f"403 Forbidden: token {TOKEN} cannot write")],
)
def test_network_failure_fails_clearly_and_leaves_the_export_intact(fake_hub, run, error):
    before = _digest(run)
    fake_hub.fail_with = error
    with pytest.raises(HubError, match="could not push.*local export is complete") as raised:
        push_folder(run, "me/ddpm-tiny", token=TOKEN)
    assert TOKEN not in str(raised.value)
    assert _digest(run) == before
    load_model(run)


def test_offline_mode_fails_clearly(fake_hub, run, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubError, match="HF_HUB_OFFLINE"):
        push_folder(run, "me/ddpm-tiny", token=TOKEN)
    assert fake_hub.clients == []


def test_refuses_folder_without_export_and_bad_repo_id(fake_hub, run, tmp_path):
    with pytest.raises(HubError, match="no exported pipeline"):
        push_folder(tmp_path / "empty", "me/ddpm-tiny", token=TOKEN)
    with pytest.raises(HubError, match="invalid Hub repo id"):
        push_folder(run, "not/a/repo", token=TOKEN)
    assert fake_hub.clients == []


def test_push_to_hub_script(fake_hub, run, capsys):
    main = load_script("push_to_hub").main
    main(["--folder", str(run), "--hub_model_id", "me/ddpm-tiny", "--hub_token", TOKEN, "--hub_private_repo"])
    assert fake_hub.uploads == [PUSHED_FILES]
    assert [c["private"] for c in fake_hub.calls_to("create_repo")] == [True]
    with pytest.raises(SystemExit, match="no Hugging Face token"):
        main(["--folder", str(run), "--repo_id", "me/ddpm-tiny"])
    assert TOKEN not in capsys.readouterr().out
