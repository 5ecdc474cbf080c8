"""Push an exported pipeline folder to the Hugging Face Hub.

    python scripts/push_to_hub.py --folder runs/cifar --repo_id me/ddpm-cifar [--private] [--commit_message MSG]

Only the pipeline files are uploaded (model_index.json, unet/, scheduler/, README.md, samples.png), never
checkpoints or logs, and the repo's pipeline files that the folder does not have are deleted (an older float32
weights file after an fp16 export, a samples.png of older weights), unless ``--allow_patterns`` says otherwise:
then those files are uploaded and nothing is deleted. The token comes from ``--hub_token``, ``HF_TOKEN``
or the cached ``hf auth login``, and is never printed.
"""

from __future__ import annotations

import argparse
import logging

from ddpm.io.hub import HubError, push_folder
from ddpm.runtime.cli import ScriptParser, user_errors


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ScriptParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", required=True, help="a folder holding an exported pipeline (e.g. a run folder)")
    parser.add_argument("--repo_id", "--hub_model_id", dest="repo_id", required=True, help="owner/name on the Hub")
    parser.add_argument("--hub_token", "--token", dest="token", default=None, help="default: HF_TOKEN, cached login")
    parser.add_argument("--private", "--hub_private_repo", dest="private", action="store_true", help="private repo")
    parser.add_argument("--commit_message", default="Upload DDPM pipeline")
    parser.add_argument(
        "--allow_patterns",
        nargs="+",
        default=None,
        help="upload these patterns instead of the pipeline files (and delete nothing on the Hub)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with user_errors("push_to_hub.py", HubError, OSError):
        push_folder(
            args.folder,
            args.repo_id,
            token=args.token,
            private=args.private,
            commit_message=args.commit_message,
            allow_patterns=args.allow_patterns,
        )


if __name__ == "__main__":
    main()
