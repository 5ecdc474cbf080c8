"""Train an unconditional image diffusion model (DDPM), on one process or on every GPU of a torchrun launch.

Every flag of diffusers' examples/unconditional_image_generation/train_unconditional.py is accepted with the same
name, default and meaning, so a command of the diffusers guide runs unchanged after replacing
`accelerate launch train_unconditional.py` with `torchrun --nproc_per_node=N scripts/train.py`:

    python scripts/train.py --config configs/quickstart.toml        # built-in digits, minutes on a laptop CPU
    torchrun --nproc_per_node=8 scripts/train.py --dataset_name huggan/flowers-102-categories --resolution 64 \\
        --center_crop --random_flip --output_dir ddpm-ema-flowers-64 --train_batch_size 16 --num_epochs 100 \\
        --use_ema --learning_rate 1e-4 --lr_warmup_steps 500 --mixed_precision bf16

--config FILE reads a TOML or JSON file whose keys are flag names; flags given on the command line win over it.
Boolean flags also have a --no-<flag> form, to switch off what a config file switched on.
"""

from __future__ import annotations

import argparse
import logging
import sys
import typing
from dataclasses import fields

from ddpm.io.hub import HubError
from ddpm.runtime.cli import ScriptParser, process_rank, user_errors
from ddpm.training.config import TrainConfig, load_config_file
from ddpm.training.errors import TrainingError
from ddpm.training.loop import command_line, train
from ddpm.training.setup import check_config

PROG = "train.py"


def build_parser() -> argparse.ArgumentParser:
    """One flag per :class:`ddpm.training.config.TrainConfig` field (help and defaults from it), plus ``--config``."""
    parser = ScriptParser(
        prog=PROG,
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=lambda prog: _Formatter(prog, max_help_position=40),
        allow_abbrev=False,  # a misspelt flag is an error, never silently another flag
    )
    parser.add_argument("--config", metavar="FILE", help="TOML or JSON file of flag values (command line wins)")
    hints = typing.get_type_hints(TrainConfig)
    for f in fields(TrainConfig):
        names = [f"--{f.name}"] + (["--local-rank"] if f.name == "local_rank" else [])  # torch.distributed.launch
        kind = [t for t in (typing.get_args(hints[f.name]) or (hints[f.name],)) if t is not type(None)][0]
        kwargs: dict[str, typing.Any] = {"default": f.default, "help": f.metadata["help"], "dest": f.name}
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = kind
            if "choices" in f.metadata:
                kwargs["choices"] = f.metadata["choices"]
        parser.add_argument(*names, **kwargs)
    return parser


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the examples' line breaks and shows every default."""


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """The run configuration of a command line (exits with a usage error on bad flags or values)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    pre = ScriptParser(prog=PROG, add_help=False, allow_abbrev=False)  # its usage errors are train.py's one line
    pre.add_argument("--config", metavar="FILE")
    config_file = pre.parse_known_args(argv)[0].config
    if config_file is not None:
        try:
            parser.set_defaults(**load_config_file(config_file))
        except ValueError as e:
            parser.error(str(e))
    values = vars(parser.parse_args(argv))
    values.pop("config")
    try:
        config = TrainConfig(**values)
        check_config(config)  # what the flags name (a model config file, the precision on a CPU): usage errors too
    except ValueError as e:
        parser.error(str(e))
    return config


def main(argv: list[str] | None = None) -> int:
    """Parse, train, return the exit status 0, also when stopped by SIGTERM/SIGINT after saving a checkpoint.

    Bad input (a flag, a missing folder or token, an output folder in use or holding another run) and a run that
    must stop (diverged, a checkpoint could not be written, an unreadable image) exit through ``SystemExit`` with a
    one-line ``train.py: error: ...`` (status 1; 2 for a bad flag), printed once under torchrun."""
    argv = sys.argv[1:] if argv is None else list(argv)
    config = parse_args(argv)
    rank = process_rank()
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # diverged, disk full, unreadable image (a ValueError), no Hub token: the message says it all
    with user_errors(PROG, ValueError, OSError, TrainingError, HubError):
        train(config, command=command_line(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
