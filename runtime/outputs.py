"""Where generated images go: every path checked before any work, each PNG written whole or not at all.

``output_paths`` runs before the model loads, so a read-only folder, a
folder named as the output, a parent that is a file, a name that is not
``.png`` or an existing file (without ``overwrite``) fail in a second, not
after the generation. ``write_pngs`` encodes each image to a temporary
file beside its target, then puts them all in place at once: an error or
Ctrl-C before or while they go in place leaves none of them (the ones placed
are taken back) and never a half-written PNG under a requested name. Without
``overwrite`` each name is created exclusively (a hard link of the finished
file, which fails where the name exists), so the no-overwrite rule holds
between processes too: of several writing the same new name at once, one
writes it and the others fail as if it had existed before they started.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import tempfile
from contextlib import contextmanager
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


PROBE = ".edgediff-probe-"  # probe_writable's file, there for an instant


def probe_writable(folder: Path) -> None:
    """Create and remove a file in ``folder``: the only check that holds for root, ACLs and read-only mounts alike
    (``os.access`` answers yes to root). OSError where it cannot be written."""
    fd, probe = tempfile.mkstemp(prefix=PROBE, dir=folder)
    try:
        os.close(fd)
    finally:
        _unlink(probe)


def _probe_writable(folder: Path, output: Path) -> None:
    try:
        probe_writable(folder)
    except OSError as e:
        raise ValueError(f"--output {output}: cannot write into {folder} ({e.strerror})") from None


def png_info(parameters: str, metadata: dict[str, Any]) -> PngInfo:
    """A1111's ``parameters`` text chunk (read by image viewers and web UIs) and edgediff's JSON."""
    info = PngInfo()
    info.add_text("parameters", parameters)
    info.add_text("edgediff", json.dumps(metadata))
    return info


def write_png(image: Image.Image, path: Path, info: PngInfo | None = None, overwrite: bool = True) -> None:
    """Write ``image`` to ``path`` whole or not at all (``write_pngs`` with one image)."""
    write_pngs([(image, Path(path), info)], overwrite)


def write_pngs(images: list[tuple[Image.Image, Path, PngInfo | None]], overwrite: bool = False) -> None:
    """Write each ``(image, path, info)``: all encoded to temporary files beside their targets first, then all put
    in place with Ctrl-C held off, or none. Without ``overwrite`` a name that exists by then (another process
    wrote it while this one worked) is a ValueError, and the names this call had already placed are removed.
    With ``overwrite`` each replaced file is kept as a hard link until the last one is placed, and put back if
    one fails (where the file system has no hard links, a replaced file cannot be put back)."""
    staged: list[tuple[Path, str]] = []
    try:
        for image, path, info in images:
            staged.append((Path(path), _encode(image, Path(path), info)))
        with _interrupts_held() as interrupted:
            placed: list[tuple[Path, str | None]] = []  # (target, how to take it back: _place)
            try:
                for path, tmp in staged:
                    placed.append((path, _place(tmp, path, overwrite)))
                if interrupted:
                    raise KeyboardInterrupt
            except BaseException:
                _take_back(placed)
                raise
            for _, old in placed:  # committed: a Ctrl-C from here on is dropped, the images are in place
                if old not in (None, NEW):
                    _unlink(old)
    finally:
        for _, tmp in staged:
            _unlink(tmp)


def _encode(image: Image.Image, path: Path, info: PngInfo | None) -> str:
    """``image`` as a PNG in a new temporary file in ``path``'s folder (removed again if the encoding fails)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=info)
        os.chmod(tmp, 0o666 & ~current_umask())
    except BaseException:
        _unlink(tmp)
        raise
    return tmp


NO_HARD_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK, errno.EXDEV}
NEW = "new"  # _place: the name did not exist; taking it back removes it


def _place(tmp: str, path: Path, overwrite: bool) -> str | None:
    """Put the finished ``tmp`` at ``path``. Returns how to take it back: ``NEW`` (remove the name), a hard link
    to the file it replaced (rename it back), or None (a replaced file with no link: it cannot be put back)."""
    if overwrite:
        old: str | None = NEW
        if os.path.lexists(path):
            old = f"{tmp}.old"
            try:
                os.link(path, old, follow_symlinks=False)
            except OSError:
                old = None
        os.replace(tmp, path)
        return old
    try:
        os.link(tmp, path)  # fails, atomically, where the name exists (a file, a folder, a symlink)
    except FileExistsError:
        raise _taken(path) from None
    except OSError as e:
        if e.errno not in NO_HARD_LINKS:
            raise
        # no hard links here (FAT, some network and FUSE mounts): reserve the name, then rename over the reservation
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        except FileExistsError:
            raise _taken(path) from None
        os.replace(tmp, path)
    return NEW


def _taken(path: Path) -> ValueError:
    return ValueError(f"{path} already exists (written while this one ran); pass --overwrite to replace it, or "
                      "choose another --output")


def _take_back(placed: list[tuple[Path, str | None]]) -> None:
    for path, old in reversed(placed):
        try:
            if old == NEW:
                os.unlink(path)
            elif old is not None:
                os.replace(old, path)
        except OSError:
            pass


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


@contextmanager
def _interrupts_held():
    """Ctrl-C (SIGINT) recorded in the returned list instead of raised, for the few system calls that put the
    images in place. Outside the main thread there is nothing to hold: Python raises KeyboardInterrupt only there."""
    interrupted: list[int] = []
    try:
        previous = signal.signal(signal.SIGINT, lambda signum, frame: interrupted.append(signum))
    except ValueError:  # not the main thread
        yield interrupted
        return
    try:
        yield interrupted
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.SIG_DFL)


def save_result(result: Result, output: str | Path, overwrite: bool = False) -> list[Path]:
    """Write every image of ``result`` as a PNG with its generation parameters (what ``edgediff generate`` writes)."""
    paths = output_paths(output, len(result), overwrite)
    write_result(result, paths, overwrite)
    return paths


def write_result(result: Result, paths: list[Path], overwrite: bool = False) -> None:
    """Write ``result``'s images to ``paths`` (checked beforehand by ``output_paths``): all or none."""
    write_pngs([(image, path, png_info(result.parameters(k), result.metadata(k)))
                for k, (image, path) in enumerate(zip(result, paths))], overwrite)
