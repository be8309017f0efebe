"""PNDM / PLMS sampler: pseudo linear multistep on the DDIM transfer, with the
optional Runge-Kutta (PRK) warm-up of F-PNDM.

Ported from diffusers ``schedulers/scheduling_pndm.py`` (``PNDMScheduler``).
Paper: Liu, Ren, Lin & Zhao, "Pseudo Numerical Methods for Diffusion Models on
Manifolds", ICLR 2022 (https://arxiv.org/abs/2202.09778), formulas (9), (12), (13)
and Algorithm 2. With ``skip_prk_steps`` (Stable Diffusion's setting) it is
crowsonkb's PLMS sampler (https://github.com/CompVis/latent-diffusion/pull/51).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .common import (
    TIMESTEP_SPACINGS,
    NoiseSource,
    alphas_cumprod,
    config_choice,
    ddpm_add_noise,
    final_alpha_cumprod,
    predicted_epsilon,
)

_PREDICTION_TYPES = ("epsilon", "v_prediction")


def _ascending_timesteps(spacing: str, num_train: int, steps: int, steps_offset: int) -> np.ndarray:
    """``PNDMScheduler.set_timesteps``'s ``_timesteps``: ascending integers."""
    # "linspace", "leading", "trailing" corresponds to annotation of Table 2. of https://arxiv.org/abs/2305.08891
    if spacing == "linspace":
        return np.linspace(0, num_train - 1, steps).round().astype(np.int64)
    if spacing == "leading":
        step_ratio = num_train // steps
        return (np.arange(0, steps) * step_ratio).round().astype(np.int64) + steps_offset
    # "trailing"
    step_ratio = num_train / steps
    return np.round(np.arange(num_train, 0, -step_ratio))[::-1].astype(np.int64) - 1


