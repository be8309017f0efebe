"""Ported from diffusers ``schedulers/scheduling_dpmsolver_multistep.py`` (``DPMSolverMultistepScheduler``).

DPM-Solver++ multistep (2M; orders 1-3) of Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of
Diffusion Probabilistic Models" (https://huggingface.co/papers/2211.01095), for ``algorithm_type="dpmsolver++"``
(data prediction, deterministic: no noise is drawn), ``solver_type`` "midpoint" or "heun", ``solver_order``
1, 2 or 3. The registry's ``dpmpp_2m_karras`` is this class with ``use_karras_sigmas=True``.

Flow models (Sana): with ``use_flow_sigmas`` and ``prediction_type="flow_prediction"`` (the registry's
``dpmpp_2m_flow``) the sigmas are flow-matching noise levels shifted by ``flow_shift`` (or by e^mu with
``use_dynamic_shifting``), alpha_t = 1 - sigma and sigma_t = sigma, and x0 = x - sigma v; the solver is the same.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .common import (
    BOOL_OR_NONE,
    OFF,
    NoiseSource,
    alpha_sigma_add_noise,
    alpha_sigma_lambda,
    config_choice,
    final_sigma,
    flow_alpha_sigma_lambda,
    flow_mu,
    flow_x0,
    interpolate_sigmas,
    karras_sigmas,
    multistep_timesteps,
    multistep_use_flow_sigmas,
    predicted_x0,
    sigmas_from_alphas_cumprod,
    sigmas_to_timesteps,
    static_shift,
    training_alphas_cumprod,
)


class DPMSolverPP2M:
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
        self.solver_order = config_choice(config, "solver_order", 2, (1, 2, 3))
        self.prediction_type = config_choice(
            config, "prediction_type", "epsilon", ("epsilon", "v_prediction", "sample", "flow_prediction")
        )
        config_choice(config, "thresholding", False, (False,))
        # diffusers itself maps "deis" to dpmsolver++, and the UniPC/DEIS solver types to midpoint
        algorithm_type = config_choice(config, "algorithm_type", "dpmsolver++", ("dpmsolver++", "deis"))
        solver_type = config_choice(config, "solver_type", "midpoint", ("midpoint", "heun", "logrho", "bh1", "bh2"))
        self.solver_type = "heun" if solver_type == "heun" else "midpoint"
        lower_order_final = bool(config_choice(config, "lower_order_final", True, (True, False)))
        euler_at_final = bool(config_choice(config, "euler_at_final", False, (False, True)))
        use_karras_sigmas = bool(config_choice(config, "use_karras_sigmas", False, BOOL_OR_NONE))
        for key in ("use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas"):
            config_choice(config, key, False, OFF)
        use_flow_sigmas = multistep_use_flow_sigmas(config, self.prediction_type)
        dynamic = bool(config_choice(config, "use_dynamic_shifting", False, BOOL_OR_NONE))
        config_choice(config, "time_shift_type", "exponential", ("exponential",))
        if use_flow_sigmas and use_karras_sigmas:  # diffusers would take VP Karras sigmas as flow ones
            raise ValueError("use_karras_sigmas=True is not supported with use_flow_sigmas=True; use unipc_flow")
        if sigmas is not None:  # diffusers' set_timesteps takes none
            raise ValueError("DPM-Solver++ takes no custom sigmas; use flow_euler or unipc_flow")
        final_sigmas_type = config_choice(config, "final_sigmas_type", "zero", ("zero", "sigma_min"))
        if algorithm_type == "deis" and final_sigmas_type == "zero":  # as diffusers
            raise ValueError("final_sigmas_type='zero' is not supported with algorithm_type='deis'; use 'sigma_min'")
        lambda_min_clipped = float(config.get("lambda_min_clipped", -float("inf")))
        # other values (e.g. DDPM's "fixed_small") are ignored by diffusers too
        self.learned_variance = config.get("variance_type") in ("learned", "learned_range")
        rescale = bool(config_choice(config, "rescale_betas_zero_snr", False, (False, True)))

        # training schedule (DPMSolverMultistepScheduler.__init__)
        acp = training_alphas_cumprod(config, zero_terminal_snr=rescale, finite_first_sigma=True)
        lambda_train = np.log(np.sqrt(acp)) - np.log(np.sqrt(1 - acp))

        # set_timesteps
        # Clipping the minimum of all lambda(t) for numerical stability.
        # This is critical for cosine (squaredcos_cap_v2) noise schedule.
        clipped_idx = int(np.searchsorted(lambda_train[::-1], np.float32(lambda_min_clipped)))
        timesteps = multistep_timesteps(config, num_inference_steps, n_train - clipped_idx)
        sigmas = sigmas_from_alphas_cumprod(acp)
        if use_karras_sigmas:
            log_sigmas = np.log(sigmas)
            sigmas = karras_sigmas(sigmas[::-1].copy(), num_inference_steps, config)
            timesteps = sigmas_to_timesteps(sigmas, log_sigmas)
            if config.get("beta_schedule", "linear") != "squaredcos_cap_v2":
                timesteps = timesteps.round()
            timesteps = timesteps.astype(np.int64)  # torch .to(int64) truncates
        elif use_flow_sigmas:
            flow_shift = float(config.get("flow_shift", 1.0))
            if dynamic:  # flow_shift is set to exp(mu)
                flow_shift = np.exp(flow_mu(config, image_seq_len, mu))
            alphas = np.linspace(1, 1 / n_train, num_inference_steps + 1)
            sigmas = 1.0 - alphas
            sigmas = np.flip(static_shift(flow_shift, sigmas))[:-1].copy()
            timesteps = (sigmas * n_train).astype(np.int64)  # torch .to(int64) truncates
        else:
            sigmas = interpolate_sigmas(timesteps, sigmas)
        self.sigmas = np.concatenate([sigmas, [final_sigma(acp, final_sigmas_type)]]).astype(np.float32)
        self.timesteps = timesteps.astype(np.float32)
        self.init_noise_sigma = 1.0

        # _sigma_to_alpha_sigma_t and lambda of every sigma
        to_alpha_sigma_lambda = flow_alpha_sigma_lambda if use_flow_sigmas else alpha_sigma_lambda
        self.alpha_t, self.sigma_t, self.lambda_t = to_alpha_sigma_lambda(self.sigmas)

        # to improve numerical stability for small number of steps: lower_order_final / lower_order_second, keyed on
        # the call index against the whole schedule (diffusers' step_index and len(timesteps))
        n = len(self.timesteps)
        final_first_order = euler_at_final or (lower_order_final and n < 15) or final_sigmas_type == "zero"
        self._lower_order_final = [i == n - 1 and final_first_order for i in range(n)]
        self._lower_order_second = [i == n - 2 and lower_order_final and n < 15 for i in range(n)]

        # per-generation state: data predictions x0 of the latest steps, oldest first, and the warm-up counter
        # (diffusers' lower_order_nums: steps taken since the loop began, capped at solver_order; an img2img loop
        # that starts at i > 0 warms up from first order again, as diffusers does after set_begin_index)
        self._model_outputs: list[np.ndarray] = []
        self.lower_order_nums = 0

    def scale_model_input(self, sample: np.ndarray, i: int) -> np.ndarray:
        return sample

    def add_noise(self, original: np.ndarray, noise: np.ndarray, i: int) -> np.ndarray:
        """Forward diffusion to the noise level of call ``i``: alpha_t x0 + sigma_t noise at sigmas[i]."""
        return alpha_sigma_add_noise(self.alpha_t[i], self.sigma_t[i], original, noise)

    def _step_order(self, i: int) -> int:
        """Solver order of the step at call ``i`` (diffusers' step()), from the warm-up counter."""
        if self.solver_order == 1 or self.lower_order_nums < 1 or self._lower_order_final[i]:
            return 1
        if self.solver_order == 2 or self.lower_order_nums < 2 or self._lower_order_second[i]:
            return 2
        return 3

    def convert_model_output(self, model_output: np.ndarray, i: int, sample: np.ndarray) -> np.ndarray:
        """DPM-Solver++ needs to solve an integral of the data prediction model: x0."""
        if self.prediction_type == "epsilon" and self.learned_variance:
            model_output = model_output[:, :3]  # learned variance: the first 3 channels are the noise
        if self.prediction_type == "flow_prediction":
            return flow_x0(model_output, sample, self.sigmas[i])
        return predicted_x0(self.prediction_type, model_output, sample, self.alpha_t[i], self.sigma_t[i])

    def step(self, model_output: np.ndarray, i: int, sample: np.ndarray, rng: NoiseSource) -> np.ndarray:
        model_output = self.convert_model_output(model_output, i, sample)
        self._model_outputs = [*self._model_outputs, model_output][-self.solver_order :]
        # Upcast to avoid precision issues when computing prev_sample
        sample = sample.astype(np.float32)
        order = self._step_order(i)
        if order == 1:
            prev_sample = self.dpm_solver_first_order_update(model_output, i, sample)
        elif order == 2:
            prev_sample = self.multistep_dpm_solver_second_order_update(self._model_outputs, i, sample)
        else:
            prev_sample = self.multistep_dpm_solver_third_order_update(self._model_outputs, i, sample)
        if self.lower_order_nums < self.solver_order:
            self.lower_order_nums += 1
        return prev_sample.astype(np.float32)

    def dpm_solver_first_order_update(self, model_output: np.ndarray, i: int, sample: np.ndarray) -> np.ndarray:
        """One step of the first-order DPM-Solver++ (equivalent to DDIM)."""
        alpha_t, sigma_t, sigma_s = self.alpha_t[i + 1], self.sigma_t[i + 1], self.sigma_t[i]
        h = self.lambda_t[i + 1] - self.lambda_t[i]
        return (sigma_t / sigma_s) * sample - (alpha_t * (np.exp(-h) - 1.0)) * model_output

    def multistep_dpm_solver_second_order_update(
        self, model_output_list: list[np.ndarray], i: int, sample: np.ndarray
    ) -> np.ndarray:
        """One step of the second-order multistep DPM-Solver++."""
        alpha_t, sigma_t, sigma_s0 = self.alpha_t[i + 1], self.sigma_t[i + 1], self.sigma_t[i]
        lambda_t, lambda_s0, lambda_s1 = self.lambda_t[i + 1], self.lambda_t[i], self.lambda_t[i - 1]
        m0, m1 = model_output_list[-1], model_output_list[-2]
        h, h_0 = lambda_t - lambda_s0, lambda_s0 - lambda_s1
        with np.errstate(divide="ignore"):  # h = 0 onto a repeated final sigma_min: r0 = inf, D1 = 0
            r0 = h_0 / h
        D0, D1 = m0, (1.0 / r0) * (m0 - m1)
        if self.solver_type == "midpoint":
            # See https://huggingface.co/papers/2211.01095 for detailed derivations
            return (
                (sigma_t / sigma_s0) * sample
                - (alpha_t * (np.exp(-h) - 1.0)) * D0
                - 0.5 * (alpha_t * (np.exp(-h) - 1.0)) * D1
            )
        return (  # heun
            (sigma_t / sigma_s0) * sample
            - (alpha_t * (np.exp(-h) - 1.0)) * D0
            + (alpha_t * ((np.exp(-h) - 1.0) / h + 1.0)) * D1
        )

    def multistep_dpm_solver_third_order_update(
        self, model_output_list: list[np.ndarray], i: int, sample: np.ndarray
    ) -> np.ndarray:
        """One step of the third-order multistep DPM-Solver++."""
        alpha_t, sigma_t, sigma_s0 = self.alpha_t[i + 1], self.sigma_t[i + 1], self.sigma_t[i]
        lambda_t, lambda_s0 = self.lambda_t[i + 1], self.lambda_t[i]
        lambda_s1, lambda_s2 = self.lambda_t[i - 1], self.lambda_t[i - 2]
        m0, m1, m2 = model_output_list[-1], model_output_list[-2], model_output_list[-3]
        h, h_0, h_1 = lambda_t - lambda_s0, lambda_s0 - lambda_s1, lambda_s1 - lambda_s2
        r0, r1 = h_0 / h, h_1 / h
        D0 = m0
        D1_0, D1_1 = (1.0 / r0) * (m0 - m1), (1.0 / r1) * (m1 - m2)
        D1 = D1_0 + (r0 / (r0 + r1)) * (D1_0 - D1_1)
        D2 = (1.0 / (r0 + r1)) * (D1_0 - D1_1)
        # See https://huggingface.co/papers/2206.00927 for detailed derivations
        return (
            (sigma_t / sigma_s0) * sample
            - (alpha_t * (np.exp(-h) - 1.0)) * D0
            + (alpha_t * ((np.exp(-h) - 1.0) / h + 1.0)) * D1
            - (alpha_t * ((np.exp(-h) - 1.0 + h) / h**2 - 0.5)) * D2
        )
