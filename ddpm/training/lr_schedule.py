"""Learning-rate schedules of ``diffusers.optimization.get_scheduler``, counted in optimizer steps.

Each schedule is a multiplier ``f(step)`` of the base learning rate with a linear warm-up from 0 over
``warmup_steps``, then the named decay until ``total_steps``; the formulas are those of ``diffusers.optimization``
(themselves transformers'). Unlike train_unconditional, which multiplies the warm-up by the accumulation steps and
lets accelerate tick the scheduler once per process (diffusers issues #1957 and #3954), both lengths here are
optimizer steps, whatever the accumulation and the number of processes: the caller steps the scheduler once per
optimizer step.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch.optim.lr_scheduler import LambdaLR

LR_SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "piecewise_constant",
)
POLYNOMIAL_LR_END = 1e-7  # diffusers' default end learning rate of the polynomial decay


def lr_multiplier(
    name: str,
    warmup_steps: int,
    total_steps: int,
    *,
    num_cycles: float | None = None,
    power: float = 1.0,
    base_lr: float | None = None,
    step_rules: str | None = None,
) -> Callable[[int], float]:
    """The function ``step -> lr / base_lr`` of schedule ``name``.

    ``num_cycles``, as in diffusers: the number of cosine waves for ``cosine`` (default 0.5: one half-cosine down
    to 0) or the number of hard restarts for ``cosine_with_restarts`` (default 1). ``power``: exponent of the
    ``polynomial`` decay, which goes from ``base_lr`` (required for it) to 1e-7. ``step_rules``: the multipliers of
    ``piecewise_constant`` (required for it, no warm-up), see :func:`parse_step_rules`.
    """
    if name not in LR_SCHEDULERS:
        raise ValueError(f"unknown learning-rate schedule {name!r}; supported: {list(LR_SCHEDULERS)}")
    if warmup_steps < 0 or total_steps < 0:
        raise ValueError(f"warmup_steps={warmup_steps} and total_steps={total_steps} must be >= 0")

    def warmup(step: int) -> float:
        return step / max(1, warmup_steps)

    def progress(step: int) -> float:
        return (step - warmup_steps) / max(1, total_steps - warmup_steps)

    if name == "constant":
        return lambda step: 1.0
    if name == "piecewise_constant":
        rules, last = parse_step_rules(step_rules)
        return lambda step: next((value for end, value in rules if step < end), last)
    if name == "constant_with_warmup":
        return lambda step: warmup(step) if step < warmup_steps else 1.0
    if name == "linear":
        return lambda step: (
            warmup(step) if step < warmup_steps else max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
        )
    if name == "cosine":
        cycles = 0.5 if num_cycles is None else num_cycles
        return lambda step: (
            warmup(step)
            if step < warmup_steps
            else max(0.0, 0.5 * (1.0 + math.cos(math.pi * cycles * 2.0 * progress(step))))
        )
    if name == "cosine_with_restarts":
        cycles = 1 if num_cycles is None else num_cycles

        def restarts(step: int) -> float:
            if step < warmup_steps:
                return warmup(step)
            if progress(step) >= 1.0:
                return 0.0
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((cycles * progress(step)) % 1.0))))

        return restarts
    return _polynomial(warmup_steps, total_steps, power, base_lr)


def parse_step_rules(text: str | None) -> tuple[list[tuple[int, float]], float]:
    """diffusers' ``step_rules`` of ``piecewise_constant``: ``"1:10,0.1:20,0.01"`` is the multiplier 1 before step 10,
    0.1 before step 20, then 0.01. Returns the ``(end step, multiplier)`` pairs by step, and the last multiplier."""
    if not text:
        raise ValueError("--lr_scheduler piecewise_constant needs --lr_step_rules (e.g. '1:1000,0.1:2000,0.01')")
    *pairs, last = text.split(",")
    try:
        rules = sorted((int(steps), float(value)) for value, steps in (pair.split(":") for pair in pairs))
        return rules, float(last)
    except ValueError:
        raise ValueError(
            f"--lr_step_rules={text!r}: expected MULTIPLIER:STEP pairs then the last multiplier, e.g. "
            "'1:1000,0.1:2000,0.01'"
        ) from None


def _polynomial(warmup_steps: int, total_steps: int, power: float, base_lr: float | None) -> Callable[[int], float]:
    """diffusers' polynomial decay from ``base_lr`` to :data:`POLYNOMIAL_LR_END`, after the linear warm-up."""
    if base_lr is None or not base_lr > POLYNOMIAL_LR_END:
        raise ValueError(f"the polynomial schedule needs a learning rate above its end value {POLYNOMIAL_LR_END}")

    def polynomial(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        if step > total_steps:
            return POLYNOMIAL_LR_END / base_lr
        remaining = 1 - (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return ((base_lr - POLYNOMIAL_LR_END) * remaining**power + POLYNOMIAL_LR_END) / base_lr

    return polynomial


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer,
    name: str,
    warmup_steps: int,
    total_steps: int,
    *,
    num_cycles: float | None = None,
    power: float = 1.0,
    step_rules: str | None = None,
) -> LambdaLR:
    """A ``LambdaLR`` applying :func:`lr_multiplier`; step it once per optimizer step.

    Its ``state_dict`` holds only numbers (the multiplier is rebuilt from the arguments), so it loads with
    ``torch.load(weights_only=True)``; after ``load_state_dict`` the schedule continues with the current arguments
    (for example a longer run) from the saved step, on the saved base learning rate.
    """
    fn = lr_multiplier(
        name,
        warmup_steps,
        total_steps,
        num_cycles=num_cycles,
        power=power,
        base_lr=optimizer.defaults["lr"],
        step_rules=step_rules,
    )
    return LambdaLR(optimizer, fn)
