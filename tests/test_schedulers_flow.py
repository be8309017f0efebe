"""Parity of the flow-matching schedulers (flow_euler, dpmpp_2m_flow, unipc_flow) and of SCM (Sana-Sprint) with
diffusers, step by step, and the registry's prediction check.

Both sides run the same loop from the same torch-seeded noise with the same stand-in transformer: the schedule
(sigmas and the timesteps the model is fed) must be diffusers', and the latents after every step must agree to
float tolerance. diffusers' side is what its pipelines do: StableDiffusion3Pipeline (static shift), FluxPipeline
(``sigmas=linspace(1, 1/N, N)`` and ``mu=calculate_shift(image_seq_len, ...)``), SanaPipeline (DPM-Solver++ flow),
SanaSprintPipeline (SCM with its TrigFlow transforms around the scheduler), and their img2img start
(``get_timesteps``: ``t_start = int(max(N - N * strength, 0))``, ``set_begin_index``, ``scale_noise`` /
``add_noise``). Each parity case is also run against a nearby wrong reference (another shift, image size, step
schedule or noise), which must be far outside the tolerance: the comparison can fail.

The parity tests need torch and diffusers; the prediction check, the shift formulas against numbers worked by hand
and the refusals are in the fast tier.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from edgediff.runtime.rng import TorchRandn
from edgediff.runtime.schedulers import (
    REGISTRY,
    SCHEDULER_NAMES,
    check_prediction,
    default_scheduler_name,
    make_scheduler,
    schedulers_for,
)
from edgediff.runtime.schedulers.common import calculate_shift, empirical_mu

from .scheduler_harness import DDPM_FAMILY, FLOW_FAMILY, K_FAMILY, NO_STRAY_RUNTIME_WARNINGS, clean_latents

SHAPE = (2, 4, 5, 7)  # batch of 2; 280 values, not a multiple of 16 (torch.randn's tail path)
SEED = 1234
RTOL = 1e-5  # per step, relative to the reference's magnitude (at least 1)

# scheduler_config.json of the checkpoints, as diffusers saves them (the keys that matter)
SD3 = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
FLUX = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
}
SANA = {
    "_class_name": "DPMSolverMultistepScheduler",
    "algorithm_type": "dpmsolver++",
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "final_sigmas_type": "zero",
    "flow_shift": 3.0,
    "lower_order_final": True,
    "num_train_timesteps": 1000,
    "prediction_type": "flow_prediction",
    "solver_order": 2,
    "solver_type": "midpoint",
    "timestep_spacing": "linspace",
    "use_flow_sigmas": True,
}
UNIPC_FLOW = {**SANA, "_class_name": "UniPCMultistepScheduler", "solver_type": "bh2", "flow_shift": 5.0}
SPRINT = {"_class_name": "SCMScheduler", "num_train_timesteps": 1000, "prediction_type": "trigflow", "sigma_data": 0.5}

pytestmark = NO_STRAY_RUNTIME_WARNINGS


def fake_transformer(x_in: np.ndarray, t: float) -> np.ndarray:
    """A deterministic stand-in for the denoiser, float32, varying with its timestep."""
    return (np.float32(0.3) * x_in + np.float32(0.05 * np.cos(t / 100))).astype(np.float32)


def flux_sigmas(steps: int) -> np.ndarray:
    """FluxPipeline's default sigmas."""
    return np.linspace(1.0, 1 / steps, steps)


def sd3_img2img_start(steps: int, strength: float) -> int:
    """StableDiffusion3Img2ImgPipeline.get_timesteps (SanaSprintImg2ImgPipeline's too): the first call index."""
    init_timestep = min(steps * strength, steps)
    return int(max(steps - init_timestep, 0))


@dataclass(frozen=True)
class Case:
    """One loop: our scheduler name, its config, steps, and what the pipeline passes at set_timesteps."""

    name: str
    config: dict[str, Any]
    steps: int
    image_seq_len: int | None = None  # ours: the number of image tokens; diffusers: mu = calculate_shift of it
    mu: float | None = None  # passed as is to both
    sigmas: tuple[float, ...] | None = None
    strength: float | None = None  # img2img at this strength
    seed: int = SEED

    def label(self) -> str:
        """The name, the steps, the config as a change of its checkpoint's, and the call's inputs."""
        base_name, base = _base(self.config)
        changed = [f"{k}={v}" for k, v in self.config.items() if base.get(k, ...) != v]
        inputs = [f"{k}={getattr(self, k)}" for k in ("image_seq_len", "mu", "strength", "seed")
                  if getattr(self, k) not in (None, SEED)]
        inputs += ["sigmas"] if self.sigmas is not None else []
        return "-".join([self.name, str(self.steps), base_name, *changed, *inputs])


