"""Export a diffusers checkpoint to an edgediff artifact (needs the `export` extra: torch, diffusers)."""

from .components import ExportError
from .exporter import export_artifact

__all__ = ["ExportError", "export_artifact"]
