"""The compile cache: what a backend derives from a graph at load, kept for the next load of the same file.

- ONNX Runtime (CPU): the graph after its optimizations (constant folding, fusions, NCHWc layout), written once
  through ``SessionOptions.optimized_model_filepath``; later loads open that file with optimizations off. The
  SD1.5 UNet's session opens in 0.6 s from it instead of 6.5 s (benchmarks/RESULTS.md, load rows).
- OpenVINO (every device): its own model cache (``CACHE_DIR``): the compiled model, imported instead of
  read and compiled again.

Where: ``cache_dir`` when given, else ``$EDGEDIFF_CACHE_DIR``, else ``$XDG_CACHE_HOME/edgediff``, else
``~/.cache/edgediff``; ``Pipeline.load(cache=False)`` (``generate --no-cache``) switches it off. An entry is
a folder ``<backend>/<graph>-<stamp>``: ``graph`` names the file's resolved path with the backend, device and
options that change what is compiled; ``stamp`` the size and modification time of each of its files, the
backend's version and the CPU. An artifact changed on disk therefore has a new stamp, so a stale entry is
never used; the older entries of the same graph are removed when the new one is written. (The stamp stands
for the artifact's hash: hashing an SD1.5 UNet's 3.4 GB at every load would cost seconds.) OpenVINO graphs
compiled for static shapes (``static_shapes``, always on NPU) get one entry per shape.

An entry is checked on every use against what its commit wrote (its marker records, per file: size,
modification and change times, inode, and a SHA-256 of its first and last MiB): a file replaced, edited or
touched since (even with its modification time put back: the change time cannot be) is not used; the entry is
dropped and rebuilt, with a warning, never served. What a load pays, measured here (ext4, 2 shared CPUs): 1.6-2.0
ms per entry of the embedded model (2-10 MB); 1.7 ms for an entry holding a 1.7 GB file, 20 ms with the page
cache dropped; the same at commit. A full SHA-256 of that file would cost 1.6 s (2.6 s cold) per load, which is
why only its ends are hashed and the change time stands for the rest. A file whose times changed without a change
of content (a copy of the cache, a chmod) costs one rebuild.

Every load holds its graph's lock (``<backend>/<graph>.lock``, ``filelock``: an OS lock, released however the
process ends) while it reads or builds the entry, so a second process loading the same graph waits and then
reads what the first wrote. Removal (``cache clear``, the size bound, older entries) takes the same lock
without waiting: an entry or staging folder in use by a running load is kept, never pulled from under it.
(The lock files stay, empty, one per graph: removing one could let two processes hold "the" lock.)

The cache is bounded: ``$EDGEDIFF_CACHE_MAX_GB`` (default 20 GB); writing an entry removes the least recently
used ones (a hit marks an entry used) until the rest fit. ``edgediff cache list`` / ``cache clear``.

An entry is built in a staging folder (``<entry>.staging-*``, holding its own marker from the start) and renamed
into place when complete: a load killed half-way leaves no entry that looks valid; a load stopped by Ctrl-C
removes its staging folder, and one killed outright leaves it to the next load of that graph, the next entry
written, or ``cache clear`` (``cache list`` shows it meanwhile and the size bound counts it). Only folders
holding one of the cache's markers are ever removed. A cache folder that cannot be written (read-only, a full
disk) degrades to loading without the cache, with one warning per process; it is never an error.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import tempfile
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from filelock import FileLock, Timeout

from .cpu import cpu

T = TypeVar("T")

MARKER = "edgediff-cache.json"  # in every entry: what it caches and what it wrote; only marked folders are removed
STAGING_MARKER = "edgediff-staging.json"  # in every staging folder from its creation: which load builds it
STAGING = ".staging-"
BACKENDS = ("onnxruntime", "openvino")
LOCK_WAIT_SECONDS = 600.0  # a load waits this long for another process's load of the same graph, then goes uncached
EDGE_BYTES = 1 << 20  # hashed at each end of an entry's file when the entry is written and when it is used

_UNWRITABLE: set[str] = set()  # backend folders that failed a write in this process: warned once, not written again


def default_root() -> Path:
    if os.environ.get("EDGEDIFF_CACHE_DIR"):
        return Path(os.environ["EDGEDIFF_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edgediff"


@dataclass
class Entry:
    """One graph's cache entry: ``folder`` when it is complete (``ready``), else where to build it. A load goes
    ``with entry.held():`` then ``usable()`` (a hit), else ``staging()``, build there, ``commit()``."""

    folder: Path
    graph_id: str
    record: dict[str, Any]

    @property
    def ready(self) -> bool:
        return (self.folder / MARKER).is_file()

    @property
    def lock_path(self) -> Path:
        return _lock_path(self.folder)

    @contextmanager
    def held(self) -> Iterator[bool]:
        """Hold this graph's lock for the whole load (waiting for another process's load of it) and say whether the
        cache may be used: True; False with a warning when another load holds it too long (this one then goes
        without the cache). In a folder where no lock can be made (read-only) nobody writes: its entries are still
        read, nothing is written (one warning). Staging folders of this graph left by loads that died are removed."""
        lock, held = FileLock(str(self.lock_path)), False
        try:
            self.folder.parent.mkdir(parents=True, exist_ok=True)
            lock.acquire(timeout=LOCK_WAIT_SECONDS)
            held = True
        except Timeout:
            warnings.warn(f"another edgediff process has been loading {self.record['graph']} through the compile "
                          f"cache for {LOCK_WAIT_SECONDS:.0f} s (it holds {self.lock_path}); loading without the cache",
                          stacklevel=4)
            yield False
            return
        except OSError as e:
            self.unwritable(e)  # staging() gives None from now on
        if not held:
            yield True
            return
        try:
            self._sweep()
            yield True
        finally:
            lock.release()

    def usable(self) -> bool:
        """Whether the entry is complete and its files are what its commit wrote; one that is not is dropped,
        with a warning (the caller then builds it again). Call with the lock held."""
        if not self.ready:
            return False
        problem = _check(self.folder, self.record)
        if problem is None:
            return True
        warnings.warn(f"the compile cache's entry for {self.record['graph']} ({self.folder}) is not what it wrote "
                      f"({problem}); dropped, rebuilding it", stacklevel=4)
        self.drop()
        return False

    def staging(self) -> Path | None:
        """A fresh staging folder beside the entry, marked as the cache's, or None (with a warning) when the cache
        cannot be written."""
        if str(self.folder.parent) in _UNWRITABLE:
            return None
        path = None
        try:
            path = Path(tempfile.mkdtemp(dir=self.folder.parent, prefix=self.folder.name + STAGING))
            (path / STAGING_MARKER).write_text(json.dumps({"graph": self.record["graph"], "pid": os.getpid(),
                                                           "started": time.time()}) + "\n")
            return path
        except OSError as e:
            if path is not None:
                shutil.rmtree(path, ignore_errors=True)
            self.unwritable(e)
            return None

    def commit(self, staging: Path) -> bool:
        """Record what the staging folder holds, mark it complete and rename it into place, dropping this graph's
        older entries; False when that failed (with a warning) and the entry is not there."""
        try:
            content = _content(staging)
            if not content:  # OpenVINO gives up writing its blob silently (a full disk): an empty entry serves nothing
                raise OSError(f"{self.record['backend']} wrote nothing into it: a full disk?")
            (staging / MARKER).write_text(json.dumps(self.record | {"content": content}, indent=1, default=str) + "\n")
            os.rename(staging, self.folder)
        except OSError as e:
            shutil.rmtree(staging, ignore_errors=True)
            self.unwritable(e)
            return False
        try:
            (self.folder / STAGING_MARKER).unlink()  # a complete entry now (the marker is not part of its content)
        except OSError:
            pass
        self._sweep(entries_too=True)
        evict(self.folder.parent.parent, max_bytes(), keep=self.folder)
        return True

    def touch(self) -> None:
        """Mark the entry used now: the size bound evicts the least recently used entries first."""
        try:
            os.utime(self.folder / MARKER)
        except OSError:
            pass

    def drop(self) -> None:
        """Remove the entry (the lock held: nobody reads it)."""
        shutil.rmtree(self.folder, ignore_errors=True)

    def discard(self, staging: Path) -> None:
        shutil.rmtree(staging, ignore_errors=True)

    def unwritable(self, error: BaseException) -> None:
        """Writing the cache failed: warn (once per folder and process) and write no more there."""
        folder = str(self.folder.parent)
        if folder in _UNWRITABLE:
            return
        _UNWRITABLE.add(folder)
        text = " ".join(str(error).split())  # a backend's own error: its last words say what failed
        why = (error.strerror if isinstance(error, OSError) else None) or \
            (text if len(text) <= 200 else "..." + text[-200:])
        warnings.warn(f"the compile cache {folder} cannot be written ({why}); loading without it (set "
                      "EDGEDIFF_CACHE_DIR or --cache-dir to a writable folder, or --no-cache)", stacklevel=5)

    def _sweep(self, entries_too: bool = False) -> None:
        """With the lock held: this graph's staging folders are dead loads' (a live one would hold the lock), and
        after a commit its entries of other stamps are stale."""
        for sibling in self.folder.parent.glob(f"{self.graph_id}-*"):
            if sibling == self.folder or sibling.is_symlink() or not sibling.is_dir():
                continue
            marker = STAGING_MARKER if STAGING in sibling.name else MARKER if entries_too else None
            if marker is not None and (sibling / marker).is_file():
                shutil.rmtree(sibling, ignore_errors=True)


def load(cache: Entry | None, graph: Path, hit: Callable[[Path], T], build: Callable[[Path], T],
         uncached: Callable[[], T], graph_errors: tuple[type[BaseException], ...] = ()) -> tuple[T, str]:
    """What a backend loads for ``graph``, through ``cache``: returns (it, "hit" | "written" | "off").

    ``hit(folder)`` opens the entry's compiled form; ``build(staging)`` compiles the graph, saving its compiled
    form into ``staging``; ``uncached()`` compiles it without the cache, raising the backend's error for the
    graph. Under the entry's lock: an entry that is what the cache wrote is opened ("hit"); one that does not
    open is dropped (a warning) and rebuilt; a build whose saving fails (a full disk) is discarded and the graph
    loaded without the cache, with one warning ("off"), unless it raised one of ``graph_errors`` (the graph's own
    fault, raised as it is). Ctrl-C during a build leaves no staging folder."""
    if cache is None:
        return uncached(), "off"
    with cache.held() as held:
        if not held:
            return uncached(), "off"
        if cache.usable():
            try:
                loaded = hit(cache.folder)
                cache.touch()
                return loaded, "hit"
            except Exception as e:  # a damaged entry: rebuilt below from the artifact's graph
                warnings.warn(f"the compile cache's copy of {graph} ({cache.folder}) does not load ({str(e)[:200]}); "
                              "rebuilding it", stacklevel=5)
                cache.drop()
        staging = cache.staging()
        if staging is None:
            return uncached(), "off"
        try:
            loaded = build(staging)
        except graph_errors:
            cache.discard(staging)
            raise
        except Exception as e:
            cache.discard(staging)
            loaded = uncached()  # the graph's own error, when it does not load without the cache either
            cache.unwritable(e)  # it does: the cache was what failed
            return loaded, "off"
        except BaseException:  # Ctrl-C: no staging folder left behind
            cache.discard(staging)
            raise
        return loaded, "written" if cache.commit(staging) else "off"


def entry(root: Path, backend: str, graph: Path, files: list[Path], settings: dict[str, Any],
          patch: list[Any] | None = None) -> Entry | None:
    """The entry for ``graph`` (its ``files``: the graph and its weights) under these ``settings``; None when
    a file cannot be read (the load itself then says what is wrong).

    ``patch``: the identity of the weights merged in at load (the LoRA files and scales). A graph keeps one
    entry as exported and one patched: a new LoRA set replaces the last one's entry, so switching LoRAs never
    piles up copies of the graph."""
    try:
        stamps = [[str(f.resolve()), st.st_size, st.st_mtime_ns] for f in files if f.exists()
                  for st in (f.stat(),)]
    except OSError:
        return None
    graph_id = _digest([backend, str(graph.resolve()), settings] + (["patched"] if patch else []))
    record = {"backend": backend, "graph": str(graph.resolve()), "settings": settings, "files": stamps,
              "backend_version": _backend_version(backend), "cpu": _cpu_signature()}
    if patch:
        record["patch"] = patch
    stamp = _digest([stamps, record["backend_version"], record["cpu"]] + ([patch] if patch else []))
    return Entry(Path(root) / backend / f"{graph_id}-{stamp}", graph_id, record)


DEFAULT_MAX_GB = 20.0  # the cache's size bound: an SD1.5 artifact's graphs take ~4-5 GB per backend and shape


def max_bytes() -> int:
    """The size bound: ``$EDGEDIFF_CACHE_MAX_GB`` (a number of GB), else DEFAULT_MAX_GB."""
    text = os.environ.get("EDGEDIFF_CACHE_MAX_GB", "")
    try:
        gb = float(text) if text else DEFAULT_MAX_GB
    except ValueError:
        gb = -1.0
    if not gb >= 0 or gb == float("inf"):
        warnings.warn(f"EDGEDIFF_CACHE_MAX_GB={text!r:.40} is not a number of GB; using {DEFAULT_MAX_GB:g}", stacklevel=2)
        gb = DEFAULT_MAX_GB
    return int(gb * 1e9)


def evict(root: Path, limit: int, keep: Path | None = None) -> list[Path]:
    """Remove the staging folders of loads that died, then the least recently used entries until the cache holds
    at most ``limit`` bytes (``keep``, the entry just written, stays even when it alone is larger; entries in use
    by a running load stay too); returns the folders removed."""
    dead = [s for s in staging_folders(root) if not s["in_use"]]
    found = sorted(entries(root), key=lambda e: e["last_used"])
    total = sum(e["bytes"] for e in found + dead)
    removed = []
    for e in dead + found:
        if total <= limit and "in_use" not in e:
            break
        if e["folder"] == keep or not _remove(e["folder"]):
            continue
        total -= e["bytes"]
        removed.append(e["folder"])
    return removed


def entries(root: Path) -> list[dict[str, Any]]:
    """The complete entries under ``root`` (what ``edgediff cache list`` shows): backend, folder, graph, bytes,
    its settings (device, shapes...), when it was last used."""
    found = []
    for backend, folder in _folders(root):
        marker = folder / MARKER
        if STAGING in folder.name or not marker.is_file():
            continue
        record = _read(marker)
        found.append({"backend": backend, "folder": folder, "graph": str(record.get("graph", "?")),
                      "bytes": _size(folder), "graph_exists": Path(str(record.get("graph", ""))).is_file(),
                      "settings": record.get("settings", {}), "last_used": _mtime(marker)})
    return found


def staging_folders(root: Path) -> list[dict[str, Any]]:
    """The staging folders under ``root`` (those holding the staging marker): ``in_use`` while a load builds
    there, else left by a load that died (``cache list`` shows them, the size bound counts them)."""
    found = []
    for backend, folder in _folders(root):
        marker = folder / STAGING_MARKER
        if STAGING not in folder.name or not marker.is_file():
            continue
        record = _read(marker)
        found.append({"backend": backend, "folder": folder, "graph": str(record.get("graph", "?")),
                      "bytes": _size(folder), "graph_exists": Path(str(record.get("graph", ""))).is_file(),
                      "settings": {}, "last_used": _mtime(marker), "in_use": _in_use(folder)})
    return found


def clear(root: Path, stale_only: bool = False) -> tuple[int, int, int]:
    """Delete every entry and dead load's staging folder under ``root``, or with ``stale_only`` the entries whose
    graph file is gone (and the dead staging folders); those in use by a running load are kept, and nothing
    without the cache's markers is touched. Returns (folders removed, bytes, folders kept in use)."""
    count = size = busy = 0
    for e in entries(root) + staging_folders(root):
        if stale_only and e["graph_exists"] and "in_use" not in e:
            continue
        removed = _remove(e["folder"])
        if removed:
            count, size = count + 1, size + e["bytes"]
        busy += removed is False
    return count, size, busy