def _base(config: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The checkpoint config a test config changes, with its name."""
    if not config:
        return "defaults", {}
    by_class = {
        "FlowMatchEulerDiscreteScheduler": ("flux", FLUX) if config.get("use_dynamic_shifting") else ("sd3", SD3),
        "DPMSolverMultistepScheduler": ("sana", SANA),
        "UniPCMultistepScheduler": ("unipc_flow", UNIPC_FLOW),
        "SCMScheduler": ("sprint", SPRINT),
    }
    return by_class[config["_class_name"]]


@dataclass
class Trace:
    """One loop's schedule and the latents before the first call and after every step."""

    sigmas: np.ndarray | None
    timesteps: np.ndarray  # what the model is fed, one per call
    start: int
    latents: list[np.ndarray]


def run_diffusers(case: Case) -> Trace:
    """diffusers' loop, as its pipelines run it."""
    import diffusers
    import torch

    entry = REGISTRY[case.name]
    call_options = ("max_timesteps", "intermediate_timesteps")  # ours: config keys; diffusers: set_timesteps'
    config = {k: v for k, v in case.config.items() if k not in call_options}
    sched = getattr(diffusers, entry.diffusers_class).from_config(config, **entry.extra)
    gen = torch.Generator().manual_seed(case.seed)
    if case.name == "scm":
        return _run_diffusers_scm(sched, case, gen)
    kwargs: dict[str, Any] = {}
    if case.image_seq_len is not None:
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift as diffusers_calculate_shift

        kwargs["mu"] = diffusers_calculate_shift(
            case.image_seq_len,
            sched.config.get("base_image_seq_len", 256),
            sched.config.get("max_image_seq_len", 4096),
            sched.config.get("base_shift", 0.5),
            sched.config.get("max_shift", 1.15),
        )
    if case.mu is not None:
        kwargs["mu"] = case.mu
    if case.sigmas is not None:
        kwargs["sigmas"] = np.array(case.sigmas)
    sched.set_timesteps(case.steps, **kwargs)
    timesteps = sched.timesteps
    if case.strength is None:
        start = 0
        latents = torch.randn(SHAPE, generator=gen)
    else:
        start = sd3_img2img_start(case.steps, case.strength) * sched.order
        sched.set_begin_index(start)
        noise = torch.randn(SHAPE, generator=gen)
        x0, t0 = torch.from_numpy(clean_latents(SHAPE)), timesteps[start : start + 1]
        add = sched.scale_noise if hasattr(sched, "scale_noise") else sched.add_noise
        latents = add(x0, t0, noise) if add == getattr(sched, "scale_noise", None) else add(x0, noise, t0)
    trace = [latents.numpy().copy()]
    step_kwargs = {"generator": gen} if "generator" in inspect.signature(sched.step).parameters else {}
    for t in timesteps[start:]:
        model_output = torch.from_numpy(fake_transformer(latents.numpy(), float(t)))
        latents = sched.step(model_output, t, latents, **step_kwargs).prev_sample
        trace.append(latents.numpy().copy())
    return Trace(sched.sigmas.numpy(), timesteps.numpy(), start, trace)


def _run_diffusers_scm(sched, case: Case, gen) -> Trace:
    """SanaSprintPipeline's (and SanaSprintImg2ImgPipeline's) loop around SCMScheduler; latents in VAE units
    (the pipeline's latents / sigma_data, its final denoised / sigma_data)."""
    import torch

    kwargs = {k: case.config[k] for k in ("max_timesteps", "intermediate_timesteps") if k in case.config}
    if "intermediate_timesteps" not in kwargs and case.steps != 2:
        kwargs["intermediate_timesteps"] = None  # the pipeline's 1.3 is refused by diffusers at other steps
    sched.set_timesteps(case.steps, **kwargs)
    sigma_data = sched.config.sigma_data
    timesteps = sched.timesteps
    if case.strength is None:
        start = 0
        sched.set_begin_index(0)
        latents = torch.randn(SHAPE, generator=gen) * sigma_data
    else:
        start = sd3_img2img_start(case.steps, case.strength)
        sched.set_begin_index(start)
        latent_timestep = timesteps[start : start + 1]
        image_latents = torch.from_numpy(clean_latents(SHAPE)) * sigma_data
        noise = torch.randn(SHAPE, generator=gen) * sigma_data
        latents = torch.cos(latent_timestep) * image_latents + torch.sin(latent_timestep) * noise
    trace = [(latents / sigma_data).numpy()]
    for t in timesteps[start:-1]:
        timestep = t.expand(latents.shape[0])
        latents_model_input = latents / sigma_data
        scm_timestep = torch.sin(timestep) / (torch.cos(timestep) + torch.sin(timestep))
        scm_timestep_expanded = scm_timestep.view(-1, 1, 1, 1)
        latent_model_input = latents_model_input * torch.sqrt(
            scm_timestep_expanded**2 + (1 - scm_timestep_expanded) ** 2
        )
        noise_pred = torch.from_numpy(fake_transformer(latent_model_input.numpy(), float(scm_timestep[0]) * 1000))
        noise_pred = (
            (1 - 2 * scm_timestep_expanded) * latent_model_input
            + (1 - 2 * scm_timestep_expanded + 2 * scm_timestep_expanded**2) * noise_pred
        ) / torch.sqrt(scm_timestep_expanded**2 + (1 - scm_timestep_expanded) ** 2)
        noise_pred = noise_pred.float() * sigma_data
        latents, denoised = sched.step(noise_pred, timestep, latents, generator=gen, return_dict=False)
        trace.append((latents / sigma_data).numpy())
    trace[-1] = (denoised / sigma_data).numpy()  # the pipeline's output
    every = timesteps[:-1]
    fed = torch.sin(every) / (torch.cos(every) + torch.sin(every))  # the transformer's timestep at each index
    return Trace(None, fed.numpy(), start, trace)


def run_ours(case: Case) -> Trace:
    """Our loop, as the pipeline runs it, float32 throughout."""
    sched = make_scheduler(
        case.name, case.config, case.steps, image_seq_len=case.image_seq_len, mu=case.mu, sigmas=case.sigmas
    )
    rng = TorchRandn(case.seed)
    if case.strength is None:
        start = 0
        latents = rng.randn(SHAPE) * sched.init_noise_sigma
    else:
        start = sd3_img2img_start(case.steps, case.strength) * sched.order
        latents = sched.add_noise(clean_latents(SHAPE), rng.randn(SHAPE), start)
    trace = [latents]
    for i in range(start, len(sched.timesteps)):
        x_in = sched.scale_model_input(latents, i)
        t = float(sched.timesteps[i]) * (1000 if case.name == "scm" else 1)
        latents = sched.step(fake_transformer(x_in, t), i, latents, rng)
        assert latents.dtype == np.float32, (i, latents.dtype)
        trace.append(latents)
    return Trace(getattr(sched, "sigmas", None), np.asarray(sched.timesteps), start, trace)


def step_errors(ours: Trace, ref: Trace) -> list[float]:
    """Each step's max abs error relative to the reference's magnitude (at least 1)."""
    assert len(ours.latents) == len(ref.latents), (len(ours.latents), len(ref.latents))
    return [
        float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max()) / max(1.0, float(np.abs(b).max()))
        for a, b in zip(ours.latents, ref.latents)
    ]


