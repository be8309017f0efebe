"""How the denoiser is called at each step: every step in full, or DeepCache's step caching.

DeepCache (Ma et al., CVPR 2024, arXiv 2312.00858) observes that the UNet's
deep features change slowly between adjacent steps. Every ``interval`` steps
(counted from the first step run, so img2img counts its own) the full
denoiser runs and also returns one high-level feature (``deep_feature``); in
the steps between, the exported shallow graph reuses that feature and
recomputes only the layers nearest the image (the branch chosen at export,
``ShallowDenoiserSpec.branch``). The skip rule is the authors' own
(``DeepCacheSDHelper``, ``uniform`` mode); ``export/deepcache.py`` builds the
graph pair.

Chosen once per generation (``for_job``), as guidance is: the loop calls the
strategy and never branches on it.
"""

from __future__ import annotations

import numpy as np

from .manifest import DEEP_FEATURE


class EveryStep:
    """The full denoiser at every step."""

    def __init__(self, job):
        self.job = job

    def __call__(self, feeds: dict[str, np.ndarray], i: int) -> np.ndarray:
        return self.job.call(self.job.denoiser, **feeds)["out_sample"]


class DeepCache(EveryStep):
    """The full denoiser every ``interval`` steps from ``start``, its shallow branch on the cached feature between."""

    def __init__(self, job, shallow: str, interval: int, start: int):
        super().__init__(job)
        self.shallow, self.interval, self.start = shallow, interval, start
        self.feature: np.ndarray | None = None
        # what the shallow graph reads (a branch without cross-attention takes no text embeddings)
        self.takes = {t.name for t in job.sessions[shallow].variant.inputs}

    def __call__(self, feeds: dict[str, np.ndarray], i: int) -> np.ndarray:
        if (i - self.start) % self.interval == 0:
            outputs = self.job.call(self.job.denoiser, **feeds)
            self.feature = outputs[DEEP_FEATURE]
            return outputs["out_sample"]
        if len(self.feature) != len(feeds["sample"]):  # cached before the guidance stopped: its conditional half
            self.feature = self.job.cfg.rows(self.feature)
        feeds = {name: value for name, value in feeds.items() if name in self.takes}
        return self.job.call(self.shallow, **feeds, **{DEEP_FEATURE: self.feature})["out_sample"]


def for_job(job, start: int):
    """The strategy ``job.settings`` asks for: DeepCache with ``cache_interval`` > 1, else every step in full."""
    interval = job.settings.cache_interval
    if interval is None or interval == 1:
        return EveryStep(job)
    return DeepCache(job, job.shallow_denoiser, interval, start)
