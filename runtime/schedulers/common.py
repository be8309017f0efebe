"""What every scheduler shares: the training noise schedule and the interface.

A scheduler is built for one generation: ``make(config, num_inference_steps)``
precomputes every table in numpy; the pipeline then calls, for
``i, t in enumerate(s.timesteps)``::

    x_in = s.scale_model_input(latents, i)
    eps_or_v = unet(x_in, t, ...)
    latents = s.step(eps_or_v, i, latents, rng)

``config`` is the checkpoint's ``scheduler_config.json`` (as diffusers wrote it);
each scheduler reads the keys it knows with its own defaults for missing ones,
which is what diffusers' ``XScheduler.from_config(config)`` does.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np


class NoiseSource(Protocol):
    """The pipeline's random stream (see ``edgediff.runtime.rng``)."""

    def randn(self, shape: tuple[int, ...]) -> np.ndarray: ...


def betas_for_alpha_bar(num_diffusion_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """The "squaredcos_cap_v2" schedule (Nichol & Dhariwal, improved DDPM)."""

    def alpha_bar(t: float) -> float:
        return float(np.cos((t + 0.008) / 1.008 * np.pi / 2) ** 2)

    betas = [
        min(1 - alpha_bar((i + 1) / num_diffusion_timesteps) / alpha_bar(i / num_diffusion_timesteps), max_beta)
        for i in range(num_diffusion_timesteps)
    ]
    return np.asarray(betas, dtype=np.float32)


def train_betas(config: dict[str, Any]) -> np.ndarray:
    """Betas of the training schedule, in float32 as diffusers computes them."""
    n = int(config.get("num_train_timesteps", 1000))
    trained = config.get("trained_betas")
    if trained is not None:
        return np.asarray(trained, dtype=np.float32)
    schedule = config.get("beta_schedule", "linear")
    start = float(config.get("beta_start", 0.0001))
    end = float(config.get("beta_end", 0.02))
    if schedule == "linear":
        return np.linspace(start, end, n, dtype=np.float32)
    if schedule == "scaled_linear":
        return (np.linspace(start**0.5, end**0.5, n, dtype=np.float32) ** 2).astype(np.float32)
    if schedule == "squaredcos_cap_v2":
        return betas_for_alpha_bar(n)
    raise ValueError(
        f"beta_schedule {schedule!r} is not supported; accepted: linear, scaled_linear, squaredcos_cap_v2"
    )


def alphas_cumprod(config: dict[str, Any]) -> np.ndarray:
    """Cumulative product of (1 - beta), float32 like diffusers' torch.cumprod on float32."""
    alphas = (1.0 - train_betas(config)).astype(np.float32)
    return np.cumprod(alphas, dtype=np.float32)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Lin et al. 2023, Algorithm 1: rescale betas to zero terminal SNR."""
    alphas_bar_sqrt = np.sqrt(np.cumprod(1.0 - betas))
    first, last = alphas_bar_sqrt[0].copy(), alphas_bar_sqrt[-1].copy()
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * first / (first - last)
    alphas_bar = alphas_bar_sqrt**2
    alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return (1 - alphas).astype(np.float32)


class Scheduler(Protocol):
    """Interface every scheduler satisfies (structural: no base class needed).

    Set by ``__init__(config, num_inference_steps)``:
      timesteps:        float array, one entry per UNet call, in call order
      init_noise_sigma: scale of the initial Gaussian latents
      order:            UNet calls per solver step (2 for Heun), for progress bars
    """

    timesteps: np.ndarray
    init_noise_sigma: float
    order: int

    def scale_model_input(self, sample: np.ndarray, i: int) -> np.ndarray:
        """Input scaling before the UNet call at index ``i``."""
        ...

    def step(self, model_output: np.ndarray, i: int, sample: np.ndarray, rng: NoiseSource) -> np.ndarray:
        """Advance ``sample`` past UNet call ``i`` given the (guided) model output."""
        ...
