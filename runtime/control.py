"""ControlNet guidance at run time: control images in, residuals summed into the UNet at every step.

An artifact exported with ``--controlnet NAME=PATH`` has one graph per ControlNet (residuals out) and a
UNet that takes those residuals (``edgediff.export.controlnet``). A ``Control`` names one of them, its
image and how strongly and when it steers; ``ControlledInputs`` wraps the task's ``DenoiserInputs`` and, at
each UNet call, runs every ControlNet inside its guidance window on the same latents, timestep and text
conditioning, scales its residuals and sums them (diffusers' ``MultiControlNetModel``); where none is active
the UNet's session feeds zeros (the UNet's own output, exactly). The arithmetic is diffusers'
``StableDiffusionControlNetPipeline`` (and its SDXL, img2img and inpainting variants) with guess mode off:

- the control image: RGB, resized to the generation's size with Lanczos, scaled to [0, 1] (its
  ``control_image_processor``), repeated per image and doubled for classifier-free guidance;
- step ``k`` of the ``n`` steps run (counted from the first step run: img2img counts its own) keeps a
  ControlNet unless ``k / n < start`` or ``(k + 1) / n > end`` (its ``controlnet_keep``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from . import notes as call_notes
from .canny import DEFAULT_HIGH, DEFAULT_LOW, canny, check_thresholds
from .denoise import DenoiserInputs
from .images import open_image
from .manifest import ArtifactError, Manifest, TensorSpec

PREPROCESSORS = ("none", "canny")  # "none": the image is the control map already (depth, pose, scribble, mask...)
MAX_SCALE = 5.0


@dataclass(frozen=True)
class Control:
    """One ControlNet's guidance: the artifact's ControlNet ``name``, its ``image`` (a path or a PIL image),
    the conditioning ``scale``, the fraction of the steps it acts in (``start`` to ``end``, diffusers'
    ``control_guidance_start/end``), and the ``preprocess`` applied to the image first (``canny`` edges with
    ``low``/``high`` thresholds, or ``none``: the image is the map)."""

    name: str
    image: Any
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0
    preprocess: str = "none"
    low: float = DEFAULT_LOW
    high: float = DEFAULT_HIGH

    @classmethod
    def parse(cls, text: str, **options: Any) -> Control:
        """``NAME=IMAGE`` or ``NAME=IMAGE:SCALE`` (the CLI's ``--control``)."""
        name, sep, rest = text.partition("=")
        if not sep or not name.strip() or not rest.strip():
            raise ValueError(f"--control takes NAME=IMAGE or NAME=IMAGE:SCALE, got {text!r:.80}")
        image, scale = rest, 1.0
        match = re.fullmatch(r"(.+):([-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)", rest)
        if match:
            image, scale = match.group(1), float(match.group(2))
        return cls(name.strip(), image, scale, **options).checked()

    def checked(self) -> Control:
        for field, value, lo, hi in (("scale", self.scale, 0.0, MAX_SCALE), ("start", self.start, 0.0, 1.0),
                                     ("end", self.end, 0.0, 1.0)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
                raise ValueError(f"control {self.name!r:.40}: {field} must be a number in [{lo:g}, {hi:g}], "
                                 f"got {value!r:.40}")
        if self.start >= self.end:
            raise ValueError(f"control {self.name!r:.40}: start ({self.start:g}) must be below end ({self.end:g}): "
                             "it acts from start to end, as fractions of the steps")
        if self.preprocess not in PREPROCESSORS:
            raise ValueError(f"control {self.name!r:.40}: unknown preprocessor {self.preprocess!r:.40}; valid: "
                             f"{', '.join(PREPROCESSORS)}")
        check_thresholds(self.low, self.high)
        return self

    def record(self) -> dict[str, Any]:
        """What the PNG and Result.inputs keep of it."""
        image = str(self.image) if isinstance(self.image, (str, Path)) else "(in memory)"
        out = {"name": self.name, "image": image, "scale": self.scale, "start": self.start, "end": self.end,
               "preprocess": self.preprocess}
        return out | ({"low": self.low, "high": self.high} if self.preprocess == "canny" else {})


@dataclass
class PreparedControl:
    control: Control
    component: str
    image: np.ndarray  # [1, C, H, W] float32 in [0, 1]


def prepare(controls: list[Control], manifest: Manifest, width: int, height: int) -> list[PreparedControl]:
    """Each control checked against the artifact and its image read, preprocessed and sized to the generation's
    ``width`` x ``height`` (a warning says when it had to be resized)."""
    by_name = {c.control: c for c in manifest.controlnets}
    prepared = []
    for control in controls:
        if not isinstance(control, Control):
            raise ValueError(f"controls must be edgediff.runtime.Control objects, got {type(control).__name__}")
        control = control.checked()
        spec = by_name.get(control.name)
        if spec is None:
            have = ", ".join(by_name) or "none (export it with --controlnet NAME=PATH)"
            raise ValueError(f"unknown control {control.name!r:.40}; this artifact's ControlNets: {have}")
        if spec.conditioning_channels != 3:
            raise ArtifactError(f"ControlNet {control.name} takes {spec.conditioning_channels}-channel control images; "
                                "this edgediff feeds RGB images (3 channels)")
        image = open_image(control.image, f"control image for {control.name}")
        if control.preprocess == "canny":
            image = canny(image, control.low, control.high)
        image = image.convert("RGB")
        if image.size != (width, height):
            call_notes.add(f"control image for {control.name} ({_label(control.image)}) is "
                           f"{image.width}x{image.height}; resized to the generation's {width}x{height}", stacklevel=3)
            image = image.resize((width, height), Image.LANCZOS)
        array = (np.asarray(image, dtype=np.float32) / 255.0).transpose(2, 0, 1)[None]
        prepared.append(PreparedControl(control, spec.name, np.ascontiguousarray(array)))
    return prepared


def _label(image: Any) -> str:
    return str(image) if isinstance(image, (str, Path)) else "in memory"


def keeps(control: Control, k: int, n: int) -> bool:
    """Whether the ControlNet acts at step ``k`` of the ``n`` run (diffusers' ``controlnet_keep``)."""
    return not (k / n < control.start or (k + 1) / n > control.end)


class ControlledInputs(DenoiserInputs):
    """A task's denoiser inputs plus the ControlNet residuals (none where no ControlNet acts at a step: the
    session then feeds zeros, ``backends.check_inputs``)."""

    def __init__(self, inner: DenoiserInputs, job, specs: list[TensorSpec], prepared: list[PreparedControl],
                 start: int, total: int):
        super().__init__(inner.conditioning, inner.cfg)
        self.inner, self.job, self.specs, self.start, self.total = inner, job, specs, start, total
        batch = job.settings.batch
        # one control image per image in the batch, the guided batch's two halves alike (diffusers' prepare_image)
        self.controls = [(p.control, p.component, job.cfg.model_input(np.repeat(p.image, batch, axis=0)))
                         for p in prepared]
        self.takes = {p.component: {t.name for t in job.sessions[p.component].variant.inputs} for p in prepared}

    def feeds(self, x_in: np.ndarray, timestep: np.ndarray, i: int) -> dict[str, np.ndarray]:
        feeds = self.inner.feeds(x_in, timestep, i)
        k, n = i - self.start, self.total - self.start
        summed: dict[str, np.ndarray] | None = None
        for control, component, image in self.controls:
            if not keeps(control, k, n):
                continue
            conditioning = {k: self.cfg.rows(v) for k, v in self.conditioning.items()}
            given = {"sample": x_in, "timestep": timestep, **conditioning, "controlnet_cond": self.cfg.rows(image)}
            outputs = self.job.call(component, **{name: v for name, v in given.items() if name in self.takes[component]})
            scale = np.float32(control.scale)
            scaled = {t.name: outputs[t.name] * scale for t in self.specs}
            summed = scaled if summed is None else {name: summed[name] + scaled[name] for name in summed}
        return feeds | (summed or {})  # no ControlNet at this step: the session feeds the UNet zeros

    def after_step(self, x: np.ndarray, i: int, sched) -> np.ndarray:
        return self.inner.after_step(x, i, sched)
