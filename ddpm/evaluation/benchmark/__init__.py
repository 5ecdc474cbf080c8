"""Speed benchmark of this project's UNet against diffusers' UNet2DModel, same weights, same process (the measurements
are defined in ``scripts/benchmark.py --help``).

- ``options``: what a run measures (the command line's settings, resolved);
- ``rows``: a row, i.e. a UNet with speed levers, and the training and sampling steps it is timed on;
- ``timing``: clocks, device facts and peaks, model FLOPs;
- ``memory``: peak resident memory, measured in a subprocess per row on the CPU;
- ``run``: the interleaved timing of the rows of each (config, dtype), and the whole document;
- ``e2e``: scripts/train.py end to end against the raw step;
- ``report``: the Markdown table and the JSON file.

The package never imports diffusers: scripts/benchmark.py hands its UNet2DModel in (``BenchmarkOptions.reference``).
"""

from .options import ALL_CONFIGS, QUICK_CONFIG, BenchmarkOptions, resolve_options
from .report import format_table
from .rows import ReferenceUNet, Runner, Variant, initial_weights, make_inputs
from .run import run_benchmark
from .timing import CLOCKS, peak_tflops

__all__ = [
    "ALL_CONFIGS",
    "CLOCKS",
    "QUICK_CONFIG",
    "BenchmarkOptions",
    "ReferenceUNet",
    "Runner",
    "Variant",
    "format_table",
    "initial_weights",
    "make_inputs",
    "peak_tflops",
    "resolve_options",
    "run_benchmark",
]
