"""One writer at a time per artifact folder: a lock beside the folder, held for the whole write.

``edgediff export`` (on OUT) and ``edgediff quantize`` / ``remove_variant``
(on the artifact) take it, so concurrent runs queue instead of losing each
other's variants or both writing one folder. Readers (``generate``,
``bench``) take none: the manifest is replaced atomically. The lock is
``filelock``'s: an OS lock on ``.NAME.lock`` beside the folder, released
when the process ends however it ends (kill -9 included).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from filelock import FileLock, Timeout

from .manifest import ArtifactError


def lock_path(folder: Path) -> Path:
    folder = Path(folder).absolute()
    return folder.parent / f".{folder.name}.lock"


@contextmanager
def folder_lock(folder: Path, progress: Callable[[str], Any] = lambda s: None) -> Iterator[None]:
    """Hold the write lock of ``folder``; waits (saying so through ``progress``) while another process holds it."""
    path = lock_path(folder)
    lock = FileLock(str(path))
    try:
        try:
            lock.acquire(timeout=0)
        except Timeout:
            progress(f"waiting: another edgediff process is writing {folder} (lock {path})")
            lock.acquire()
    except OSError as e:
        raise ArtifactError(f"cannot lock {folder} for writing ({path}: {e.strerror}); is its folder writable?") from e
    try:
        yield
    finally:
        lock.release()
