"""numpy schedulers, one file per algorithm, each verified against diffusers."""

from __future__ import annotations

import importlib
import math
import numbers
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping, Sequence

from .common import Scheduler


# What a denoiser predicts (the manifest's prediction_type): the noise or v (DDPM-trained UNets), the flow velocity
# (SD3, FLUX, Sana; diffusers' config spells it "flow_prediction"), or TrigFlow's (Sana-Sprint)
VP_PREDICTIONS = ("epsilon", "v_prediction")
PREDICTION_ALIASES = {"flow_prediction": "flow"}


@dataclass(frozen=True)
class SchedulerEntry:
    """One of our schedulers: where its port lives, the diffusers scheduler it reproduces and the predictions it
    samples."""

    module: str  # file in this package
    cls: str  # class in that file
    diffusers_class: str  # the diffusers class it is ported from (``_class_name`` in scheduler_config.json)
    extra: Mapping[str, Any] = field(default_factory=dict)  # config applied on top of the checkpoint's
    predictions: tuple[str, ...] = VP_PREDICTIONS  # the models it can sample, by what they predict

    def __post_init__(self) -> None:
        object.__setattr__(self, "extra", MappingProxyType(dict(self.extra)))  # read-only, like the rest


# flow variants of the multistep solvers: the same port, diffusers' flow flags set on the checkpoint's config
FLOW_SIGMAS = {"use_flow_sigmas": True, "prediction_type": "flow_prediction"}

# our name -> entry; read by make_scheduler, default_scheduler_name and the parity tests
REGISTRY: dict[str, SchedulerEntry] = {
    "ddim": SchedulerEntry("ddim", "DDIM", "DDIMScheduler"),
    "pndm": SchedulerEntry("pndm", "PNDM", "PNDMScheduler"),
    "lms": SchedulerEntry("lms", "LMS", "LMSDiscreteScheduler"),
    "euler": SchedulerEntry("euler", "Euler", "EulerDiscreteScheduler"),
    "euler_a": SchedulerEntry("euler_ancestral", "EulerAncestral", "EulerAncestralDiscreteScheduler"),
    "dpmpp_2m": SchedulerEntry("dpmpp_2m", "DPMSolverPP2M", "DPMSolverMultistepScheduler"),
    "dpmpp_2m_karras": SchedulerEntry(
        "dpmpp_2m", "DPMSolverPP2M", "DPMSolverMultistepScheduler", {"use_karras_sigmas": True}
    ),
    "unipc": SchedulerEntry("unipc", "UniPC", "UniPCMultistepScheduler"),
    "heun": SchedulerEntry("heun", "Heun", "HeunDiscreteScheduler"),
    "lcm": SchedulerEntry("lcm", "LCM", "LCMScheduler"),
    "flow_euler": SchedulerEntry(
        "flow_euler", "FlowMatchEuler", "FlowMatchEulerDiscreteScheduler", predictions=("flow",)
    ),
    "dpmpp_2m_flow": SchedulerEntry(
        "dpmpp_2m", "DPMSolverPP2M", "DPMSolverMultistepScheduler", FLOW_SIGMAS, predictions=("flow",)
    ),
    "unipc_flow": SchedulerEntry("unipc", "UniPC", "UniPCMultistepScheduler", FLOW_SIGMAS, predictions=("flow",)),
    "scm": SchedulerEntry("scm", "SCM", "SCMScheduler", predictions=("trigflow",)),
}

SCHEDULER_NAMES: tuple[str, ...] = tuple(REGISTRY)


def schedulers_for(prediction_type: str) -> tuple[str, ...]:
    """Our schedulers that sample a model predicting ``prediction_type`` ("flow_prediction" reads as "flow")."""
    prediction = PREDICTION_ALIASES.get(prediction_type, prediction_type)
    return tuple(name for name, entry in REGISTRY.items() if prediction in entry.predictions)


def check_prediction(name: str, prediction_type: str) -> None:
    """ValueError unless scheduler ``name`` samples a model predicting ``prediction_type``, naming those that do:
    e.g. ddim on a flow model (settings resolve this before any model runs)."""
    if name not in REGISTRY:
        raise ValueError(f"unknown scheduler {name!r:.40}; valid: {', '.join(SCHEDULER_NAMES)}")
    prediction = PREDICTION_ALIASES.get(prediction_type, prediction_type)
    if prediction in REGISTRY[name].predictions:
        return
    valid = schedulers_for(prediction)
    if not valid:
        known = sorted({p for entry in REGISTRY.values() for p in entry.predictions})
        raise ValueError(f"no scheduler samples a model predicting {prediction_type!r:.40}; known: {', '.join(known)}")
    raise ValueError(
        f"the {name} scheduler cannot sample a model predicting {prediction_type!r:.40} "
        f"(it takes {' or '.join(REGISTRY[name].predictions)}); valid for this model: {', '.join(valid)}"
    )


