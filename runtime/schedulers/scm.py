"""Ported from diffusers ``schedulers/scheduling_scm.py`` (``SCMScheduler``), with the TrigFlow transforms that
``pipelines/sana/pipeline_sana_sprint.py`` (``SanaSprintPipeline``) applies around it.

sCM of Lu & Song 2024, "Simplifying, Stabilizing and Scaling Continuous-Time Consistency Models"
(https://huggingface.co/papers/2410.11081), as Sana-Sprint samples it in 1-4 steps: TrigFlow
x_t = cos(t) x0 + sin(t) z with t in [0, pi/2] and z ~ N(0, sigma_data^2), each step predicting x0 and re-noising it
to the next t with fresh noise (drawn at every step, the last one too, where sin(0) = 0 cancels it).

Where diffusers splits the work between the scheduler and the pipeline, this port keeps it here, so that the loop
is the same as for every other scheduler:

* the sample is the VAE's latent, x_t / sigma_data (the pipeline's ``latents / sigma_data``; its final
  ``denoised / sigma_data`` is the last step's output), so ``init_noise_sigma`` is 1 and the x_t below is
  ``sigma_data`` times it (exact for Sana-Sprint's sigma_data = 0.5, a power of two);
* ``timesteps`` are what the transformer is fed: s = sin(t) / (cos(t) + sin(t)) of the TrigFlow t;
* ``scale_model_input`` is the pipeline's x_t / sigma_data * sqrt(s^2 + (1 - s)^2), and ``step`` turns the raw
  model output into TrigFlow's velocity as the pipeline does before calling diffusers' ``step``.

The schedule: ``max_timesteps`` (1.5708, about pi/2) to 0 in equal steps, or at 2 steps through
``intermediate_timesteps`` (1.3, Sana-Sprint's default, which diffusers accepts at 2 steps only). Both are call
options of diffusers' ``set_timesteps``; here they are read from the config, an absent ``intermediate_timesteps``
meaning 1.3 at 2 steps and none otherwise.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .common import NoiseSource, config_choice, linspace_f32


def _positive_number(config: dict[str, Any], key: str, default: float) -> float:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"{key}={value!r:.40} is not supported; accepted: a positive number")
    return float(value)


class SCM:
    order = 1

    def __init__(self, config: dict[str, Any], num_inference_steps: int):
        n_train = int(config.get("num_train_timesteps", 1000))
        config_choice(config, "prediction_type", "trigflow", ("trigflow",))
        self.sigma_data = np.float32(_positive_number(config, "sigma_data", 0.5))
        max_timesteps = _positive_number(config, "max_timesteps", 1.57080)
        intermediate = config.get("intermediate_timesteps", 1.3 if num_inference_steps == 2 else None)
        if intermediate is not None:
            intermediate = _positive_number(config, "intermediate_timesteps", 1.3)
            if num_inference_steps != 2:  # as diffusers
                raise ValueError(
                    f"intermediate_timesteps={intermediate!r} is supported at 2 steps only, not "
                    f"{num_inference_steps}; leave it unset (None) for an even schedule"
                )
        if num_inference_steps > n_train:  # as diffusers
            raise ValueError(f"SCM takes at most num_train_timesteps={n_train} steps, not {num_inference_steps}")

        # set_timesteps: TrigFlow times t, float32, ending at t = 0 (clean)
        if intermediate is not None:
            self.trig_t = np.array([max_timesteps, intermediate, 0], dtype=np.float32)
        else:
            # max_timesteps=arctan(80/0.5)=1.56454 is the default from sCM paper, we choose a different value here
            self.trig_t = linspace_f32(max_timesteps, 0, num_inference_steps + 1)
        self.cos_t, self.sin_t = np.cos(self.trig_t), np.sin(self.trig_t)

        # SanaSprintPipeline: the transformer's timestep s and its input scale sqrt(s^2 + (1 - s)^2), per call
        s = (self.sin_t / (self.cos_t + self.sin_t))[:-1]
        self.timesteps = s.astype(np.float32)
        self.c_in = np.sqrt(s**2 + (1 - s) ** 2)
        self.init_noise_sigma = 1.0

    def scale_model_input(self, sample: np.ndarray, i: int) -> np.ndarray:
        latents = sample * self.sigma_data  # x_t, the TrigFlow sample
        return ((latents / self.sigma_data) * self.c_in[i]).astype(np.float32)

    def add_noise(self, original: np.ndarray, noise: np.ndarray, i: int) -> np.ndarray:
        """TrigFlow's forward process to t_i, in latent units (SanaSprintImg2ImgPipeline.prepare_latents):
        (cos(t) x0 sigma_data + sin(t) noise sigma_data) / sigma_data."""
        image_latents = np.asarray(original, dtype=np.float32) * self.sigma_data
        noise = np.asarray(noise, dtype=np.float32) * self.sigma_data
        latents = self.cos_t[i] * image_latents + self.sin_t[i] * noise
        return (latents / self.sigma_data).astype(np.float32)

    def step(self, model_output: np.ndarray, i: int, sample: np.ndarray, rng: NoiseSource) -> np.ndarray:
        latents = sample.astype(np.float32) * self.sigma_data  # x_t
        s, c_in = self.timesteps[i], self.c_in[i]
        # SanaSprintPipeline: the model's output as TrigFlow's velocity
        latent_model_input = (latents / self.sigma_data) * c_in
        noise_pred = ((1 - 2 * s) * latent_model_input + (1 - 2 * s + 2 * s**2) * model_output) / c_in
        noise_pred = noise_pred.astype(np.float32) * self.sigma_data

        # 4. Different Parameterization: trigflow
        pred_x0 = self.cos_t[i] * latents - self.sin_t[i] * noise_pred

        # 5. Sample z ~ N(0, I), For MultiStep Inference
        noise = rng.randn(model_output.shape) * self.sigma_data
        prev_sample = self.cos_t[i + 1] * pred_x0 + self.sin_t[i + 1] * noise
        return (prev_sample / self.sigma_data).astype(np.float32)
