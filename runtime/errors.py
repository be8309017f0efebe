"""The runtime's error kinds, under one base that the CLI and a server map (to an exit code, an HTTP status).

- ``EdgediffError``: every error edgediff raises on purpose. Its subclasses also derive from the built-in type
  they were before (``ArtifactError`` is a ``ValueError``), so existing ``except ValueError`` keeps working.
- ``ArtifactError`` (``manifest``), ``LoraError`` (``lora``), ``UpscalerError`` (``upscale``): a file the
  caller gave is unusable; ``BackendError`` (``backends``): a backend or device is; ``GenerationError``
  (``denoise``): a run overflowed; ``Cancelled``: the caller's step observer stopped the run.
"""

from __future__ import annotations


class EdgediffError(Exception):
    """An error edgediff raises on purpose, with a message that says what was wrong and what is accepted."""


class Cancelled(EdgediffError):
    """The step observer asked to stop (returned False): the run ended between two steps, nothing was returned."""


__all__ = ["Cancelled", "EdgediffError"]
