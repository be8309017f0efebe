"""Image-to-image parity of every numpy scheduler with diffusers: ``add_noise`` at the start index, then the
sampling loop from that index to the end.

The start index is StableDiffusionImg2ImgPipeline.get_timesteps': ``t_start * scheduler.order`` with
``t_start = steps - min(int(steps * strength), steps)``, and diffusers' scheduler gets ``set_begin_index(start)``
where it has one. Both sides noise the same clean latents with the same torch-seeded noise, run the same stand-in
UNet, and draw any further noise (Euler a, LCM) from the same continuing stream (tests/scheduler_harness.py); the
noised latents and the final latents must agree to 1e-4 of their magnitude.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")  # each case runs diffusers beside ours

from edgediff.runtime.rng import TorchRandn
from edgediff.runtime.schedulers import REGISTRY, SCHEDULER_NAMES, make_scheduler

from .scheduler_harness import (
    DDPM_FAMILY,
    FLOW_FAMILY,
    IGNORE_LMS_ARRAY_WARNING,
    K_FAMILY,
    NO_STRAY_RUNTIME_WARNINGS,
    ODD_SHAPE,
    SD2,
    SD15,
    clean_latents,
    diffusers_scheduler,
    relative_error,
    run_diffusers,
    run_ours,
)

pytestmark = [IGNORE_LMS_ARRAY_WARNING, NO_STRAY_RUNTIME_WARNINGS]

CONFIGS = {"sd15": SD15, "sd2_v_trailing": SD2}
STEPS = (4, 10, 25)
STRENGTHS = (0.3, 0.75, 1.0)
SEED = 1234
SHAPE = ODD_SHAPE

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


def check_img2img(name: str, config: dict[str, Any], steps: int, strength: float) -> tuple[float, float]:
    """Assert parity; return (noised-latents error, final-latents error), each relative to its scale."""
    try:
        ref = run_diffusers(name, config, steps, SEED, SHAPE, strength)
    except Exception as exc:  # noqa: BLE001 - diffusers' own failures are skipped, with the reason
        pytest.skip(f"diffusers fails on {name}, {steps} steps, strength {strength}: {type(exc).__name__}: {exc}")
    if not (np.isfinite(ref.noisy).all() and np.isfinite(ref.latents).all()):
        pytest.skip(f"diffusers gives non-finite latents on {name}, {steps} steps, strength {strength}")
    ours = run_ours(name, config, steps, SEED, SHAPE, strength)
    assert ours.start == ref.start
    noisy_err, noisy_scale = relative_error(ours.noisy, ref.noisy)
    assert noisy_err <= 1e-4 * noisy_scale, f"add_noise: max abs error {noisy_err:.3g} (scale {noisy_scale:.3g})"
    err, scale = relative_error(ours.latents, ref.latents)
    assert err <= 1e-4 * scale, f"final latents: max abs error {err:.3g} (scale {scale:.3g})"
    return noisy_err / noisy_scale, err / scale


def test_every_scheduler_is_covered() -> None:
    """The two txt2img parity files cover the registry between them, each against a class diffusers has."""
    assert sorted(DDPM_FAMILY + K_FAMILY + FLOW_FAMILY) == sorted(SCHEDULER_NAMES)
    for entry in REGISTRY.values():
        assert hasattr(diffusers, entry.diffusers_class), entry


@pytest.mark.parametrize("strength", STRENGTHS)
@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("config_name", list(CONFIGS))
@pytest.mark.parametrize("name", DDPM_FAMILY + K_FAMILY)  # the flow ones: test_schedulers_flow.py
def test_img2img_parity(name: str, config_name: str, steps: int, strength: float) -> None:
    check_img2img(name, CONFIGS[config_name], steps, strength)


@pytest.mark.parametrize("strength", STRENGTHS)
@pytest.mark.parametrize(
    ("name", "overrides"), EXTRA, ids=[f"{n}-{'-'.join(f'{k}={v}' for k, v in o.items())}" for n, o in EXTRA]
)
def test_img2img_parity_warmup_configs(name: str, overrides: dict[str, Any], strength: float) -> None:
    check_img2img(name, {**SD15, **overrides}, 10, strength)


@pytest.mark.parametrize("name", DDPM_FAMILY + K_FAMILY)  # the flow ones: test_schedulers_flow.py
def test_add_noise_at_every_index(name: str) -> None:
    """add_noise(x0, noise, i) equals diffusers' at every call index (set_begin_index(i), timesteps[i:i+1])."""
    steps = 7
    ours = make_scheduler(name, SD2, steps)
    x0 = clean_latents(SHAPE)
    noise = TorchRandn(SEED).randn(SHAPE)
    for i in range(len(ours.timesteps)):
        sched = diffusers_scheduler(name, SD2, steps)
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(i)
        ref = sched.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), sched.timesteps[i : i + 1]).numpy()
        got = ours.add_noise(x0, noise, i)
        assert got.dtype == np.float32 and got.shape == SHAPE
        err, scale = relative_error(got, ref)
        assert err <= 1e-6 * scale, f"{name} index {i}: max abs error {err:.3g}"