def check_parity(case: Case) -> Trace:
    """Assert the schedule and every step's latents equal diffusers'."""
    ref = run_diffusers(case)
    ours = run_ours(case)
    assert ours.start == ref.start
    assert ours.timesteps.dtype == np.float32
    assert ours.timesteps.shape == ref.timesteps.shape, (ours.timesteps, ref.timesteps)
    np.testing.assert_allclose(ours.timesteps, ref.timesteps.astype(np.float64), rtol=1e-6, atol=0)
    if ref.sigmas is not None:
        np.testing.assert_allclose(ours.sigmas, ref.sigmas, rtol=1e-6, atol=0)
    assert all(np.isfinite(x).all() for x in ref.latents), "diffusers' latents are not finite"
    errors = step_errors(ours, ref)
    worst = int(np.argmax(errors))
    assert errors[worst] <= RTOL, f"step {worst}: max abs error {errors[worst]:.3g} of the scale > {RTOL:g}"
    return ref


def assert_far(ours: Case, ref: Case) -> None:
    """Our final latents for ``ours`` are far outside the tolerance of diffusers' for ``ref``: a wrong schedule
    would be caught."""
    got, want = run_ours(ours).latents[-1], run_diffusers(ref).latents[-1]
    error = float(np.abs(got.astype(np.float64) - want).max()) / max(1.0, float(np.abs(want).max()))
    assert error > 100 * RTOL, f"{ours.label()} vs {ref.label()}: only {error:.3g} apart"


def _diffusers() -> None:
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")


# --- parity: the txt2img loop ---

