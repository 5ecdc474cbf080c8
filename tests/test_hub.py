"""Pushing to the Hub, with the network replaced at the ``huggingface_hub.HfApi`` boundary."""

import hashlib
import logging
from pathlib import Path

import huggingface_hub
import pytest
import torch
from helpers import load_script
from huggingface_hub.utils import filter_repo_objects
from unet_configs import TINY

from ddpm import ScheduleConfig, UNet, UNetConfig
from ddpm.io.export import export_pipeline
from ddpm.io.hub import HubError, files_to_upload, push_folder, resolve_token
from ddpm.io.pretrained import load_model

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "hf_TestTokenThatMustNeverLeak123"
PIPELINE = {
    "model_index.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "scheduler/scheduler_config.json",
    "README.md",
    "samples.png",
}


class FakeApi:
    """Records what would be sent; ``upload_folder`` resolves the patterns exactly as huggingface_hub does."""

    instances: list["FakeApi"] = []
    fail_with: Exception | None = None

    def __init__(self, token=None, **kwargs):
        self.token, self.calls = token, []
        FakeApi.instances.append(self)

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, *, repo_id, folder_path, allow_patterns=None, ignore_patterns=None, **kwargs):
        if FakeApi.fail_with is not None:
            raise FakeApi.fail_with
        every_file = [p.relative_to(folder_path).as_posix() for p in Path(folder_path).rglob("*") if p.is_file()]
        uploaded = set(filter_repo_objects(every_file, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns))
        self.calls.append(("upload_folder", repo_id, {"files": uploaded, **kwargs}))
        return "commit-info"


@pytest.fixture
def api(monkeypatch):
    FakeApi.instances, FakeApi.fail_with = [], None
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    return FakeApi


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
def test_push_uploads_exactly_the_pipeline(api, run, private, caplog):
    with caplog.at_level(logging.DEBUG):
        result = push_folder(run, "me/ddpm-tiny", token=TOKEN, private=private, commit_message="Step 500")
    assert result == "commit-info"
    calls = [call for instance in api.instances for call in instance.calls]
    assert all(instance.token == TOKEN for instance in api.instances)
    create = [c for c in calls if c[0] == "create_repo"]
    upload = [c for c in calls if c[0] == "upload_folder"]
    assert create == [("create_repo", "me/ddpm-tiny", {"private": private, "exist_ok": True})]
    assert len(upload) == 1 and upload[0][1] == "me/ddpm-tiny"
    assert upload[0][2]["files"] == PIPELINE == set(files_to_upload(run))
    assert upload[0][2]["commit_message"] == "Step 500"
    assert TOKEN not in caplog.text


def test_asking_for_more_uploads_more(api, run):
    push_folder(run, "me/ddpm-tiny", token=TOKEN, allow_patterns=["*"])
    uploaded = api.instances[-1].calls[-1][2]["files"]
    assert PIPELINE < uploaded and "checkpoint-10/training_state.pt" in uploaded
    assert not any(name.startswith(".tmp-") for name in uploaded)


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


def test_token_from_env_is_used_and_never_written(api, run, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    push_folder(run, "me/ddpm-tiny")
    assert api.instances[-1].token == TOKEN
    assert not any(TOKEN.encode() in path.read_bytes() for path in run.rglob("*") if path.is_file())


def test_missing_token_fails_clearly_and_leaves_the_export_intact(api, run):
    before = _digest(run)
    with pytest.raises(HubError, match="no Hugging Face token.*HF_TOKEN"):
        push_folder(run, "me/ddpm-tiny")
    assert api.instances == []  # nothing was attempted
    assert _digest(run) == before
    load_model(run)  # still a complete, loadable pipeline


@pytest.mark.parametrize(
    "error",
    [ConnectionError("Connection refused"), PermissionError(f"403 Forbidden: token {TOKEN} cannot write")],
)
def test_network_failure_fails_clearly_and_leaves_the_export_intact(api, run, error):
    before = _digest(run)
    api.fail_with = error
    with pytest.raises(HubError, match="could not push.*local export is complete") as raised:
        push_folder(run, "me/ddpm-tiny", token=TOKEN)
    assert TOKEN not in str(raised.value)
    assert _digest(run) == before
    load_model(run)


def test_offline_mode_fails_clearly(api, run, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubError, match="HF_HUB_OFFLINE"):
        push_folder(run, "me/ddpm-tiny", token=TOKEN)
    assert api.instances == []


def test_refuses_folder_without_export_and_bad_repo_id(api, run, tmp_path):
    with pytest.raises(HubError, match="no exported pipeline"):
        push_folder(tmp_path / "empty", "me/ddpm-tiny", token=TOKEN)
    with pytest.raises(HubError, match="invalid Hub repo id"):
        push_folder(run, "not/a/repo", token=TOKEN)
    assert api.instances == []


def test_push_to_hub_script(api, run, capsys):
    main = load_script("push_to_hub").main
    main(["--folder", str(run), "--hub_model_id", "me/ddpm-tiny", "--hub_token", TOKEN, "--hub_private_repo"])
    calls = api.instances[-1].calls
    assert calls[-1][2]["files"] == PIPELINE
    assert [c for i in api.instances for c in i.calls if c[0] == "create_repo"][0][2]["private"] is True
    with pytest.raises(SystemExit, match="no Hugging Face token"):
        main(["--folder", str(run), "--repo_id", "me/ddpm-tiny"])
    assert TOKEN not in capsys.readouterr().out
