"""Exponential moving average of model weights with diffusers' warm-up rule.

``decay(n) = min(max_decay, 1 - (1 + k / inv_gamma) ** -power)`` with ``k = n - update_after_step - 1``, floored at
``min_decay`` and zero while ``k <= 0``: the first update copies the weights, later ones average over a window that
grows with training (``EMAModel(use_ema_warmup=True)`` in diffusers).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


class EMA:
    """EMA of a model's floating-point parameters, kept in float32 on the model's device."""

    def __init__(
        self,
        model: nn.Module,
        *,
        inv_gamma: float = 1.0,
        power: float = 0.75,
        max_decay: float = 0.9999,
        min_decay: float = 0.0,
        update_after_step: int = 0,
    ):
        if inv_gamma <= 0:
            raise ValueError(f"EMA inv_gamma={inv_gamma} must be positive")
        if power <= 0:
            raise ValueError(f"EMA power={power} must be positive")
        if not 0.0 <= min_decay <= max_decay <= 1.0:
            raise ValueError(f"EMA needs 0 <= min_decay ({min_decay}) <= max_decay ({max_decay}) <= 1")
        if update_after_step < 0:
            raise ValueError(f"EMA update_after_step={update_after_step} must be >= 0")
        self.inv_gamma = inv_gamma
        self.power = power
        self.max_decay = max_decay
        self.min_decay = min_decay
        self.update_after_step = update_after_step
        self.optimization_step = 0
        self.cur_decay = 0.0
        self.shadow: dict[str, torch.Tensor] = {
            name: p.detach().float().clone() for name, p in model.named_parameters()
        }

    def decay(self, optimization_step: int) -> float:
        """The decay used by the ``optimization_step``-th call of :meth:`update` (1-based)."""
        step = max(0, optimization_step - self.update_after_step - 1)
        if step <= 0:
            return 0.0
        value = 1 - (1 + step / self.inv_gamma) ** -self.power
        return max(min(value, self.max_decay), self.min_decay)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average towards the model's current weights (call once per optimizer step)."""
        self.optimization_step += 1
        self.cur_decay = self.decay(self.optimization_step)
        params = dict(model.named_parameters())
        shadows = list(self.shadow.values())
        current = [params[name].detach().float() for name in self.shadow]
        # shadow <- shadow + (1 - decay) * (param - shadow), for every tensor in one fused call
        torch._foreach_lerp_(shadows, current, 1.0 - self.cur_decay)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite the model's parameters with the averaged weights."""
        params = dict(model.named_parameters())
        for name, value in self.shadow.items():
            params[name].copy_(value)

    @contextmanager
    def applied_to(self, model: nn.Module) -> Iterator[nn.Module]:
        """Swap the EMA weights into ``model`` for the block (sampling, saving), then restore the live weights."""
        backup = {name: p.detach().clone() for name, p in model.named_parameters()}
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for name, p in model.named_parameters():
                    p.copy_(backup[name])

    def state_dict(self) -> dict[str, Any]:
        """Counters and settings (tensors are kept apart, in :attr:`shadow`, to be saved as safetensors)."""
        return {
            "inv_gamma": self.inv_gamma,
            "power": self.power,
            "max_decay": self.max_decay,
            "min_decay": self.min_decay,
            "update_after_step": self.update_after_step,
            "optimization_step": self.optimization_step,
            "cur_decay": self.cur_decay,
        }

    def load_state_dict(self, state: dict[str, Any], shadow: dict[str, torch.Tensor]) -> None:
        """Restore counters from :meth:`state_dict` and the averaged weights from ``shadow``."""
        missing, unexpected = set(self.shadow) - set(shadow), set(shadow) - set(self.shadow)
        if missing or unexpected:
            raise ValueError(
                f"EMA weights do not match the model: missing {sorted(missing)[:5]}, "
                f"unexpected {sorted(unexpected)[:5]}"
            )
        for key in (
            "inv_gamma",
            "power",
            "max_decay",
            "min_decay",
            "update_after_step",
            "optimization_step",
            "cur_decay",
        ):
            setattr(self, key, state[key])
        with torch.no_grad():
            for name, value in shadow.items():
                if value.shape != self.shadow[name].shape:
                    raise ValueError(
                        f"EMA weight {name!r} has shape {tuple(value.shape)}, "
                        f"the model {tuple(self.shadow[name].shape)}"
                    )
                self.shadow[name].copy_(value)