def _folders(root: Path) -> Iterator[tuple[str, Path]]:
    for backend in BACKENDS:
        parent = Path(root) / backend
        for folder in sorted(parent.iterdir()) if parent.is_dir() else []:
            if folder.is_dir() and not folder.is_symlink():
                yield backend, folder


def _lock_path(folder: Path) -> Path:
    """A graph's lock: shared by its entries (any stamp) and their staging folders."""
    return folder.parent / (folder.name.split("-", 1)[0] + ".lock")


def _in_use(folder: Path) -> bool:
    lock = FileLock(str(_lock_path(folder)))
    try:
        lock.acquire(timeout=0)
    except (Timeout, OSError):
        return True
    lock.release()
    return False


def _remove(folder: Path) -> bool | None:
    """Remove an entry or staging folder unless a load holds its graph's lock: True when removed, False when in
    use, None when it was gone already. Only a folder that still holds one of the cache's markers is removed."""
    lock = FileLock(str(_lock_path(folder)))
    try:
        lock.acquire(timeout=0)
    except (Timeout, OSError):
        return False
    try:
        marker = STAGING_MARKER if STAGING in folder.name else MARKER
        if folder.is_symlink() or not (folder / marker).is_file():
            return None
        shutil.rmtree(folder, ignore_errors=True)
        return True
    finally:
        lock.release()


