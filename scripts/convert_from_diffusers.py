"""Import a diffusers DDPM model (local folder or Hub id) into a clean pipeline folder this project trains from.

    python scripts/convert_from_diffusers.py --model google/ddpm-cifar10-32 --output_dir ddpm-cifar10-32
    python scripts/convert_from_diffusers.py --model path/to/train_unconditional-output --output_dir imported

Accepts a DDPMPipeline folder, a bare UNet2DModel folder or a Hub id; safetensors (sharded too) or legacy ``.bin``;
old attention names and old configs (see ``ddpm.io.pretrained``). Writes the canonical layout (every config key
explicit, fp32 safetensors, current tensor names) that ``train.py --pretrained_model_name_or_path`` and
``sample.py --model`` accept, as does ``DDPMPipeline.from_pretrained``. Nothing is written if the input is refused.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ddpm.io.export import export_pipeline, make_model_card
from ddpm.io.hub import is_hub_id
from ddpm.io.pretrained import load_model
from ddpm.runtime.cli import ScriptParser, user_errors


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ScriptParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a diffusers folder or a Hub id (owner/name)")
    parser.add_argument("--output_dir", required=True, help="where to write the imported pipeline")
    parser.add_argument("--cache_dir", default=None, help="Hugging Face cache folder for Hub downloads")
    parser.add_argument("--no_ema", action="store_true", help="for sources holding both: the live weights")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with user_errors("convert_from_diffusers.py"):
        unet_config, schedule_config, state_dict = load_model(args.model, not args.no_ema, args.cache_dir)
        card = make_model_card(
            unet_config,
            schedule_config,
            name=Path(args.output_dir).resolve().name,
            num_parameters=sum(t.numel() for t in state_dict.values()),
            base_model=args.model if is_hub_id(args.model) else None,
            training_info={"Imported from": args.model},
        )
        out = export_pipeline(unet_config, schedule_config, state_dict, args.output_dir, model_card=card)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
