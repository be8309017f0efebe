"""What one generation gives back, as a value: the images and everything needed to explain or redo them.

A ``Result`` is a sequence of its images (``result[0]``, ``len(result)``,
``for image in result``) that also carries the settings actually used (the
model's recommended values filled in), the seed of each image, the raw
per-call seconds of each stage, and the backend, device and precision each
component ran at. ``edgediff.runtime.outputs.save_result`` writes it as PNGs
with A1111's ``parameters`` text and edgediff's JSON, the same files the CLI
writes.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from .settings import GenerationSettings


@dataclass
class Timings:
    """Raw per-call durations of one generation, stage by stage (seconds)."""

    stages: dict[str, list[float]] = field(default_factory=dict)

    def add(self, stage: str, seconds: float) -> None:
        self.stages.setdefault(stage, []).append(seconds)

    def summary(self) -> dict[str, dict[str, float]]:
        """Per stage: calls, total, first call, median of the rest (what ``--verbose`` prints)."""
        out = {}
        for stage, values in self.stages.items():
            rest = values[1:]
            out[stage] = {"calls": len(values), "total": sum(values), "first": values[0],
                          "median_rest": statistics.median(rest) if rest else float("nan")}
        return out


@dataclass(frozen=True)
class Result(Sequence):
    images: tuple[Image.Image, ...]
    settings: GenerationSettings  # resolved: the values used
    task: str  # txt2img, img2img, inpaint, outpaint
    timings: Timings
    components: dict[str, dict[str, Any]]  # per component: precision, backend, device, execution_precision
    model: str = ""  # the artifact folder
    inputs: dict[str, Any] = field(default_factory=dict)  # the task's own inputs, for the record (image, mask, ...)
    loras: tuple[dict[str, Any], ...] = ()  # the LoRAs merged in: file and scale of each
    notes: tuple[str, ...] = ()  # what this call should tell its caller (a prompt cut, a control image resized)

    def __getitem__(self, k):
        return self.images[k]

    def __len__(self) -> int:
        return len(self.images)

    @property
    def seeds(self) -> tuple[int, ...]:
        return self.settings.seeds

    def parameters(self, k: int) -> str:
        """A1111's ``parameters`` text for image ``k``: what web UIs and image viewers read."""
        s = self.settings
        prompt, negative = s.rows()[k]
        return (f"{prompt}\nNegative prompt: {negative or ''}\n"
                f"Steps: {s.steps}, Sampler: {s.scheduler}, CFG scale: {s.guidance}, Seed: {s.seeds[k]}, "
                f"Size: {self.images[k].width}x{self.images[k].height}"
                + (f", Denoising strength: {s.strength}" if s.strength is not None else "")
                + (f", CFG until: {s.cfg_until}" if s.cfg_until is not None else "")
                + (f", DeepCache interval: {s.cache_interval}" if s.cache_interval not in (None, 1) else "")
                + (", VAE: tiny" if self.components.get("vae_decoder", {}).get("precision") == "tiny" else "")
                + (", LoRAs: " + ", ".join(f"{Path(x['file']).stem}:{x['scale']:g}" for x in self.loras)
                   if self.loras else "")
                + (f", Hires upscale: {h['scale']:g}, Hires upscaler: {h['upscaler']}"
                   if (h := self.inputs.get("hires")) else "")
                + "".join(f", ControlNet {j}: Model: {c['name']}, Module: {c['preprocess']}, Weight: {c['scale']:g}, "
                          f"Guidance Start: {c['start']:g}, Guidance End: {c['end']:g}"
                          for j, c in enumerate(self.inputs.get("controls", ()))))

    def metadata(self, k: int) -> dict[str, Any]:
        """edgediff's JSON record of image ``k``: enough to regenerate it alone."""
        s = self.settings
        prompt, negative = s.rows()[k]
        return {"task": self.task, "prompt": prompt, "negative": negative, "index": k, "seed": self.seeds[k],
                "steps": s.steps, "guidance": s.guidance, "width": s.width, "height": s.height,
                "scheduler": s.scheduler, "rng": s.rng, "strength": s.strength, "cfg_until": s.cfg_until,
                "cache_interval": s.cache_interval,
                "model": self.model,
                "backend": next(iter(self.components.values()), {}).get("backend"),
                "precision": {c: d["precision"] for c, d in self.components.items()},
                **({"loras": list(self.loras)} if self.loras else {}), **self.inputs}
