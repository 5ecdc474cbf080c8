"""The benchmark's outputs: a Markdown table per (config, dtype) and the JSON document."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ...io.files import atomic_write_file


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _percent(fraction: float | None) -> str:
    return _fmt(fraction and 100 * fraction, ".1f") + ("%" if fraction else "")


def _row_line(row: dict[str, Any]) -> str:
    speed = row["speedup_vs_diffusers"] or {}
    train, sample = row["train"], row["sample"]
    return (
        f"| {row['variant']} | {train['img_s']:.1f} | {_fmt(speed.get('train'), '.2f')} | "
        f"{sample['img_s']:.1f} | {_fmt(speed.get('sample'), '.2f')} | {_fmt(train['peak_mem_mb'], '.0f')} | "
        f"{_fmt(sample['peak_mem_mb'], '.0f')} | {_percent(train['mfu'])} | {_percent(sample['mfu'])} | "
        f"{row['max_abs_diff_vs_first_row']:.1e} |"
    )


def _extras_lines(result: dict[str, Any]) -> list[str]:
    """The --samplers and --e2e summaries, when they ran."""
    lines = []
    if result["samplers"] and "skipped" not in result["samplers"]:
        s = result["samplers"]
        lines.append(
            f"\nsamplers (batch {s['batch_size']}): DDIM 50 steps {s['ddim_50_s_per_image']:.3f} s/img, "
            f"DDPM 1000 steps {s['ddpm_1000_s_per_image']:.3f} s/img: DDIM {s['ddim_speedup']:.1f}x faster"
        )
    if result["e2e"]:
        e = result["e2e"]
        if "ratio" in e:
            lines.append(
                f"\ne2e: scripts/train.py {e['train_py_img_s']:.1f} img/s vs raw {e['raw_row']} "
                f"{e['raw_train_img_s']:.1f} img/s: {100 * e['ratio']:.0f}% in the median logging interval, "
                f"{100 * e['mean_ratio']:.0f}% over all of them ({e['flags']})"
            )
        else:
            lines.append(f"\ne2e: {e.get('skipped') or e.get('error')}")
    return lines


def format_table(result: dict[str, Any]) -> str:
    """A Markdown table of one (config, dtype) result."""
    lines = [
        f"{result['config']} ({result['parameters'] / 1e6:.1f}M params, "
        f"{result['gflop_per_image']['train']:.1f} GFLOP/img train, "
        f"{result['gflop_per_image']['sample']:.1f} GFLOP/img sample), {result['dtype']}, "
        f"batch {result['batch_size']}",
        "",
        "| variant | train img/s | x diffusers | sample img/s | x diffusers | train peak MiB | sample peak MiB "
        "| train MFU | sample MFU | max abs diff |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [_row_line(row) for row in result["rows"]]
    return "\n".join(lines + _extras_lines(result))


def write_json(document: dict[str, Any], path: Path) -> None:
    """Atomically: readers never see half a document."""
    with atomic_write_file(path) as tmp:
        tmp.write_text(json.dumps(document, indent=2) + "\n")
