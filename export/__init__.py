"""Export a diffusers checkpoint to an edgediff artifact (needs the `export` extra: torch, diffusers).

Submodules import torch only where they need it; ``edgediff.export.onnx_io``
is torch-free so the quantizer can share it.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "ExportError":
        from .components import ExportError

        return ExportError
    if name == "export_artifact":
        from .exporter import export_artifact

        return export_artifact
    raise AttributeError(name)


__all__ = ["ExportError", "export_artifact"]
