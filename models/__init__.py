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


def shapes_upscaler() -> Path:
    """The x2 upscaler trained for the embedded model (``models/shapes/upscaler/``, an exported SRVGGNetCompact:
    ``models/shapes/training/train_upscaler.py``); ``edgediff upscale --upscaler`` and ``--hires-upscaler`` take it."""
    return Path(__file__).resolve().parent / DEFAULT_MODEL / "upscaler"


def shapes_lora(name: str = "diamond") -> Path:
    """A LoRA shipped for the embedded model (``models/shapes/loras/``): ``diamond`` teaches it a shape it never
    saw (``models/shapes/training/train_lora.py``)."""
    path = Path(__file__).resolve().parent / DEFAULT_MODEL / "loras" / f"{name}.safetensors"
    if not path.is_file():
        shipped = sorted(p.stem for p in path.parent.glob("*.safetensors"))
        raise ValueError(f"no shipped LoRA {name!r:.40}; shipped: {', '.join(shipped) or 'none'}")
    return path
