"""numpy schedulers, one file per algorithm, each verified against diffusers."""

from __future__ import annotations

import importlib
from typing import Any

from .common import Scheduler

# name -> (module, class, extra config applied on top of the checkpoint's)
_REGISTRY: dict[str, tuple[str, str, dict[str, Any]]] = {
    "ddim": ("ddim", "DDIM", {}),
    "pndm": ("pndm", "PNDM", {}),
    "lms": ("lms", "LMS", {}),
    "euler": ("euler", "Euler", {}),
    "euler_a": ("euler_ancestral", "EulerAncestral", {}),
    "dpmpp_2m": ("dpmpp_2m", "DPMSolverPP2M", {}),
    "dpmpp_2m_karras": ("dpmpp_2m", "DPMSolverPP2M", {"use_karras_sigmas": True}),
    "unipc": ("unipc", "UniPC", {}),
    "heun": ("heun", "Heun", {}),
    "lcm": ("lcm", "LCM", {}),
}

SCHEDULER_NAMES: tuple[str, ...] = tuple(_REGISTRY)

# diffusers class name in scheduler_config.json -> our name
_FROM_DIFFUSERS = {
    "DDIMScheduler": "ddim",
    "PNDMScheduler": "pndm",
    "LMSDiscreteScheduler": "lms",
    "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler_a",
    "DPMSolverMultistepScheduler": "dpmpp_2m",
    "UniPCMultistepScheduler": "unipc",
    "HeunDiscreteScheduler": "heun",
    "LCMScheduler": "lcm",
}


def default_scheduler_name(config: dict[str, Any]) -> str:
    """The checkpoint's own scheduler, or Euler when we do not implement it."""
    name = _FROM_DIFFUSERS.get(config.get("_class_name", ""), "euler")
    if name == "dpmpp_2m" and config.get("use_karras_sigmas"):
        name = "dpmpp_2m_karras"
    return name


def make_scheduler(name: str, config: dict[str, Any], num_inference_steps: int) -> Scheduler:
    """A fresh scheduler for one generation of ``num_inference_steps`` steps."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown scheduler {name!r}; valid: {', '.join(SCHEDULER_NAMES)}")
    if num_inference_steps < 1:
        raise ValueError(f"steps must be >= 1, got {num_inference_steps}")
    module, cls, extra = _REGISTRY[name]
    mod = importlib.import_module(f"{__name__}.{module}")
    return getattr(mod, cls)({**config, **extra}, num_inference_steps)


__all__ = ["SCHEDULER_NAMES", "Scheduler", "default_scheduler_name", "make_scheduler"]
