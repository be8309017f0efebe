"""Parity of the numpy DDIM, PNDM, LMS and LCM schedulers with diffusers.

Both sides run the same sampling loop (tests/scheduler_harness.py) from the same torch.randn stream, with a
fake UNet that is a deterministic function of (x_in, t); the final latents must agree to 1e-4 (relative to
the latents' magnitude).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

pytest.importorskip("diffusers")  # each case runs diffusers beside ours

from edgediff.runtime.schedulers import make_scheduler

from .scheduler_harness import (
    CONFIGS,
    DDPM_FAMILY,
    IGNORE_LMS_ARRAY_WARNING,
    SD15,
    check_parity,
    diffusers_rejection,
)

pytestmark = IGNORE_LMS_ARRAY_WARNING

NAMES = DDPM_FAMILY
STEPS = (1, 2, 7, 20)
SEEDS = (0, 1234)
SHAPE = (2, 4, 8, 8)

# Further settings of the keys each scheduler honours, on top of SD15 (one seed).
EXTRA_CONFIGS: dict[str, dict[str, dict[str, Any]]] = {
    "ddim": {
        "eta1": {"eta": 1.0},
        "eta05_v_trailing": {"eta": 0.5, "prediction_type": "v_prediction", "timestep_spacing": "trailing"},
        "sample_clip": {"prediction_type": "sample", "clip_sample": True, "clip_sample_range": 1.5},
        "zero_snr_v": {
            "rescale_betas_zero_snr": True,
            "prediction_type": "v_prediction",
            "timestep_spacing": "trailing",
        },
        "alpha_one_linear": {
            "set_alpha_to_one": True,
            "beta_schedule": "linear",
            "beta_start": 0.0001,
            "beta_end": 0.02,
        },
        "cosine": {"beta_schedule": "squaredcos_cap_v2"},
        "own_defaults": {"_class_name": "DDIMScheduler", "clip_sample": None, "set_alpha_to_one": None},
    },
    "pndm": {
        "prk": {"skip_prk_steps": False},
        "prk_v_linspace": {"skip_prk_steps": False, "prediction_type": "v_prediction", "timestep_spacing": "linspace"},
        "alpha_one": {"set_alpha_to_one": True},
        "trailing": {"timestep_spacing": "trailing"},
        "trained_betas": {"trained_betas": np.linspace(1e-4, 2e-2, 1000).tolist()},
    },
    "lms": {
        "karras": {"use_karras_sigmas": True},
        "karras_v_linspace": {
            "use_karras_sigmas": True,
            "prediction_type": "v_prediction",
            "timestep_spacing": "linspace",
        },
        "sample": {"prediction_type": "sample"},
        "trailing": {"timestep_spacing": "trailing"},
        "own_defaults": {"_class_name": "LMSDiscreteScheduler", "timestep_spacing": None, "steps_offset": None},
    },
    "lcm": {
        "v": {"prediction_type": "v_prediction"},
        "sample_clip": {"prediction_type": "sample", "clip_sample": True},
        "orig30_scaling5": {"original_inference_steps": 30, "timestep_scaling": 5.0},
        "zero_snr_v": {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction"},
        "alpha_one": {"set_alpha_to_one": True},
        "own_defaults": {
            "_class_name": "LCMScheduler",
            "beta_start": None,
            "beta_end": None,
            "beta_schedule": None,
            "set_alpha_to_one": None,
        },
    },
}


def _config(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides``; an override of None drops the key (the class default applies)."""
    merged = {**base, **overrides}
    return {k: v for k, v in merged.items() if not (k in overrides and overrides[k] is None)}


def check_parity_or_common_rejection(name: str, config: dict[str, Any], steps: int, seed: int) -> float:
    """Parity with diffusers, or, where diffusers refuses the combination, a ValueError from ours too."""
    reason = diffusers_rejection(name, config, steps)
    if reason is not None:
        with pytest.raises(ValueError):
            make_scheduler(name, config, steps)
        pytest.skip(f"diffusers rejects {name} with {steps} steps ({reason}); ours raises ValueError too")
    return check_parity(name, config, steps, seed, SHAPE)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("config_name", list(CONFIGS))
@pytest.mark.parametrize("name", NAMES)
def test_parity(name: str, config_name: str, steps: int, seed: int) -> None:
    check_parity_or_common_rejection(name, CONFIGS[config_name], steps, seed)


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize(
    "name, extra_name", [(name, extra) for name, extras in EXTRA_CONFIGS.items() for extra in extras]
)
def test_parity_extra_configs(name: str, extra_name: str, steps: int) -> None:
    check_parity_or_common_rejection(name, _config(SD15, EXTRA_CONFIGS[name][extra_name]), steps, seed=7)


@pytest.mark.parametrize(
    "name, overrides",
    [
        ("ddim", {"thresholding": True}),
        ("ddim", {"prediction_type": "flow"}),
        ("ddim", {"timestep_spacing": "karras"}),
        ("ddim", {"beta_schedule": "sigmoid"}),
        ("pndm", {"prediction_type": "sample"}),
        ("pndm", {"timestep_spacing": "middle"}),
        ("lms", {"use_exponential_sigmas": True}),
        ("lms", {"use_beta_sigmas": True}),
        ("lms", {"prediction_type": "flow"}),
        ("lms", {"timestep_spacing": "middle"}),
        ("lcm", {"thresholding": True}),
        ("lcm", {"prediction_type": "flow"}),
    ],
)
def test_unsupported_config_raises(name: str, overrides: dict[str, Any]) -> None:
    (key, value), = overrides.items()
    with pytest.raises(ValueError, match=key) as info:
        make_scheduler(name, {**SD15, **overrides}, 10)
    assert repr(value) in str(info.value) or str(value) in str(info.value)
    assert "accepted" in str(info.value)


@pytest.mark.parametrize(
    "name, steps, overrides",
    [
        ("ddim", 1001, {}),
        ("pndm", 3, {"skip_prk_steps": False}),
        ("lcm", 51, {}),
        ("lcm", 20, {"original_inference_steps": 10}),
    ],
)
def test_step_counts_diffusers_rejects_raise(name: str, steps: int, overrides: dict[str, Any]) -> None:
    assert diffusers_rejection(name, {**SD15, **overrides}, steps) is not None
    with pytest.raises(ValueError):
        make_scheduler(name, {**SD15, **overrides}, steps)


def test_runtime_modules_do_not_import_torch() -> None:
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from edgediff.runtime.schedulers import make_scheduler\n"
        f"for n in {NAMES!r}: make_scheduler(n, {SD15!r}, 4)\n"
        "assert 'torch' not in sys.modules and 'scipy' not in sys.modules, 'torch/scipy imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
