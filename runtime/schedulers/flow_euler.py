"""Ported from diffusers ``schedulers/scheduling_flow_match_euler_discrete.py`` (``FlowMatchEulerDiscreteScheduler``).

Euler steps along the flow of a rectified-flow model (Esser et al. 2024, "Scaling Rectified Flow Transformers for
High-Resolution Image Synthesis", https://huggingface.co/papers/2403.03206): x_{sigma'} = x_sigma + (sigma' - sigma) v.
The schedule is SD3's static ``shift``, or FLUX's dynamic shift at ``mu`` (``use_dynamic_shifting``, with
``time_shift_type`` "exponential" or "linear"), optionally stretched to ``shift_terminal``, with Karras or exponential
spacing, inverted (``invert_sigmas``, Mochi), or the caller's ``sigmas`` (FluxPipeline passes linspace(1, 1/N, N)).
``stochastic_sampling`` re-noises the predicted x0 to the next sigma with fresh noise instead of the Euler step.
The model is fed ``timesteps`` = sigma * num_train_timesteps (FLUX pipelines divide it by 1000 themselves).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .common import (
    BOOL_OR_NONE,
    OFF,
    TIME_SHIFT_TYPES,
    NoiseSource,
    config_choice,
    custom_flow_sigmas,
    flow_add_noise,
    flow_shift_terminal,
    flow_mu,
    flow_x0,
    karras_sigmas,
    shift_flow_sigmas,
    static_shift,
)


class FlowMatchEuler:
    order = 1
    takes_flow_inputs = True  # make_scheduler passes image_seq_len, mu and sigmas

    def __init__(
        self,
        config: dict[str, Any],
        num_inference_steps: int,
        *,
        image_seq_len: int | None = None,
        mu: float | None = None,
        sigmas: Any = None,
    ):
        n_train = int(config.get("num_train_timesteps", 1000))
        shift = float(config.get("shift", 1.0))
        dynamic = bool(config_choice(config, "use_dynamic_shifting", False, BOOL_OR_NONE))
        time_shift_type = config_choice(config, "time_shift_type", "exponential", TIME_SHIFT_TYPES)
        invert_sigmas = bool(config_choice(config, "invert_sigmas", False, BOOL_OR_NONE))
        use_karras_sigmas = bool(config_choice(config, "use_karras_sigmas", False, BOOL_OR_NONE))
        use_exponential_sigmas = bool(config_choice(config, "use_exponential_sigmas", False, BOOL_OR_NONE))
        config_choice(config, "use_beta_sigmas", False, OFF)  # scipy's beta quantiles: not in the lean runtime
        if use_karras_sigmas and use_exponential_sigmas:  # as diffusers
            raise ValueError("use_karras_sigmas and use_exponential_sigmas cannot both be set; choose one")
        self.stochastic_sampling = bool(config_choice(config, "stochastic_sampling", False, BOOL_OR_NONE))
        shift_terminal = flow_shift_terminal(config)
        mu = flow_mu(config, image_seq_len, mu) if dynamic else None  # a static config ignores mu, as diffusers

        # training schedule (FlowMatchEulerDiscreteScheduler.__init__): the ends of the (statically shifted) sigmas
        train_sigmas = np.linspace(1, n_train, n_train, dtype=np.float32)[::-1].copy() / n_train
        if not dynamic:
            # when use_dynamic_shifting is True, we apply the timestep shifting on the fly based on the image resolution
            train_sigmas = static_shift(shift, train_sigmas)
        sigma_max, sigma_min = float(train_sigmas[0]), float(train_sigmas[-1])

        # set_timesteps
        # 1. Prepare default sigmas
        if sigmas is None:
            timesteps = np.linspace(sigma_max * n_train, sigma_min * n_train, num_inference_steps)
            sigmas = timesteps / n_train
        else:
            sigmas = custom_flow_sigmas(sigmas, num_inference_steps, np.float32)
        # 2., 3. shift, statically or at mu, then stretch to shift_terminal
        sigmas = shift_flow_sigmas(
            sigmas, shift=shift, mu=mu, time_shift_type=time_shift_type, shift_terminal=shift_terminal
        )
        # 4. If required, convert sigmas to one of karras or exponential sigma schedules
        if use_karras_sigmas:
            sigmas = karras_sigmas(sigmas, num_inference_steps, config)
        elif use_exponential_sigmas:
            sigma_lo, sigma_hi = config.get("sigma_min"), config.get("sigma_max")
            sigma_lo = sigma_lo if sigma_lo is not None else float(sigmas[-1])
            sigma_hi = sigma_hi if sigma_hi is not None else float(sigmas[0])
            sigmas = np.exp(np.linspace(math.log(sigma_hi), math.log(sigma_lo), num_inference_steps))
        # 5. Convert sigmas and timesteps to float32
        sigmas = sigmas.astype(np.float32)
        # 6. Append the terminal sigma value (inverted: a model that denoises towards sigma = 1, Mochi)
        if invert_sigmas:
            sigmas = (1.0 - sigmas).astype(np.float32)
            self.sigmas = np.concatenate([sigmas, np.ones(1, np.float32)])
        else:
            self.sigmas = np.concatenate([sigmas, np.zeros(1, np.float32)])
        self.timesteps = (sigmas * np.float32(n_train)).astype(np.float32)
        self.init_noise_sigma = 1.0

    def scale_model_input(self, sample: np.ndarray, i: int) -> np.ndarray:
        return sample

    def add_noise(self, original: np.ndarray, noise: np.ndarray, i: int) -> np.ndarray:
        """Forward process to the noise level of call ``i``: sigma noise + (1 - sigma) x0 (diffusers' scale_noise)."""
        return flow_add_noise(self.sigmas[i], original, noise)

    def step(self, model_output: np.ndarray, i: int, sample: np.ndarray, rng: NoiseSource) -> np.ndarray:
        # Upcast to avoid precision issues when computing prev_sample
        sample = sample.astype(np.float32)
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        dt = sigma_next - sigma

        if self.stochastic_sampling:
            x0 = flow_x0(model_output, sample, sigma)
            noise = rng.randn(sample.shape)
            prev_sample = (np.float32(1.0) - sigma_next) * x0 + sigma_next * noise
        else:
            prev_sample = sample + dt * model_output
        return prev_sample.astype(np.float32)