def default_scheduler_name(config: dict[str, Any]) -> str:
    """The checkpoint's own scheduler, or Euler when we do not implement it. Of the entries for the config's
    diffusers class, the one with the most extra flags that the config sets the same way wins: dpmpp_2m_karras
    for a DPMSolverMultistepScheduler with use_karras_sigmas, dpmpp_2m_flow for one with use_flow_sigmas and
    prediction_type "flow_prediction" (Sana's), else dpmpp_2m."""
    class_name = config.get("_class_name", "")

    def same(key: str, value: Any) -> bool:  # flags by truth (diffusers saves an unset one as None), others equal
        return bool(config.get(key)) == value if isinstance(value, bool) else config.get(key) == value

    matches = [
        name
        for name, entry in REGISTRY.items()
        if entry.diffusers_class == class_name and all(same(key, value) for key, value in entry.extra.items())
    ]
    return max(matches, key=lambda name: len(REGISTRY[name].extra), default="euler")


# the model's flow shift, as each flow sampler's config names it
SHIFT_KEYS = {"FlowMatchEulerDiscreteScheduler": "shift", "DPMSolverMultistepScheduler": "flow_shift",
              "UniPCMultistepScheduler": "flow_shift"}


def carried_shift(diffusers_class: str, config: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint's shift under the name ``diffusers_class`` reads it, where the config is another flow
    sampler's: a flow model's shift (SD3's 3.0, Sana's flow_shift 3.0) belongs to the model, so ``--scheduler
    flow_euler`` on Sana samples at shift 3, not at FlowMatchEuler's default 1 (diffusers' ``from_config`` drops the
    other class's key; its users pass ``shift=`` by hand)."""
    want, have = SHIFT_KEYS.get(diffusers_class), SHIFT_KEYS.get(config.get("_class_name", ""))
    if want is None or have is None or want == have or want in config or have not in config:
        return {}
    return {want: config[have]}


def make_scheduler(
    name: str,
    config: dict[str, Any],
    num_inference_steps: int,
    *,
    image_seq_len: int | None = None,
    mu: float | None = None,
    sigmas: Sequence[float] | None = None,
) -> Scheduler:
    """A fresh scheduler for one generation of ``num_inference_steps`` steps.

    The flow schedulers (flow_euler, and dpmpp_2m / unipc when the config sets ``use_flow_sigmas``) also take:

    * ``image_seq_len``: the number of image tokens the transformer sees, which sets the dynamic shift's mu when
      the config has ``use_dynamic_shifting`` (``calculate_shift`` with the config's base/max shift and sequence
      lengths). For a latent of H x W and a transformer patch size p it is (H // p) * (W // p): FLUX and SD3
      patch 2x2 ((H/2) * (W/2), FluxPipeline's packed ``latents.shape[1]``, StableDiffusion3Pipeline's
      ``(height // patch_size) * (width // patch_size)``); Sana patches 1x1 (H * W). The pipeline passes it for
      every model; the schedulers that do not shift by the image size ignore it, as they ignore ``mu``.
    * ``mu``: the dynamic shift's exponent itself, in place of ``calculate_shift`` (FLUX.2 passes
      ``common.empirical_mu(image_seq_len, steps)``).
    * ``sigmas``: the caller's noise levels, one per step (FluxPipeline passes linspace(1, 1/N, N)); the config's
      shift still applies to them, as in diffusers' ``set_timesteps(sigmas=...)``. flow_euler and unipc_flow only.

    SCM (Sana-Sprint) reads its call options from the config: ``max_timesteps`` (default 1.5708) and
    ``intermediate_timesteps`` (default 1.3 at 2 steps, none otherwise; a value needs exactly 2 steps).
    """
    if name not in REGISTRY:
        raise ValueError(f"unknown scheduler {name!r}; valid: {', '.join(SCHEDULER_NAMES)}")
    if num_inference_steps < 1:
        raise ValueError(f"steps must be >= 1, got {num_inference_steps}")
    if image_seq_len is not None:
        if isinstance(image_seq_len, bool) or not isinstance(image_seq_len, numbers.Integral) or image_seq_len < 1:
            raise ValueError(f"image_seq_len must be a positive number of tokens, got {image_seq_len!r:.40}")
        image_seq_len = int(image_seq_len)
    if mu is not None:
        if isinstance(mu, bool) or not isinstance(mu, numbers.Real) or not math.isfinite(mu):
            raise ValueError(f"mu must be a finite number, got {mu!r:.40}")
        mu = float(mu)
    entry = REGISTRY[name]
    mod = importlib.import_module(f"{__name__}.{entry.module}")
    cls = getattr(mod, entry.cls)
    merged = {**config, **carried_shift(entry.diffusers_class, config), **entry.extra}
    if getattr(cls, "takes_flow_inputs", False):
        return cls(merged, num_inference_steps, image_seq_len=image_seq_len, mu=mu, sigmas=sigmas)
    if sigmas is not None:
        raise ValueError(f"the {name} scheduler takes no custom sigmas")
    return cls(merged, num_inference_steps)


__all__ = [
    "REGISTRY",
    "SCHEDULER_NAMES",
    "Scheduler",
    "SchedulerEntry",
    "carried_shift",
    "check_prediction",
    "default_scheduler_name",
    "make_scheduler",
    "schedulers_for",
]
