"""The compile cache as a hostile or careless user meets it (issue 24, cases 2 and 9-13): its entries tampered
with or swapped, its disk full, ``cache clear`` in the middle of another process's load, a load stopped
half-way. Real processes throughout: the CLI in its own process, paused at a chosen point by a hook where the
timing matters, cleared or interrupted from outside."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgediff.runtime import Pipeline, compile_cache
from edgediff.runtime.compile_cache import MARKER, STAGING_MARKER
from edgediff.runtime.metrics import psnr

pytestmark = pytest.mark.fast

BACKENDS = ["onnxruntime", "openvino"]
PROMPT = "a red circle on a blue background"

# Run before the CLI in the child process: pauses it once, at the first load that fills a staging folder
# ("build": after the backend wrote it) or reads an entry ("hit": before the backend reads it), writing the
# folder's path to HOOK/paused and waiting for HOOK/go.
HOOK = r"""
import os, time
from pathlib import Path

_hook, _when, _done = Path(os.environ["HOOK"]), os.environ["HOOK_WHEN"], []


def _pause(folder):
    if _done:
        return
    _done.append(folder)
    (_hook / "paused.tmp").write_text(str(folder))
    os.replace(_hook / "paused.tmp", _hook / "paused")
    deadline = time.time() + 120
    while not (_hook / "go").exists() and time.time() < deadline:
        time.sleep(0.02)


if os.environ["HOOK_BACKEND"] == "onnxruntime":
    import onnxruntime

    _session = onnxruntime.InferenceSession

    def _hooked(path, so=None, *args, **kw):
        saved = so.optimized_model_filepath if so is not None else ""
        if _when == "hit" and str(path).startswith(os.environ["HOOK_CACHE"]):
            _pause(Path(path).parent)
        s = _session(path, so, *args, **kw)
        if _when == "build" and ".staging-" in saved:
            _pause(Path(saved).parent)
        return s

    onnxruntime.InferenceSession = _hooked
else:
    from edgediff.runtime import backends

    class _Core:
        def __init__(self, core):
            self.core = core

        def __getattr__(self, name):
            return getattr(self.core, name)

        def compile_model(self, model, device, config):
            folder = config.get("CACHE_DIR", "")
            if _when == "hit" and folder and ".staging-" not in folder:
                _pause(folder)
            compiled = self.core.compile_model(model, device, config)
            if _when == "build" and ".staging-" in folder:
                _pause(folder)
            return compiled

    backends._CORE = _Core(backends._ov_core())
"""


def cli(*args: str, hook: Path | None = None, when: str = "build", backend: str = "onnxruntime",
        cache: Path | None = None, file_limit: int | None = None, wait: bool = True):
    """The CLI in its own process (with HOOK's pause, or writes limited to ``file_limit`` bytes per file: a
    full disk as the process sees it, EFBIG)."""
    env = dict(os.environ)
    code = "from edgediff.cli import main; main()"
    if hook is not None:
        env.update(HOOK=str(hook), HOOK_WHEN=when, HOOK_BACKEND=backend, HOOK_CACHE=str(cache))
        code = HOOK + code

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (6 * 2**30, 6 * 2**30))
        if file_limit is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG), not the process
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, file_limit))

    proc = subprocess.Popen([sys.executable, "-c", code, *map(str, args)], env=env, preexec_fn=limit,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if not wait:
        return proc
    out, err = proc.communicate(timeout=600)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def generate(artifact: Path, out: Path, backend: str, cache: Path | None, **kw):
    where = ["--cache-dir", str(cache)] if cache is not None else ["--no-cache"]
    return cli("generate", PROMPT, "--model", artifact, "--backend", backend, "--steps", "3", "--seed", "1",
               "-o", out, "--overwrite", *where, backend=backend, cache=cache, **kw)


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def entry_of(cache: Path, backend: str, component: str) -> Path:
    found = [e["folder"] for e in compile_cache.entries(cache)
             if e["backend"] == backend and Path(e["graph"]).parent.name == component]
    assert len(found) == 1, found
    return found[0]


def notes(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


def wait_for(path: Path, proc: subprocess.Popen, seconds: float = 120) -> str:
    deadline = time.time() + seconds
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.02)
    return path.read_text()


@pytest.fixture
def artifact(embedded_copy):
    return embedded_copy


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, np.ndarray]:
    """Each backend's image without the cache: what every run below must draw."""
    from edgediff.models import default_model_path

    out = tmp_path_factory.mktemp("reference")
    images = {}
    for backend in BACKENDS:
        r = generate(default_model_path(), out / f"{backend}.png", backend, None)
        assert r.returncode == 0, r.stderr
        images[backend] = pixels(out / f"{backend}.png")
    return images


