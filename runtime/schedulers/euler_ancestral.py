"""Ported from diffusers ``schedulers/scheduling_euler_ancestral_discrete.py`` (``EulerAncestralDiscreteScheduler``).

"Euler a": ancestral sampling with Euler steps, Katherine Crowson's k-diffusion ``sample_euler_ancestral``
(Karras et al. 2022, https://huggingface.co/papers/2206.00364; the ancestral split of Song et al. 2021,
https://huggingface.co/papers/2011.13456). Each ``step`` draws one Gaussian of the sample's shape from ``rng``,
where diffusers calls ``randn_tensor``, so a torch-compatible stream reproduces diffusers' images.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .common import (
    NoiseSource,
    config_choice,
    discrete_sigma_schedule,
    predicted_x0_from_sigma,
    sigma_add_noise,
    sigma_init_noise_sigma,
    sigma_scale_model_input,
    training_alphas_cumprod,
)


class EulerAncestral:
    order = 1

    def __init__(self, config: dict[str, Any], num_inference_steps: int):
        # diffusers raises NotImplementedError for "sample"
        self.prediction_type = config_choice(config, "prediction_type", "epsilon", ("epsilon", "v_prediction"))
        rescale = bool(config_choice(config, "rescale_betas_zero_snr", False, (False, True)))

        # training schedule (EulerAncestralDiscreteScheduler.__init__)
        acp = training_alphas_cumprod(config, zero_terminal_snr=rescale, finite_first_sigma=True)

        # set_timesteps
        self.timesteps, sigmas = discrete_sigma_schedule(config, acp, num_inference_steps, use_karras_sigmas=False)
        self.sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)

        # ancestral split of each step sigma_from -> sigma_to (from step())
        sigma_from, sigma_to = self.sigmas[:-1], self.sigmas[1:]
        self.sigma_up = (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
        self.sigma_down = (sigma_to**2 - self.sigma_up**2) ** 0.5
        self.init_noise_sigma = sigma_init_noise_sigma(self.sigmas, config)

    def scale_model_input(self, sample: np.ndarray, i: int) -> np.ndarray:
        return sigma_scale_model_input(sample, self.sigmas[i])

    def add_noise(self, original: np.ndarray, noise: np.ndarray, i: int) -> np.ndarray:
        """Forward diffusion to the noise level of call ``i``: x0 + noise * sigmas[i]."""
        return sigma_add_noise(self.sigmas[i], original, noise)

    def step(self, model_output: np.ndarray, i: int, sample: np.ndarray, rng: NoiseSource) -> np.ndarray:
        sigma = self.sigmas[i]
        sample = sample.astype(np.float32)

        # 1. compute predicted original sample (x_0) from sigma-scaled predicted noise
        pred_original_sample = predicted_x0_from_sigma(self.prediction_type, model_output, sample, sigma)

        # 2. Convert to an ODE derivative
        derivative = (sample - pred_original_sample) / sigma
        dt = self.sigma_down[i] - sigma
        prev_sample = sample + derivative * dt

        noise = rng.randn(model_output.shape)
        prev_sample = prev_sample + noise * self.sigma_up[i]
        return prev_sample.astype(np.float32)
