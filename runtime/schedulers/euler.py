"""Ported from diffusers ``schedulers/scheduling_euler_discrete.py`` (``EulerDiscreteScheduler``).

Euler sampler of Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models",
Algorithm 2 (https://huggingface.co/papers/2206.00364), deterministic as ``StableDiffusionPipeline`` calls it:
``step`` without ``s_churn``, so gamma = 0 and no noise is drawn.
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
    rescale_zero_terminal_snr,
    sigma_add_noise,
    sigma_to_t,
    train_betas,
)

_OFF = (False, None)


class Euler:
    order = 1

    def __init__(self, config: dict[str, Any], num_inference_steps: int):
        self.prediction_type = config_choice(
            config, "prediction_type", "epsilon", ("epsilon", "v_prediction", "sample", "original_sample")
        )
        config_choice(config, "interpolation_type", "linear", ("linear",))
        timestep_type = config_choice(config, "timestep_type", "discrete", ("discrete", "continuous"))
        final_sigmas_type = config_choice(config, "final_sigmas_type", "zero", ("zero", "sigma_min"))
        use_karras_sigmas = bool(config_choice(config, "use_karras_sigmas", False, (False, True, None)))
        config_choice(config, "use_exponential_sigmas", False, _OFF)
        config_choice(config, "use_beta_sigmas", False, _OFF)
        rescale = bool(config_choice(config, "rescale_betas_zero_snr", False, (False, True)))

        # training schedule (EulerDiscreteScheduler.__init__)
        betas = train_betas(config)
        if rescale:
            betas = rescale_zero_terminal_snr(betas)
        acp = alphas_cumprod(config, betas)
        if rescale:
            # Close to 0 without being 0 so first sigma is not inf
            acp[-1] = 2**-24

        # set_timesteps
        timesteps = discrete_timesteps(config, num_inference_steps)
        sigmas = ((1 - acp) / acp) ** 0.5
        log_sigmas = np.log(sigmas)
        sigmas = np.interp(timesteps, np.arange(0, len(sigmas)), sigmas)
        if use_karras_sigmas:
            sigmas = karras_sigmas(sigmas, num_inference_steps, config)
            timesteps = np.array([sigma_to_t(sigma, log_sigmas) for sigma in sigmas])
        if final_sigmas_type == "sigma_min":
            sigma_last = ((1 - acp[0]) / acp[0]) ** 0.5
        else:
            sigma_last = 0
        self.sigmas = np.concatenate([sigmas, [sigma_last]]).astype(np.float32)

        if timestep_type == "continuous" and self.prediction_type == "v_prediction":
            self.timesteps = (0.25 * np.log(self.sigmas[:-1])).astype(np.float32)
        else:
            self.timesteps = timesteps.astype(np.float32)

        max_sigma = self.sigmas.max()
        if config.get("timestep_spacing", "linspace") in ("linspace", "trailing"):
            self.init_noise_sigma = float(max_sigma)
        else:
            self.init_noise_sigma = float((max_sigma**2 + 1) ** 0.5)

    def scale_model_input(self, sample: np.ndarray, i: int) -> np.ndarray:
        sigma = self.sigmas[i]
        return (sample / ((sigma**2 + 1) ** 0.5)).astype(np.float32)

    def add_noise(self, original: np.ndarray, noise: np.ndarray, i: int) -> np.ndarray:
        """Forward diffusion to the noise level of call ``i``: x0 + noise * sigmas[i]."""
        return sigma_add_noise(self.sigmas[i], original, noise)

    def step(self, model_output: np.ndarray, i: int, sample: np.ndarray, rng: NoiseSource) -> np.ndarray:
        sample = sample.astype(np.float32)
        sigma = self.sigmas[i]
        sigma_hat = sigma  # gamma = 0: no churn, so no noise is drawn

        # 1. compute predicted original sample (x_0) from sigma-scaled predicted noise
        if self.prediction_type in ("original_sample", "sample"):
            pred_original_sample = model_output
        elif self.prediction_type == "epsilon":
            pred_original_sample = sample - sigma_hat * model_output
        else:  # v_prediction: denoised = model_output * c_out + input * c_skip
            pred_original_sample = model_output * (-sigma / (sigma**2 + 1) ** 0.5) + (sample / (sigma**2 + 1))

        # 2. Convert to an ODE derivative
        derivative = (sample - pred_original_sample) / sigma_hat
        dt = self.sigmas[i + 1] - sigma_hat
        prev_sample = sample + derivative * dt
        return prev_sample.astype(np.float32)
