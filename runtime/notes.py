"""What one generation call should tell its caller, kept with that call: ``Result.notes``.

A prompt cut to its encoder's length, a control image resized, a reduced-precision component rerun in fp32: each is
said with ``add``, which appends it to the notes of the call running in this thread (or asyncio task) and also
issues it as a Python warning, as before. The notes live in a ``contextvars.ContextVar``, so two calls running at
once on one pipeline (a server's threads) each get their own, where catching warnings (process-wide state) would
mix them up.
"""

from __future__ import annotations

import contextlib
import warnings
from contextvars import ContextVar
from typing import Iterator

_CURRENT: ContextVar[list[str] | None] = ContextVar("edgediff_call_notes", default=None)


def add(text: str, stacklevel: int = 2) -> None:
    """Note ``text`` for the current call (if one is being collected) and warn with it."""
    notes = _CURRENT.get()
    if notes is not None and text not in notes:
        notes.append(text)
    warnings.warn(text, stacklevel=stacklevel + 1)


@contextlib.contextmanager
def collecting() -> Iterator[list[str]]:
    """The list that the ``add`` calls made inside the block fill (its own, whatever runs in other threads)."""
    notes: list[str] = []
    token = _CURRENT.set(notes)
    try:
        yield notes
    finally:
        _CURRENT.reset(token)


__all__ = ["add", "collecting"]
