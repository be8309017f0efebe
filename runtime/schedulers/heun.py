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
    BOOL_OR_NONE,
    OFF,
    NoiseSource,
    alphas_cumprod,
    config_choice,
    discrete_sigma_schedule,
    predicted_x0_from_sigma,
    sigma_add_noise,
    sigma_init_noise_sigma,
    sigma_scale_model_input,
)


class Heun:
    order = 2

    def __init__(self, config: dict[str, Any], num_inference_steps: int):
        self.prediction_type = config_choice(
            config, "prediction_type", "epsilon", ("epsilon", "v_prediction", "sample")
        )
        use_karras_sigmas = bool(config_choice(config, "use_karras_sigmas", False, BOOL_OR_NONE))
        config_choice(config, "use_exponential_sigmas", False, OFF)
        config_choice(config, "use_beta_sigmas", False, OFF)
        self.clip_sample = bool(config.get("clip_sample", False))
        self.clip_sample_range = float(config.get("clip_sample_range", 1.0))

        # training schedule (HeunDiscreteScheduler.__init__; note its own beta defaults)
        acp = alphas_cumprod(
            {**config, "beta_start": config.get("beta_start", 0.00085), "beta_end": config.get("beta_end", 0.012)}
        )

        # set_timesteps
        timesteps, sigmas = discrete_sigma_schedule(config, acp, num_inference_steps, use_karras_sigmas)
        sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
        self.sigmas = np.concatenate([sigmas[:1], sigmas[1:-1].repeat(2), sigmas[-1:]])
        self.timesteps = np.concatenate([timesteps[:1], timesteps[1:].repeat(2)]).astype(np.float32)
        self.init_noise_sigma = sigma_init_noise_sigma(self.sigmas, config)

        # per-generation state: the first-order half's derivative, dt and sample
        self._first_order: tuple[np.ndarray, np.float32, np.ndarray] | None = None

    def scale_model_input(self, sample: np.ndarray, i: int) -> np.ndarray:
        return sigma_scale_model_input(sample, self.sigmas[i])

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
        pred_original_sample = predicted_x0_from_sigma(self.prediction_type, model_output, sample, sigma_input)
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
