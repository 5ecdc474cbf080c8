"""The DDPM forward process: beta schedules, noising, training targets and the training loss.

The arrays are computed exactly as diffusers' ``DDPMScheduler`` computes them (float32 ``torch.linspace`` ...), so a
model trained here and sampled there (or the reverse) sees the same numbers. Nothing here knows about the network:
:meth:`NoiseSchedule.training_loss` takes any ``model(x_t, t)`` callable.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "laplace")  # every one DDPMScheduler takes
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
VARIANCE_TYPES = ("fixed_small", "fixed_large")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


@dataclass
class ScheduleConfig:
    """The noise schedule and sampler settings; field names and defaults are ``DDPMScheduler``'s config keys."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    prediction_type: str = "epsilon"
    variance_type: str = "fixed_small"
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    timestep_spacing: str = "leading"
    steps_offset: int = 0
    rescale_betas_zero_snr: bool = False

    def __post_init__(self) -> None:
        def bad(key: str, why: str) -> ValueError:
            return ValueError(f"ScheduleConfig.{key}={getattr(self, key)!r}: {why}")

        if not isinstance(self.num_train_timesteps, int) or self.num_train_timesteps < 2:
            raise bad("num_train_timesteps", "must be an integer >= 2")
        if not 0 < self.beta_start <= self.beta_end < 1:
            raise bad("beta_end", f"need 0 < beta_start ({self.beta_start}) <= beta_end < 1")
        for key, allowed in (
            ("beta_schedule", BETA_SCHEDULES),
            ("prediction_type", PREDICTION_TYPES),
            ("variance_type", VARIANCE_TYPES),
            ("timestep_spacing", TIMESTEP_SPACINGS),
        ):
            if getattr(self, key) not in allowed:
                raise bad(key, f"supported: {list(allowed)}")
        if self.clip_sample_range <= 0:
            raise bad("clip_sample_range", "must be positive")
        if self.steps_offset < 0:
            raise bad("steps_offset", "must be >= 0")

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> ScheduleConfig:
        """Build from :meth:`to_dict`'s form; a key that is not a field is refused by name.

        A diffusers ``scheduler_config.json`` is read by ``ddpm.io.diffusers_format.schedule_config_from_diffusers``.
        """
        names = {f.name for f in fields(cls)}
        for key, value in config.items():
            if key not in names:
                raise ValueError(f"unknown scheduler config key {key!r} (value {value!r})")
        return cls(**config)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def make_betas(config: ScheduleConfig) -> torch.Tensor:
    """The float32 beta array of ``DDPMScheduler`` for this config."""
    n = config.num_train_timesteps
    if config.beta_schedule == "linear":
        betas = torch.linspace(config.beta_start, config.beta_end, n, dtype=torch.float32)
    elif config.beta_schedule == "scaled_linear":
        betas = torch.linspace(config.beta_start**0.5, config.beta_end**0.5, n, dtype=torch.float32) ** 2
    elif config.beta_schedule == "sigmoid":  # GeoDiff's
        betas = torch.sigmoid(torch.linspace(-6, 6, n)) * (config.beta_end - config.beta_start) + config.beta_start
    else:  # squaredcos_cap_v2 (improved DDPM's cosine) or laplace: from alpha_bar in float64, cast like diffusers
        alpha_bar = _cosine_alpha_bar if config.beta_schedule == "squaredcos_cap_v2" else _laplace_alpha_bar
        betas = torch.tensor(
            [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)], dtype=torch.float32
        )
    if config.rescale_betas_zero_snr:
        betas = _rescale_zero_terminal_snr(betas)
    return betas


def _cosine_alpha_bar(t: float) -> float:
    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2


def _laplace_alpha_bar(t: float) -> float:
    """sqrt(SNR / (1 + SNR)) with log SNR(t) a Laplace quantile (diffusers' ``alpha_transform_type="laplace"``)."""
    log_snr = -0.5 * math.copysign(1, 0.5 - t) * math.log(1 - 2 * math.fabs(0.5 - t) + 1e-6)
    snr = math.exp(log_snr)
    return math.sqrt(snr / (1 + snr))


def _rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Shift and scale sqrt(alpha_bar) so the last step is pure noise (Lin et al. 2023, Algorithm 1)."""
    sqrt_ab = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))
    ab = sqrt_ab**2
    alphas = torch.cat([ab[0:1], ab[1:] / ab[:-1]])
    return 1 - alphas


def _gather(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """values[t] shaped [B, 1, 1, 1] on ``like``'s device and dtype, for broadcasting over images."""
    out = values.to(like.device)[t.to(like.device)].to(like.dtype)
    return out.reshape(-1, *([1] * (like.ndim - 1)))


