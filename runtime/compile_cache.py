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

The cache is bounded: ``$EDGEDIFF_CACHE_MAX_GB`` (default 20 GB); writing an entry removes the least recently
used ones (a hit marks an entry used) until the rest fit. ``edgediff cache list`` / ``cache clear``.

An entry is built in a staging folder and renamed into place when complete: a load killed half-way leaves
no entry that looks valid. A cache folder that cannot be written degrades to loading without the cache, with
a warning; it is never an error.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .cpu import cpu

MARKER = "edgediff-cache.json"  # in every entry: what it caches; only folders holding it are ever removed
STAGING = ".staging-"
STALE_STAGING_SECONDS = 3600  # a staging folder this old belongs to a load that died


def default_root() -> Path:
    if os.environ.get("EDGEDIFF_CACHE_DIR"):
        return Path(os.environ["EDGEDIFF_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edgediff"


@dataclass
class Entry:
    """One graph's cache entry: ``folder`` when it is complete (``ready``), else where to build it."""

    folder: Path
    graph_id: str
    record: dict[str, Any]

    @property
    def ready(self) -> bool:
        return (self.folder / MARKER).is_file()

    def staging(self) -> Path | None:
        """A fresh staging folder beside the entry, or None (with a warning) when the cache cannot be written."""
        try:
            self.folder.parent.mkdir(parents=True, exist_ok=True)
            return Path(tempfile.mkdtemp(dir=self.folder.parent, prefix=self.folder.name + STAGING))
        except OSError as e:
            _unwritable(self.folder.parent, e)
            return None

    def commit(self, staging: Path) -> bool:
        """Mark the staging folder complete and rename it into place, dropping this graph's older entries;
        False when that failed (with a warning) and the entry is not there."""
        try:
            (staging / MARKER).write_text(json.dumps(self.record, indent=1) + "\n")
            os.rename(staging, self.folder)
        except OSError as e:
            shutil.rmtree(staging, ignore_errors=True)
            if self.ready:  # another process committed the same entry first: nothing lost
                return True
            _unwritable(self.folder.parent, e)
            return False
        self._remove_stale()
        evict(self.folder.parent.parent, max_bytes(), keep=self.folder)
        return True

    def touch(self) -> None:
        """Mark the entry used now: the size bound evicts the least recently used entries first."""
        try:
            os.utime(self.folder / MARKER)
        except OSError:
            pass

    def discard(self, staging: Path) -> None:
        shutil.rmtree(staging, ignore_errors=True)

    def _remove_stale(self) -> None:
        now = time.time()
        for sibling in self.folder.parent.glob(f"{self.graph_id}-*"):
            if sibling == self.folder or not sibling.is_dir() or sibling.is_symlink():
                continue
            if STAGING in sibling.name:
                try:
                    old = now - sibling.stat().st_mtime > STALE_STAGING_SECONDS
                except OSError:
                    continue
                if old:
                    shutil.rmtree(sibling, ignore_errors=True)
            elif (sibling / MARKER).is_file():
                shutil.rmtree(sibling, ignore_errors=True)


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
    """Remove the least recently used entries until the cache holds at most ``limit`` bytes (``keep``, the entry
    just written, stays even when it alone is larger); returns the folders removed."""
    found = sorted(entries(root), key=lambda e: e["last_used"])
    total = sum(e["bytes"] for e in found)
    removed = []
    for e in found:
        if total <= limit:
            break
        if keep is not None and e["folder"] == keep:
            continue
        shutil.rmtree(e["folder"], ignore_errors=True)
        total -= e["bytes"]
        removed.append(e["folder"])
    return removed


def entries(root: Path) -> list[dict[str, Any]]:
    """The complete entries under ``root`` (what ``edgediff cache list`` shows): backend, folder, graph, bytes,
    its settings (device, shapes...), when it was last used."""
    found = []
    for backend in ("onnxruntime", "openvino"):
        for folder in sorted((Path(root) / backend).glob("*")) if (Path(root) / backend).is_dir() else []:
            marker = folder / MARKER
            if folder.is_symlink() or not marker.is_file():
                continue
            try:
                record = json.loads(marker.read_text())
            except (OSError, ValueError):
                record = {}
            size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and not f.is_symlink())
            graph = str(record.get("graph", "?"))
            try:
                last_used = marker.stat().st_mtime
            except OSError:
                last_used = 0.0
            found.append({"backend": backend, "folder": folder, "graph": graph, "bytes": size,
                          "graph_exists": Path(graph).is_file(), "settings": record.get("settings", {}),
                          "last_used": last_used})
    return found


def clear(root: Path, stale_only: bool = False) -> tuple[int, int]:
    """Delete every entry (and staging folder) under ``root``, or with ``stale_only`` the entries whose graph file
    is gone; nothing else there is touched. Returns (entries removed, bytes)."""
    count = size = 0
    for e in entries(root):
        if stale_only and e["graph_exists"]:
            continue
        shutil.rmtree(e["folder"], ignore_errors=True)
        count, size = count + 1, size + e["bytes"]
    for backend in ("onnxruntime", "openvino") if not stale_only else ():
        for staging in (Path(root) / backend).glob(f"*{STAGING}*") if (Path(root) / backend).is_dir() else []:
            if staging.is_dir() and not staging.is_symlink():
                shutil.rmtree(staging, ignore_errors=True)
    return count, size


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _unwritable(folder: Path, error: OSError) -> None:
    warnings.warn(f"the compile cache {folder} cannot be written ({error.strerror or error}); loading without it "
                  "(set EDGEDIFF_CACHE_DIR or --cache-dir to a writable folder, or --no-cache)", stacklevel=5)


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
