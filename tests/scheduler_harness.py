"""The harness of the scheduler parity tests: one stand-in UNet, one diffusers loop and one numpy loop.

Both loops run the same sampler on the same torch-seeded noise: txt2img starts from ``randn * init_noise_sigma``
at call 0; img2img (``strength`` given) noises fixed clean latents with ``add_noise`` at
StableDiffusionImg2ImgPipeline's start index, ``set_begin_index(start)`` on diffusers' side, and runs from there.
Any further noise (DDIM with eta, Euler a, LCM) comes from the same continuing stream on both sides. The
diffusers class and the extra config of each of our schedulers come from ``REGISTRY``, as at run time.

This is not a test module, so pytest does not rewrite its asserts: each one carries its own message. It imports
torch and diffusers only inside the diffusers side, so the torch-free tier uses ``run_ours`` against the
references that ``tests/reference/make_references.py`` saved from ``run_diffusers``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from .conftest import SD15_SCHEDULER_CONFIG

from edgediff.runtime.rng import TorchRandn
from edgediff.runtime.schedulers import REGISTRY, make_scheduler

# diffusers 0.42 LMS calls np.array(tensor) the numpy-2 way that torch warns about
IGNORE_LMS_ARRAY_WARNING = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
NO_STRAY_RUNTIME_WARNINGS = pytest.mark.filterwarnings("error::RuntimeWarning")  # no overflow / 0-division

# The two test files that cover the registry between them
DDPM_FAMILY = ("ddim", "pndm", "lms", "lcm")  # test_schedulers_ddpm_family.py
K_FAMILY = ("euler", "euler_a", "heun", "dpmpp_2m", "dpmpp_2m_karras", "unipc")  # test_schedulers_k_family.py

# Stable Diffusion 1.5's scheduler_config.json, as diffusers saves it, and the two other checkpoint styles
SD15 = SD15_SCHEDULER_CONFIG
SD2 = {**SD15, "prediction_type": "v_prediction", "timestep_spacing": "trailing"}
LINSPACE = {**SD15, "timestep_spacing": "linspace"}
CONFIGS = {"sd15": SD15, "sd2_v_trailing": SD2, "linspace": LINSPACE}

ODD_SHAPE = (2, 4, 5, 7)  # batch of 2; 280 values, not a multiple of 16 (torch.randn's tail path)


def fake_unet(x_in: np.ndarray, t: float) -> np.ndarray:
    """A deterministic stand-in for the UNet, float32."""
    return (np.float32(0.3) * x_in + np.float32(0.05 * np.cos(t / 100))).astype(np.float32)


def clean_latents(shape: tuple[int, ...]) -> np.ndarray:
    """Fixed stand-in for the VAE's (scaled) image latents."""
    return (np.random.default_rng(0).standard_normal(shape) * 0.8).astype(np.float32)


def img2img_start(steps: int, strength: float, order: int) -> int:
    """StableDiffusionImg2ImgPipeline.get_timesteps: the first UNet call index."""
    init_timestep = min(int(steps * strength), steps)
    t_start = max(steps - init_timestep, 0)
    return t_start * order


def diffusers_scheduler(name: str, config: dict[str, Any], steps: int | None = None):
    """diffusers' counterpart of ``make_scheduler(name, config, steps)``, its timesteps set when ``steps`` is given
    (a pipeline sets them itself)."""
    import diffusers

    entry = REGISTRY[name]
    sched = getattr(diffusers, entry.diffusers_class).from_config(config, **entry.extra)
    if steps is not None:
        sched.set_timesteps(steps)
    return sched


def diffusers_rejection(name: str, config: dict[str, Any], steps: int) -> str | None:
    """Why diffusers refuses this combination, or None when it accepts it."""
    try:
        diffusers_scheduler(name, config, steps)
    except Exception as exc:  # noqa: BLE001 - e.g. PNDM's PRK warm-up fails in numpy broadcasting
        return f"{type(exc).__name__}: {exc}"
    return None


@dataclass
class Run:
    """One sampling loop's outcome."""

    timesteps: np.ndarray  # the scheduler's whole schedule
    init_noise_sigma: Any
    start: int  # the first UNet call index (0 for txt2img)
    noisy: np.ndarray  # the latents before call ``start``
    latents: np.ndarray  # the final latents


