"""DDIM sampler: deterministic for eta = 0, DDPM-like noise injection for eta > 0.

Ported from diffusers ``schedulers/scheduling_ddim.py`` (``DDIMScheduler``).
Paper: Song, Meng & Ermon, "Denoising Diffusion Implicit Models", ICLR 2021
(https://arxiv.org/abs/2010.02502), formulas (12) and (16).

``eta`` is a call argument of diffusers' ``step`` (pipelines pass 0.0 by
default); here it is read from the config key ``"eta"`` (default 0.0).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .common import (
    TIMESTEP_SPACINGS,
    NoiseSource,
    alphas_cumprod_at,
    config_choice,
    ddpm_add_noise,
    final_alpha_cumprod,
    predicted_epsilon,
    predicted_x0,
    training_alphas_cumprod,
)

_PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


def _ddim_timesteps(spacing: str, num_train: int, steps: int, steps_offset: int) -> np.ndarray:
    """``DDIMScheduler.set_timesteps``: integer timesteps, descending."""
    # "linspace", "leading", "trailing" corresponds to annotation of Table 2. of https://arxiv.org/abs/2305.08891
    if spacing == "linspace":
        return np.linspace(0, num_train - 1, steps).round()[::-1].copy().astype(np.int64)
    if spacing == "leading":
        step_ratio = num_train // steps
        timesteps = (np.arange(0, steps) * step_ratio).round()[::-1].copy().astype(np.int64)
        return timesteps + steps_offset
    # "trailing"
    step_ratio = num_train / steps
    return np.round(np.arange(num_train, 0, -step_ratio)).astype(np.int64) - 1


class DDIM:
    """Denoising Diffusion Implicit Models (numpy)."""

    order = 1

    def __init__(self, config: dict[str, Any], num_inference_steps: int):
        num_train = int(config.get("num_train_timesteps", 1000))
        self.prediction_type: str = config_choice(config, "prediction_type", "epsilon", _PREDICTION_TYPES)
        spacing = config_choice(config, "timestep_spacing", "leading", TIMESTEP_SPACINGS)
        config_choice(config, "thresholding", False, (False,))  # dynamic thresholding: pixel-space models only
        rescale = bool(config_choice(config, "rescale_betas_zero_snr", False, (False, True)))
        if num_inference_steps > num_train:
            raise ValueError(
                f"num_inference_steps {num_inference_steps} cannot be larger than num_train_timesteps {num_train}"
            )
        self.eta = float(config.get("eta", 0.0))
        if self.eta < 0:
            raise ValueError(f"eta {self.eta!r} is not supported; accepted: eta >= 0")
        self.clip_sample = bool(config.get("clip_sample", True))
        self.clip_sample_range = np.float32(config.get("clip_sample_range", 1.0))

        acp = training_alphas_cumprod(config, zero_terminal_snr=rescale)
        final = final_alpha_cumprod(config, acp, set_alpha_to_one_default=True)

        # standard deviation of the initial noise distribution
        self.init_noise_sigma = 1.0

        timesteps = _ddim_timesteps(spacing, num_train, num_inference_steps, int(config.get("steps_offset", 0)))
        self.timesteps = timesteps.astype(np.float32)

        # per-step tables. 1. get previous step value (=t-1): diffusers subtracts
        # num_train // steps whatever the spacing, so the same here.
        prev_timesteps = timesteps - num_train // num_inference_steps
        self.alpha_prod_t = acp[timesteps]
        self.alpha_prod_t_prev = alphas_cumprod_at(acp, prev_timesteps, final)
        # 5. compute variance: "sigma_t(η)" -> see formula (16)
        # σ_t = sqrt((1 − α_t−1)/(1 − α_t)) * sqrt(1 − α_t/α_t−1)
        beta_prod_t = 1 - self.alpha_prod_t
        beta_prod_t_prev = 1 - self.alpha_prod_t_prev
        variance = (beta_prod_t_prev / beta_prod_t) * (1 - self.alpha_prod_t / self.alpha_prod_t_prev)
        self.std_dev_t = (np.float32(self.eta) * variance**0.5).astype(np.float32)

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

        # 3. compute predicted original sample from predicted noise also called
        # "predicted x_0" of formula (12) from https://arxiv.org/abs/2010.02502
        alpha_t, sigma_t = alpha_prod_t**0.5, beta_prod_t**0.5
        pred_original_sample = predicted_x0(self.prediction_type, model_output, sample, alpha_t, sigma_t)
        pred_epsilon = predicted_epsilon(self.prediction_type, model_output, sample, alpha_t, sigma_t)

        # 4. Clip "predicted x_0"
        if self.clip_sample:
            pred_original_sample = np.clip(pred_original_sample, -self.clip_sample_range, self.clip_sample_range)

        # 5. compute variance (table)
        std_dev_t = self.std_dev_t[i]

        # 6. compute "direction pointing to x_t" of formula (12) from https://arxiv.org/abs/2010.02502
        pred_sample_direction = (1 - alpha_prod_t_prev - std_dev_t**2) ** 0.5 * pred_epsilon

        # 7. compute x_t without "random noise" of formula (12) from https://arxiv.org/abs/2010.02502
        prev_sample = alpha_prod_t_prev**0.5 * pred_original_sample + pred_sample_direction

        if self.eta > 0:
            variance_noise = rng.randn(model_output.shape).astype(model_output.dtype, copy=False)
            prev_sample = prev_sample + std_dev_t * variance_noise
        return prev_sample
