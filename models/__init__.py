"""Models shipped with edgediff: the embedded default ``shapes`` model and architecture recipes."""

from __future__ import annotations

from pathlib import Path

DEFAULT_MODEL = "shapes"


def default_model_path() -> Path:
    """The embedded default artifact (used when no --model is given)."""
    return Path(__file__).resolve().parent / DEFAULT_MODEL / "artifact"


def default_model_source() -> Path:
    """The embedded model's diffusers folder (its weights as trained; ``edgediff export`` makes the artifact)."""
    return Path(__file__).resolve().parent / DEFAULT_MODEL / "diffusers"
