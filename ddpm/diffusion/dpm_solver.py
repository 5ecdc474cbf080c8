"""DPM-Solver++ (Lu et al. 2022): multistep, deterministic or stochastic, diffusers-exact.

:func:`dpm_solver_sample` computes what diffusers' ``DDPMPipeline`` computes with its scheduler swapped for
``DPMSolverMultistepScheduler.from_config(<the pipeline's DDPMScheduler config>, algorithm_type=...)``: the schedule's
own keys (betas, prediction type, ``timestep_spacing``, ``steps_offset``, zero terminal SNR) carry over, every other
setting is that scheduler's default (``solver_type="midpoint"``, ``lower_order_final=True``,
``final_sigmas_type="zero"``, no thresholding). DPM-Solver never clips its x0 predictions, whatever ``clip_sample``
says. The random numbers are drawn in diffusers' order: the initial noise, then (``sde-dpmsolver++``) one ``randn``
per step, the last one included; a list of generators draws image by image as in :mod:`.samplers`.
"""

from __future__ import annotations

import numpy as np
import torch

from .samplers import Generators, _image_shape, _initial_noise, _model_device_dtype, check_first_timestep
from .schedule import NoiseSchedule, ScheduleConfig

ALGORITHM_TYPES = ("dpmsolver++", "sde-dpmsolver++")
SOLVER_ORDERS = (1, 2, 3)
# diffusers' lower_order_final: below this many steps the last two steps use order <= 2 (the last is first order
# anyway, final_sigmas_type="zero").
_LOWER_ORDER_FINAL_BELOW = 15


