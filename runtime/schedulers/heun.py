"""Ported from diffusers ``schedulers/scheduling_heun_discrete.py`` (``HeunDiscreteScheduler``).

Heun's 2nd-order sampler of Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative
Models", Algorithm 1 (https://huggingface.co/papers/2206.00364). Each solver step takes two UNet calls, so
``timesteps`` holds 2N - 1 entries: t0, t1, t1, t2, t2, ... A call with no pending first-order half is the
Euler (1st-order) half from sigmas[i] to sigmas[i + 1]; the next call is the Heun correction of that step, and
the last call (to sigma = 0) stays first order. As in diffusers (its stored ``dt``), the state machine is keyed
on whether a first-order half is pending, not on the parity of ``i``, so a loop started at any index (img2img
starts at ``2 * t_start``) behaves like diffusers after ``set_begin_index``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .common import (
    NoiseSource,
    alphas_cumprod,
    config_choice,
    discrete_timesteps,
    karras_sigmas,
    sigma_add_noise,
    sigma_to_t,
)

_OFF = (False, None)


class Heun:
    order = 2

    def __init__(self, config: dict[str, Any], num_inference_steps: int):
        self.prediction_type = config_choice(
            config, "prediction_type", "epsilon", ("epsilon", "v_prediction", "sample")
        )
        use_karras_sigmas = bool(config_choice(config, "use_karras_sigmas", False, (False, True, None)))
        config_choice(config, "use_exponential_sigmas", False, _OFF)
        config_choice(config, "use_beta_sigmas", False, _OFF)
        self.clip_sample = bool(config.get("clip_sample", False))
        self.clip_sample_range = float(config.get("clip_sample_range", 1.0))

        # training schedule (HeunDiscreteScheduler.__init__; note its own beta defaults)
        acp = alphas_cumprod(
            {**config, "beta_start": config.get("beta_start", 0.00085), "beta_end": config.get("beta_end", 0.012)}
        )

        # set_timesteps
        timesteps = discrete_timesteps(config, num_inference_steps)
        sigmas = ((1 - acp) / acp) ** 0.5
        log_sigmas = np.log(sigmas)
        sigmas = np.interp(timesteps, np.arange(0, len(sigmas)), sigmas)
        if use_karras_sigmas:
            sigmas = karras_sigmas(sigmas, num_inference_steps, config)
            timesteps = np.array([sigma_to_t(sigma, log_sigmas) for sigma in sigmas])
        sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
        self.sigmas = np.concatenate([sigmas[:1], sigmas[1:-1].repeat(2), sigmas[-1:]])
        self.timesteps = np.concatenate([timesteps[:1], timesteps[1:].repeat(2)]).astype(np.float32)

        max_sigma = self.sigmas.max()
        if config.get("timestep_spacing", "linspace") in ("linspace", "trailing"):
            self.init_noise_sigma = float(max_sigma)
        else:
            self.init_noise_sigma = float((max_sigma**2 + 1) ** 0.5)

        # per-generation state: the first-order half's derivative, dt and sample
        self._first_order: tuple[np.ndarray, np.float32, np.ndarray] | None = None

    def scale_model_input(self, sample: np.ndarray, i: int) -> np.ndarray:
        sigma = self.sigmas[i]
        return (sample / ((sigma**2 + 1) ** 0.5)).astype(np.float32)

    def add_noise(self, original: np.ndarray, noise: np.ndarray, i: int) -> np.ndarray:
        """Forward diffusion to the noise level of call ``i``: x0 + noise * sigmas[i]."""
        return sigma_add_noise(self.sigmas[i], original, noise)

    def step(self, model_output: np.ndarray, i: int, sample: np.ndarray, rng: NoiseSource) -> np.ndarray:
        first_order = self._first_order is None  # diffusers' state_in_first_order (self.dt is None)
        if first_order:
            sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        else:  # 2nd order / Heun's method
            sigma, sigma_next = self.sigmas[i - 1], self.sigmas[i]
        sigma_hat = sigma  # gamma = 0

        # 1. compute predicted original sample (x_0) from sigma-scaled predicted noise
        sigma_input = sigma_hat if first_order else sigma_next
        if self.prediction_type == "epsilon":
            pred_original_sample = sample - sigma_input * model_output
        elif self.prediction_type == "v_prediction":
            pred_original_sample = model_output * (-sigma_input / (sigma_input**2 + 1) ** 0.5) + (
                sample / (sigma_input**2 + 1)
            )
        else:  # sample
            pred_original_sample = model_output
        if self.clip_sample:
            pred_original_sample = np.clip(pred_original_sample, -self.clip_sample_range, self.clip_sample_range)

        if first_order:
            # 2. Convert to an ODE derivative for 1st order
            derivative = (sample - pred_original_sample) / sigma_hat
            # 3. delta timestep
            dt = sigma_next - sigma_hat
            # store for 2nd order step
            self._first_order = (derivative, dt, sample)
        else:
            prev_derivative, dt, first_sample = self._first_order
            # 2. 2nd order / Heun's method
            derivative = (sample - pred_original_sample) / sigma_next
            derivative = (prev_derivative + derivative) / 2
            # 3. take prev timestep & sample
            sample = first_sample
            self._first_order = None
        prev_sample = sample + derivative * dt
        return prev_sample.astype(np.float32)