def run_diffusers(
    name: str, config: dict[str, Any], steps: int, seed: int, shape: tuple[int, ...], strength: float | None = None
) -> Run:
    """diffusers' sampling loop: txt2img, or img2img at ``strength``."""
    import torch

    sched = diffusers_scheduler(name, config, steps)
    gen = torch.Generator().manual_seed(seed)
    if strength is None:
        start = 0
        latents = torch.randn(shape, generator=gen) * sched.init_noise_sigma
    else:
        start = img2img_start(steps, strength, sched.order)
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(start)
        noise = torch.randn(shape, generator=gen)
        latents = sched.add_noise(torch.from_numpy(clean_latents(shape)), noise, sched.timesteps[start : start + 1])
    noisy = latents.numpy().copy()
    params = inspect.signature(sched.step).parameters
    kwargs: dict[str, Any] = {"generator": gen} if "generator" in params else {}
    if "eta" in params:  # DDIM's eta: a config key here, a step() argument in diffusers
        kwargs["eta"] = float(config.get("eta", 0.0))
    for t in sched.timesteps[start:]:
        x_in = sched.scale_model_input(latents, t)
        model_output = torch.from_numpy(fake_unet(x_in.numpy(), float(t)))
        latents = sched.step(model_output, t, latents, **kwargs).prev_sample
    return Run(sched.timesteps.numpy(), sched.init_noise_sigma, start, noisy, latents.numpy())


def run_ours(
    name: str, config: dict[str, Any], steps: int, seed: int, shape: tuple[int, ...], strength: float | None = None
) -> Run:
    """Our sampling loop, as the pipeline runs it: txt2img, or img2img at ``strength``; float32 throughout."""
    sched = make_scheduler(name, config, steps)
    rng = TorchRandn(seed)
    if strength is None:
        start = 0
        latents = rng.randn(shape) * sched.init_noise_sigma
    else:
        start = img2img_start(steps, strength, sched.order)
        latents = sched.add_noise(clean_latents(shape), rng.randn(shape), start)
    assert latents.dtype == np.float32, latents.dtype
    noisy = latents.copy()
    for i in range(start, len(sched.timesteps)):
        x_in = sched.scale_model_input(latents, i)
        latents = sched.step(fake_unet(x_in, float(sched.timesteps[i])), i, latents, rng)
        assert latents.dtype == np.float32, (i, latents.dtype)
    return Run(np.asarray(sched.timesteps), sched.init_noise_sigma, start, noisy, latents)


def relative_error(ours: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """(max abs error, scale): the scale is the reference's magnitude, at least 1."""
    scale = max(1.0, float(np.abs(ref).max()))
    return float(np.abs(ours.astype(np.float64) - ref.astype(np.float64)).max()), scale


def check_parity(
    name: str, config: dict[str, Any], steps: int, seed: int, shape: tuple[int, ...], rtol: float = 1e-4
) -> float:
    """Assert txt2img parity (timesteps, init_noise_sigma, final latents); return the error relative to its scale."""
    ref = run_diffusers(name, config, steps, seed, shape)
    ours = run_ours(name, config, steps, seed, shape)
    assert isinstance(ours.init_noise_sigma, float), type(ours.init_noise_sigma)
    assert ours.timesteps.shape == ref.timesteps.shape, (ours.timesteps, ref.timesteps)
    np.testing.assert_allclose(ours.timesteps, ref.timesteps.astype(np.float64), rtol=0, atol=1e-4)
    assert ours.init_noise_sigma == pytest.approx(float(ref.init_noise_sigma), rel=1e-6), (
        ours.init_noise_sigma,
        ref.init_noise_sigma,
    )
    assert np.isfinite(ref.latents).all(), "diffusers' latents are not finite"
    err, scale = relative_error(ours.latents, ref.latents)
    assert err <= rtol * scale, f"max abs error {err:.3g} > {rtol:g} * {scale:.3g}"
    return err / scale


# The flow-matching and TrigFlow schedulers, each with its own parity loop: test_schedulers_flow.py
FLOW_FAMILY = ("flow_euler", "dpmpp_2m_flow", "unipc_flow", "scm")
