"""Push an exported pipeline to the Hugging Face Hub, and the token rules that go with it.

``create_repo(..., exist_ok=True)`` then ``upload_folder`` of the pipeline files only
(:data:`ddpm.io.diffusers_format.PIPELINE_PATTERNS`: never ``checkpoint-*``, logs or optimizer state unless other
patterns are asked for). All network calls go through ``huggingface_hub.HfApi``, looked up at call time so tests can
replace it.

The token comes from :func:`resolve_token`; it is handed to ``HfApi`` and nowhere else: never logged, never written
into a file, and scrubbed (:func:`scrub_tokens`) from error messages and model cards. Every failure (no token,
offline mode, network, permissions) raises :class:`HubError` with the reason, after which the local export is still
complete and can be pushed again later with ``scripts/push_to_hub.py``.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import huggingface_hub
from huggingface_hub.utils import filter_repo_objects, validate_repo_id

from .diffusers_format import MODEL_INDEX_NAME, PIPELINE_PATTERNS

logger = logging.getLogger(__name__)

# Leftovers of an interrupted export or checkpoint write; never uploaded, whatever the allow patterns.
IGNORE_PATTERNS = [".tmp-*", ".old-*", "*/.tmp-*", "*/.old-*"]
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# Hugging Face tokens and a --hub_token value in a command line, scrubbed from anything written or raised.
_TOKEN_PATTERNS = (re.compile(r"(--hub_token[= ]|--token[= ])\S+"), re.compile(r"\bhf_[A-Za-z0-9]{8,}"))


def is_hub_id(spec: str) -> bool:
    """True for ``owner/name`` that is not an existing path nor a JSON file name: the one rule for "this names a Hub
    repo" (models, datasets, model configs)."""
    return not Path(spec).exists() and not spec.endswith(".json") and _HUB_ID.fullmatch(spec) is not None


def hub_id_or_none(spec: str | None) -> str | None:
    """``spec`` when it names a Hub repo (for model-card metadata), else None (local paths, built-in data)."""
    return spec if spec is not None and is_hub_id(spec) else None


def scrub_tokens(text: str) -> str:
    """Replace anything that looks like a Hugging Face token (or follows --hub_token) with ``***``."""
    text = _TOKEN_PATTERNS[0].sub(r"\1***", text)
    return _TOKEN_PATTERNS[1].sub("***", text)


class HubError(RuntimeError):
    """A push to the Hub could not be done; the message says why and what to do."""


def resolve_token(token_flag: str | None) -> str | None:
    """The token to use: the ``--hub_token`` flag, else ``HF_TOKEN``, else the cached ``hf auth login`` (or None)."""
    if token_flag:
        return token_flag
    if os.environ.get("HF_TOKEN"):
        return os.environ["HF_TOKEN"]
    return huggingface_hub.get_token()


def files_to_upload(folder: str | Path, allow_patterns: Sequence[str] | None = None) -> list[str]:
    """The files (paths relative to ``folder``) a push uploads; ``allow_patterns`` None means the pipeline only."""
    folder = Path(folder)
    patterns = list(PIPELINE_PATTERNS if allow_patterns is None else allow_patterns)
    files = []
    # os.walk, not Path.rglob: during a run, checkpoint writes and rotations rename and delete folders here while an
    # export lists it, and a folder gone between being listed and being entered must be passed over, not an error
    for root, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith((".tmp-", ".old-"))]  # leftovers and writes in progress
        base = Path(root).relative_to(folder)
        files += [(base / name).as_posix() for name in names if (Path(root) / name).is_file()]
    return list(filter_repo_objects(sorted(files), allow_patterns=patterns, ignore_patterns=IGNORE_PATTERNS))


def _api(token: str | None) -> Any:
    if token is None:
        raise HubError(
            "no Hugging Face token: pass --hub_token, set HF_TOKEN or log in with `hf auth login` "
            "(a write token is needed to create and push to a repo)"
        )
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        raise HubError("HF_HUB_OFFLINE is set: the Hub cannot be reached; unset it to push")
    return huggingface_hub.HfApi(token=token)


def ensure_repo(repo_id: str, *, token: str | None = None, private: bool = False) -> str:
    """Create the model repo if it does not exist (an existing repo keeps its visibility); returns its URL."""
    try:
        validate_repo_id(repo_id)
    except ValueError as e:
        raise HubError(f"invalid Hub repo id {repo_id!r}: {e}") from e
    api = _api(resolve_token(token))
    try:
        return str(api.create_repo(repo_id, private=private, exist_ok=True))
    except Exception as e:  # any network / HTTP / permission failure of the Hub client
        raise HubError(f"could not create or access Hub repo {repo_id}: {scrub_tokens(str(e))}") from e


def push_folder(
    folder: str | Path,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = False,
    commit_message: str = "Upload DDPM pipeline",
    allow_patterns: Sequence[str] | None = None,
) -> Any:
    """Upload the exported pipeline in ``folder`` to ``repo_id`` (created if needed); returns the commit info.

    ``allow_patterns`` None uploads the pipeline files only (:func:`files_to_upload` lists them), and deletes the
    repo's pipeline files that the export no longer has (a float32 weights file after an fp16 export would otherwise
    be what ``from_pretrained`` loads; a grid of older weights would stay on the card); pass other patterns to
    upload more (e.g. ``["*"]`` for the whole folder, checkpoints included), deleting nothing.
    """
    folder = Path(folder)
    if not (folder / MODEL_INDEX_NAME).is_file():
        raise HubError(
            f"{folder} holds no exported pipeline ({MODEL_INDEX_NAME} missing); "
            "export one first (scripts/convert_to_diffusers.py)"
        )
    patterns = list(PIPELINE_PATTERNS if allow_patterns is None else allow_patterns)
    files = files_to_upload(folder, patterns)
    if not files:
        raise HubError(f"nothing in {folder} matches {patterns}")
    ensure_repo(repo_id, token=token, private=private)
    api = _api(resolve_token(token))
    logger.info("pushing %d files from %s to %s", len(files), folder, repo_id)
    try:
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            commit_message=commit_message,
            allow_patterns=patterns,
            ignore_patterns=IGNORE_PATTERNS,
            delete_patterns=PIPELINE_PATTERNS if allow_patterns is None else None,
        )
    except Exception as e:  # any network / HTTP / permission failure of the Hub client
        raise HubError(
            f"could not push {folder} to {repo_id}: {scrub_tokens(str(e))}. The local export is complete; "
            "push it later with scripts/push_to_hub.py"
        ) from e
    logger.info("pushed to https://huggingface.co/%s", repo_id)
    return info
