"""Where generated images go: every path checked before any work, each PNG written whole or not at all.

``output_paths`` runs before the model loads, so a read-only folder, a
folder named as the output, a parent that is a file, a name that is not
``.png`` or an existing file (without ``overwrite``) fail in a second, not
after the generation. ``write_png`` writes to a temporary file beside the
target and renames it into place: an interrupted write never leaves a
half-written PNG under the requested name.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from .manifest import current_umask
from .result import Result


def output_paths(output: str | Path, count: int, overwrite: bool = False) -> list[Path]:
    """The files ``count`` images go to: ``out.png``, or ``out-1.png``, ``out-2.png``... for several."""
    output = Path(output)
    if output.is_dir():
        raise ValueError(f"--output {output} is a folder; give a file name ending in .png")
    if output.suffix.lower() != ".png":
        raise ValueError(f"--output {output}: images are written as PNG (with their generation parameters); "
                         "give a file name ending in .png")
    paths = [output] if count == 1 else [output.with_name(f"{output.stem}-{k + 1}{output.suffix}") for k in range(count)]
    folder = output.parent
    existing = next((p for p in (folder, *folder.parents) if p.exists()), folder)  # the folder or its nearest ancestor
    if not existing.is_dir():
        raise ValueError(f"--output {output}: {existing} is a file, not a folder")
    _probe_writable(existing, output)
    for path in paths:
        if path.is_dir():
            raise ValueError(f"--output {path} is a folder; give a file name ending in .png")
        if path.exists() and not overwrite:
            raise ValueError(f"{path} already exists; pass --overwrite to replace it, or choose another --output")
    return paths


def _probe_writable(folder: Path, output: Path) -> None:
    """Create and remove a file in ``folder``: the only check that holds for root, ACLs and read-only mounts alike."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".edgediff-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ValueError(f"--output {output}: cannot write into {folder} ({e.strerror})") from None


def png_info(parameters: str, metadata: dict[str, Any]) -> PngInfo:
    """A1111's ``parameters`` text chunk (read by image viewers and web UIs) and edgediff's JSON."""
    info = PngInfo()
    info.add_text("parameters", parameters)
    info.add_text("edgediff", json.dumps(metadata))
    return info


def write_png(image: Image.Image, path: Path, info: PngInfo | None = None) -> None:
    """Write ``image`` to ``path`` through a temporary file in the same folder, renamed into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=info)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_result(result: Result, output: str | Path, overwrite: bool = False) -> list[Path]:
    """Write every image of ``result`` as a PNG with its generation parameters (what ``edgediff generate`` writes)."""
    paths = output_paths(output, len(result), overwrite)
    write_result(result, paths)
    return paths


def write_result(result: Result, paths: list[Path]) -> None:
    """Write ``result``'s images to ``paths`` (checked beforehand by ``output_paths``)."""
    for k, (image, path) in enumerate(zip(result, paths)):
        write_png(image, path, png_info(result.parameters(k), result.metadata(k)))