CASES: list[Case] = [
    # SD3 / SD3.5: static shift 3.0
    *(Case("flow_euler", SD3, steps) for steps in (1, 2, 7, 28)),
    Case("flow_euler", {**SD3, "shift": 7.0}, 7),  # diffusers' Sana test config
    Case("flow_euler", {}, 7),  # every class default: shift 1.0
    # FLUX.1: dynamic shift from the image size (512x512: 1024 tokens; 1024x1024: 4096), the pipeline's sigmas
    *(Case("flow_euler", FLUX, steps, image_seq_len=seq, sigmas=tuple(flux_sigmas(steps)))
      for steps in (1, 4, 28) for seq in (1024, 4096)),
    Case("flow_euler", FLUX, 9, image_seq_len=1024),  # dynamic shift on the scheduler's own sigmas
    Case("flow_euler", {**FLUX, "time_shift_type": "linear"}, 9, image_seq_len=4096),
    Case("flow_euler", FLUX, 4, mu=empirical_mu(1024, 4), sigmas=tuple(flux_sigmas(4))),  # FLUX.2's mu
    Case("flow_euler", SD3, 5, sigmas=(1.0, 0.8, 0.5, 0.3, 0.1)),
    Case("flow_euler", {**FLUX, "shift_terminal": 0.1}, 9, image_seq_len=2048),  # LTX-Video
    Case("flow_euler", {**SD3, "shift_terminal": 0.05}, 9),
    Case("flow_euler", {**SD3, "use_karras_sigmas": True}, 9),
    Case("flow_euler", {**SD3, "use_exponential_sigmas": True}, 9),
    Case("flow_euler", {**SD3, "invert_sigmas": True}, 6),  # Mochi
    Case("flow_euler", {**SD3, "stochastic_sampling": True}, 7),  # fresh noise each step, same stream
    Case("flow_euler", {**FLUX, "stochastic_sampling": True}, 4, image_seq_len=4096, sigmas=tuple(flux_sigmas(4))),
    # Sana: DPM-Solver++ with flow sigmas
    *(Case("dpmpp_2m_flow", SANA, steps) for steps in (1, 2, 7, 20)),
    Case("dpmpp_2m_flow", {**SANA, "flow_shift": 1.0}, 7),
    Case("dpmpp_2m_flow", {**SANA, "solver_order": 3}, 9),
    Case("dpmpp_2m_flow", {**SANA, "solver_order": 3, "lower_order_final": False, "final_sigmas_type": "sigma_min"}, 9),
    Case("dpmpp_2m_flow", {**SANA, "solver_type": "heun"}, 9),
    Case("dpmpp_2m_flow", {**SANA, "euler_at_final": True}, 9),
    Case("dpmpp_2m_flow", {**SANA, "use_dynamic_shifting": True}, 9, image_seq_len=1024),
    Case("dpmpp_2m", SANA, 7),  # the checkpoint's own class and flags, by its plain name
    Case("dpmpp_2m_flow", {}, 7),  # the entry's flags on class defaults
    # UniPC with flow sigmas
    *(Case("unipc_flow", UNIPC_FLOW, steps) for steps in (1, 2, 7, 20)),
    Case("unipc_flow", {**UNIPC_FLOW, "solver_order": 3}, 9),
    # without lower_order_final diffusers' own last step fails: to sigma 0 a singular matrix, to a repeated
    # sigma_min (h = 0) NaN
    Case("unipc_flow", {**UNIPC_FLOW, "solver_order": 3, "final_sigmas_type": "sigma_min"}, 9),
    Case("unipc_flow", {**UNIPC_FLOW, "final_sigmas_type": "sigma_min"}, 9),
    Case("unipc_flow", {**UNIPC_FLOW, "final_sigmas_type": "sigma_min", "solver_type": "bh1"}, 9),
    Case("unipc_flow", {**UNIPC_FLOW, "disable_corrector": [0, 3]}, 9),
    Case("unipc_flow", {**UNIPC_FLOW, "flow_shift": 1.0}, 9),  # the first sigma 1 moved to 1 - 1e-6
    Case("unipc_flow", {**UNIPC_FLOW, "use_dynamic_shifting": True}, 9, image_seq_len=4096),
    Case("unipc_flow", {**UNIPC_FLOW, "use_dynamic_shifting": True, "time_shift_type": "linear"}, 9, mu=1.2),
    Case("unipc_flow", {**UNIPC_FLOW, "use_dynamic_shifting": True}, 4, image_seq_len=1024,
         sigmas=tuple(flux_sigmas(4))),
    Case("unipc_flow", {**UNIPC_FLOW, "shift_terminal": 0.1}, 9),
    Case("unipc_flow", {**UNIPC_FLOW, "use_karras_sigmas": True}, 9),
    Case("unipc_flow", {**UNIPC_FLOW, "use_karras_sigmas": True, "final_sigmas_type": "sigma_min"}, 9),
    Case("unipc", UNIPC_FLOW, 7),
    # Sana-Sprint: SCM at 1, 2 (through intermediate_timesteps 1.3, the default, or evenly), 3 and 4 steps
    Case("scm", SPRINT, 1),
    Case("scm", SPRINT, 2),
    Case("scm", {**SPRINT, "intermediate_timesteps": 1.1}, 2),
    Case("scm", {**SPRINT, "intermediate_timesteps": None}, 2),
    Case("scm", SPRINT, 3),
    Case("scm", SPRINT, 4),
    Case("scm", {**SPRINT, "max_timesteps": 1.56454}, 4),  # the sCM paper's arctan(80 / 0.5)
    Case("scm", {**SPRINT, "sigma_data": 0.7}, 2),  # not a power of two: x_t / sigma_data is rounded
    Case("scm", {}, 2),
]


@pytest.mark.parametrize("case", CASES, ids=[c.label() for c in CASES])
def test_parity_step_by_step(case: Case) -> None:
    _diffusers()
    check_parity(case)


