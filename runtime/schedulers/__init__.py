"""numpy schedulers, one file per algorithm, each verified against diffusers."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

from .common import Scheduler


@dataclass(frozen=True)
class SchedulerEntry:
    """One of our schedulers: where its port lives and the diffusers scheduler it reproduces."""

    module: str  # file in this package
    cls: str  # class in that file
    diffusers_class: str  # the diffusers class it is ported from (``_class_name`` in scheduler_config.json)
    extra: Mapping[str, Any] = field(default_factory=dict)  # config applied on top of the checkpoint's

    def __post_init__(self) -> None:
        object.__setattr__(self, "extra", MappingProxyType(dict(self.extra)))  # read-only, like the rest


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
}

SCHEDULER_NAMES: tuple[str, ...] = tuple(REGISTRY)


def default_scheduler_name(config: dict[str, Any]) -> str:
    """The checkpoint's own scheduler, or Euler when we do not implement it. Of the entries for the config's
    diffusers class, the one with the most extra flags that the config sets the same way wins: dpmpp_2m_karras
    for a DPMSolverMultistepScheduler with use_karras_sigmas, else dpmpp_2m."""
    class_name = config.get("_class_name", "")
    matches = [
        name
        for name, entry in REGISTRY.items()
        if entry.diffusers_class == class_name
        and all(bool(config.get(key)) == bool(value) for key, value in entry.extra.items())
    ]
    return max(matches, key=lambda name: len(REGISTRY[name].extra), default="euler")


def make_scheduler(name: str, config: dict[str, Any], num_inference_steps: int) -> Scheduler:
    """A fresh scheduler for one generation of ``num_inference_steps`` steps."""
    if name not in REGISTRY:
        raise ValueError(f"unknown scheduler {name!r}; valid: {', '.join(SCHEDULER_NAMES)}")
    if num_inference_steps < 1:
        raise ValueError(f"steps must be >= 1, got {num_inference_steps}")
    entry = REGISTRY[name]
    mod = importlib.import_module(f"{__name__}.{entry.module}")
    return getattr(mod, entry.cls)({**config, **entry.extra}, num_inference_steps)


__all__ = ["REGISTRY", "SCHEDULER_NAMES", "Scheduler", "SchedulerEntry", "default_scheduler_name", "make_scheduler"]
