"""Image-to-image parity of every numpy scheduler with diffusers: ``add_noise`` at the start index, then the
sampling loop from that index to the end.

The start index is StableDiffusionImg2ImgPipeline.get_timesteps': ``t_start * scheduler.order`` with
``t_start = steps - min(int(steps * strength), steps)``, and diffusers' scheduler gets ``set_begin_index(start)``
where it has one. Both sides noise the same clean latents with the same torch-seeded noise, run the same stand-in
UNet, and draw any further noise (Euler a, LCM) from the same continuing stream; the noised latents and the final
latents must agree to 1e-4 of their magnitude.
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
import pytest

from .conftest import SD15_SCHEDULER_CONFIG

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from edgediff.runtime.rng import TorchRandn  # noqa: E402
from edgediff.runtime.schedulers import SCHEDULER_NAMES, make_scheduler  # noqa: E402

from .test_txt2img_parity import DIFFUSERS  # noqa: E402

pytestmark = [
    # diffusers 0.42 LMS calls np.array(tensor) the numpy-2 way that torch warns about
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
    pytest.mark.filterwarnings("error::RuntimeWarning"),  # no stray overflow / 0-division in our ports
]

SD15 = SD15_SCHEDULER_CONFIG
SD2 = {**SD15, "prediction_type": "v_prediction", "timestep_spacing": "trailing"}
CONFIGS = {"sd15": SD15, "sd2_v_trailing": SD2}
STEPS = (4, 10, 25)
STRENGTHS = (0.3, 0.75, 1.0)
SEED = 1234
SHAPE = (2, 4, 5, 7)  # batch of 2; 280 values, not a multiple of 16 (torch.randn's tail path)

# Warm-up logic beyond the two checkpoint styles: (scheduler, overrides of SD15), run at 10 steps
EXTRA: list[tuple[str, dict[str, Any]]] = [
    ("pndm", {"skip_prk_steps": False}),  # F-PNDM: the Runge-Kutta warm-up counts steps taken, not the index
    ("dpmpp_2m", {"solver_order": 3}),
    ("dpmpp_2m", {"solver_order": 3, "lower_order_final": False, "final_sigmas_type": "sigma_min"}),
    ("unipc", {"solver_order": 3}),
    ("unipc", {"solver_order": 3, "disable_corrector": [3]}),
    ("lms", {"use_karras_sigmas": True}),
    ("heun", {"use_karras_sigmas": True, "prediction_type": "v_prediction", "timestep_spacing": "trailing"}),
    ("ddim", {"eta": 1.0}),  # DDIM's eta: a config key here, a step() argument in diffusers
]


def fake_unet(x_in: np.ndarray, t: float) -> np.ndarray:
    """A deterministic stand-in for the UNet, float32 (as in test_schedulers_ddpm_family)."""
    return (np.float32(0.3) * x_in + np.float32(0.05 * np.cos(t / 100))).astype(np.float32)


def clean_latents() -> np.ndarray:
    """Fixed stand-in for the VAE's (scaled) image latents."""
    return (np.random.default_rng(0).standard_normal(SHAPE) * 0.8).astype(np.float32)


def img2img_start(steps: int, strength: float, order: int) -> int:
    """StableDiffusionImg2ImgPipeline.get_timesteps: the first UNet call index."""
    init_timestep = min(int(steps * strength), steps)
    t_start = max(steps - init_timestep, 0)
    return t_start * order


def run_diffusers(name: str, config: dict[str, Any], steps: int, strength: float):
    cls_name, extra = DIFFUSERS[name]
    sched = getattr(diffusers, cls_name).from_config(config, **extra)
    sched.set_timesteps(steps)
    start = img2img_start(steps, strength, sched.order)
    if hasattr(sched, "set_begin_index"):
        sched.set_begin_index(start)
    gen = torch.Generator().manual_seed(SEED)
    noise = torch.randn(SHAPE, generator=gen)
    latents = sched.add_noise(torch.from_numpy(clean_latents()), noise, sched.timesteps[start : start + 1])
    noisy = latents.numpy().copy()
    params = inspect.signature(sched.step).parameters
    kwargs: dict[str, Any] = {"generator": gen} if "generator" in params else {}
    if "eta" in params:
        kwargs["eta"] = float(config.get("eta", 0.0))
    for t in sched.timesteps[start:]:
        x_in = sched.scale_model_input(latents, t)
        model_output = torch.from_numpy(fake_unet(x_in.numpy(), float(t)))
        latents = sched.step(model_output, t, latents, **kwargs).prev_sample
    return start, noisy, latents.numpy()