def dpm_solver_timesteps(config: ScheduleConfig, num_inference_steps: int) -> list[int]:
    """The descending timesteps ``DPMSolverMultistepScheduler.set_timesteps`` visits for this config.

    Not :func:`~.samplers.inference_timesteps`: its "leading" and "linspace" grids divide the range into
    ``num_inference_steps + 1`` parts (and drop the last), so they differ from ``DDPMScheduler``'s.
    """
    t_max = config.num_train_timesteps
    n = num_inference_steps
    if not 1 <= n <= t_max:
        raise ValueError(f"num_inference_steps={n} must be in [1, num_train_timesteps={t_max}]")
    if config.timestep_spacing == "linspace":
        steps = np.linspace(0, t_max - 1, n + 1).round()[::-1][:-1]
    elif config.timestep_spacing == "leading":
        steps = (np.arange(0, n + 1) * (t_max // (n + 1))).round()[::-1][:-1] + config.steps_offset
    else:  # trailing
        steps = np.arange(t_max, 0, -t_max / n).round() - 1
    check_first_timestep(int(steps[0]), config, n)
    out = [int(t) for t in steps.astype(np.int64)]
    if len(set(out)) != len(out):
        raise ValueError(
            f"num_inference_steps={n} is too many for {config.timestep_spacing!r} spacing over {t_max} timesteps "
            "(timesteps repeat)"
        )
    return out


def _alphas_sigmas(schedule: NoiseSchedule, steps: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """alpha_t and sigma_t (float32) at ``steps`` and, last, at the final sigma 0, computed as diffusers does."""
    alphas_cumprod = schedule.alphas_cumprod.clone()
    if schedule.config.rescale_betas_zero_snr:
        alphas_cumprod[-1] = 2**-24  # diffusers: close to 0 without being 0, so the first sigma is finite
    sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
    sigmas = torch.cat([sigmas[steps], torch.zeros(1)])
    alpha = 1 / ((sigmas**2 + 1) ** 0.5)
    return alpha, sigmas * alpha


def _orders(num_steps: int, solver_order: int) -> list[int]:
    """The order of each step: warm-up from first order, and lower orders at the end as diffusers' defaults do."""
    orders = [min(solver_order, i + 1) for i in range(num_steps)]
    orders[-1] = 1
    if num_steps >= 2 and num_steps < _LOWER_ORDER_FINAL_BELOW:
        orders[-2] = min(orders[-2], 2)
    return orders


@torch.no_grad()
def dpm_solver_sample(
    model: torch.nn.Module,
    schedule: NoiseSchedule,
    batch_size: int,
    *,
    num_inference_steps: int = 20,
    generator: Generators = None,
    algorithm_type: str = "dpmsolver++",
    solver_order: int = 2,
) -> torch.Tensor:
    """DPM-Solver++ sampling (``"sde-dpmsolver++"``: its stochastic form); returns images in [-1, 1] (not clamped).

    Timesteps follow ``schedule.config.timestep_spacing`` (:func:`dpm_solver_timesteps`); ``solver_order`` 1 is
    DDIM-like, 2 diffusers' default, 3 for the deterministic form with many steps.
    """
    if algorithm_type not in ALGORITHM_TYPES:
        raise ValueError(f"algorithm_type={algorithm_type!r}: choose one of {list(ALGORITHM_TYPES)}")
    if solver_order not in SOLVER_ORDERS:
        raise ValueError(f"solver_order={solver_order!r}: choose one of {list(SOLVER_ORDERS)}")
    device, dtype = _model_device_dtype(model)
    steps = dpm_solver_timesteps(schedule.config, num_inference_steps)
    # Everything the loop indexes is on the device once: no host-to-device copy per step.
    timesteps = torch.tensor(steps, device=device)
    alpha, sigma = (v.to(device) for v in _alphas_sigmas(schedule, steps))
    lam = torch.log(alpha) - torch.log(sigma)  # +inf at the final sigma 0: only the first-order step goes there
    stochastic = algorithm_type == "sde-dpmsolver++"
    kind = schedule.config.prediction_type

    x = _initial_noise(_image_shape(model, batch_size), generator, device, dtype)
    x0_preds: list[torch.Tensor] = []  # the data predictions of the previous steps, newest last
    for i, order in enumerate(_orders(len(steps), solver_order)):
        out = model(x, timesteps[i])
        if kind == "epsilon":
            x0 = (x - sigma[i] * out) / alpha[i]
        elif kind == "v_prediction":
            x0 = alpha[i] * x - sigma[i] * out
        else:
            x0 = out
        x0_preds = [*x0_preds[-(solver_order - 1) :], x0] if solver_order > 1 else [x0]
        sample = x.float()
        noise = _initial_noise(tuple(out.shape), generator, out.device, torch.float32) if stochastic else None
        x = _update(x0_preds, order, sample, noise, alpha[i + 1], sigma[i + 1], sigma[i], lam, i).to(out.dtype)
    return x


def _update(
    x0_preds: list[torch.Tensor],
    order: int,
    sample: torch.Tensor,
    noise: torch.Tensor | None,
    alpha_t: torch.Tensor,
    sigma_t: torch.Tensor,
    sigma_s0: torch.Tensor,
    lam: torch.Tensor,
    i: int,
) -> torch.Tensor:
    """One multistep update of order 1, 2 (midpoint) or 3 from step ``i`` to ``i + 1``, in diffusers' arithmetic."""
    h = lam[i + 1] - lam[i]
    m0 = x0_preds[-1]
    if order == 1:
        d1 = d2 = None
    elif order == 2:
        r0 = (lam[i] - lam[i - 1]) / h
        d1, d2 = (1.0 / r0) * (m0 - x0_preds[-2]), None
    else:
        m1, m2 = x0_preds[-2], x0_preds[-3]
        r0, r1 = (lam[i] - lam[i - 1]) / h, (lam[i - 1] - lam[i - 2]) / h
        d1_0, d1_1 = (1.0 / r0) * (m0 - m1), (1.0 / r1) * (m1 - m2)
        d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
        d2 = (1.0 / (r0 + r1)) * (d1_0 - d1_1)
    if noise is None:  # dpmsolver++
        x = (sigma_t / sigma_s0) * sample - (alpha_t * (torch.exp(-h) - 1.0)) * m0
        if order == 2:
            x = x - 0.5 * (alpha_t * (torch.exp(-h) - 1.0)) * d1
        elif order == 3:
            x = x + (alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0)) * d1
            x = x - (alpha_t * ((torch.exp(-h) - 1.0 + h) / h**2 - 0.5)) * d2
        return x
    # sde-dpmsolver++
    x = (sigma_t / sigma_s0 * torch.exp(-h)) * sample + (alpha_t * (1 - torch.exp(-2.0 * h))) * m0
    if order == 2:
        x = x + 0.5 * (alpha_t * (1 - torch.exp(-2.0 * h))) * d1
    elif order == 3:
        x = x + (alpha_t * ((1.0 - torch.exp(-2.0 * h)) / (-2.0 * h) + 1.0)) * d1
        x = x + (alpha_t * ((1.0 - torch.exp(-2.0 * h) - 2.0 * h) / (2.0 * h) ** 2 - 0.5)) * d2
    return x + sigma_t * torch.sqrt(1.0 - torch.exp(-2 * h)) * noise