# -- case 2: nothing without the cache's marker is deleted ---------------------------------------------------


def test_clear_deletes_only_folders_holding_the_caches_marker(artifact, tmp_path):
    cache = tmp_path / "cache"
    Pipeline.load(artifact, backend="onnxruntime", device="cpu", cache_dir=cache)
    theirs = len(compile_cache.entries(cache))
    user = tmp_path / "user"
    user.mkdir()
    (user / STAGING_MARKER).write_text("{}")  # a marker behind a link is not the cache's folder
    (user / MARKER).write_text("{}")
    mine = [cache / "onnxruntime" / "x.staging-abc", cache / "openvino" / "0123456789abcdef-01234567.staging-q",
            cache / "onnxruntime" / "0123456789abcdef-0123456789abcdef"]  # named as the cache names its own
    for folder in mine:
        folder.mkdir(parents=True)
        (folder / "important.txt").write_text("mine")
    (cache / "onnxruntime" / "y.staging-link").symlink_to(user, target_is_directory=True)
    r = cli("cache", "clear", "--cache-dir", cache)
    assert r.returncode == 0, r.stderr
    assert f"removed {theirs} entries" in r.stdout and "in use" not in r.stdout
    assert all((folder / "important.txt").read_text() == "mine" for folder in mine)
    assert sorted(p.name for p in user.iterdir()) == sorted([MARKER, STAGING_MARKER])
    assert not compile_cache.entries(cache) and not compile_cache.staging_folders(cache)
    r = cli("cache", "list", "--cache-dir", cache)
    assert r.returncode == 0 and "0 entries" in " ".join(r.stdout.split()) and "unfinished" not in r.stdout


# -- cases 9 and 11: an entry is what the cache wrote, or it is rebuilt -----------------------------------------


