"""What one generation is asked to do, as one frozen value validated once.

``GenerationSettings`` holds the prompts and every number of a generation.
``None`` means "the model's": steps and guidance from the artifact's
recommended ``defaults`` (else 25 and 7.5), the checkpoint's own scheduler,
the model's native size (or, for image tasks, the input image's size rounded
down to a multiple of the VAE's scale factor). ``resolved(...)`` fills those
in, so a ``Result`` records the values actually used. The Python API and the
CLI build the same object.

Image ``k`` of a batch (prompts in order, each repeated ``images_per_prompt``
times) is drawn with its own random stream seeded ``seed + k`` (A1111's
convention), so any image regenerates alone from the seed its PNG records.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from .limits import MAX_STEPS, MAX_TOTAL_PIXELS, check_pixels
from .rng import RNG_NAMES
from .schedulers import SCHEDULER_NAMES, check_prediction


@dataclass(frozen=True)
class GenerationSettings:
    prompts: tuple[str, ...]
    negative_prompts: tuple[str, ...] | None = None  # one per prompt; None: no negative prompt (SDXL: zeros)
    steps: int | None = None
    guidance: float | None = None  # classifier-free guidance scale; <= 1 disables it
    seed: int = 0  # of image 0; image k uses seed + k
    width: int | None = None
    height: int | None = None
    scheduler: str | None = None
    images_per_prompt: int = 1
    rng: str = "numpy"  # "torch" reproduces diffusers' torch.Generator stream
    strength: float | None = None  # image tasks: the fraction of the schedule redone, in (0, 1]
    cfg_until: float | None = None  # guidance only for this fraction of the steps run, in [0, 1]; None: all
    cache_interval: int | None = None  # DeepCache: the full denoiser every N steps run, its shallow branch between

    def __post_init__(self) -> None:
        prompts = (self.prompts,) if isinstance(self.prompts, str) else self.prompts
        if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompt must be a string or a non-empty list of strings, got {self.prompts!r:.80}")
        object.__setattr__(self, "prompts", tuple(prompts))
        negatives = self.negative_prompts
        if isinstance(negatives, str):
            negatives = (negatives,) * len(prompts)
        if negatives is not None:
            if not isinstance(negatives, (list, tuple)) or not all(isinstance(p, str) for p in negatives):
                raise ValueError(f"negative_prompt must be a string, a list of strings or None, got {negatives!r:.80}")
            if len(negatives) != len(prompts):
                raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts; give one per prompt "
                                 "or a single string")
            object.__setattr__(self, "negative_prompts", tuple(negatives))
        for name in ("width", "height"):
            value = getattr(self, name)
            if value is not None and not _is_int(value, 1):
                raise ValueError(f"{name} must be a positive multiple of 8 pixels, got {value!r:.40}")
        if self.steps is not None and not _is_int(self.steps, 1, MAX_STEPS):
            raise ValueError(f"steps must be an integer >= 1 (at most {MAX_STEPS}), got {self.steps!r:.40}")
        if self.guidance is not None and not (_is_number(self.guidance) and math.isfinite(self.guidance)
                                              and self.guidance >= 0):
            raise ValueError(f"guidance must be a finite number >= 0 (<= 1 disables classifier-free guidance), "
                             f"got {self.guidance!r:.40}")
        if not _is_int(self.images_per_prompt, 1):
            raise ValueError(f"num_images must be an integer >= 1, got {self.images_per_prompt!r:.40}")
        if not _is_int(self.seed, 0, 2**64 - 1):
            raise ValueError(f"seed must be a non-negative integer below 2**64, got {self.seed!r:.40}")
        if self.seed + self.batch - 1 >= 2**64:
            raise ValueError(f"seed + images must stay below 2**64 (image k is seeded seed + k), got seed {self.seed}")
        if self.scheduler is not None and (not isinstance(self.scheduler, str) or self.scheduler not in SCHEDULER_NAMES):
            raise ValueError(f"unknown scheduler {self.scheduler!r:.40}; valid: {', '.join(SCHEDULER_NAMES)}")
        if not isinstance(self.rng, str) or self.rng not in RNG_NAMES:
            raise ValueError(f"unknown rng {self.rng!r:.40}; valid: {', '.join(RNG_NAMES)}")
        if self.strength is not None and not (_is_number(self.strength) and 0 < self.strength <= 1):
            raise ValueError(f"strength must be in (0, 1], got {self.strength!r:.40}")
        if self.cfg_until is not None and not (_is_number(self.cfg_until) and 0 <= self.cfg_until <= 1):
            raise ValueError(f"cfg_until must be a fraction of the steps in [0, 1] (guidance for the first "
                             f"int(steps * cfg_until) + 1 steps, none after), got {self.cfg_until!r:.40}")
        if self.cache_interval is not None and not _is_int(self.cache_interval, 1, MAX_STEPS):
            raise ValueError(f"cache_interval must be an integer in [1, {MAX_STEPS}] (the full UNet every N steps, "
                             f"DeepCache's shallow branch between; 1 = every step full), got {self.cache_interval!r:.40}")

    @property
    def batch(self) -> int:
        """Images in all: every prompt ``images_per_prompt`` times."""
        return len(self.prompts) * self.images_per_prompt

    @property
    def seeds(self) -> tuple[int, ...]:
        """The seed of each image, in batch order."""
        return tuple(self.seed + k for k in range(self.batch))

    def rows(self) -> list[tuple[str, str | None]]:
        """(prompt, negative prompt) of each image, in batch order."""
        negatives = self.negative_prompts or (None,) * len(self.prompts)
        return [(p, n) for p, n in zip(self.prompts, negatives) for _ in range(self.images_per_prompt)]

    def images(self, start: int, count: int) -> GenerationSettings:
        """The settings of images ``start .. start + count - 1`` alone: the same images, as a batch of their own."""
        rows = self.rows()[start : start + count]
        return replace(self, prompts=tuple(p for p, _ in rows), images_per_prompt=1, seed=self.seed + start,
                       negative_prompts=None if self.negative_prompts is None else tuple(n for _, n in rows))

    def resolved(self, manifest: Any, max_pixels: int, size: tuple[int, int] | None = None) -> GenerationSettings:
        """Every ``None`` filled from ``manifest`` (or the input image's ``size``), the size checked against
        the VAE's multiple and the pixel budget."""
        steps, guidance = manifest.settings(self.steps, self.guidance)
        width = self.width or (size[0] if size else manifest.sample_size)
        height = self.height or (size[1] if size else manifest.sample_size)
        multiple = manifest.vae_scale_factor
        for name, value in (("width", width), ("height", height)):
            if value % multiple:
                raise ValueError(f"{name} must be a positive multiple of {multiple} pixels, got {value}")
        check_pixels(width, height, max_pixels)
        if self.batch * width * height > MAX_TOTAL_PIXELS:
            raise ValueError(f"{self.batch} images of {width}x{height} exceed {MAX_TOTAL_PIXELS:,} pixels in one call "
                             "(they are all held in memory); ask for fewer and call again with another seed")
        scheduler = self.scheduler or manifest.scheduler
        check_prediction(scheduler, manifest.prediction_type)  # ddim on a flow model: refused here, naming the valid
        return replace(self, steps=steps, guidance=guidance, width=width, height=height, scheduler=scheduler)


def _is_int(value: Any, lo: int, hi: int | None = None) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= lo and (hi is None or value <= hi)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