# --- parity: img2img (the SD3 / Sana-Sprint start rule, set_begin_index, then scale_noise / add_noise) ---

IMG2IMG: list[Case] = [
    *(Case("flow_euler", SD3, 10, strength=s) for s in (0.3, 0.6, 1.0)),
    Case("flow_euler", FLUX, 10, image_seq_len=4096, sigmas=tuple(flux_sigmas(10)), strength=0.6),
    Case("flow_euler", {**SD3, "stochastic_sampling": True}, 10, strength=0.6),
    *(Case("dpmpp_2m_flow", SANA, 10, strength=s) for s in (0.3, 0.6, 1.0)),
    Case("dpmpp_2m_flow", {**SANA, "solver_order": 3}, 10, strength=0.6),
    *(Case("unipc_flow", UNIPC_FLOW, 10, strength=s) for s in (0.3, 0.6, 1.0)),
    Case("unipc_flow", {**UNIPC_FLOW, "solver_order": 3}, 10, strength=0.6),
    *(Case("scm", SPRINT, 4, strength=s) for s in (0.3, 0.6, 1.0)),
    Case("scm", SPRINT, 2, strength=0.5),
]


@pytest.mark.parametrize("case", IMG2IMG, ids=[c.label() for c in IMG2IMG])
def test_img2img_parity_step_by_step(case: Case) -> None:
    _diffusers()
    ref = check_parity(case)
    assert ref.start > 0 or case.strength == 1.0


@pytest.mark.parametrize("name", FLOW_FAMILY[:3])
def test_add_noise_at_every_index(name: str) -> None:
    """add_noise(x0, noise, i) equals diffusers' scale_noise / add_noise at every index (set_begin_index(i))."""
    _diffusers()
    import diffusers
    import torch

    config = {"flow_euler": SD3, "dpmpp_2m_flow": SANA, "unipc_flow": UNIPC_FLOW}[name]
    x0, noise = clean_latents(SHAPE), TorchRandn(SEED).randn(SHAPE)
    ours = make_scheduler(name, config, 7)
    for i in range(len(ours.timesteps)):
        entry = REGISTRY[name]
        sched = getattr(diffusers, entry.diffusers_class).from_config(config, **entry.extra)
        sched.set_timesteps(7)
        sched.set_begin_index(i)
        t = sched.timesteps[i : i + 1]
        if name == "flow_euler":
            ref = sched.scale_noise(torch.from_numpy(x0), t, torch.from_numpy(noise)).numpy()
        else:
            ref = sched.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), t).numpy()
        got = ours.add_noise(x0, noise, i)
        assert got.dtype == np.float32 and got.shape == SHAPE
        assert np.abs(got - ref).max() <= 1e-6 * max(1.0, float(np.abs(ref).max())), (name, i)


# --- each comparison can fail: a nearby wrong reference is far outside the tolerance ---

FAR: list[tuple[Case, Case]] = [
    (Case("flow_euler", SD3, 7), Case("flow_euler", {**SD3, "shift": 2.0}, 7)),
    (Case("flow_euler", FLUX, 4, image_seq_len=1024, sigmas=tuple(flux_sigmas(4))),
     Case("flow_euler", FLUX, 4, image_seq_len=4096, sigmas=tuple(flux_sigmas(4)))),
    (Case("flow_euler", FLUX, 4, image_seq_len=1024, sigmas=tuple(flux_sigmas(4))),
     Case("flow_euler", FLUX, 4, image_seq_len=1024)),  # without FluxPipeline's sigmas
    (Case("flow_euler", {**FLUX, "time_shift_type": "linear"}, 9, image_seq_len=4096),
     Case("flow_euler", FLUX, 9, image_seq_len=4096)),
    (Case("flow_euler", {**SD3, "stochastic_sampling": True}, 7),
     Case("flow_euler", {**SD3, "stochastic_sampling": True}, 7, seed=SEED + 1)),  # other noise after the start
    (Case("flow_euler", {**SD3, "shift_terminal": 0.05}, 9), Case("flow_euler", SD3, 9)),
    (Case("dpmpp_2m_flow", SANA, 7), Case("dpmpp_2m_flow", {**SANA, "flow_shift": 4.0}, 7)),
    (Case("dpmpp_2m_flow", SANA, 7), Case("dpmpp_2m_flow", {**SANA, "solver_order": 1}, 7)),
    (Case("unipc_flow", UNIPC_FLOW, 7), Case("unipc_flow", {**UNIPC_FLOW, "flow_shift": 3.0}, 7)),
    (Case("unipc_flow", {**UNIPC_FLOW, "use_dynamic_shifting": True}, 9, image_seq_len=1024),
     Case("unipc_flow", {**UNIPC_FLOW, "use_dynamic_shifting": True}, 9, image_seq_len=4096)),
    (Case("scm", SPRINT, 2), Case("scm", {**SPRINT, "intermediate_timesteps": 1.1}, 2)),
    (Case("scm", SPRINT, 4), Case("scm", SPRINT, 4, seed=SEED + 1)),
    (Case("flow_euler", SD3, 10, strength=0.6), Case("flow_euler", SD3, 10, strength=0.75)),
]


