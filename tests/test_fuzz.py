"""Property-based fuzzing (hypothesis): manifests mutated every way, and generate's arguments of every type.

The only outcomes allowed are success or a documented error: ``ArtifactError``
for a bad artifact, ``ValueError`` for a bad argument, ``BackendError``,
``GenerationError``. No other exception, no hang (examples and time bounded).
"""

from __future__ import annotations

import json
import math
import shutil
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from edgediff.models import default_model_path
from edgediff.runtime import ArtifactError, BackendError, GenerationError, Pipeline, load_manifest

DOCUMENTED = (ArtifactError, BackendError, GenerationError, ValueError)
pytestmark = pytest.mark.fast
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                        HealthCheck.too_slow])

# values a hostile manifest may hold anywhere: types, ranges, paths
hostile_values = st.one_of(
    st.none(), st.booleans(), st.integers(-2**70, 2**70), st.sampled_from([0, -1, 1, 3, 7, 77, 10**9, 2**63]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([float("nan"), float("inf"), 0.0, -0.0, 1e300]),
    st.text(max_size=20),
    st.sampled_from(["../outside/model.onnx", "/etc/passwd", "unet\\model.onnx", "unet/../../x.onnx", "", "float128",
                     "unet/model.onnx", "vae_decoder/model.onnx", "model.txt", "C:/x.onnx", "\x00.onnx"]),
    st.lists(st.integers(-3, 3), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)


def _paths(node, prefix=()):
    """Every key path of a JSON tree."""
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, prefix + (i,))


@pytest.fixture(scope="module")
def original():
    return json.loads((default_model_path() / "manifest.json").read_text())


@pytest.fixture(scope="module")
def fuzz_artifact(tmp_path_factory):
    dst = tmp_path_factory.mktemp("fuzz") / "artifact"
    shutil.copytree(default_model_path(), dst)
    return dst


@FUZZ
@given(data=st.data())
def test_mutated_manifests_load_or_fail_cleanly(original, fuzz_artifact, data):
    d = json.loads(json.dumps(original))
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        paths = [p for p in _paths(d) if p]
        path = data.draw(st.sampled_from(paths), label="path")
        parent = d
        for key in path[:-1]:
            parent = parent[key]
        if data.draw(st.booleans(), label="delete") and isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent[path[-1]] = data.draw(hostile_values, label="value")
    (fuzz_artifact / "manifest.json").write_text(json.dumps(d))
    t0 = time.perf_counter()
    try:
        manifest = load_manifest(fuzz_artifact)
    except ArtifactError:
        event("refused on load")
        return
    # what loads must also run, or fail with a documented error
    try:
        pipe = Pipeline.load(fuzz_artifact, backend="onnxruntime", device="cpu", manifest=manifest)
        pipe.txt2img("a red circle", steps=1, width=16, height=16)
        event("loaded and generated")
    except DOCUMENTED as e:
        event(f"loaded, then {type(e).__name__}")
    assert time.perf_counter() - t0 < 60


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.load(backend="onnxruntime", device="cpu")  # the embedded model


def _weird(*good):
    return st.one_of(st.sampled_from(good), st.sampled_from([None, True, -1, 0, "2", 2.5, float("nan"), float("inf"),
                                                             2**64, [], {}]))


generate_args = st.fixed_dictionaries({}, optional={
    "steps": _weird(1, 2, 1001, 10**9),
    "guidance": _weird(0.0, 1.0, 3.0, 1e30, 1e300, -1.0),
    "seed": _weird(0, 7, 2**64 - 1, -5),
    "width": _weird(16, 24, 7, 100000, 2**40),
    "height": _weird(16, 32, 9, 100000),
    "num_images": _weird(1, 2, 5),
    "scheduler": _weird("euler", "euler_a", "dpmpp_2m", "lcm", "karras9"),
    "rng": _weird("numpy", "torch", "cuda"),
    "latents": st.sampled_from([np.zeros((1, 4, 2, 2), np.float32), np.zeros(3), "noise"]),
    "callback": st.sampled_from([lambda done, total: None, "print", 5]),
})
prompts = st.one_of(st.text(max_size=300), st.lists(st.text(max_size=20), min_size=0, max_size=3),
                    st.sampled_from([None, 5, ["a", 3], "red circle " * 200]))
negatives = st.one_of(st.none(), st.text(max_size=20), st.lists(st.text(max_size=5), max_size=3), st.just(5))


@FUZZ
@given(prompt=prompts, negative=negatives, kwargs=generate_args)
def test_generate_arguments_succeed_or_fail_cleanly(pipe, prompt, negative, kwargs):
    t0 = time.perf_counter()
    try:
        images = pipe.txt2img(prompt, negative, **kwargs)
    except DOCUMENTED as e:
        event(type(e).__name__)
        return
    finally:
        assert time.perf_counter() - t0 < 60
    event("generated")
    per_prompt = kwargs.get("num_images", 1)
    assert len(images) == (1 if isinstance(prompt, str) else len(prompt)) * per_prompt
    size = (kwargs.get("width") or pipe.manifest.sample_size, kwargs.get("height") or pipe.manifest.sample_size)
    assert all(image.size == size for image in images)
    assert all(math.isfinite(float(np.asarray(image).mean())) for image in images)


# -- upscaler manifests (issue 24): upscaler.json's fields and values mutated ---------------------------------


@pytest.fixture(scope="module")
def fuzz_upscaler(tmp_path_factory):
    from edgediff.models import shapes_upscaler

    dst = tmp_path_factory.mktemp("fuzz-upscaler") / "upscaler"
    shutil.copytree(shapes_upscaler(), dst)
    return dst


@FUZZ
@given(data=st.data())
def test_mutated_upscaler_manifests_load_or_fail_cleanly(fuzz_upscaler, data):
    """Success (a x2 result of the right size) or UpscalerError / ArtifactError, in bounded time: a scale the
    graph does not do, a file elsewhere, any type anywhere."""
    from PIL import Image

    from edgediff.models import shapes_upscaler
    from edgediff.runtime.upscale import MANIFEST, Upscaler, UpscalerError

    d = json.loads((shapes_upscaler() / MANIFEST).read_text())
    if data.draw(st.integers(0, 9), label="whole record") == 0:
        d = data.draw(hostile_values, label="record")
    else:
        for _ in range(data.draw(st.integers(1, 3), label="mutations")):
            paths = [p for p in _paths(d) if p]
            path = data.draw(st.sampled_from(paths + [("scale",), ("file",), ("architecture",), ("extra",)]),
                             label="path")
            parent = d
            for key in path[:-1]:
                parent = parent[key] if isinstance(parent, (dict, list)) else {}
            if not isinstance(parent, (dict, list)):
                continue
            if isinstance(parent, dict) and data.draw(st.booleans(), label="delete"):
                parent.pop(path[-1], None)
            elif isinstance(parent, dict) or (isinstance(path[-1], int) and path[-1] < len(parent)):
                parent[path[-1]] = data.draw(st.one_of(hostile_values, st.integers(-3, 10)), label="value")
    (fuzz_upscaler / MANIFEST).write_text(json.dumps(d))
    scale = data.draw(st.one_of(st.none(), st.integers(-1, 5)), label="scale asked")
    t0 = time.perf_counter()
    try:
        up = Upscaler.load(fuzz_upscaler, backend="onnxruntime", device="cpu")
        result = up.upscale(Image.new("RGB", (20, 24), (200, 30, 30)), scale)
    except (UpscalerError, ArtifactError) as e:
        event(f"{type(e).__name__}: {str(e).split(':')[-1][:40]}")
        return
    finally:
        assert time.perf_counter() - t0 < 30
    event("upscaled")
    assert up.scale == 2 and result.size == (20 * (scale or 2), 24 * (scale or 2))
