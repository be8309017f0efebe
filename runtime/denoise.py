"""One generation's state, and the denoising loop every task shares.

A ``Job`` is made per call (per chunk of images): the settings, a snapshot of
the sessions, one noise stream per image, the guidance strategy, the timings.
Nothing of a call is kept on the ``Pipeline``, so one loaded pipeline serves
several threads. ``Job.call`` runs a component, times it and refuses NaN/Inf
in what it returns, at every precision.

``denoise`` is the loop. What varies between tasks is the denoiser's inputs,
built by one ``DenoiserInputs`` object: the base passes the latents, the
timestep and the conditioning; ``InpaintingUNetInputs`` appends a 9-channel
inpainting UNet's mask and masked-image latents; ``KnownRegionBlend`` pastes
the known region, noised to the next level, back after each step (inpainting
with an ordinary UNet). ControlNet residuals or cached features plug in the
same way.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np

from .errors import Cancelled, EdgediffError
from . import step_cache
from .backends import Session
from .conditioning import Guidance
from .result import Timings
from .settings import GenerationSettings


class GenerationError(EdgediffError, RuntimeError):
    """A stage produced NaN/Inf values: the settings or the weights overflow."""


class PrecisionError(GenerationError):
    """A reduced-precision component produced NaN/Inf or a flat image."""

    def __init__(self, component: str, precision: str, what: str):
        super().__init__(
            f"{component} at {precision} produced {what}; rerun with fallback=True (--fallback) to redo "
            f"{component} in fp32, or choose another precision for it"
        )
        self.component = component
        self.precision = precision


class StepObserver(Protocol):
    """Told after every denoising step of a call, with the latents so far (a preview decodes them, a progress bar
    counts): ``done`` of ``total`` steps over the whole call (all its chunks). Returning False stops the call
    between two steps: ``Cancelled`` is raised and nothing is returned. It runs on the generating thread."""

    def on_step(self, done: int, total: int, latents: np.ndarray) -> bool | None: ...


@dataclass(frozen=True)
class Progress:
    """A progress function ``callback(done, total)`` as an observer; it too may return False to stop."""

    callback: Callable[[int, int], bool | None]

    def on_step(self, done: int, total: int, latents: np.ndarray) -> bool | None:
        return self.callback(done, total)


@dataclass(frozen=True)
class ChunkSteps:
    """An observer of the whole call, told of chunk ``index`` of ``chunks`` (each of the same steps)."""

    observer: StepObserver
    index: int
    chunks: int

    def on_step(self, done: int, total: int, latents: np.ndarray) -> bool | None:
        return self.observer.on_step(self.index * total + done, self.chunks * total, latents)


@dataclass
class Job:
    """What one generation carries from stage to stage."""

    settings: GenerationSettings  # resolved
    sessions: dict[str, Session]  # a snapshot: a fallback elsewhere does not change this call's
    noise: object  # ImageNoise: one stream per image
    cfg: Guidance
    observer: StepObserver | None = None
    timings: Timings = field(default_factory=Timings)
    denoiser: str = "unet"  # the manifest's denoiser component
    shallow_denoiser: str | None = None  # DeepCache's shallow graph, where the artifact has one
    controls: list = field(default_factory=list)  # control.PreparedControl: the ControlNets steering this call

    def call(self, component: str, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        """Run ``component``, timed; NaN/Inf in any output is an error naming it."""
        session = self.sessions[component]
        t0 = time.perf_counter()
        outputs = session(**inputs)
        self.timings.add(component, time.perf_counter() - t0)
        for name, array in outputs.items():
            if not np.isfinite(array).all():
                raise nan_error(component, session.variant.precision, f" in its output {name}")
        return outputs


def nan_error(component: str, precision: str, where: str) -> GenerationError:
    if precision != "fp32":
        return PrecisionError(component, precision, "NaN/Inf values")
    return GenerationError(f"{component} produced NaN/Inf values{where} at fp32: the settings overflow (a very large "
                           "guidance scale?) or the weights are broken; nothing was written")


class DenoiserInputs:
    """The denoiser's feeds at each call: latents, timestep, conditioning (the rows the guidance takes now)."""

    def __init__(self, conditioning: dict[str, np.ndarray], cfg: Guidance):
        self.conditioning, self.cfg = conditioning, cfg

    def feeds(self, x_in: np.ndarray, timestep: np.ndarray, i: int) -> dict[str, np.ndarray]:
        return {"sample": x_in, "timestep": timestep, **{k: self.cfg.rows(v) for k, v in self.conditioning.items()}}

    def after_step(self, x: np.ndarray, i: int, sched) -> np.ndarray:
        return x


