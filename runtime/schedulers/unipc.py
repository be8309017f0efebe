"""Ported from diffusers ``schedulers/scheduling_unipc_multistep.py`` (``UniPCMultistepScheduler``).

UniPC of Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of Diffusion
Models" (https://huggingface.co/papers/2302.04867): UniP predictor and UniC corrector with B(h) "bh1"/"bh2",
data (``predict_x0``) or noise prediction, any ``solver_order``, ``lower_order_final``, ``disable_corrector``.
Deterministic: no noise is drawn.

Flow models: with ``use_flow_sigmas`` and ``prediction_type="flow_prediction"`` (the registry's ``unipc_flow``) the
sigmas are flow-matching noise levels: linspace(1, 1/N) (or the caller's ``sigmas``) shifted by ``flow_shift``, or
at ``mu`` with ``use_dynamic_shifting``, stretched to ``shift_terminal``; or Karras sigmas mapped to
sigma / (1 + sigma). alpha_t = 1 - sigma, sigma_t = sigma, and x0 = x - sigma v; the solver is the same.
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
    TIME_SHIFT_TYPES,
    config_choice,
    custom_flow_sigmas,
    final_sigma,
    flow_alpha_sigma_lambda,
    flow_mu,
    flow_shift_terminal,
    flow_x0,
    interpolate_sigmas,
    karras_sigmas,
    multistep_timesteps,
    multistep_use_flow_sigmas,
    predicted_epsilon,
    predicted_x0,
    sigmas_from_alphas_cumprod,
    shift_flow_sigmas,
    sigmas_to_timesteps,
    training_alphas_cumprod,
)


class UniPC:
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
        self.solver_order = int(config.get("solver_order", 2))
        if self.solver_order < 1:
            raise ValueError(f"solver_order={self.solver_order!r} is not supported; accepted: an int >= 1")
        self.prediction_type = config_choice(
            config, "prediction_type", "epsilon", ("epsilon", "v_prediction", "sample", "flow_prediction")
        )
        config_choice(config, "thresholding", False, (False,))
        self.predict_x0 = bool(config_choice(config, "predict_x0", True, (True, False)))
        # diffusers maps the DPM-Solver/DEIS solver types to bh2
        solver_type = config_choice(config, "solver_type", "bh2", ("bh1", "bh2", "midpoint", "heun", "logrho"))
        self.solver_type = "bh1" if solver_type == "bh1" else "bh2"
        lower_order_final = bool(config_choice(config, "lower_order_final", True, (True, False)))
        self.disable_corrector = [int(k) for k in config.get("disable_corrector", [])]
        config_choice(config, "solver_p", None, (None,))
        use_karras_sigmas = bool(config_choice(config, "use_karras_sigmas", False, BOOL_OR_NONE))
        for key in ("use_exponential_sigmas", "use_beta_sigmas"):
            config_choice(config, key, False, OFF)
        # diffusers: shift_terminal only with use_flow_sigmas
        use_flow_sigmas = multistep_use_flow_sigmas(
            config, self.prediction_type, ("use_dynamic_shifting", "shift_terminal")
        )
        if use_flow_sigmas and not self.predict_x0:  # diffusers: ValueError in its first step
            raise ValueError("prediction_type='flow_prediction' needs predict_x0=True (UniPC integrates a flow's x0)")
        dynamic = bool(config_choice(config, "use_dynamic_shifting", False, BOOL_OR_NONE))
        time_shift_type = config_choice(config, "time_shift_type", "exponential", TIME_SHIFT_TYPES)
        shift_terminal = flow_shift_terminal(config)
        mu = flow_mu(config, image_seq_len, mu) if dynamic else None
        custom_sigmas = sigmas
        if custom_sigmas is not None and (not use_flow_sigmas or use_karras_sigmas):  # diffusers: flow sigmas only
            raise ValueError("custom sigmas need use_flow_sigmas=True without use_karras_sigmas")
        final_sigmas_type = config_choice(config, "final_sigmas_type", "zero", ("zero", "sigma_min"))
        rescale = bool(config_choice(config, "rescale_betas_zero_snr", False, (False, True)))

        # training schedule (UniPCMultistepScheduler.__init__)
        acp = training_alphas_cumprod(config, zero_terminal_snr=rescale, finite_first_sigma=True)

        # set_timesteps
        timesteps = multistep_timesteps(config, num_inference_steps, n_train)
        sigmas = sigmas_from_alphas_cumprod(acp)
        if use_karras_sigmas:
            log_sigmas = np.log(sigmas)
            sigmas = karras_sigmas(sigmas[::-1].copy(), num_inference_steps, config)
            if use_flow_sigmas:
                sigmas = sigmas / (sigmas + 1)
                timesteps = (sigmas * n_train).astype(np.int64)  # torch .to(int64) truncates
            else:
                timesteps = sigmas_to_timesteps(sigmas, log_sigmas).round().astype(np.int64)
            sigma_last = sigmas[-1] if final_sigmas_type == "sigma_min" else 0  # the last Karras sigma
        elif use_flow_sigmas:
            if custom_sigmas is None:
                sigmas = np.linspace(1, 1 / n_train, num_inference_steps + 1)[:-1]
            else:
                sigmas = custom_flow_sigmas(custom_sigmas, num_inference_steps, np.float64)
            sigmas = shift_flow_sigmas(
                sigmas, shift=float(config.get("flow_shift", 1.0)), mu=mu, time_shift_type=time_shift_type,
                shift_terminal=shift_terminal,
            ).copy()
            eps = 1e-6
            if np.fabs(sigmas[0] - 1) < eps:
                # to avoid inf torch.log(alpha_si) in multistep_uni_p_bh_update during first/second update
                sigmas[0] -= eps
            timesteps = (sigmas * n_train).astype(np.int64)  # torch .to(int64) truncates
            sigma_last = sigmas[-1] if final_sigmas_type == "sigma_min" else 0
        else:
            sigmas = interpolate_sigmas(timesteps, sigmas)
            sigma_last = final_sigma(acp, final_sigmas_type)
        self.sigmas = np.concatenate([sigmas, [sigma_last]]).astype(np.float32)
        self.timesteps = timesteps.astype(np.float32)
        self.init_noise_sigma = 1.0

        # _sigma_to_alpha_sigma_t and lambda of every sigma
        to_alpha_sigma_lambda = flow_alpha_sigma_lambda if use_flow_sigmas else alpha_sigma_lambda
        self.alpha_t, self.sigma_t, self.lambda_t = to_alpha_sigma_lambda(self.sigmas)

        # UniP order cap of each step from lower_order_final, keyed on the call index against the whole schedule
        # (diffusers' step_index and len(timesteps)); step() caps it further by the warm-up counter
        n = len(self.timesteps)
        self._order_cap = [
            min(self.solver_order, n - i) if lower_order_final else self.solver_order for i in range(n)
        ]

        # per-generation state: converted model outputs of the latest steps (oldest first), the sample before the
        # last predictor, that predictor's order (the next corrector reuses it), and the warm-up counter (diffusers'
        # lower_order_nums: steps taken since the loop began, capped at solver_order; an img2img loop that starts at
        # i > 0 warms up from first order again, as diffusers does after set_begin_index)
        self._model_outputs: list[np.ndarray] = []
        self._last_sample: np.ndarray | None = None
        self._this_order = 0
        self.lower_order_nums = 0

    def scale_model_input(self, sample: np.ndarray, i: int) -> np.ndarray:
        return sample

    def add_noise(self, original: np.ndarray, noise: np.ndarray, i: int) -> np.ndarray:
        """Forward diffusion to the noise level of call ``i``: alpha_t x0 + sigma_t noise at sigmas[i]."""
        return alpha_sigma_add_noise(self.alpha_t[i], self.sigma_t[i], original, noise)

    def convert_model_output(self, model_output: np.ndarray, i: int, sample: np.ndarray) -> np.ndarray:
        """x0 (``predict_x0``) or epsilon, whichever the solver integrates."""
        if self.prediction_type == "flow_prediction":
            return flow_x0(model_output, sample, self.sigmas[i])
        convert = predicted_x0 if self.predict_x0 else predicted_epsilon
        return convert(self.prediction_type, model_output, sample, self.alpha_t[i], self.sigma_t[i])

    def step(self, model_output: np.ndarray, i: int, sample: np.ndarray, rng: NoiseSource) -> np.ndarray:
        use_corrector = i > 0 and i - 1 not in self.disable_corrector and self._last_sample is not None
        model_output_convert = self.convert_model_output(model_output, i, sample)
        if use_corrector:
            sample = self.multistep_uni_c_bh_update(
                model_output_convert, i, last_sample=self._last_sample, this_sample=sample, order=self._this_order
            )
        self._model_outputs = [*self._model_outputs, model_output_convert][-self.solver_order :]
        self._this_order = min(self._order_cap[i], self.lower_order_nums + 1)  # warmup for multistep
        self._last_sample = sample
        prev_sample = self.multistep_uni_p_bh_update(i, sample, order=self._this_order)
        if self.lower_order_nums < self.solver_order:
            self.lower_order_nums += 1
        return prev_sample.astype(np.float32)

    def _bh_coefficients(self, h: np.float32, rks: list[np.float32], order: int):
        """hh, h*phi_1(hh), B(h), and the matrix R and vector b of the order conditions (shared by UniP and UniC)."""
        rks = np.array([*rks, 1.0], dtype=np.float32)
        hh = -h if self.predict_x0 else h
        h_phi_1 = np.expm1(hh)  # h\phi_1(h) = e^h - 1
        factorial_i = 1
        B_h = hh if self.solver_type == "bh1" else np.expm1(hh)
        R, b = [], []
        with np.errstate(divide="ignore", invalid="ignore"):  # h = 0 (final sigma_min step): NaNs left unused
            h_phi_k = h_phi_1 / hh - 1
            for k in range(1, order + 1):
                R.append(rks ** (k - 1))
                b.append(h_phi_k * factorial_i / B_h)
                factorial_i *= k + 1
                h_phi_k = h_phi_k / hh - 1 / factorial_i
        return h_phi_1, B_h, np.stack(R), np.array(b, dtype=np.float32)

    def multistep_uni_p_bh_update(self, i: int, sample: np.ndarray, order: int) -> np.ndarray:
        """One step of UniP (B(h) version): from sample at sigmas[i] to sigmas[i + 1]."""
        model_output_list = self._model_outputs
        m0 = model_output_list[-1]
        x = sample
        alpha_t, sigma_t, lambda_t = self.alpha_t[i + 1], self.sigma_t[i + 1], self.lambda_t[i + 1]
        alpha_s0, sigma_s0, lambda_s0 = self.alpha_t[i], self.sigma_t[i], self.lambda_t[i]
        h = lambda_t - lambda_s0

        rks, D1s = [], []
        for k in range(1, order):
            mi = model_output_list[-(k + 1)]
            rk = (self.lambda_t[i - k] - lambda_s0) / h
            rks.append(rk)
            D1s.append((mi - m0) / rk)
        h_phi_1, B_h, R, b = self._bh_coefficients(h, rks, order)

        if D1s:
            # for order 2, we use a simplified version
            rhos_p = np.array([0.5], np.float32) if order == 2 else np.linalg.solve(R[:-1, :-1], b[:-1])
            pred_res = sum(rho * d for rho, d in zip(rhos_p, D1s))
        else:
            pred_res = 0
        if self.predict_x0:
            x_t_ = sigma_t / sigma_s0 * x - alpha_t * h_phi_1 * m0
            return x_t_ - alpha_t * B_h * pred_res
        x_t_ = alpha_t / alpha_s0 * x - sigma_t * h_phi_1 * m0
        return x_t_ - sigma_t * B_h * pred_res

    def multistep_uni_c_bh_update(
        self, this_model_output: np.ndarray, i: int, last_sample: np.ndarray, this_sample: np.ndarray, order: int
    ) -> np.ndarray:
        """One step of UniC (B(h) version): corrects ``this_sample`` (at sigmas[i]), predicted from
        ``last_sample`` (at sigmas[i - 1]), with the model output at ``this_sample``."""
        model_output_list = self._model_outputs
        m0 = model_output_list[-1]
        x = last_sample
        model_t = this_model_output
        alpha_t, sigma_t, lambda_t = self.alpha_t[i], self.sigma_t[i], self.lambda_t[i]
        alpha_s0, sigma_s0, lambda_s0 = self.alpha_t[i - 1], self.sigma_t[i - 1], self.lambda_t[i - 1]
        h = lambda_t - lambda_s0

        rks, D1s = [], []
        for k in range(1, order):
            mi = model_output_list[-(k + 1)]
            rk = (self.lambda_t[i - (k + 1)] - lambda_s0) / h
            rks.append(rk)
            D1s.append((mi - m0) / rk)
        h_phi_1, B_h, R, b = self._bh_coefficients(h, rks, order)

        # for order 1, we use a simplified version
        rhos_c = np.array([0.5], np.float32) if order == 1 else np.linalg.solve(R, b)
        corr_res = sum(rho * d for rho, d in zip(rhos_c[:-1], D1s)) if D1s else 0
        D1_t = model_t - m0
        if self.predict_x0:
            x_t_ = sigma_t / sigma_s0 * x - alpha_t * h_phi_1 * m0
            return x_t_ - alpha_t * B_h * (corr_res + rhos_c[-1] * D1_t)
        x_t_ = alpha_t / alpha_s0 * x - sigma_t * h_phi_1 * m0
        return x_t_ - sigma_t * B_h * (corr_res + rhos_c[-1] * D1_t)
