"""What every scheduler shares: the interface, the training noise schedule and the small pure
functions the ports have in common.

A scheduler is built for one generation: ``make(config, num_inference_steps)``
precomputes every table in numpy; the pipeline then calls, for
``i, t in enumerate(s.timesteps)``::

    x_in = s.scale_model_input(latents, i)
    eps_or_v = unet(x_in, t, ...)
    latents = s.step(eps_or_v, i, latents, rng)

Image-to-image starts the same loop part-way: ``latents = s.add_noise(x0, noise, start)``
noises the clean latents to the level of UNet call ``start``, then the loop runs
``for i in range(start, len(s.timesteps))`` (diffusers' ``set_begin_index(start)``).
Warm-up state (multistep histories, PNDM's counter, DPM-Solver/UniPC's lower-order
counters, Heun's pending half-step) counts the steps taken since the loop began, as
diffusers does, so any ``start`` reproduces diffusers (LMS, like diffusers, takes its
order from the index while using only the derivatives it has gathered).

``config`` is the checkpoint's ``scheduler_config.json`` (as diffusers wrote it);
each scheduler reads the keys it knows with its own defaults for missing ones,
which is what diffusers' ``XScheduler.from_config(config)`` does.

Two parameterisations of the noise level appear below, as in diffusers:

* DDPM / "variance preserving": x_t = alpha_t x0 + sigma_t eps with alpha_t = sqrt(alpha_bar_t),
  sigma_t = sqrt(1 - alpha_bar_t) (DDIM, PNDM, LCM, and DPM-Solver / UniPC's alpha_t, sigma_t tables);
* k-diffusion / "variance exploding": x = x0 + sigma eps with sigma = sqrt((1 - alpha_bar) / alpha_bar),
  the UNet seeing x / sqrt(sigma^2 + 1) (Euler, Euler a, Heun, LMS; Karras et al. 2022).

and two for the transformer denoisers, whose models predict a velocity rather than the noise:

* flow matching: x = (1 - sigma) x0 + sigma eps with sigma in [0, 1] (FlowMatchEuler, and DPM-Solver / UniPC with
  ``use_flow_sigmas``, whose alpha_t, sigma_t tables are then 1 - sigma and sigma); see the flow section below;
* TrigFlow: x = cos(t) x0 + sin(t) eps with t in [0, pi/2] (SCM, Sana-Sprint), in scm.py.

Every function keeps diffusers' float32 / float64 operation order: the ports are bit-for-bit what they were
when each computed these values itself.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import numpy as np

# --- the interface ---


class NoiseSource(Protocol):
    """The pipeline's random stream (see ``edgediff.runtime.rng``)."""

    def randn(self, shape: tuple[int, ...]) -> np.ndarray: ...


class Scheduler(Protocol):
    """Interface every scheduler satisfies (structural: no base class needed).

    Set by ``__init__(config, num_inference_steps)``:
      timesteps:        float array, one entry per UNet call, in call order
      init_noise_sigma: scale of the initial Gaussian latents
      order:            UNet calls per solver step (2 for Heun), for progress bars
                        and for img2img's start index (diffusers' ``t_start * order``)

    The loop may start at any index ``start`` (img2img / inpainting, after
    ``add_noise(x0, noise, start)``) and must then call ``step`` for every index
    ``start, start + 1, ..., len(timesteps) - 1`` in order, on a freshly built
    scheduler: the result equals diffusers' after ``set_begin_index(start)``.
    """

    timesteps: np.ndarray
    init_noise_sigma: float
    order: int

    def scale_model_input(self, sample: np.ndarray, i: int) -> np.ndarray:
        """Input scaling before the UNet call at index ``i``."""
        ...

    def step(self, model_output: np.ndarray, i: int, sample: np.ndarray, rng: NoiseSource) -> np.ndarray:
        """Advance ``sample`` past UNet call ``i`` given the (guided) model output."""
        ...

    def add_noise(self, original: np.ndarray, noise: np.ndarray, i: int) -> np.ndarray:
        """Forward diffusion of a clean latent to the noise level of UNet call ``i``, float32: diffusers'
        ``add_noise(original, noise, timesteps[i:i + 1])`` after ``set_begin_index(i)`` (or, once the
        loop has stepped through call ``i - 1``, at its current step index, as for inpainting)."""
        ...


# --- reading the config ---

TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")  # Table 2 of Lin et al. 2023
BOOL_OR_NONE = (False, True, None)  # a flag we implement; diffusers saves an unset flag as None
OFF = (False, None)  # a flag we do not implement: accepted only when off


def config_choice(config: dict[str, Any], key: str, default: Any, accepted: tuple[Any, ...]) -> Any:
    """``config.get(key, default)``, or ValueError naming the key, the value and what is accepted."""
    value = config.get(key, default)
    if not any(value is a or (type(value) is type(a) and value == a) for a in accepted):
        raise ValueError(f"{key}={value!r} is not supported; accepted: {', '.join(repr(a) for a in accepted)}")
    return value


# --- the training noise schedule (the schedulers' ``__init__``) ---


def betas_for_alpha_bar(num_diffusion_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """The "squaredcos_cap_v2" schedule (Nichol & Dhariwal, improved DDPM)."""

    def alpha_bar(t: float) -> float:
        return float(np.cos((t + 0.008) / 1.008 * np.pi / 2) ** 2)

    betas = [
        min(1 - alpha_bar((i + 1) / num_diffusion_timesteps) / alpha_bar(i / num_diffusion_timesteps), max_beta)
        for i in range(num_diffusion_timesteps)
    ]
    return np.asarray(betas, dtype=np.float32)


def linspace_f32(start: float, end: float, n: int) -> np.ndarray:
    """``torch.linspace(start, end, n, dtype=torch.float32)`` on the CPU, bit for bit: a float32 step, the first
    half counted up from ``start`` and the rest down from ``end``, each value one fused multiply-add (emulated in
    float64, where the product is exact). ``np.linspace`` rounds differently in about a third of the values."""
    start32, end32 = np.float32(start), np.float32(end)
    if n == 1:
        return np.array([start32], dtype=np.float32)
    step = np.float32((end32 - start32) / np.float32(n - 1))
    idx = np.arange(n, dtype=np.float64)
    half = n // 2
    low = np.float64(start32) + np.float64(step) * idx[:half]
    high = np.float64(end32) - np.float64(step) * (n - 1 - idx[half:])
    return np.concatenate([low, high]).astype(np.float32)


def train_betas(config: dict[str, Any]) -> np.ndarray:
    """Betas of the training schedule, in float32 as diffusers computes them."""
    n = int(config.get("num_train_timesteps", 1000))
    trained = config.get("trained_betas")
    if trained is not None:
        return np.asarray(trained, dtype=np.float32)
    schedule = config.get("beta_schedule", "linear")
    start = float(config.get("beta_start", 0.0001))
    end = float(config.get("beta_end", 0.02))
    if schedule == "linear":
        return linspace_f32(start, end, n)
    if schedule == "scaled_linear":
        return (linspace_f32(start**0.5, end**0.5, n) ** 2).astype(np.float32)
    if schedule == "squaredcos_cap_v2":
        return betas_for_alpha_bar(n)
    raise ValueError(
        f"beta_schedule {schedule!r} is not supported; accepted: linear, scaled_linear, squaredcos_cap_v2"
    )


def alphas_cumprod(config: dict[str, Any], betas: np.ndarray | None = None) -> np.ndarray:
    """Cumulative product of (1 - beta) for the config's betas (or ``betas``), float32 like
    diffusers' torch.cumprod on float32, which on the CPU accumulates in double."""
    alphas = (1.0 - (train_betas(config) if betas is None else betas)).astype(np.float32)
    return np.cumprod(alphas.astype(np.float64)).astype(np.float32)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Lin et al. 2023, Algorithm 1: rescale betas to zero terminal SNR."""
    # torch's CPU cumprod accumulates in double
    alphas_bar_sqrt = np.sqrt(np.cumprod((1.0 - betas).astype(np.float64)).astype(np.float32))
    first, last = alphas_bar_sqrt[0].copy(), alphas_bar_sqrt[-1].copy()
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * (first / (first - last))  # diffusers' operation order
    alphas_bar = alphas_bar_sqrt**2
    alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return (1 - alphas).astype(np.float32)


def training_alphas_cumprod(
    config: dict[str, Any], *, zero_terminal_snr: bool, finite_first_sigma: bool = False
) -> np.ndarray:
    """alphas_cumprod of the config's betas, first rescaled to zero terminal SNR when ``zero_terminal_snr``
    (the config's ``rescale_betas_zero_snr``). With ``finite_first_sigma`` (Euler, Euler a, DPM-Solver, UniPC)
    a rescaled schedule ends at alpha_bar = 2**-24 instead of 0, as diffusers sets it, so that the first
    sigma = sqrt((1 - alpha_bar) / alpha_bar) is not inf; DDIM and LCM keep the 0."""
    betas = train_betas(config)
    # Rescale for zero SNR
    if zero_terminal_snr:
        betas = rescale_zero_terminal_snr(betas)
    acp = alphas_cumprod(config, betas)
    if zero_terminal_snr and finite_first_sigma:
        # Close to 0 without being 0 so first sigma is not inf
        acp[-1] = 2**-24
    return acp


def final_alpha_cumprod(config: dict[str, Any], acp: np.ndarray, set_alpha_to_one_default: bool) -> np.floating:
    """alpha_bar "before" timestep 0, for the final step, where there is no previous alphas_cumprod:
    ``set_alpha_to_one`` decides whether it is 1 or the alphas_cumprod of step 0 (DDIM, PNDM, LCM)."""
    return np.float32(1.0) if config.get("set_alpha_to_one", set_alpha_to_one_default) else acp[0]


def alphas_cumprod_at(acp: np.ndarray, timesteps: np.ndarray, final: np.floating) -> np.ndarray:
    """float32 alphas_cumprod at each integer timestep, or ``final`` where it is negative (a "previous
    timestep" past the end of the schedule; DDIM's and LCM's ``alpha_prod_t_prev``)."""
    return np.where(timesteps >= 0, acp[np.maximum(timesteps, 0)], final).astype(np.float32)


# --- inference timesteps (``set_timesteps``) ---


def discrete_timesteps(config: dict[str, Any], num_inference_steps: int) -> np.ndarray:
    """Float32 timesteps of Euler/Heun/LMS ``set_timesteps`` ("linspace", "leading", "trailing"),
    Table 2 of Lin et al. 2023 (https://huggingface.co/papers/2305.08891)."""
    n_train = int(config.get("num_train_timesteps", 1000))
    spacing = config_choice(config, "timestep_spacing", "linspace", TIMESTEP_SPACINGS)
    if spacing == "linspace":
        return np.linspace(0, n_train - 1, num_inference_steps, dtype=np.float32)[::-1].copy()
    if spacing == "leading":
        step_ratio = n_train // num_inference_steps
        timesteps = (np.arange(0, num_inference_steps) * step_ratio).round()[::-1].copy().astype(np.float32)
        return timesteps + np.float32(config.get("steps_offset", 0))
    step_ratio = n_train / num_inference_steps
    return np.arange(n_train, 0, -step_ratio).round().astype(np.float32) - np.float32(1)


def multistep_timesteps(config: dict[str, Any], num_inference_steps: int, last_timestep: int) -> np.ndarray:
    """Int64 timesteps of DPMSolverMultistep/UniPC ``set_timesteps``; ``last_timestep`` is
    ``num_train_timesteps`` unless DPM-Solver's ``lambda_min_clipped`` cuts the schedule."""
    n_train = int(config.get("num_train_timesteps", 1000))
    n = num_inference_steps
    spacing = config_choice(config, "timestep_spacing", "linspace", TIMESTEP_SPACINGS)
    if spacing == "linspace":
        return np.linspace(0, last_timestep - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
    if spacing == "leading":
        step_ratio = last_timestep // (n + 1)
        timesteps = (np.arange(0, n + 1) * step_ratio).round()[::-1][:-1].copy().astype(np.int64)
        return timesteps + int(config.get("steps_offset", 0))
    step_ratio = n_train / n
    return np.arange(last_timestep, 0, -step_ratio).round().copy().astype(np.int64) - 1


# --- k-diffusion sigmas: Euler, Euler a, Heun, LMS (and DPM-Solver / UniPC's sigma tables) ---


def sigmas_from_alphas_cumprod(acp: np.ndarray) -> np.ndarray:
    """Noise level sigma = sqrt((1 - alpha_bar) / alpha_bar) of every training timestep."""
    return ((1 - acp) / acp) ** 0.5


def interpolate_sigmas(timesteps: np.ndarray, train_sigmas: np.ndarray) -> np.ndarray:
    """float64 sigmas at (possibly fractional) ``timesteps``, linear in the training timestep."""
    return np.interp(timesteps, np.arange(0, len(train_sigmas)), train_sigmas)


def sigma_to_t(sigma: np.ndarray | float, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timestep of ``sigma``: linear interpolation in log sigma (diffusers' ``_sigma_to_t``)."""
    sigma = np.asarray(sigma)
    # get log sigma
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    # get distribution
    dists = log_sigma - log_sigmas[:, np.newaxis]
    # get sigmas range
    low_idx = np.cumsum((dists >= 0), axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low = log_sigmas[low_idx]
    high = log_sigmas[high_idx]
    # interpolate sigmas
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    # transform interpolation to time range
    t = (1 - w) * low_idx + w * high_idx
    return t.reshape(sigma.shape)


def sigmas_to_timesteps(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timestep of each sigma, one at a time as diffusers does
    (``np.array([self._sigma_to_t(sigma, log_sigmas) for sigma in sigmas])``)."""
    return np.array([sigma_to_t(sigma, log_sigmas) for sigma in sigmas])


def karras_sigmas(in_sigmas: np.ndarray, num_inference_steps: int, config: dict[str, Any]) -> np.ndarray:
    """Karras et al. 2022 (EDM, https://huggingface.co/papers/2206.00364) rho=7 noise levels, float64, from
    ``config["sigma_max"]``/``["sigma_min"]`` or else ``in_sigmas[0]``/``[-1]`` (diffusers' ``_convert_to_karras``;
    diffusers reads those keys even where they are only "hidden" config from another scheduler class)."""
    sigma_min = config.get("sigma_min")
    sigma_max = config.get("sigma_max")
    sigma_min = sigma_min if sigma_min is not None else float(in_sigmas[-1])
    sigma_max = sigma_max if sigma_max is not None else float(in_sigmas[0])
    rho = 7.0  # 7.0 is the value used in the paper
    ramp = np.linspace(0, 1, num_inference_steps)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def discrete_sigma_schedule(
    config: dict[str, Any],
    acp: np.ndarray,
    num_inference_steps: int,
    use_karras_sigmas: bool,
    karras_bounds_from_config: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Timesteps and their sigmas (without the final sigma) of Euler / Euler a / Heun / LMS ``set_timesteps``:
    the training sigmas interpolated at ``discrete_timesteps``, or with ``use_karras_sigmas`` the Karras
    sigmas and their fractional timesteps. ``karras_bounds_from_config`` False: the Karras sigmas span the
    interpolated ones whatever ``sigma_min`` / ``sigma_max`` say (LMS's ``_convert_to_karras``)."""
    timesteps = discrete_timesteps(config, num_inference_steps)
    train_sigmas = sigmas_from_alphas_cumprod(acp)
    log_sigmas = np.log(train_sigmas)
    sigmas = interpolate_sigmas(timesteps, train_sigmas)
    if use_karras_sigmas:
        sigmas = karras_sigmas(sigmas, num_inference_steps, config if karras_bounds_from_config else {})
        timesteps = sigmas_to_timesteps(sigmas, log_sigmas)
    return timesteps, sigmas


def final_sigma(acp: np.ndarray, final_sigmas_type: str) -> np.floating | int:
    """The sigma after the last step (``final_sigmas_type``): 0 ("zero"), or the smallest training sigma
    ("sigma_min")."""
    return ((1 - acp[0]) / acp[0]) ** 0.5 if final_sigmas_type == "sigma_min" else 0


def sigma_init_noise_sigma(sigmas: np.ndarray, config: dict[str, Any]) -> float:
    """Standard deviation of the initial noise (k-diffusion schedulers' ``init_noise_sigma``): the largest
    sigma for "linspace" / "trailing" timestep spacing, else sqrt(max_sigma**2 + 1)."""
    max_sigma = sigmas.max()
    if config.get("timestep_spacing", "linspace") in ("linspace", "trailing"):
        return float(max_sigma)
    return float((max_sigma**2 + 1) ** 0.5)


def sigma_scale_model_input(sample: np.ndarray, sigma: np.floating) -> np.ndarray:
    """The UNet's input at noise level sigma, float32: sample / sqrt(sigma**2 + 1) (k-diffusion's c_in,
    the schedulers' ``scale_model_input``)."""
    return (sample / ((sigma**2 + 1) ** 0.5)).astype(np.float32)


def predicted_x0_from_sigma(
    prediction_type: str, model_output: np.ndarray, sample: np.ndarray, sigma: np.floating
) -> np.ndarray:
    """Predicted original sample (x_0) from the model output at noise level sigma (k-diffusion's
    denoised = model_output * c_out + input * c_skip); "sample" / "original_sample" is x_0 itself."""
    if prediction_type == "epsilon":
        return sample - sigma * model_output
    if prediction_type == "v_prediction":
        return model_output * (-sigma / (sigma**2 + 1) ** 0.5) + (sample / (sigma**2 + 1))
    return model_output


# --- alpha_t, sigma_t: DDIM, PNDM, LCM, DPM-Solver, UniPC ---


def alpha_sigma_lambda(sigmas: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """alpha_t = 1 / sqrt(sigma**2 + 1) and sigma_t = sigma * alpha_t of every k-diffusion sigma (diffusers'
    ``_sigma_to_alpha_sigma_t``), and the half log-SNR lambda_t = log(alpha_t) - log(sigma_t), float32;
    sigma = 0 gives lambda = inf (DPM-Solver, UniPC)."""
    alpha_t = (1 / ((sigmas**2 + 1) ** 0.5)).astype(np.float32)
    sigma_t = sigmas * alpha_t
    with np.errstate(divide="ignore"):
        lambda_t = np.log(alpha_t) - np.log(sigma_t)
    return alpha_t, sigma_t, lambda_t


def predicted_x0(
    prediction_type: str, model_output: np.ndarray, sample: np.ndarray, alpha_t: np.floating, sigma_t: np.floating
) -> np.ndarray:
    """Predicted original sample (x_0, "data prediction") of x_t = alpha_t x_0 + sigma_t eps from an
    epsilon, v or x_0 ("sample") model output (formula (12) of the DDIM paper; DPM-Solver++'s and UniPC's
    ``convert_model_output``)."""
    if prediction_type == "epsilon":
        return (sample - sigma_t * model_output) / alpha_t
    if prediction_type == "sample":
        return model_output
    return alpha_t * sample - sigma_t * model_output  # v_prediction


def predicted_epsilon(
    prediction_type: str, model_output: np.ndarray, sample: np.ndarray, alpha_t: np.floating, sigma_t: np.floating
) -> np.ndarray:
    """Predicted noise (epsilon, "noise prediction") of x_t = alpha_t x_0 + sigma_t eps from an epsilon, v
    or x_0 ("sample") model output (DDIM's ``pred_epsilon``, PNDM's v conversion, UniPC without predict_x0)."""
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "sample":
        return (sample - alpha_t * model_output) / sigma_t
    return alpha_t * model_output + sigma_t * sample  # v_prediction


# --- forward diffusion (``add_noise``) ---


def alpha_sigma_add_noise(
    alpha_t: np.floating, sigma_t: np.floating, original: np.ndarray, noise: np.ndarray
) -> np.ndarray:
    """alpha_t * x0 + sigma_t * noise in float32 (DPM-Solver / UniPC ``add_noise``)."""
    original = np.asarray(original, dtype=np.float32)
    noise = np.asarray(noise, dtype=np.float32)
    return (alpha_t * original + sigma_t * noise).astype(np.float32, copy=False)


def ddpm_add_noise(alpha_prod: np.floating, original: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """sqrt(alpha_bar) * x0 + sqrt(1 - alpha_bar) * noise in float32 (DDPM/DDIM/PNDM/LCM ``add_noise``)."""
    alpha_prod = np.float32(alpha_prod)
    return alpha_sigma_add_noise(np.sqrt(alpha_prod), np.sqrt(np.float32(1) - alpha_prod), original, noise)


def sigma_add_noise(sigma: np.floating, original: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """x0 + noise * sigma in float32 (the k-diffusion schedulers' ``add_noise``: Euler, Heun, LMS)."""
    original = np.asarray(original, dtype=np.float32)
    noise = np.asarray(noise, dtype=np.float32)
    return (original + noise * np.float32(sigma)).astype(np.float32, copy=False)


# --- flow matching: SD3 / SD3.5, FLUX, Sana (FlowMatchEuler, and DPM-Solver / UniPC with use_flow_sigmas) ---
#
# A flow model (rectified flow, Liu et al. 2022; Esser et al. 2024, https://huggingface.co/papers/2403.03206) sees
# x_sigma = (1 - sigma) x0 + sigma eps, sigma in [0, 1], and predicts the velocity v = eps - x0; its timestep is
# sigma * num_train_timesteps. The schedule is shifted towards high noise, statically (``shift`` / ``flow_shift``)
# or by the image's size (``use_dynamic_shifting``: ``mu`` from the number of image tokens the transformer sees).

TIME_SHIFT_TYPES = ("exponential", "linear")


def calculate_shift(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """FLUX.1's mu: linear in the image sequence length, ``base_shift`` at ``base_seq_len`` tokens and ``max_shift``
    at ``max_seq_len`` (diffusers ``pipelines/flux/pipeline_flux.py`` ``calculate_shift``)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    mu = image_seq_len * m + b
    return mu


def empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """FLUX.2's mu, fitted to the image sequence length and the number of steps (diffusers
    ``pipelines/flux2/pipeline_flux2.py`` ``compute_empirical_mu``); its family passes it as ``mu``."""
    a1, b1 = 8.73809524e-05, 1.89833333
    a2, b2 = 0.00016927, 0.45666666

    if image_seq_len > 4300:
        mu = a2 * image_seq_len + b2
        return float(mu)

    m_200 = a2 * image_seq_len + b2
    m_10 = a1 * image_seq_len + b1

    a = (m_200 - m_10) / 190.0
    b = m_200 - 200.0 * a
    mu = a * num_steps + b

    return float(mu)


def flow_mu(config: dict[str, Any], image_seq_len: int | None, mu: float | None) -> float:
    """The dynamic shift's mu: ``mu`` when given (FLUX.2 passes ``empirical_mu``), else ``calculate_shift`` of the
    image sequence length with the config's ``base_image_seq_len``, ``max_image_seq_len``, ``base_shift`` and
    ``max_shift`` (FluxPipeline's and StableDiffusion3Pipeline's call, with their defaults 256, 4096, 0.5, 1.15)."""
    if mu is not None:
        return float(mu)
    if image_seq_len is None:
        raise ValueError(
            "use_dynamic_shifting=True shifts the schedule by the image size: pass image_seq_len (the number of "
            "image tokens the transformer sees) or mu"
        )
    return calculate_shift(
        image_seq_len,
        config.get("base_image_seq_len", 256),
        config.get("max_image_seq_len", 4096),
        config.get("base_shift", 0.5),
        config.get("max_shift", 1.15),
    )


def static_shift(shift: float, sigmas: np.ndarray) -> np.ndarray:
    """SD3's timestep shift sigma' = shift sigma / (1 + (shift - 1) sigma), in the dtype of ``sigmas``."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def time_shift(time_shift_type: str, mu: float, sigmas: np.ndarray) -> np.ndarray:
    """The resolution-dependent shift at mu, in the dtype of ``sigmas``: "exponential" e^mu / (e^mu + (1/t - 1)),
    "linear" mu / (mu + (1/t - 1)) (diffusers' ``time_shift`` with its exponent sigma = 1.0)."""
    with np.errstate(divide="ignore"):  # t = 0 gives 1/t = inf and a shifted 0, as in diffusers
        if time_shift_type == "exponential":
            return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1) ** 1.0)
        return mu / (mu + (1 / sigmas - 1) ** 1.0)


def stretch_shift_to_terminal(sigmas: np.ndarray, shift_terminal: float) -> np.ndarray:
    """Stretch the shifted schedule so that it ends at ``shift_terminal`` (LTX-Video's rf.py; diffusers'
    ``stretch_shift_to_terminal``)."""
    one_minus_z = 1 - sigmas
    scale_factor = one_minus_z[-1] / (1 - shift_terminal)
    stretched_t = 1 - (one_minus_z / scale_factor)
    return stretched_t


def shift_flow_sigmas(
    sigmas: np.ndarray, *, shift: float, mu: float | None, time_shift_type: str, shift_terminal: float | None
) -> np.ndarray:
    """Steps 2 and 3 of FlowMatchEuler's (and UniPC's flow) ``set_timesteps``: the dynamic shift at ``mu`` when
    given, else the static ``shift``; then the stretch to ``shift_terminal`` when set."""
    # 2. Perform timestep shifting. Either no shifting is applied, or resolution-dependent shifting of
    #    "exponential" or "linear" type is applied
    if mu is not None:
        sigmas = time_shift(time_shift_type, mu, sigmas)
    else:
        sigmas = static_shift(shift, sigmas)
    # 3. If required, stretch the sigmas schedule to terminate at the configured `shift_terminal` value
    if shift_terminal:
        sigmas = stretch_shift_to_terminal(sigmas, shift_terminal)
    return sigmas


def custom_flow_sigmas(sigmas: Any, num_inference_steps: int, dtype: type) -> np.ndarray:
    """The caller's sigmas (FluxPipeline passes linspace(1, 1/N, N)) as a 1-D array of ``dtype``, one per step,
    each finite and in (0, 1]; ValueError saying what is wrong otherwise."""
    try:
        out = np.asarray(sigmas, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"sigmas must be a list of numbers, one per step: {e}") from e
    if out.ndim != 1 or len(out) != num_inference_steps:
        raise ValueError(f"sigmas must hold one value per step ({num_inference_steps}), got shape {out.shape}")
    if not (np.isfinite(out).all() and (out > 0).all() and (out <= 1).all()):
        raise ValueError("sigmas must each be in (0, 1] (a flow model's noise levels)")
    return np.asarray(sigmas, dtype=dtype)


def flow_alpha_sigma_lambda(sigmas: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """alpha_t = 1 - sigma and sigma_t = sigma of every flow sigma (diffusers' ``_sigma_to_alpha_sigma_t`` with
    ``use_flow_sigmas``), and the half log-SNR lambda_t = log(alpha_t) - log(sigma_t), float32; sigma = 0 gives
    lambda = inf (DPM-Solver, UniPC)."""
    sigmas = sigmas.astype(np.float32)
    alpha_t = (1 - sigmas).astype(np.float32)
    sigma_t = sigmas
    with np.errstate(divide="ignore"):
        lambda_t = np.log(alpha_t) - np.log(sigma_t)
    return alpha_t, sigma_t, lambda_t


def flow_x0(model_output: np.ndarray, sample: np.ndarray, sigma: np.floating) -> np.ndarray:
    """Predicted original sample x0 = x_sigma - sigma v of a flow (velocity) prediction ("flow_prediction")."""
    return sample - sigma * model_output


def flow_add_noise(sigma: np.floating, original: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """sigma * noise + (1 - sigma) * x0 in float32 (FlowMatchEuler's ``scale_noise``, the flow forward process)."""
    original = np.asarray(original, dtype=np.float32)
    noise = np.asarray(noise, dtype=np.float32)
    sigma = np.float32(sigma)
    return (sigma * noise + (np.float32(1.0) - sigma) * original).astype(np.float32, copy=False)


def flow_shift_terminal(config: dict[str, Any]) -> float | None:
    """The config's ``shift_terminal``: None (or 0, as diffusers tests it for truth) for no stretch, else a number
    below 1, where the shifted schedule is made to end."""
    value = config.get("shift_terminal")
    if value is None or value == 0:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value < 1:
        raise ValueError(f"shift_terminal={value!r} is not supported; accepted: None or a number below 1")
    return float(value)


def multistep_use_flow_sigmas(
    config: dict[str, Any], prediction_type: str, flow_only: tuple[str, ...] = ("use_dynamic_shifting",)
) -> bool:
    """``use_flow_sigmas`` of a DPM-Solver / UniPC config, which must agree with its prediction type: flow sigmas
    with a flow ("flow_prediction") model, and a flow model with flow sigmas (diffusers runs either half alone, on a
    schedule the model was not trained on). The keys ``flow_only`` (the dynamic shift; UniPC's ``shift_terminal``)
    need flow sigmas."""
    use_flow_sigmas = bool(config_choice(config, "use_flow_sigmas", False, BOOL_OR_NONE))
    if use_flow_sigmas and prediction_type != "flow_prediction":
        raise ValueError(
            f"use_flow_sigmas=True is supported with prediction_type='flow_prediction' (a flow model) only, "
            f"not {prediction_type!r}"
        )
    if prediction_type == "flow_prediction" and not use_flow_sigmas:
        raise ValueError("prediction_type='flow_prediction' needs use_flow_sigmas=True (a flow model's sigmas)")
    if not use_flow_sigmas:
        for key in flow_only:
            if config.get(key) not in (None, False):
                raise ValueError(f"{key}={config[key]!r} is supported with use_flow_sigmas=True only")
    return use_flow_sigmas