@pytest.mark.parametrize(("ours", "ref"), FAR, ids=[f"{a.label()}~{b.label()}" for a, b in FAR])
def test_parity_can_fail(ours: Case, ref: Case) -> None:
    _diffusers()
    check_parity(ours)  # right on its own reference
    assert_far(ours, ref)


def test_scm_one_step_draws_noise_and_returns_x0() -> None:
    """One SCM step draws noise (keeping the stream in step with diffusers') and cancels it: sin(0) = 0."""
    sched = make_scheduler("scm", SPRINT, 1)
    x = TorchRandn(0).randn(SHAPE)
    model_output = fake_transformer(sched.scale_model_input(x, 0), 500.0)
    out = [sched.step(model_output, 0, x, TorchRandn(seed)) for seed in (1, 2)]
    np.testing.assert_array_equal(out[0], out[1])


def test_flow_shift_helpers_match_diffusers() -> None:
    _diffusers()
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift as flux_shift
    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

    for seq in (1, 256, 1024, 4096, 4300, 4301, 16384):
        assert calculate_shift(seq) == flux_shift(seq)
        assert calculate_shift(seq, 256, 4096, 0.5, 1.16) == flux_shift(seq, 256, 4096, 0.5, 1.16)
        for steps in (1, 4, 50):
            assert empirical_mu(seq, steps) == compute_empirical_mu(seq, steps)


# --- the fast tier: no torch ---


@pytest.mark.fast
def test_calculate_shift_by_hand() -> None:
    """FLUX.1's mu runs from base_shift at 256 tokens to max_shift at 4096, linearly."""
    assert calculate_shift(256) == pytest.approx(0.5)
    assert calculate_shift(4096) == pytest.approx(1.15)
    assert calculate_shift(2176) == pytest.approx((0.5 + 1.15) / 2)
    assert empirical_mu(8192, 4) == pytest.approx(0.00016927 * 8192 + 0.45666666)  # past 4300 tokens: steps-free


@pytest.mark.fast
def test_dynamic_shift_follows_the_image_size() -> None:
    """A larger image shifts FLUX's schedule towards noise; the same tokens give the same schedule whatever the
    latent shape, and mu overrides the image size."""
    small = make_scheduler("flow_euler", FLUX, 8, image_seq_len=1024).sigmas
    large = make_scheduler("flow_euler", FLUX, 8, image_seq_len=4096).sigmas
    assert (large[1:-1] > small[1:-1]).all()
    mu = calculate_shift(4096)
    np.testing.assert_array_equal(make_scheduler("flow_euler", FLUX, 8, mu=mu).sigmas, large)
    static = make_scheduler("flow_euler", SD3, 8)
    np.testing.assert_array_equal(make_scheduler("flow_euler", SD3, 8, image_seq_len=4096).sigmas, static.sigmas)


@pytest.mark.fast
def test_flow_schedules_end_clean_and_start_noisy() -> None:
    """Every flow schedule runs from (nearly) pure noise, sigma ~ 1, down to 0, feeding the model sigma * 1000."""
    for name, config in (("flow_euler", SD3), ("dpmpp_2m_flow", SANA), ("unipc_flow", UNIPC_FLOW)):
        sched = make_scheduler(name, config, 10)
        assert sched.sigmas[0] == pytest.approx(1.0, abs=1e-3) and sched.sigmas[-1] == 0
        assert (np.diff(sched.sigmas) < 0).all()
        assert sched.init_noise_sigma == 1.0 and sched.order == 1
        np.testing.assert_allclose(sched.timesteps, sched.sigmas[:-1] * 1000, atol=1.0)  # DPM/UniPC: truncated


@pytest.mark.fast
def test_flow_euler_step_is_euler_along_the_velocity() -> None:
    sched = make_scheduler("flow_euler", SD3, 4)
    x = TorchRandn(0).randn(SHAPE)
    v = np.full(SHAPE, 0.5, np.float32)
    out = sched.step(v, 1, x, TorchRandn(1))
    np.testing.assert_allclose(out, x + (sched.sigmas[2] - sched.sigmas[1]) * v, rtol=1e-6)
    x0, noise = clean_latents(SHAPE), TorchRandn(2).randn(SHAPE)
    np.testing.assert_allclose(sched.add_noise(x0, noise, 1), sched.sigmas[1] * noise + (1 - sched.sigmas[1]) * x0,
                               rtol=1e-6)