class PNDM:
    """PLMS (and F-PNDM when ``skip_prk_steps`` is false), numpy."""

    order = 1
    pndm_order = 4

    def __init__(self, config: dict[str, Any], num_inference_steps: int):
        num_train = int(config.get("num_train_timesteps", 1000))
        self.prediction_type: str = config_choice(config, "prediction_type", "epsilon", _PREDICTION_TYPES)
        spacing = config_choice(config, "timestep_spacing", "leading", TIMESTEP_SPACINGS)
        skip_prk_steps = bool(config.get("skip_prk_steps", False))

        self.alphas_cumprod = alphas_cumprod(config)
        self.final_alpha_cumprod = final_alpha_cumprod(config, self.alphas_cumprod, set_alpha_to_one_default=False)

        # standard deviation of the initial noise distribution
        self.init_noise_sigma = 1.0

        step_ratio = num_train // num_inference_steps
        _timesteps = _ascending_timesteps(spacing, num_train, num_inference_steps, int(config.get("steps_offset", 0)))
        if skip_prk_steps:
            prk_timesteps = np.array([], dtype=np.int64)
            plms_timesteps = np.concatenate([_timesteps[:-1], _timesteps[-2:-1], _timesteps[-1:]])[::-1].copy()
        else:
            if len(_timesteps) < self.pndm_order:
                raise ValueError(
                    f"skip_prk_steps False (the Runge-Kutta warm-up) needs at least {self.pndm_order} inference steps, "
                    f"got {num_inference_steps}; accepted: skip_prk_steps True, or steps >= {self.pndm_order}"
                )
            prk_timesteps = np.array(_timesteps[-self.pndm_order :]).repeat(2) + np.tile(
                np.array([0, step_ratio // 2]), self.pndm_order
            )
            prk_timesteps = (prk_timesteps[:-1].repeat(2)[1:-1])[::-1].copy()
            plms_timesteps = _timesteps[:-3][::-1].copy()
        timesteps = np.concatenate([prk_timesteps, plms_timesteps]).astype(np.int64)
        self.timesteps = timesteps.astype(np.float32)
        self.num_prk_steps = len(prk_timesteps)
        self._int_timesteps = timesteps
        self._prk_timesteps = prk_timesteps
        self._step_ratio = step_ratio

        # running values; `counter` counts the steps taken, whatever index the loop started at (img2img),
        # and drives the PRK / PLMS state machine as in diffusers
        self.counter = 0
        self.cur_model_output: np.ndarray | int = 0
        self.cur_sample: np.ndarray | None = None
        self.ets: list[np.ndarray] = []

    def scale_model_input(self, sample: np.ndarray, i: int) -> np.ndarray:
        return sample

    def add_noise(self, original: np.ndarray, noise: np.ndarray, i: int) -> np.ndarray:
        """Forward diffusion to ``timesteps[i]``: sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise."""
        return ddpm_add_noise(self.alphas_cumprod[int(self._int_timesteps[i])], original, noise)

    def step(self, model_output: np.ndarray, i: int, sample: np.ndarray, rng: NoiseSource) -> np.ndarray:
        timestep = int(self._int_timesteps[i])
        if self.counter < self.num_prk_steps:
            prev_sample = self._step_prk(model_output, timestep, sample)
        else:
            prev_sample = self._step_plms(model_output, timestep, sample)
        self.counter += 1
        return prev_sample

    def _step_prk(self, model_output: np.ndarray, timestep: int, sample: np.ndarray) -> np.ndarray:
        """Runge-Kutta warm-up: four UNet calls per step, formula (13)."""
        counter = self.counter
        diff_to_prev = 0 if counter % 2 else self._step_ratio // 2
        prev_timestep = timestep - diff_to_prev
        timestep = int(self._prk_timesteps[counter // 4 * 4])

        if counter % 4 == 0:
            self.cur_model_output = self.cur_model_output + 1 / 6 * model_output
            self.ets.append(model_output)
            self.cur_sample = sample
        elif (counter - 1) % 4 == 0 or (counter - 2) % 4 == 0:
            self.cur_model_output = self.cur_model_output + 1 / 3 * model_output
        else:
            model_output = self.cur_model_output + 1 / 6 * model_output
            self.cur_model_output = 0

        # cur_sample should not be `None`
        cur_sample = self.cur_sample if self.cur_sample is not None else sample
        return self._get_prev_sample(cur_sample, timestep, prev_timestep, model_output)

    def _step_plms(self, model_output: np.ndarray, timestep: int, sample: np.ndarray) -> np.ndarray:
        """Linear multistep, formula (12); the first two calls are a 2nd-order (Heun-like) start: the second
        call re-does the first step (from timestep + step_ratio to timestep) with the averaged output."""
        counter = self.counter
        prev_timestep = timestep - self._step_ratio
        if counter != 1:
            self.ets = self.ets[-3:]
            self.ets.append(model_output)
        else:
            prev_timestep = timestep
            timestep = timestep + self._step_ratio

        if len(self.ets) == 1 and counter == 0:
            self.cur_sample = sample
        elif len(self.ets) == 1 and counter == 1:
            model_output = (model_output + self.ets[-1]) / 2
            sample = self.cur_sample
            self.cur_sample = None
        elif len(self.ets) == 2:
            model_output = (3 * self.ets[-1] - self.ets[-2]) / 2
        elif len(self.ets) == 3:
            model_output = (23 * self.ets[-1] - 16 * self.ets[-2] + 5 * self.ets[-3]) / 12
        else:
            model_output = (1 / 24) * (55 * self.ets[-1] - 59 * self.ets[-2] + 37 * self.ets[-3] - 9 * self.ets[-4])

        return self._get_prev_sample(sample, timestep, prev_timestep, model_output)

    def _get_prev_sample(
        self, sample: np.ndarray, timestep: int, prev_timestep: int, model_output: np.ndarray
    ) -> np.ndarray:
        """x_(t-δ) from x_t, formula (9) of the PNDM paper."""
        alpha_prod_t = self.alphas_cumprod[timestep]
        alpha_prod_t_prev = self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod
        beta_prod_t = 1 - alpha_prod_t
        beta_prod_t_prev = 1 - alpha_prod_t_prev

        # the formula takes the predicted noise: convert a v prediction
        model_output = predicted_epsilon(self.prediction_type, model_output, sample, alpha_prod_t**0.5, beta_prod_t**0.5)

        # corresponds to (α_(t−δ) - α_t) divided by
        # denominator of x_t in formula (9) and plus 1
        # Note: (α_(t−δ) - α_t) / (sqrt(α_t) * (sqrt(α_(t−δ)) + sqr(α_t))) =
        # sqrt(α_(t−δ)) / sqrt(α_t))
        sample_coeff = (alpha_prod_t_prev / alpha_prod_t) ** 0.5

        # corresponds to denominator of e_θ(x_t, t) in formula (9)
        model_output_denom_coeff = alpha_prod_t * beta_prod_t_prev**0.5 + (
            alpha_prod_t * beta_prod_t * alpha_prod_t_prev
        ) ** 0.5

        # full formula (9)
        return sample_coeff * sample - (alpha_prod_t_prev - alpha_prod_t) * model_output / model_output_denom_coeff
