"""LCM sampler: multistep consistency sampling for latent consistency models.

Ported from diffusers ``schedulers/scheduling_lcm.py`` (``LCMScheduler``).
Paper: Luo, Tan, Huang, Li & Zhao, "Latent Consistency Models: Synthesizing
High-Resolution Images with Few-Step Inference", 2023 (https://arxiv.org/abs/2310.04378),
Algorithm 1 (multistep latent consistency sampling); boundary conditions
c_skip / c_out from Song et al., "Consistency Models" (https://arxiv.org/abs/2303.01469).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .common import (
    NoiseSource,
    alphas_cumprod_at,
    config_choice,
    ddpm_add_noise,
    final_alpha_cumprod,
    predicted_x0,
    training_alphas_cumprod,
)

_PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


def _lcm_timesteps(num_train: int, original_steps: int, steps: int) -> np.ndarray:
    """``LCMScheduler.set_timesteps`` (no custom timesteps, strength 1): descending integers."""
    if original_steps > num_train:
        raise ValueError(
            f"original_inference_steps {original_steps} cannot be larger than num_train_timesteps {num_train}"
        )
    # LCM Timesteps Setting
    # The skipping step parameter k from the paper.
    k = num_train // original_steps
    # LCM Training/Distillation Steps Schedule
    lcm_origin_timesteps = np.asarray(list(range(1, original_steps + 1))) * k - 1
    if steps > num_train:
        raise ValueError(f"num_inference_steps {steps} cannot be larger than num_train_timesteps {num_train}")
    if len(lcm_origin_timesteps) // steps < 1 or steps > original_steps:
        raise ValueError(
            f"num_inference_steps {steps} cannot be larger than original_inference_steps {original_steps}: the "
            "LCM schedule is a subset of the original_inference_steps-sized schedule"
        )
    # LCM Inference Steps Schedule
    lcm_origin_timesteps = lcm_origin_timesteps[::-1].copy()
    # Select (approximately) evenly spaced indices from lcm_origin_timesteps.
    inference_indices = np.linspace(0, len(lcm_origin_timesteps), num=steps, endpoint=False)
    inference_indices = np.floor(inference_indices).astype(np.int64)
    return lcm_origin_timesteps[inference_indices]


class LCM:
    """Latent Consistency Model multistep sampler, numpy."""

    order = 1
    sigma_data = 0.5  # Default: 0.5

    def __init__(self, config: dict[str, Any], num_inference_steps: int):
        num_train = int(config.get("num_train_timesteps", 1000))
        # LCMScheduler's own defaults are the Stable Diffusion schedule
        config = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", **config}
        self.prediction_type: str = config_choice(config, "prediction_type", "epsilon", _PREDICTION_TYPES)
        config_choice(config, "thresholding", False, (False,))  # dynamic thresholding: pixel-space models only
        rescale = bool(config_choice(config, "rescale_betas_zero_snr", False, (False, True)))
        self.clip_sample = bool(config.get("clip_sample", False))
        self.clip_sample_range = np.float32(config.get("clip_sample_range", 1.0))
        timestep_scaling = float(config.get("timestep_scaling", 10.0))
        original_steps = int(config.get("original_inference_steps", 50))

        acp = training_alphas_cumprod(config, zero_terminal_snr=rescale)
        final = final_alpha_cumprod(config, acp, set_alpha_to_one_default=True)

        # standard deviation of the initial noise distribution
        self.init_noise_sigma = 1.0
        self.num_inference_steps = num_inference_steps

        timesteps = _lcm_timesteps(num_train, original_steps, num_inference_steps)
        self.timesteps = timesteps.astype(np.float32)

        # 1. get previous step value: the next timestep, or the same one on the last step
        prev_timesteps = np.concatenate([timesteps[1:], timesteps[-1:]])
        # 2. compute alphas, betas
        self.alpha_prod_t = acp[timesteps]
        self.alpha_prod_t_prev = alphas_cumprod_at(acp, prev_timesteps, final)
        # 3. Get scalings for boundary conditions (get_scalings_for_boundary_condition_discrete)
        scaled_timestep = timesteps.astype(np.float32) * np.float32(timestep_scaling)
        self.c_skip = (self.sigma_data**2 / (scaled_timestep**2 + self.sigma_data**2)).astype(np.float32)
        self.c_out = (scaled_timestep / (scaled_timestep**2 + self.sigma_data**2) ** 0.5).astype(np.float32)

    def scale_model_input(self, sample: np.ndarray, i: int) -> np.ndarray:
        return sample

    def add_noise(self, original: np.ndarray, noise: np.ndarray, i: int) -> np.ndarray:
        """Forward diffusion to ``timesteps[i]``: sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise."""
        return ddpm_add_noise(self.alpha_prod_t[i], original, noise)

    def step(self, model_output: np.ndarray, i: int, sample: np.ndarray, rng: NoiseSource) -> np.ndarray:
        # 2. compute alphas, betas
        alpha_prod_t = self.alpha_prod_t[i]
        alpha_prod_t_prev = self.alpha_prod_t_prev[i]
        beta_prod_t = 1 - alpha_prod_t
        beta_prod_t_prev = 1 - alpha_prod_t_prev

        # 3. Get scalings for boundary conditions
        c_skip, c_out = self.c_skip[i], self.c_out[i]

        # 4. Compute the predicted original sample x_0 based on the model parameterization
        predicted_original_sample = predicted_x0(
            self.prediction_type, model_output, sample, np.sqrt(alpha_prod_t), np.sqrt(beta_prod_t)
        )

        # 5. Clip "predicted x_0"
        if self.clip_sample:
            predicted_original_sample = np.clip(
                predicted_original_sample, -self.clip_sample_range, self.clip_sample_range
            )

        # 6. Denoise model output using boundary conditions
        denoised = c_out * predicted_original_sample + c_skip * sample

        # 7. Sample and inject noise z ~ N(0, I) for MultiStep Inference
        # Noise is not used on the final timestep of the timestep schedule.
        # This also means that noise is not used for one-step sampling.
        if i != self.num_inference_steps - 1:
            noise = rng.randn(model_output.shape).astype(denoised.dtype, copy=False)
            return np.sqrt(alpha_prod_t_prev) * denoised + np.sqrt(beta_prod_t_prev) * noise
        return denoised