@pytest.mark.fast
def test_noise_draws() -> None:
    """Deterministic flow schedulers draw no noise; stochastic sampling and SCM draw one batch per step."""

    class Counting(TorchRandn):
        calls = 0

        def randn(self, shape):
            type(self).calls += 1
            return super().randn(shape)

    for name, config, draws in (
        ("flow_euler", SD3, 0),
        ("dpmpp_2m_flow", SANA, 0),
        ("unipc_flow", UNIPC_FLOW, 0),
        ("flow_euler", {**SD3, "stochastic_sampling": True}, 4),
        ("scm", SPRINT, 4),
    ):
        Counting.calls = 0
        sched = make_scheduler(name, config, 4)
        x = np.ones(SHAPE, np.float32)
        for i in range(len(sched.timesteps)):
            x = sched.step(fake_transformer(sched.scale_model_input(x, i), 500.0), i, x, Counting(0))
        assert np.isfinite(x).all()
        assert Counting.calls == draws, (name, config, Counting.calls)


# --- which scheduler samples which model ---


@pytest.mark.fast
def test_every_entry_declares_its_predictions() -> None:
    assert set(SCHEDULER_NAMES) == set(DDPM_FAMILY + K_FAMILY + FLOW_FAMILY)
    for name in DDPM_FAMILY + K_FAMILY:
        assert REGISTRY[name].predictions == ("epsilon", "v_prediction"), name
    assert schedulers_for("flow") == ("flow_euler", "dpmpp_2m_flow", "unipc_flow")
    assert schedulers_for("flow_prediction") == schedulers_for("flow")  # diffusers' spelling
    assert schedulers_for("trigflow") == ("scm",)
    vp = ("ddim", "pndm", "lms", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "unipc", "heun", "lcm")
    assert schedulers_for("epsilon") == schedulers_for("v_prediction") == vp


@pytest.mark.fast
@pytest.mark.parametrize(
    ("name", "prediction", "valid"),
    [
        ("ddim", "flow", "flow_euler, dpmpp_2m_flow, unipc_flow"),
        ("euler", "flow_prediction", "flow_euler, dpmpp_2m_flow, unipc_flow"),
        ("dpmpp_2m", "flow", "flow_euler, dpmpp_2m_flow, unipc_flow"),
        ("scm", "flow", "flow_euler, dpmpp_2m_flow, unipc_flow"),
        ("flow_euler", "trigflow", "scm"),
        ("ddim", "trigflow", "scm"),
        ("flow_euler", "epsilon", "ddim, pndm, lms, euler, euler_a, dpmpp_2m, dpmpp_2m_karras, unipc, heun, lcm"),
        ("unipc_flow", "v_prediction", "ddim, pndm, lms, euler, euler_a, dpmpp_2m, dpmpp_2m_karras, unipc, heun"),
    ],
)
def test_check_prediction_refuses_and_names_the_valid(name: str, prediction: str, valid: str) -> None:
    with pytest.raises(ValueError) as info:
        check_prediction(name, prediction)
    message = str(info.value)
    assert name in message and repr(prediction) in message and valid in message, message
    assert "\n" not in message


@pytest.mark.fast
def test_check_prediction_accepts() -> None:
    for name in DDPM_FAMILY + K_FAMILY:
        check_prediction(name, "epsilon")
        check_prediction(name, "v_prediction")
    for name in FLOW_FAMILY[:3]:
        check_prediction(name, "flow")
        check_prediction(name, "flow_prediction")
    check_prediction("scm", "trigflow")


@pytest.mark.fast
def test_check_prediction_unknowns() -> None:
    with pytest.raises(ValueError, match="unknown scheduler 'bogus'; valid: ddim"):
        check_prediction("bogus", "epsilon")
    with pytest.raises(ValueError, match="no scheduler samples a model predicting 'x0'; known: epsilon, flow"):
        check_prediction("ddim", "x0")


@pytest.mark.fast
@pytest.mark.parametrize(
    ("config", "name"),
    [
        (SD3, "flow_euler"),
        (FLUX, "flow_euler"),
        (SANA, "dpmpp_2m_flow"),
        (UNIPC_FLOW, "unipc_flow"),
        (SPRINT, "scm"),
        ({"_class_name": "DPMSolverMultistepScheduler", "prediction_type": "epsilon"}, "dpmpp_2m"),
        ({"_class_name": "DPMSolverMultistepScheduler", "use_karras_sigmas": True}, "dpmpp_2m_karras"),
        ({"_class_name": "UniPCMultistepScheduler", "use_flow_sigmas": None}, "unipc"),
    ],
)
def test_default_scheduler_is_the_checkpoints(config: dict[str, Any], name: str) -> None:
    assert default_scheduler_name(config) == name


# --- refusals: one line saying what is wrong and what is accepted ---

