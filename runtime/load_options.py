"""How an artifact is opened, as one frozen value: ``LoadOptions``.

``GenerationSettings`` says what one call draws; ``LoadOptions`` says how the pipeline that draws it was opened
(backend, devices, precisions, VAE, memory mode, LoRAs...). The CLI, the Python API and a server build the same
object, check it once (a bad value is a ``ValueError`` naming what is accepted, before any file is read), and a
pipeline keeps the one it was opened with (``Pipeline.load_options``): a server can say how each model is loaded,
compare two requests' options, and open a second pipeline the same way. ``Pipeline.load(path, **fields)`` builds
one from its keyword arguments; ``Pipeline.open(path, options)`` takes one.

Frozen: lists (LoRAs, embeddings) are kept as tuples and a per-component device or precision mapping as a
read-only mapping, so an options object shared between threads or requests cannot change under a pipeline.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

from .limits import DEFAULT_MAX_BATCH

VAE_TILING = ("auto", "on", "off")  # edgediff.runtime.vae_tiling's modes (Pipeline's TILING_MODES)


def _frozen(value: Any) -> Any:
    if isinstance(value, Mapping):
        return MappingProxyType(dict(value))
    if isinstance(value, list):
        return tuple(value)
    return value


@dataclass(frozen=True)
class LoadOptions:
    """Every choice ``Pipeline.load`` takes besides the artifact's path; see its docstring for each field."""

    backend: str = "auto"
    device: str | Mapping[str, str] = "auto"
    precision: str | Mapping[str, str] | None = None
    vae: str | None = None
    fast: bool = False
    fallback: bool = False
    threads: int | None = None
    cache: bool = True
    cache_dir: str | Path | None = None
    ov_precision: str = "auto"
    max_pixels: int | None = None
    max_batch: int = DEFAULT_MAX_BATCH
    loras: tuple[Any, ...] = field(default=())
    embeddings: tuple[str | Path, ...] = field(default=())
    static_shapes: bool | None = None
    low_memory: bool = False
    vae_tiling: str = "auto"
    cuda_graph: bool = False
    dml_adapter: int = 0
    check: bool = True
    t5: bool = True

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _frozen(getattr(self, f.name)))
        for name in ("max_pixels", "max_batch", "threads"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r:.40}")
        for name in ("fast", "fallback", "cache", "low_memory", "cuda_graph", "check", "t5"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r:.40}")
        if self.static_shapes is not None and not isinstance(self.static_shapes, bool):
            raise ValueError(f"static_shapes must be True, False or None, got {self.static_shapes!r:.40}")
        if self.vae_tiling not in VAE_TILING:
            raise ValueError(f"unknown vae_tiling {self.vae_tiling!r:.40}; valid: {', '.join(VAE_TILING)}")
        if isinstance(self.dml_adapter, bool) or not isinstance(self.dml_adapter, int) or self.dml_adapter < 0:
            raise ValueError(f"dml_adapter must be a GPU index (0, 1, ...), got {self.dml_adapter!r:.40}")
        for name in ("loras", "embeddings"):
            if isinstance(getattr(self, name), (str, Path)):
                raise ValueError(f"{name} must be a list of files, not one {type(getattr(self, name)).__name__} "
                                 f"(write [{getattr(self, name)!r:.60}])")

    def kwargs(self) -> dict[str, Any]:
        """The fields as ``Pipeline.load``'s keyword arguments."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def record(self) -> dict[str, Any]:
        """The fields as JSON values (what a server reports, what a result records)."""
        def plain(value: Any) -> Any:
            if isinstance(value, Mapping):
                return {str(k): plain(v) for k, v in value.items()}
            if isinstance(value, tuple):
                return [plain(v) for v in value]
            if hasattr(value, "record"):  # a LoraSpec
                return value.record()
            return str(value) if isinstance(value, Path) else value

        return {k: plain(v) for k, v in self.kwargs().items()}


__all__ = ["LoadOptions"]