class InpaintingUNetInputs(DenoiserInputs):
    """A 9-channel inpainting UNet: the mask and the masked image's latents appended to the latents."""

    def __init__(self, conditioning: dict[str, np.ndarray], cfg: Guidance, channels: np.ndarray):
        super().__init__(conditioning, cfg)
        self.channels = channels  # for the guided batch

    def feeds(self, x_in: np.ndarray, timestep: np.ndarray, i: int) -> dict[str, np.ndarray]:
        return super().feeds(np.concatenate([x_in, self.cfg.rows(self.channels)], axis=1), timestep, i)


class KnownRegionBlend(DenoiserInputs):
    """An ordinary UNet inpainting: after each step the known region, noised to the next step's level,
    replaces the sample outside the mask (diffusers' ``StableDiffusionInpaintPipeline`` with 4 channels)."""

    def __init__(self, conditioning: dict[str, np.ndarray], cfg: Guidance, mask: np.ndarray, known: np.ndarray,
                 noise: np.ndarray):
        super().__init__(conditioning, cfg)
        self.mask, self.known, self.noise = mask, known, noise

    def after_step(self, x: np.ndarray, i: int, sched) -> np.ndarray:
        known = self.known
        if i < len(sched.timesteps) - 1:
            known = sched.add_noise(known, self.noise, i + 1)
        return ((1 - self.mask) * known + self.mask * x).astype(np.float32)


def denoise(job: Job, sched, x: np.ndarray, start: int, inputs: DenoiserInputs) -> np.ndarray:
    """The denoising loop from UNet call ``start`` to the end of the schedule.

    With ``cfg_until`` the guidance stops after call ``int(calls run * cfg_until)`` of the run: the rest runs
    the conditional half only, at half the batch (diffusers' ``SDCFGCutoffCallback(cutoff_step_ratio=...)``).
    With ``cache_interval`` the denoiser runs in full every that many calls of the run and DeepCache's
    shallow branch between (``step_cache``); both count the calls actually run.
    """
    total = len(sched.timesteps)
    until = job.settings.cfg_until
    cutoff = start + int((total - start) * until) if until is not None and job.cfg.enabled else total
    denoiser = step_cache.for_job(job, start)
    for i in range(start, total):
        if i == cutoff + 1:
            job.cfg.stop()
        x_in = sched.scale_model_input(job.cfg.model_input(x), i).astype(np.float32)
        timestep = np.full((x_in.shape[0],), sched.timesteps[i], dtype=np.float32)
        out = denoiser(inputs.feeds(x_in, timestep, i), i)
        x = sched.step(job.cfg.combine(out), i, x, job.noise).astype(np.float32)
        x = inputs.after_step(x, i, sched)
        if not np.isfinite(x).all():
            raise nan_error(job.denoiser, job.sessions[job.denoiser].variant.precision,
                            f" at step {i + 1} of {total} (guidance {job.cfg.scale:g})")
        if job.observer is not None and job.observer.on_step(i + 1 - start, total - start, x) is False:
            raise Cancelled(f"cancelled by the step observer after step {i + 1 - start} of {total - start}; "
                            "nothing was returned")
    return x