def _content(folder: Path) -> dict[str, list[Any]]:
    """What an entry holds, each file (relative path) -> [bytes, modification ns, change ns, inode, SHA-256 of
    its first and last EDGE_BYTES]; anything but a plain file -> ["not a file"]. The markers are not content."""
    found: dict[str, list[Any]] = {}
    for path in sorted(folder.rglob("*")):
        name = path.relative_to(folder).as_posix()
        if name in (MARKER, STAGING_MARKER):
            continue
        st = path.lstat()
        if stat.S_ISDIR(st.st_mode):
            continue
        if not stat.S_ISREG(st.st_mode):
            found[name] = ["not a file"]
            continue
        h = hashlib.sha256()
        with open(path, "rb") as f:
            h.update(f.read(EDGE_BYTES))
            if st.st_size > EDGE_BYTES:
                f.seek(max(EDGE_BYTES, st.st_size - EDGE_BYTES))
                h.update(f.read(EDGE_BYTES))
        found[name] = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, h.hexdigest()]
    return found


def _check(folder: Path, record: dict[str, Any]) -> str | None:
    """Why the entry in ``folder`` is not the one ``record`` describes with the content its commit wrote; None
    when it is."""
    written = _read(folder / MARKER)
    if {k: v for k, v in written.items() if k != "content"} != json.loads(json.dumps(record, default=str)):
        return "its marker describes another graph"
    try:
        now = _content(folder)
    except OSError as e:
        return f"cannot read it: {e.strerror}"
    was = written.get("content")
    if not isinstance(was, dict):
        return "it records no digest of its files"
    for name in sorted(set(was) | set(now)):
        if name not in now:
            return f"{name} is gone"
        if name not in was:
            return f"{name} was added"
        if now[name] != was[name]:
            return f"{name} changed since it was written"
    return None


def _read(marker: Path) -> dict[str, Any]:
    try:
        record = json.loads(marker.read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _size(folder: Path) -> int:
    total = 0
    for parent, _, files in os.walk(folder):  # a folder removed meanwhile counts what was seen
        for name in files:
            try:
                st = os.lstat(os.path.join(parent, name))
            except OSError:
                continue
            total += st.st_size if stat.S_ISREG(st.st_mode) else 0
    return total


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _backend_version(backend: str) -> str:
    if backend == "onnxruntime":
        import onnxruntime

        return onnxruntime.__version__
    import openvino

    return openvino.__version__


def _cpu_signature() -> str:
    """The CPU's model and flags: ONNX Runtime's saved layout and OpenVINO's kernels depend on them."""
    model, flags = cpu()
    return _digest([model, sorted(flags)])
