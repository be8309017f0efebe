"""The compile cache (edgediff.runtime.compile_cache): the same images as a load without it, never a stale or
half-written entry, and a folder that cannot be written costs a warning, not the load."""

from __future__ import annotations

import json
import os
import shutil
import warnings

import numpy as np
import pytest

from edgediff.runtime import Pipeline, compile_cache
from edgediff.runtime.compile_cache import MARKER
from edgediff.runtime.metrics import psnr

BACKENDS = ["onnxruntime", "openvino"]
PROMPT = "a red circle on a blue background"


def image(pipe: Pipeline) -> np.ndarray:
    return np.asarray(pipe.txt2img(PROMPT, steps=3, seed=1)[0])


def load(root, backend, **kw) -> Pipeline:
    return Pipeline.load(root, backend=backend, device="cpu", ov_precision="f32", **kw)


def entries(cache, backend) -> list:
    return sorted(p for p in (cache / backend).iterdir() if (p / MARKER).is_file())


@pytest.fixture
def artifact(tmp_path):
    from edgediff.models import default_model_path

    root = tmp_path / "model"
    shutil.copytree(default_model_path(), root)
    return root


@pytest.mark.fast
@pytest.mark.parametrize("backend", BACKENDS)
def test_cached_loads_draw_the_uncached_images(artifact, tmp_path, backend):
    plain = image(load(artifact, backend, cache=False))
    cache = tmp_path / "cache"
    first = load(artifact, backend, cache_dir=cache)
    assert {d["compile_cache"] for d in first.describe().values()} == {"written"}
    filled = entries(cache, backend)
    assert len(filled) == len(first.sessions)  # one entry per graph
    second = load(artifact, backend, cache_dir=cache)
    assert {d["compile_cache"] for d in second.describe().values()} == {"hit"}
    assert entries(cache, backend) == filled  # read, not written again
    for pipe in (first, second):
        assert psnr(image(pipe), plain) >= 60
    off = load(artifact, backend, cache=False)
    assert {d["compile_cache"] for d in off.describe().values()} == {"off"}


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_changed_graph_is_not_served_from_the_stale_entry(artifact, tmp_path, backend):
    """The UNet file replaced by another graph with the same signature (its int8 variant): the load compiles
    the new file, draws its images, and the old graph's entry is dropped. (Needs onnx to quantize: full tier.)"""
    from edgediff.quantize import quantize_artifact

    quantize_artifact(artifact, "int8", ("unet",), force=True)
    cache = tmp_path / "cache"
    before = image(load(artifact, backend, cache_dir=cache))
    old = set(entries(cache, backend))
    unet = artifact / "unet"
    shutil.copyfile(unet / "model.int8.onnx", unet / "new.onnx")
    os.replace(unet / "new.onnx", unet / "model.onnx")  # a new inode, size and mtime
    manifest = json.loads((artifact / "manifest.json").read_text())  # recorded as a re-export would: the
    manifest["components"]["unet"]["variants"]["fp32"]["bytes"] = (unet / "model.onnx").stat().st_size  # sizes are checked
    (artifact / "manifest.json").write_text(json.dumps(manifest))
    expected = image(load(artifact, backend, cache=False))
    assert psnr(expected, before) < 60  # the two graphs draw different images: the check below can fail
    pipe = load(artifact, backend, cache_dir=cache)
    assert pipe.describe()["unet"]["compile_cache"] == "written"
    assert psnr(image(pipe), expected) >= 60
    now = set(entries(cache, backend))
    assert len(now - old) == 1 and len(old - now) == 1  # the UNet's new entry in place of its stale one


@pytest.mark.fast
@pytest.mark.parametrize("backend", BACKENDS)
def test_an_unwritable_cache_folder_loads_without_it_with_a_warning(artifact, tmp_path, backend):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.warns(UserWarning, match="compile cache .* cannot be written .* loading without it"):
        pipe = load(artifact, backend, cache_dir=blocker / "cache")
    assert {d["compile_cache"] for d in pipe.describe().values()} == {"off"}
    assert blocker.read_text() == "not a folder"
    assert psnr(image(pipe), image(load(artifact, backend, cache=False))) >= 60


@pytest.mark.fast
def test_a_damaged_or_half_written_entry_is_not_used(artifact, tmp_path):
    """A staging folder (a load killed mid-write) is never read; an entry whose graph was damaged is rebuilt,
    whether the damage shows in its files' digest or only when the backend reads it."""
    cache = tmp_path / "cache"
    plain = image(load(artifact, "onnxruntime", cache=False))
    load(artifact, "onnxruntime", cache_dir=cache)
    for entry in entries(cache, "onnxruntime"):
        (entry / "model.onnx").write_bytes(b"damaged")
        shutil.copytree(entry, entry.with_name(entry.name + ".staging-x"))
        (entry.with_name(entry.name + ".staging-x") / MARKER).unlink()
    with pytest.warns(UserWarning, match=r"is not what it wrote \(model.onnx changed since it was written\); "
                                         "dropped, rebuilding it"):
        pipe = load(artifact, "onnxruntime", cache_dir=cache)
    assert {d["compile_cache"] for d in pipe.describe().values()} == {"written"}
    assert psnr(image(pipe), plain) >= 60
    for entry in entries(cache, "onnxruntime"):  # damaged when written: its digest is the damaged file's
        (entry / "model.onnx").write_bytes(b"damaged")
        record = json.loads((entry / MARKER).read_text())
        (entry / MARKER).write_text(json.dumps(record | {"content": compile_cache._content(entry)}))
    with pytest.warns(UserWarning, match="does not load .* rebuilding it"):
        pipe = load(artifact, "onnxruntime", cache_dir=cache)
    assert {d["compile_cache"] for d in pipe.describe().values()} == {"written"}
    assert psnr(image(pipe), plain) >= 60
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = load(artifact, "onnxruntime", cache_dir=cache)
    assert {d["compile_cache"] for d in again.describe().values()} == {"hit"}


@pytest.mark.fast
def test_the_cache_command_lists_and_clears_only_its_entries(artifact, tmp_path):
    from .conftest import run_cli

    cache = tmp_path / "cache"
    pipe = load(artifact, "onnxruntime", cache_dir=cache)
    load(artifact, "openvino", cache_dir=cache)
    (cache / "onnxruntime" / "notes.txt").write_text("mine")  # not the cache's: never touched
    r = run_cli("cache", "list", "--cache-dir", str(cache))
    assert r.exit_code == 0, r.output
    words = " ".join(r.output.split())
    assert f"{2 * len(pipe.sessions)} entries" in words and "onnxruntime" in words and "openvino" in words
    gone = tmp_path / "gone"
    shutil.copytree(artifact, gone)
    load(gone, "onnxruntime", cache_dir=cache)
    shutil.rmtree(gone)  # its entries are stale now: --stale drops them and only them
    r = run_cli("cache", "clear", "--cache-dir", str(cache), "--stale")
    assert r.exit_code == 0 and f"removed {len(pipe.sessions)} entries" in r.output
    assert len(entries(cache, "onnxruntime")) == len(entries(cache, "openvino")) == len(pipe.sessions)
    r = run_cli("cache", "clear", "--cache-dir", str(cache))
    assert r.exit_code == 0 and f"removed {2 * len(pipe.sessions)} entries" in r.output
    assert not entries(cache, "onnxruntime") and not entries(cache, "openvino")
    assert (cache / "onnxruntime" / "notes.txt").read_text() == "mine"
    assert load(artifact, "onnxruntime", cache_dir=cache).describe()["unet"]["compile_cache"] == "written"
