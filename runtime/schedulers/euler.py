"""Ported from diffusers ``schedulers/scheduling_euler_discrete.py`` (``EulerDiscreteScheduler``).

Euler sampler of Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models",
Algorithm 2 (https://huggingface.co/papers/2206.00364), deterministic as ``StableDiffusionPipeline`` calls it:
``step`` without ``s_churn``, so gamma = 0 and no noise is drawn.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .common import (
    BOOL_OR_NONE,
    OFF,
    NoiseSource,
    config_choice,
    discrete_sigma_schedule,
    final_sigma,
    predicted_x0_from_sigma,
    sigma_add_noise,
    sigma_init_noise_sigma,
    sigma_scale_model_input,
    training_alphas_cumprod,
)


class Euler:
    order = 1

    def __init__(self, config: dict[str, Any], num_inference_steps: int):
        self.prediction_type = config_choice(
            config, "prediction_type", "epsilon", ("epsilon", "v_prediction", "sample", "original_sample")
        )
        config_choice(config, "interpolation_type", "linear", ("linear",))
        timestep_type = config_choice(config, "timestep_type", "discrete", ("discrete", "continuous"))
        final_sigmas_type = config_choice(config, "final_sigmas_type", "zero", ("zero", "sigma_min"))
        use_karras_sigmas = bool(config_choice(config, "use_karras_sigmas", False, BOOL_OR_NONE))
        config_choice(config, "use_exponential_sigmas", False, OFF)
        config_choice(config, "use_beta_sigmas", False, OFF)
        rescale = bool(config_choice(config, "rescale_betas_zero_snr", False, (False, True)))

        # training schedule (EulerDiscreteScheduler.__init__)
        acp = training_alphas_cumprod(config, zero_terminal_snr=rescale, finite_first_sigma=True)

        # set_timesteps
        timesteps, sigmas = discrete_sigma_schedule(config, acp, num_inference_steps, use_karras_sigmas)
        self.sigmas = np.concatenate([sigmas, [final_sigma(acp, final_sigmas_type)]]).astype(np.float32)

        if timestep_type == "continuous" and self.prediction_type == "v_prediction":
            self.timesteps = (0.25 * np.log(self.sigmas[:-1])).astype(np.float32)
        else:
            self.timesteps = timesteps.astype(np.float32)
        self.init_noise_sigma = sigma_init_noise_sigma(self.sigmas, config)

    def scale_model_input(self, sample: np.ndarray, i: int) -> np.ndarray:
        return sigma_scale_model_input(sample, self.sigmas[i])

    def add_noise(self, original: np.ndarray, noise: np.ndarray, i: int) -> np.ndarray:
        """Forward diffusion to the noise level of call ``i``: x0 + noise * sigmas[i]."""
        return sigma_add_noise(self.sigmas[i], original, noise)

    def step(self, model_output: np.ndarray, i: int, sample: np.ndarray, rng: NoiseSource) -> np.ndarray:
        sample = sample.astype(np.float32)
        sigma = self.sigmas[i]
        sigma_hat = sigma  # gamma = 0: no churn, so no noise is drawn

        # 1. compute predicted original sample (x_0) from sigma-scaled predicted noise
        pred_original_sample = predicted_x0_from_sigma(self.prediction_type, model_output, sample, sigma_hat)

        # 2. Convert to an ODE derivative
        derivative = (sample - pred_original_sample) / sigma_hat
        dt = self.sigmas[i + 1] - sigma_hat
        prev_sample = sample + derivative * dt
        return prev_sample.astype(np.float32)