def negate_three_weights(entry: Path, keep_mtime: bool) -> None:
    """The UNet entry's graph with its three largest weights negated, in place: same size, and with
    ``keep_mtime`` the same modification time."""
    import onnx

    model = onnx.load(str(entry / "model.onnx"), load_external_data=False)
    data = entry / "model.onnx.data"
    raw = data.read_bytes()
    found = []
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL and tensor.data_type == onnx.TensorProto.FLOAT:
            info = {d.key: int(d.value) for d in tensor.external_data if d.key in ("offset", "length")}
            values = np.frombuffer(raw, "<f4", info["length"] // 4, info["offset"])
            i = int(np.argmax(np.abs(values)))
            found.append((abs(float(values[i])), info["offset"] + 4 * i))
    before = data.stat()
    with open(data, "r+b") as f:
        for _, at in sorted(found, reverse=True)[:3]:
            f.seek(at + 3)
            top = f.read(1)[0]
            f.seek(at + 3)
            f.write(bytes([top ^ 0x80]))  # the float's sign bit
    if keep_mtime:
        os.utime(data, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert data.stat().st_size == before.st_size


@pytest.mark.parametrize("keep_mtime", [False, True])
def test_an_entry_with_weights_negated_is_dropped_and_rebuilt(artifact, tmp_path, reference, monkeypatch, keep_mtime):
    cache = tmp_path / "cache"
    r = generate(artifact, tmp_path / "a.png", "onnxruntime", cache)
    assert r.returncode == 0 and not notes(r.stderr), r.stderr
    negate_three_weights(entry_of(cache, "onnxruntime", "unet"), keep_mtime)
    with monkeypatch.context() as m:  # trusted as before: a cache hit drawing another image (the check can fail)
        m.setattr(compile_cache, "_check", lambda folder, record: None)
        trusted = Pipeline.load(artifact, backend="onnxruntime", device="cpu", cache_dir=cache)
        assert trusted.describe()["unet"]["compile_cache"] == "hit"
        assert psnr(np.asarray(trusted.txt2img(PROMPT, steps=3, seed=1)[0]), reference["onnxruntime"]) < 40
    r = generate(artifact, tmp_path / "b.png", "onnxruntime", cache)
    assert r.returncode == 0, r.stderr
    [note] = notes(r.stderr)
    assert "unet/model.onnx" in note and "is not what it wrote (model.onnx.data changed" in note and "rebuilding" in note
    assert psnr(pixels(tmp_path / "b.png"), reference["onnxruntime"]) >= 60
    again = Pipeline.load(artifact, backend="onnxruntime", device="cpu", cache_dir=cache)  # rebuilt: a clean hit
    assert {d["compile_cache"] for d in again.describe().values()} == {"hit"}


def test_an_openvino_blob_edited_in_place_is_dropped_and_rebuilt(artifact, tmp_path, reference):
    """OpenVINO imports a damaged blob without a word; the cache notices it, the modification time put back."""
    cache = tmp_path / "cache"
    assert generate(artifact, tmp_path / "a.png", "openvino", cache).returncode == 0
    [blob] = entry_of(cache, "openvino", "unet").glob("*.blob")
    before = blob.stat()
    blob.chmod(0o644)
    with open(blob, "r+b") as f:
        f.seek(before.st_size // 2)
        f.write(b"\x00" * 64)
    os.utime(blob, ns=(before.st_atime_ns, before.st_mtime_ns))
    r = generate(artifact, tmp_path / "b.png", "openvino", cache)
    assert r.returncode == 0, r.stderr
    [note] = notes(r.stderr)
    assert f"is not what it wrote ({blob.name} changed" in note and "rebuilding" in note
    assert psnr(pixels(tmp_path / "b.png"), reference["openvino"]) >= 60


@pytest.mark.parametrize("what", ["graph", "whole entry"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_an_entry_replaced_by_another_components_is_dropped_and_rebuilt(artifact, tmp_path, reference, backend, what):
    cache = tmp_path / "cache"
    assert generate(artifact, tmp_path / "a.png", backend, cache).returncode == 0
    unet, text = entry_of(cache, backend, "unet"), entry_of(cache, backend, "text_encoder")
    for f in unet.iterdir():
        if what == "whole entry" or f.name != MARKER:
            f.unlink()
    for f in text.iterdir():
        if what == "whole entry" or f.name != MARKER:
            shutil.copy2(f, unet / f.name)
    r = generate(artifact, tmp_path / "b.png", backend, cache)
    assert r.returncode == 0, r.stderr  # not "is not the graph the manifest describes... Re-export the artifact"
    [note] = notes(r.stderr)
    reason = "its marker describes another graph" if what == "whole entry" else ""
    assert "unet/model.onnx" in note and f"is not what it wrote ({reason}" in note and "rebuilding" in note
    assert psnr(pixels(tmp_path / "b.png"), reference[backend]) >= 60


# -- case 10: a cache on a full disk ----------------------------------------------------------------------------


def no_staging_left(cache: Path) -> bool:
    return not any(STAGING_MARKER in str(p) or ".staging-" in p.name for p in cache.rglob("*"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_cache_that_cannot_take_a_file_loads_without_it_with_one_warning(artifact, tmp_path, reference, backend):
    """Every file written past 1 MB fails (EFBIG): the backends' saved graphs do, the 5 KB image does not."""
    cache = tmp_path / "cache"
    r = generate(artifact, tmp_path / "a.png", backend, cache, file_limit=2**20)
    assert r.returncode == 0, r.stderr
    [note] = notes(r.stderr)
    assert note.startswith(f"note: the compile cache {cache / backend} cannot be written (") and "loading without it" in note
    assert psnr(pixels(tmp_path / "a.png"), reference[backend]) >= 60
    assert not compile_cache.entries(cache) and no_staging_left(cache)


@pytest.fixture
def full_disk(tmp_path):
    """A 1 MB tmpfs: a disk that fills for real (ENOSPC). Needs root and a mount that works."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_cache_on_a_full_disk_loads_without_it_with_one_warning(artifact, tmp_path, reference, full_disk, backend):
    (full_disk / "filler").write_bytes(b"\0" * 600_000)  # not all of it full: the small writes (markers) go through
    for run in ("a", "b"):
        r = generate(artifact, tmp_path / f"{run}.png", backend, full_disk / "cache")
        assert r.returncode == 0, r.stderr
        [note] = notes(r.stderr)
        assert "cannot be written (" in note and "loading without it" in note
        assert psnr(pixels(tmp_path / f"{run}.png"), reference[backend]) >= 60
        assert not compile_cache.entries(full_disk / "cache") and no_staging_left(full_disk / "cache")


# -- case 12: cache clear during another process's load ------------------------------------------------------------


@pytest.mark.parametrize("when", ["build", "hit"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_clear_keeps_what_a_running_load_uses(artifact, tmp_path, reference, backend, when):
    cache, hook = tmp_path / "cache", tmp_path / "hook"
    hook.mkdir()
    if when == "hit":
        assert generate(artifact, tmp_path / "first.png", backend, cache).returncode == 0
    proc = generate(artifact, tmp_path / "a.png", backend, cache, hook=hook, when=when, wait=False)
    try:
        folder = Path(wait_for(hook / "paused", proc))
        assert (".staging-" in folder.name) == (when == "build") and folder.is_dir()
        cleared = cli("cache", "clear", "--cache-dir", cache)
        assert cleared.returncode == 0, cleared.stderr
        assert "kept 1 in use by a running load" in cleared.stdout
        assert folder.is_dir() and any(folder.iterdir())  # untouched while the load uses it
    finally:
        (hook / "go").touch()
        out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0 and not notes(err), err
    assert psnr(pixels(tmp_path / "a.png"), reference[backend]) >= 60
    done = Pipeline.load(artifact, backend=backend, device="cpu", cache_dir=cache)  # the paused load's entry landed
    assert {d["compile_cache"] for d in done.describe().values()} == {"hit"}
    assert cli("cache", "clear", "--cache-dir", cache).stdout.startswith("removed 3 entries")  # free again


@pytest.mark.parametrize("backend", BACKENDS)
def test_cold_loads_survive_clear_run_over_and_over(artifact, tmp_path, reference, backend):
    """The issue's timing race without a hook: a process clears the cache every few milliseconds while cold
    loads fill it; every load succeeds, without a warning, and draws the same image."""
    cache = tmp_path / "cache"
    clearer = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\nfrom pathlib import Path\nfrom edgediff.runtime import compile_cache\n"
        "stop = Path(sys.argv[2])\nwhile not stop.exists():\n    compile_cache.clear(Path(sys.argv[1]))\n"
        "    time.sleep(0.005)\n"), str(cache), str(tmp_path / "stop")])
    try:
        for run in range(3):
            r = generate(artifact, tmp_path / f"{run}.png", backend, cache)
            assert r.returncode == 0 and not notes(r.stderr), r.stderr
            assert psnr(pixels(tmp_path / f"{run}.png"), reference[backend]) >= 60
    finally:
        (tmp_path / "stop").touch()
        clearer.wait(timeout=60)
    assert clearer.returncode == 0


# -- case 13: a load stopped half-way ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_ctrl_c_during_a_first_load_leaves_no_staging_folder(artifact, tmp_path, backend):
    cache, hook = tmp_path / "cache", tmp_path / "hook"
    hook.mkdir()
    proc = generate(artifact, tmp_path / "a.png", backend, cache, hook=hook, wait=False)
    staging = Path(wait_for(hook / "paused", proc))
    assert (staging / STAGING_MARKER).is_file()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert not staging.exists() and no_staging_left(cache)
    assert not (tmp_path / "a.png").exists()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_killed_loads_staging_folder_is_listed_counted_and_removed(artifact, tmp_path, backend):
    cache, hook = tmp_path / "cache", tmp_path / "hook"

    def killed() -> Path:
        shutil.rmtree(hook, ignore_errors=True)
        hook.mkdir()
        proc = generate(artifact, tmp_path / "a.png", backend, cache, hook=hook, wait=False)
        staging = Path(wait_for(hook / "paused", proc))
        proc.kill()
        proc.communicate(timeout=60)
        assert (staging / STAGING_MARKER).is_file() and any(f.name != STAGING_MARKER for f in staging.iterdir())
        return staging

    staging = killed()
    [found] = compile_cache.staging_folders(cache)
    assert found["folder"] == staging and not found["in_use"] and found["bytes"] > 100_000
    r = cli("cache", "list", "--cache-dir", cache)
    words = " ".join(r.stdout.split())
    assert r.returncode == 0 and "1 unfinished" in words and "its load stopped" in words
    assert f"{found['bytes'] / 1e6:.1f}" in words  # its size shown, and counted in the total
    assert compile_cache.evict(cache, 10**12) == [staging]  # the next entry written removes it, whatever the bound
    staging = killed()
    r = cli("cache", "clear", "--cache-dir", cache)
    assert r.returncode == 0 and not staging.exists()
    staging = killed()
    r = generate(artifact, tmp_path / "b.png", backend, cache)  # the next load of that graph removes it
    assert r.returncode == 0 and not notes(r.stderr), r.stderr
    assert not staging.exists() and not compile_cache.staging_folders(cache)
    assert len(compile_cache.entries(cache)) == 3


# -- the check's cost --------------------------------------------------------------------------------------------


def test_the_entry_check_costs_under_a_few_milliseconds(artifact, tmp_path):
    """What every hit pays (the docstring of compile_cache states the measured figures)."""
    cache = tmp_path / "cache"
    Pipeline.load(artifact, backend="onnxruntime", device="cpu", cache_dir=cache)
    found = compile_cache.entries(cache)
    records = [json.loads((e["folder"] / MARKER).read_text()) for e in found]
    for e, record in zip(found, records):
        record = {k: v for k, v in record.items() if k != "content"}
        assert compile_cache._check(e["folder"], record) is None
        t0 = time.perf_counter()
        for _ in range(20):
            compile_cache._check(e["folder"], record)
        assert (time.perf_counter() - t0) / 20 < 0.02


def test_a_cache_where_no_lock_can_be_made_is_still_read(artifact, tmp_path, monkeypatch, reference):
    """A read-only cache (prepared elsewhere): its entries are read without a lock (nobody can write there),
    nothing is written, one warning. (Simulated: root ignores folder permissions.)"""
    cache = tmp_path / "cache"
    Pipeline.load(artifact, backend="onnxruntime", device="cpu", cache_dir=cache)
    unet = entry_of(cache, "onnxruntime", "unet")
    shutil.rmtree(unet)  # one graph missing: it cannot be written now

    class ReadOnly:
        def __init__(self, path):
            self.path = path

        def acquire(self, timeout=None):
            raise PermissionError(13, "Permission denied", self.path)

    monkeypatch.setattr(compile_cache, "FileLock", ReadOnly)
    with pytest.warns(UserWarning, match="cannot be written \\(Permission denied\\); loading without it") as caught:
        pipe = Pipeline.load(artifact, backend="onnxruntime", device="cpu", cache_dir=cache)
    assert len([w for w in caught if "cannot be written" in str(w.message)]) == 1
    assert {k: d["compile_cache"] for k, d in pipe.describe().items()} == \
        {"text_encoder": "hit", "unet": "off", "vae_decoder": "hit"}
    assert not unet.exists() and no_staging_left(cache)
    assert psnr(np.asarray(pipe.txt2img(PROMPT, steps=3, seed=1)[0]), reference["onnxruntime"]) >= 60
