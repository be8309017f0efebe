"""Low-memory mode: the graphs of one stage in memory at a time.

A generation runs in stages: the text encoders, then the denoiser (with DeepCache's shallow graph), then the
VAE decoder (the VAE encoder before the denoiser for image inputs). ``StageSessions`` stands in for the
pipeline's session dict: asking for a component of another stage releases the current stage's sessions first,
then opens the new one, so the peak is the largest stage's, not the sum of all. The price is a load per stage
per call (the compile cache makes it a read of the compiled graph); several chunks of images in one call
load the text encoder again for each chunk.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import threading
from typing import Callable, Iterator

from .backends import Session

STAGE_OF_ROLE = {"text_encoder": "text", "denoiser": "denoise", "shallow_denoiser": "denoise", "controlnet": "denoise",
                 "vae_encoder": "encode", "vae_decoder": "decode"}


class StageSessions:
    """A mapping component -> Session holding one stage's sessions; the others are opened when asked for."""

    def __init__(self, open_component: Callable[[str], Session], roles: dict[str, str],
                 on_release: Callable[[str, Session], None] = lambda component, session: None):
        self._open, self._on_release = open_component, on_release
        self._stage_of = {c: STAGE_OF_ROLE[r] for c, r in roles.items()}
        self._resident: dict[str, Session] = {}
        self._lock = threading.RLock()

    def __getitem__(self, component: str) -> Session:
        with self._lock:
            if component not in self._resident:
                if component not in self._stage_of:
                    raise KeyError(component)
                stage = self._stage_of[component]
                if any(self._stage_of[c] != stage for c in self._resident):
                    self.release()
                self._resident[component] = self._open(component)
            return self._resident[component]

    def __setitem__(self, component: str, session: Session) -> None:
        with self._lock:
            self._resident[component] = session

    def __contains__(self, component: object) -> bool:
        return component in self._resident

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._resident))

    def __len__(self) -> int:
        return len(self._resident)

    def items(self):
        return list(self._resident.items())

    def release(self) -> None:
        """Drop every loaded session and hand the freed memory back to the system."""
        with self._lock:
            for component, session in self._resident.items():
                self._on_release(component, session)
            self._resident.clear()
        gc.collect()
        trim_heap()


def trim_heap() -> None:
    """glibc keeps freed memory for reuse; ``malloc_trim`` returns it to the system, so the resident size drops
    after a stage is released (a no-op where the C library has no malloc_trim)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        if libc is not None and hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)
    except OSError:
        pass