REFUSED: list[tuple[str, dict[str, Any], int, dict[str, Any], str]] = [
    ("flow_euler", FLUX, 4, {}, "use_dynamic_shifting=True shifts the schedule by the image size: pass image_seq_len"),
    ("dpmpp_2m_flow", {**SANA, "use_dynamic_shifting": True}, 4, {}, "pass image_seq_len"),
    ("unipc_flow", {**UNIPC_FLOW, "use_dynamic_shifting": True}, 4, {}, "pass image_seq_len"),
    ("flow_euler", SD3, 4, {"sigmas": [1.0, 0.5]}, "sigmas must hold one value per step (4)"),
    ("flow_euler", SD3, 2, {"sigmas": [1.0, float("nan")]}, "sigmas must each be in (0, 1]"),
    ("flow_euler", SD3, 2, {"sigmas": [2.0, 0.5]}, "sigmas must each be in (0, 1]"),
    ("flow_euler", SD3, 2, {"sigmas": ["a", "b"]}, "sigmas must be a list of numbers"),
    ("dpmpp_2m_flow", SANA, 2, {"sigmas": [1.0, 0.5]}, "DPM-Solver++ takes no custom sigmas"),
    ("unipc", {}, 2, {"sigmas": [1.0, 0.5]}, "custom sigmas need use_flow_sigmas=True"),
    ("euler", {}, 2, {"sigmas": [1.0, 0.5]}, "the euler scheduler takes no custom sigmas"),
    ("scm", SPRINT, 2, {"sigmas": [1.0, 0.5]}, "the scm scheduler takes no custom sigmas"),
    ("flow_euler", FLUX, 4, {"image_seq_len": 0}, "image_seq_len must be a positive number of tokens, got 0"),
    ("flow_euler", FLUX, 4, {"image_seq_len": True}, "image_seq_len must be a positive number of tokens"),
    ("flow_euler", FLUX, 4, {"image_seq_len": 1024.0}, "image_seq_len must be a positive number of tokens"),
    ("flow_euler", FLUX, 4, {"mu": float("inf")}, "mu must be a finite number, got inf"),
    ("flow_euler", FLUX, 4, {"mu": "1.0"}, "mu must be a finite number"),
    ("flow_euler", {**SD3, "time_shift_type": "empirical"}, 4, {}, "time_shift_type='empirical' is not supported"),
    ("flow_euler", {**SD3, "use_beta_sigmas": True}, 4, {}, "use_beta_sigmas=True is not supported"),
    ("flow_euler", {**SD3, "use_karras_sigmas": True, "use_exponential_sigmas": True}, 4, {}, "choose one"),
    ("flow_euler", {**SD3, "shift_terminal": 1.5}, 4, {}, "shift_terminal=1.5 is not supported"),
    ("dpmpp_2m_karras", SANA, 4, {}, "use_karras_sigmas=True is not supported with use_flow_sigmas=True"),
    ("dpmpp_2m_flow", {**SANA, "time_shift_type": "linear"}, 4, {}, "time_shift_type='linear' is not supported"),
    ("dpmpp_2m", {**SANA, "prediction_type": "epsilon"}, 4, {}, "use_flow_sigmas=True is supported with"),
    ("unipc", {**SANA, "use_flow_sigmas": False}, 4, {}, "prediction_type='flow_prediction' needs use_flow_sigmas"),
    ("unipc_flow", {**UNIPC_FLOW, "predict_x0": False}, 4, {}, "needs predict_x0=True"),
    ("unipc", {"shift_terminal": 0.1}, 4, {}, "shift_terminal=0.1 is supported with use_flow_sigmas=True only"),
    ("scm", SPRINT, 4, {}, None),  # accepted: no intermediate step at 4 steps
    ("scm", {**SPRINT, "intermediate_timesteps": 1.3}, 4, {}, "intermediate_timesteps=1.3 is supported at 2 steps"),
    ("scm", {**SPRINT, "prediction_type": "flow_prediction"}, 2, {}, "prediction_type='flow_prediction' is not"),
    ("scm", {**SPRINT, "sigma_data": 0}, 2, {}, "sigma_data=0 is not supported; accepted: a positive number"),
    ("scm", {**SPRINT, "max_timesteps": float("nan")}, 2, {}, "max_timesteps=nan is not supported"),
    ("scm", {**SPRINT, "num_train_timesteps": 3}, 4, {}, "SCM takes at most num_train_timesteps=3 steps, not 4"),
]


@pytest.mark.fast
@pytest.mark.parametrize(
    ("name", "config", "steps", "kwargs", "message"), REFUSED, ids=[f"{r[0]}-{r[4]}" for r in REFUSED]
)
def test_refusals(name: str, config: dict[str, Any], steps: int, kwargs: dict[str, Any], message: str | None) -> None:
    if message is None:
        assert len(make_scheduler(name, config, steps, **kwargs).timesteps) == steps
        return
    with pytest.raises(ValueError) as info:
        make_scheduler(name, config, steps, **kwargs)
    assert message in str(info.value), str(info.value)
    assert "\n" not in str(info.value)
