"""LMS sampler: 4th-order linear multistep on the probability-flow ODE in sigma.

Ported from diffusers ``schedulers/scheduling_lms_discrete.py`` (``LMSDiscreteScheduler``),
which follows k-diffusion's ``sample_lms``. Method: Karras et al., "Elucidating
the Design Space of Diffusion-Based Generative Models", NeurIPS 2022
(https://arxiv.org/abs/2206.00364) for the sigma parameterisation and the
Karras schedule; linear multistep (Adams-Bashforth) coefficients as in
k-diffusion.

diffusers integrates each Lagrange basis polynomial with ``scipy.integrate.quad``;
the integrand is a polynomial of degree <= 3, so here it is integrated exactly
with ``numpy.polynomial`` (no scipy at run time).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.polynomial import Polynomial

from .common import (
    BOOL_OR_NONE,
    OFF,
    TIMESTEP_SPACINGS,
    NoiseSource,
    alphas_cumprod,
    config_choice,
    discrete_sigma_schedule,
    predicted_x0_from_sigma,
    sigma_add_noise,
    sigma_init_noise_sigma,
    sigma_scale_model_input,
)

_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def _lms_coefficient(sigmas: np.ndarray, order: int, t: int, current_order: int) -> float:
    """Integral over [sigmas[t], sigmas[t + 1]] of the Lagrange basis polynomial of node t - current_order."""
    nodes = sigmas.astype(np.float64)
    basis = Polynomial([1.0])
    for k in range(order):
        if current_order == k:
            continue
        basis = basis * Polynomial([-nodes[t - k], 1.0]) / (nodes[t - current_order] - nodes[t - k])
    antiderivative = basis.integ()
    return float(antiderivative(nodes[t + 1]) - antiderivative(nodes[t]))


class LMS:
    """Linear multistep (order 4) in sigma, numpy."""

    order = 1
    lms_order = 4

    def __init__(self, config: dict[str, Any], num_inference_steps: int):
        self.prediction_type: str = config_choice(config, "prediction_type", "epsilon", _PREDICTION_TYPES)
        config_choice(config, "timestep_spacing", "linspace", TIMESTEP_SPACINGS)
        config_choice(config, "use_exponential_sigmas", False, OFF)
        config_choice(config, "use_beta_sigmas", False, OFF)  # diffusers needs scipy.stats for it
        use_karras_sigmas = bool(config_choice(config, "use_karras_sigmas", False, BOOL_OR_NONE))

        acp = alphas_cumprod(config)
        # LMS's _convert_to_karras ignores config sigma_min / sigma_max
        timesteps, sigmas = discrete_sigma_schedule(
            config, acp, num_inference_steps, use_karras_sigmas, karras_bounds_from_config=False
        )
        self.sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
        self.timesteps = timesteps.astype(np.float32)

        # standard deviation of the initial noise distribution
        self.init_noise_sigma = sigma_init_noise_sigma(self.sigmas, config)

        # 3. linear multistep coefficients, one list per step (newest derivative first). As in diffusers the order
        # is min(i + 1, 4) from the call index, not from the derivatives gathered: a loop started at i > 0
        # (img2img) pairs the first coefficients of a higher-order rule with the few derivatives it has (zip()
        # in step() stops at the shorter), which is what diffusers does after set_begin_index.
        self.lms_coeffs: list[list[float]] = []
        for i in range(len(self.timesteps)):
            order = min(i + 1, self.lms_order)
            self.lms_coeffs.append([_lms_coefficient(self.sigmas, order, i, j) for j in range(order)])
        self.derivatives: list[np.ndarray] = []

    def scale_model_input(self, sample: np.ndarray, i: int) -> np.ndarray:
        return sigma_scale_model_input(sample, self.sigmas[i])

    def add_noise(self, original: np.ndarray, noise: np.ndarray, i: int) -> np.ndarray:
        """Forward diffusion to the noise level of call ``i``: x0 + noise * sigmas[i]."""
        return sigma_add_noise(self.sigmas[i], original, noise)

    def step(self, model_output: np.ndarray, i: int, sample: np.ndarray, rng: NoiseSource) -> np.ndarray:
        sigma = self.sigmas[i]

        # 1. compute predicted original sample (x_0) from sigma-scaled predicted noise
        pred_original_sample = predicted_x0_from_sigma(self.prediction_type, model_output, sample, sigma)

        # 2. Convert to an ODE derivative
        derivative = (sample - pred_original_sample) / sigma
        self.derivatives.append(derivative)
        if len(self.derivatives) > self.lms_order:
            self.derivatives.pop(0)

        # 3. Compute linear multistep coefficients (precomputed in __init__)
        lms_coeffs = self.lms_coeffs[i]

        # 4. Compute previous sample based on the derivatives path
        return sample + sum(coeff * derivative for coeff, derivative in zip(lms_coeffs, reversed(self.derivatives)))