def run_ours(name: str, config: dict[str, Any], steps: int, strength: float):
    sched = make_scheduler(name, config, steps)
    start = img2img_start(steps, strength, sched.order)
    rng = TorchRandn(SEED)
    latents = sched.add_noise(clean_latents(), rng.randn(SHAPE), start)
    assert latents.dtype == np.float32
    noisy = latents.copy()
    for i in range(start, len(sched.timesteps)):
        x_in = sched.scale_model_input(latents, i)
        latents = sched.step(fake_unet(x_in, float(sched.timesteps[i])), i, latents, rng)
        assert latents.dtype == np.float32
    return start, noisy, latents


def _rel_err(ours: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    scale = max(1.0, float(np.abs(ref).max()))
    return float(np.abs(ours.astype(np.float64) - ref.astype(np.float64)).max()), scale


def check_img2img(name: str, config: dict[str, Any], steps: int, strength: float) -> tuple[float, float]:
    """Assert parity; return (noised-latents error, final-latents error), each relative to its scale."""
    try:
        ref_start, ref_noisy, ref = run_diffusers(name, config, steps, strength)
    except Exception as exc:  # noqa: BLE001 - diffusers' own failures are skipped, with the reason
        pytest.skip(f"diffusers fails on {name}, {steps} steps, strength {strength}: {type(exc).__name__}: {exc}")
    if not (np.isfinite(ref_noisy).all() and np.isfinite(ref).all()):
        pytest.skip(f"diffusers gives non-finite latents on {name}, {steps} steps, strength {strength}")
    start, noisy, ours = run_ours(name, config, steps, strength)
    assert start == ref_start
    noisy_err, noisy_scale = _rel_err(noisy, ref_noisy)
    assert noisy_err <= 1e-4 * noisy_scale, f"add_noise: max abs error {noisy_err:.3g} (scale {noisy_scale:.3g})"
    err, scale = _rel_err(ours, ref)
    assert err <= 1e-4 * scale, f"final latents: max abs error {err:.3g} (scale {scale:.3g})"
    return noisy_err / noisy_scale, err / scale


def test_every_scheduler_is_covered() -> None:
    assert set(DIFFUSERS) == set(SCHEDULER_NAMES)


@pytest.mark.parametrize("strength", STRENGTHS)
@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("config_name", list(CONFIGS))
@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_img2img_parity(name: str, config_name: str, steps: int, strength: float) -> None:
    check_img2img(name, CONFIGS[config_name], steps, strength)


@pytest.mark.parametrize("strength", STRENGTHS)
@pytest.mark.parametrize(
    ("name", "overrides"), EXTRA, ids=[f"{n}-{'-'.join(f'{k}={v}' for k, v in o.items())}" for n, o in EXTRA]
)
def test_img2img_parity_warmup_configs(name: str, overrides: dict[str, Any], strength: float) -> None:
    check_img2img(name, {**SD15, **overrides}, 10, strength)


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_add_noise_at_every_index(name: str) -> None:
    """add_noise(x0, noise, i) equals diffusers' at every call index (set_begin_index(i), timesteps[i:i+1])."""
    cls_name, extra = DIFFUSERS[name]
    steps = 7
    ours = make_scheduler(name, SD2, steps)
    x0 = clean_latents()
    noise = TorchRandn(SEED).randn(SHAPE)
    for i in range(len(ours.timesteps)):
        sched = getattr(diffusers, cls_name).from_config(SD2, **extra)
        sched.set_timesteps(steps)
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(i)
        ref = sched.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), sched.timesteps[i : i + 1]).numpy()
        got = ours.add_noise(x0, noise, i)
        assert got.dtype == np.float32 and got.shape == SHAPE
        err, scale = _rel_err(got, ref)
        assert err <= 1e-6 * scale, f"{name} index {i}: max abs error {err:.3g}"

