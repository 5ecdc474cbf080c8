"""The training loop against its raw step, alternated in one process: how much of the model's speed a run keeps.

    python scripts/benchmark_loop.py --config configs/quickstart.toml --output_dir /tmp/loop --json loop.json

Each round times the raw optimizer step of the config's model, batch and memory format (scripts/benchmark.py's
ours+fused row: forward, float32 MSE, backward, clipping, fused AdamW, on fixed inputs; no data, no EMA, no logging),
then trains the config for --steps steps in OUTPUT_DIR/round-N-PRECISION with everything a run does
(ddpm.training.train), then times the raw step again. The round's ratio is the run's median logged img/s (the first
interval, the warm-up, left out) over the mean of the two raw figures. Alternating in one process keeps the machine's
drift out of the comparison: on a shared CPU the same step's speed moves by up to 25% within minutes, more than the
few percent a training loop's overhead is worth, so two commands run minutes apart cannot resolve it (see the README,
"Performance"). With several precisions (``--mixed_precision no bf16``) each round does the above for each in turn,
and the loop's speed-up of each over the first is the median of the per-round ratios of their logged img/s.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from pathlib import Path
from typing import Any

from ddpm.evaluation.benchmark import Runner, Variant, initial_weights, make_inputs
from ddpm.evaluation.benchmark.timing import timed
from ddpm.runtime.cli import ScriptParser, user_errors
from ddpm.runtime.distributed import resolve_device
from ddpm.runtime.precision import MIXED_PRECISION_CHOICES, resolve_mixed_precision
from ddpm.training.config import TrainConfig, load_config_file
from ddpm.training.loop import train
from ddpm.training.model_config import model_description
from ddpm.training.setup import check_config, use_channels_last

PROG = "benchmark_loop.py"
DTYPES = {"no": "fp32", "fp16": "fp16", "bf16": "bf16"}  # --mixed_precision -> the benchmark's --dtype


def raw_step(config: TrainConfig) -> Runner:
    """The step the run's UNet takes on fixed inputs, without the run around it."""
    device = resolve_device(config.device, config.local_rank)
    unet_config = model_description(config)[0]
    model = unet_config.to_dict()
    levers = {"fused"} | ({"channels_last"} if use_channels_last(config, unet_config, device) else set())
    runner = Runner(
        Variant("ours", frozenset(levers)),
        model,
        initial_weights(model),
        make_inputs(model, config.train_batch_size, device),
        device,
        DTYPES[resolve_mixed_precision(config.mixed_precision, device)],
        config.max_grad_norm,
    )
    runner.set_phase("train")
    timed(runner.train_step, 3, device)  # warm-up: the first steps allocate and pick kernels
    return runner


def loop_vs_step(config: TrainConfig, rounds: int, steps: int, raw_steps: int, precisions: list[str]) -> dict[str, Any]:
    """``rounds`` rounds, each of raw step / ``steps`` training steps / raw step per precision in ``precisions``
    (``--mixed_precision`` names); every figure, each precision's median ratio and the loop's speed-ups."""
    configs = {name: dataclasses.replace(config, mixed_precision=name) for name in precisions}
    raws = {name: raw_step(c) for name, c in configs.items()}

    def raw_img_s(raw: Runner) -> float:
        return config.train_batch_size / timed(raw.train_step, raw_steps, raw.device)

    results: dict[str, list[dict[str, float]]] = {name: [] for name in precisions}
    for index in range(rounds):
        for name, precision_config in configs.items():
            before = raw_img_s(raws[name])
            run = dataclasses.replace(
                precision_config,
                output_dir=str(Path(config.output_dir) / f"round-{index}-{name}"),
                max_train_steps=steps,
            )
            train(run)
            metrics = (Path(run.output_dir) / run.logging_dir / "metrics.jsonl").read_text().splitlines()
            ticks = [record["img_s"] for record in map(json.loads, metrics) if "img_s" in record][1:]
            if not ticks:
                raise ValueError(
                    f"--steps {steps}: fewer than two log ticks; raise it or lower the config's logging_steps"
                )
            after = raw_img_s(raws[name])
            loop = statistics.median(ticks)
            raw = (before + after) / 2
            ratio = loop / raw
            results[name].append({"raw_before": before, "loop": loop, "raw_after": after, "raw": raw, "ratio": ratio})
            print(f"round {index} {name}: raw {before:.1f}, loop {loop:.1f}, raw {after:.1f} img/s: {ratio:.1%}")
    first = precisions[0]
    return {
        "device": str(raws[first].device),
        "batch_size": config.train_batch_size,
        "steps": steps,
        "raw_steps": raw_steps,
        "precisions": {
            name: {
                "resolved": raws[name].precision.name,  # the precision the raw step ran in
                "rounds": results[name],
                "median_ratio": statistics.median(r["ratio"] for r in results[name]),
            }
            for name in precisions
        },
        # each precision's img/s over the first's, round by round (the same minutes of the machine): the loop's
        # and the raw step's (the mean of its two figures): whether the loop keeps the raw step's gain
        "loop_speedup": {name: _median_speedup(results[name], results[first], "loop") for name in precisions[1:]},
        "raw_speedup": {name: _median_speedup(results[name], results[first], "raw") for name in precisions[1:]},
    }


def _median_speedup(rounds: list[dict[str, float]], baseline: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] / b[key] for r, b in zip(rounds, baseline, strict=True))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = ScriptParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="a train.py TOML or JSON config (its settings are the run's)")
    parser.add_argument("--output_dir", type=Path, required=True, help="the rounds' training runs go here")
    parser.add_argument("--rounds", type=int, default=4, help="raw / loop / raw rounds")
    parser.add_argument("--steps", type=int, default=160, help="optimizer steps of each round's run")
    parser.add_argument("--raw_steps", type=int, default=30, help="timed raw steps before and after each run")
    parser.add_argument(
        "--mixed_precision",
        nargs="+",
        choices=MIXED_PRECISION_CHOICES,
        help="the precisions to alternate (default: the config's); the first is the speed-ups' baseline",
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    for flag in ("rounds", "steps", "raw_steps"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    try:
        config = dataclasses.replace(TrainConfig(**load_config_file(args.config)), output_dir=str(args.output_dir))
        precisions = list(dict.fromkeys(args.mixed_precision or [config.mixed_precision]))
        for name in precisions:
            check_config(dataclasses.replace(config, mixed_precision=name))
    except ValueError as e:
        parser.error(str(e))
    with user_errors(PROG):  # a run that cannot start: an output folder in use, a missing dataset
        result = loop_vs_step(config, args.rounds, args.steps, args.raw_steps, precisions)
    for name, figures in result["precisions"].items():
        print(f"{name}: the loop at {figures['median_ratio']:.1%} of the raw step (median over {args.rounds} rounds)")
    for name, speedup in result["loop_speedup"].items():
        print(
            f"{name}: the loop at {speedup:.2f}x {precisions[0]}'s img/s, the raw step at "
            f"{result['raw_speedup'][name]:.2f}x (medians over {args.rounds} rounds)"
        )
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