class NoiseSchedule:
    """Precomputed ``betas``, ``alphas`` and ``alphas_cumprod`` (float32, CPU) and the maths built on them."""

    def __init__(self, config: ScheduleConfig | None = None):
        self.config = config or ScheduleConfig()
        self.betas = make_betas(self.config)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)

    @property
    def num_train_timesteps(self) -> int:
        return self.config.num_train_timesteps

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise (abar cast to x0's dtype, as diffusers does)."""
        ab = _gather(self.alphas_cumprod, t, x0)
        return ab.sqrt() * x0 + (1 - ab).sqrt() * noise

    def velocity(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The v-prediction target sqrt(abar_t) noise - sqrt(1 - abar_t) x0."""
        ab = _gather(self.alphas_cumprod, t, x0)
        return ab.sqrt() * noise - (1 - ab).sqrt() * x0

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio abar_t / (1 - abar_t) at integer timesteps ``t`` (float32, t's device)."""
        ab = self.alphas_cumprod.to(t.device)[t]
        return ab / (1 - ab)

    def sample_timesteps(
        self, batch_size: int, device: torch.device | str | None = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Uniform integer timesteps in [0, T), as train_unconditional draws them."""
        return torch.randint(0, self.num_train_timesteps, (batch_size,), device=device, generator=generator)

    def training_loss(
        self,
        model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        x0: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor,
        snr_gamma: float | None = None,
    ) -> torch.Tensor:
        """Mean training loss of ``model`` on clean images ``x0`` at timesteps ``t`` with the given noise.

        ``epsilon``: MSE to the noise; ``sample``: MSE to x0 weighted by SNR(t), as train_unconditional does;
        ``v_prediction``: MSE to the velocity. The loss is computed in float32 whatever the autocast dtype.
        ``snr_gamma``: per-image min-SNR-gamma weights instead (:meth:`min_snr_weights`).
        """
        x_t = self.add_noise(x0, noise, t)
        prediction = model(x_t, t).float()
        kind = self.config.prediction_type
        if snr_gamma is not None:
            target = {"epsilon": noise.float(), "sample": x0.float()}.get(kind)
            if target is None:
                target = self.velocity(x0.float(), noise.float(), t)
            per_image = F.mse_loss(prediction, target, reduction="none").mean(dim=list(range(1, prediction.ndim)))
            return (per_image * self.min_snr_weights(t, snr_gamma)).mean()
        if kind == "epsilon":
            return F.mse_loss(prediction, noise.float())
        if kind == "v_prediction":
            return F.mse_loss(prediction, self.velocity(x0.float(), noise.float(), t))
        weights = self.snr(t).reshape(-1, 1, 1, 1)
        return (weights * F.mse_loss(prediction, x0.float(), reduction="none")).mean()

    def min_snr_weights(self, t: torch.Tensor, gamma: float) -> torch.Tensor:
        """Min-SNR-gamma loss weights (Hang et al. 2023) at timesteps ``t``, as diffusers' training scripts compute
        them: ``min(SNR, gamma)``, divided by SNR for epsilon and by SNR + 1 for v-prediction targets.

        Where SNR is 0 (the last step of a zero-terminal-SNR schedule) the epsilon weight is its limit 1, not the
        scripts' 0 / 0 = NaN.
        """
        ab = self.alphas_cumprod.to(t.device)[t]
        snr = (ab**0.5 / (1.0 - ab) ** 0.5) ** 2  # diffusers.training_utils.compute_snr's arithmetic
        weights = torch.minimum(snr, torch.full_like(snr, gamma))
        kind = self.config.prediction_type
        if kind == "epsilon":
            return torch.where(snr == 0, torch.ones_like(snr), weights / snr)
        if kind == "v_prediction":
            return weights / (snr + 1)
        return weights


def offset_noise(noise: torch.Tensor, strength: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """``noise`` plus ``strength`` times one normal draw per image and channel (offset noise, Guttenberg 2023), as
    diffusers' training scripts add it: the model learns to change an image's mean brightness."""
    b, c = noise.shape[:2]
    return noise + strength * torch.randn((b, c, 1, 1), device=noise.device, dtype=noise.dtype, generator=generator)
