"""Devices for real: a component per device, OpenVINO static shapes (NPU's batch-1 UNet), the compile cache's
per-shape entries and size bound, the device check's demotions (the CPU on both sides, a fault injected), IO
binding and the DirectML/CUDA session options. Torch-free, on the embedded model."""

from __future__ import annotations

import os
import shutil
import time
import warnings

import numpy as np
import pytest

from edgediff.runtime import BackendError, Pipeline
from edgediff.runtime import compile_cache, device_check
from edgediff.runtime.backends import BackendOptions, BoundRun, StaticShapes, open_session, ort_providers, \
    ort_session_options
from edgediff.runtime.metrics import psnr
from edgediff.runtime.placement import parse_devices, place, resolve_placement

pytestmark = pytest.mark.fast
PROMPT = "a red circle on a blue background"
ROLES = {"text_encoder": "text_encoder", "unet": "denoiser", "unet_shallow": "shallow_denoiser",
         "vae_decoder": "vae_decoder", "vae_encoder": "vae_encoder"}


@pytest.fixture
def artifact(tmp_path):
    from edgediff.models import default_model_path

    root = tmp_path / "model"
    shutil.copytree(default_model_path(), root)
    return root


def image(pipe: Pipeline, **kw) -> np.ndarray:
    return np.asarray(pipe.txt2img(PROMPT, steps=3, seed=1, **kw)[0])


# -- a component per device -----------------------------------------------------------------------------------


def test_device_lists_parse_with_groups_defaults_and_followers():
    assert parse_devices("gpu", ROLES) == ("gpu", {})
    default, named = parse_devices("npu,text_encoder=cpu,vae=gpu", ROLES)
    assert default == "npu" and named == {"text_encoder": "cpu", "vae_decoder": "gpu", "vae_encoder": "gpu"}
    # a component's own name wins over its group; the shallow UNet follows the UNet, the encoder the decoder
    devices = place(*parse_devices({"vae": "gpu", "vae_encoder": "cpu", "unet": "gpu"}, ROLES), ROLES)
    assert devices == {"text_encoder": "auto", "unet": "gpu", "unet_shallow": "gpu", "vae_decoder": "gpu",
                       "vae_encoder": "cpu"}
    assert place(*parse_devices("vae_decoder=gpu", ROLES), ROLES)["vae_encoder"] == "gpu"


@pytest.mark.parametrize("spec, words", [
    ("unet=tpu", "unknown device 'tpu' for unet; valid: auto, cpu, cuda, dml, gpu, npu"),
    ("transformer=gpu", "unknown component 'transformer' in device; this artifact has: text_encoder, unet"),
    ("unet=gpu,unet=cpu", "device names unet twice"),
    ("gpu,cpu", "more than one default device"),
    ("unet=", "has an empty entry"),
    ("unet=cuda,vae=gpu", "one pipeline runs on one backend, and these devices belong to different ones: "
                          "cuda (onnxruntime), gpu (openvino)"),
])
def test_bad_device_lists_say_what_is_accepted(spec, words):
    with pytest.raises(BackendError, match=words.replace("(", r"\(").replace(")", r"\)")):
        resolve_placement("auto", spec, ROLES)


def test_a_device_that_is_not_here_fails_before_any_compile():
    with pytest.raises(BackendError, match="OpenVINO has no NPU device here; available: CPU"):
        resolve_placement("auto", "text_encoder=cpu,unet=npu", ROLES)
    with pytest.raises(BackendError, match="no CUDAExecutionProvider"):
        resolve_placement("onnxruntime", "unet=cuda", ROLES)


def test_each_component_runs_where_it_is_placed_and_says_so(artifact):
    pipe = Pipeline.load(artifact, backend="openvino", device="text_encoder=cpu,unet=auto,vae=cpu",
                         ov_precision="f32")
    desc = pipe.describe()
    assert desc["text_encoder"]["requested_device"] == "cpu" and desc["unet"]["requested_device"] == "auto"
    assert desc["unet"]["device"] == "CPU"  # what AUTO chose is reported, not "auto"
    assert pipe.device == ("text_encoder=cpu, unet=auto, unet_shallow=auto, controlnet_mask=auto, vae_decoder=cpu, "
                           "vae_encoder=cpu")  # the ControlNet goes where the UNet goes
    whole = Pipeline.load(artifact, backend="openvino", device="cpu", ov_precision="f32")
    assert psnr(image(pipe), image(whole)) >= 60


def test_generate_verbose_reports_the_placement(artifact, tmp_path):
    from .conftest import run_cli

    r = run_cli("generate", PROMPT, "--model", str(artifact), "--backend", "onnxruntime", "--device",
                "text_encoder=cpu,unet=cpu", "--steps", "2", "-o", str(tmp_path / "a.png"), "--verbose")
    assert r.exit_code == 0, r.output
    assert '"requested_device": "cpu"' in r.output
    r = run_cli("generate", PROMPT, "--model", str(artifact), "--device", "unet=tpu", "-o", str(tmp_path / "b.png"))
    assert r.exit_code == 2 and "unknown device 'tpu' for unet" in r.output and "Traceback" not in r.output


# -- static shapes --------------------------------------------------------------------------------------------


def test_static_shapes_compile_per_shape_and_draw_the_dynamic_image(artifact, tmp_path):
    dynamic = Pipeline.load(artifact, backend="openvino", device="cpu", ov_precision="f32", cache=False)
    static = Pipeline.load(artifact, backend="openvino", device="cpu", ov_precision="f32", static_shapes=True,
                           cache_dir=tmp_path / "cache")
    assert psnr(image(static), image(dynamic)) >= 60
    unet = static.sessions["unet"].run
    assert isinstance(unet, StaticShapes)
    (compiled, _), = unet.compiled.values()
    assert all(port.get_partial_shape().is_static for port in compiled.inputs)
    assert [list(s["sample"]) for s in unet.compiled_shapes()] == [[2, 4, 16, 16]]
    assert static.describe()["unet"]["compile_cache"] == "written"
    # a third shape drops the least recently used compiled one from memory
    for size in (96, 64):
        static.txt2img(PROMPT, steps=1, width=size, height=size)
    assert [s["sample"][2] for s in unet.compiled_shapes()] == [12, 8]
    # the next process's first image at the same size is served from the cache's entry for that shape
    again = Pipeline.load(artifact, backend="openvino", device="cpu", ov_precision="f32", static_shapes=True,
                          cache_dir=tmp_path / "cache")
    image(again)
    assert {d["compile_cache"] for d in again.describe().values()} == {"hit"}
    shapes = [e["settings"].get("shapes") for e in compile_cache.entries(tmp_path / "cache")]
    assert any(s and s.get("sample") == [2, 4, 16, 16] for s in shapes)  # an entry per shape


def test_batch_one_runs_the_guidance_as_two_calls_with_the_batched_result(artifact):
    batched = Pipeline.load(artifact, backend="openvino", device="cpu", ov_precision="f32", cache=False)
    split = Pipeline.load(artifact, backend="openvino", device="cpu", ov_precision="f32", cache=False,
                          static_shapes=True)
    for session in split.sessions.values():
        session.run.batch_one = True  # what NPU gets by default
    result = split.txt2img(PROMPT, steps=3, seed=1)
    assert len(result.timings.stages["unet"]) == 3  # one timed UNet call per step, two graph calls inside
    shapes = split.sessions["unet"].run.compiled_shapes()
    assert [s["sample"][0] for s in shapes] == [1]  # only a batch-1 graph was ever compiled
    assert psnr(np.asarray(result[0]), image(batched)) >= 60


# -- the compile cache's bound --------------------------------------------------------------------------------


def test_the_cache_is_bounded_least_recently_used_first(artifact, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    Pipeline.load(artifact, backend="onnxruntime", device="cpu", cache_dir=cache)
    found = compile_cache.entries(cache)
    assert len(found) == 3
    by_graph = {e["graph"].split("/")[-2]: e for e in found}
    now = time.time()
    for age, name in enumerate(("vae_decoder", "text_encoder", "unet")):  # the UNet least recently used
        os.utime(by_graph[name]["folder"] / compile_cache.MARKER, (now - 100 * age, now - 100 * age))
    total = sum(e["bytes"] for e in found)
    removed = compile_cache.evict(cache, total - 1)
    assert removed == [by_graph["unet"]["folder"]]
    # through the environment: a bound smaller than any entry keeps only the entry just written
    monkeypatch.setenv("EDGEDIFF_CACHE_MAX_GB", str(1e-9))
    Pipeline.load(artifact, backend="onnxruntime", device="cpu", cache_dir=cache)
    assert len(compile_cache.entries(cache)) == 1
    monkeypatch.setenv("EDGEDIFF_CACHE_MAX_GB", "lots")
    with pytest.warns(UserWarning, match="EDGEDIFF_CACHE_MAX_GB='lots' is not a number of GB"):
        assert compile_cache.max_bytes() == int(compile_cache.DEFAULT_MAX_GB * 1e9)


def test_cache_list_shows_shapes_and_cache_clear_empties_it(artifact, tmp_path):
    from .conftest import run_cli

    cache = tmp_path / "cache"
    image(Pipeline.load(artifact, backend="openvino", device="cpu", static_shapes=True, cache_dir=cache))
    r = run_cli("cache", "list", "--cache-dir", str(cache))
    assert r.exit_code == 0, r.output
    assert "sample 2x4x16x16" in r.output and "bound 20 GB" in r.output
    r = run_cli("cache", "clear", "--cache-dir", str(cache))
    assert r.exit_code == 0 and "removed" in r.output and not compile_cache.entries(cache)


# -- the device check ------------------------------------------------------------------------------------------


def corrupting(target: str, only_precision: str | None = None):
    """A fault on the device side: ``target``'s outputs turned to noise (for one precision, or any)."""

    def wrap(component, side, session):
        if component != target or side != "device" or \
                (only_precision is not None and session.variant.precision != only_precision):
            return session
        run = session.run

        def broken(feeds):
            return [np.random.default_rng(0).standard_normal(o.shape).astype(o.dtype) for o in run(feeds)]

        session.run = broken
        return session

    return wrap


def test_the_check_demotes_a_wrong_component_to_the_cpu(artifact, tmp_path, monkeypatch):
    monkeypatch.setattr(device_check, "is_the_cpu", lambda backend, device: device == "cpu")  # AUTO plays a GPU
    options = BackendOptions(cache_dir=tmp_path / "cache", ov_precision="f32")
    from edgediff.runtime import load_manifest

    manifest = load_manifest(artifact)
    devices = {c: "auto" for c in manifest.components}
    precision = {c: "fp32" for c in manifest.components}
    report = device_check.check(artifact, manifest, "openvino", devices, precision, options,
                                wrap=corrupting("vae_decoder"))
    verdicts = {v.component: v for v in report.verdicts}
    assert verdicts["vae_decoder"].action == "cpu" and verdicts["vae_decoder"].device == "cpu"
    assert verdicts["vae_decoder"].snr_db < 5
    assert "vae_decoder fp32 on auto" in verdicts["vae_decoder"].why
    for name in ("text_encoder", "unet", "unet_shallow", "vae_encoder"):  # every stage measured, all fine
        assert verdicts[name].action == "kept" and verdicts[name].snr_db > 60, verdicts[name]


def test_the_check_tries_fp32_on_the_device_before_the_cpu(artifact, tmp_path, monkeypatch):
    monkeypatch.setattr(device_check, "is_the_cpu", lambda backend, device: device == "cpu")
    from edgediff.runtime import load_manifest

    manifest = load_manifest(artifact)
    options = BackendOptions(cache_dir=tmp_path / "cache", ov_precision="f32")
    devices = {c: "auto" for c in manifest.components}
    precision = {c: "fp32" for c in manifest.components} | {"vae_decoder": "tiny", "vae_encoder": "tiny"}
    report = device_check.check(artifact, manifest, "openvino", devices, precision, options,
                                wrap=corrupting("vae_decoder", only_precision="tiny"))
    v = {v.component: v for v in report.verdicts}["vae_decoder"]
    assert (v.action, v.device, v.precision) == ("fp32", "auto", "fp32")


def test_a_load_checks_once_then_applies_the_kept_verdict(artifact, tmp_path, monkeypatch):
    monkeypatch.setattr(device_check, "is_the_cpu", lambda backend, device: device == "cpu")
    real = device_check.open_session
    measured = []

    def faulty_device(root, component, variant, backend, device, options, patch=None):
        measured.append(component)
        session = real(root, component, variant, backend, device, options, patch)
        return corrupting("unet")(component, "device", session)

    monkeypatch.setattr(device_check, "open_session", faulty_device)
    cache = tmp_path / "cache"
    with pytest.warns(UserWarning, match="device check: unet fp32 on auto: .* vs the CPU .*running unet on the CPU"):
        pipe = Pipeline.load(artifact, backend="openvino", device="auto", ov_precision="f32", cache_dir=cache)
    assert pipe.devices["unet"] == "cpu" and pipe.describe()["unet"]["requested_device"] == "cpu"
    assert pipe.devices["text_encoder"] == "auto"
    count = len(measured)
    with pytest.warns(UserWarning, match="a verdict kept from an earlier check"):
        again = Pipeline.load(artifact, backend="openvino", device="auto", ov_precision="f32", cache_dir=cache)
    assert len(measured) == count and again.devices["unet"] == "cpu"  # not measured again
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Pipeline.load(artifact, backend="openvino", device="auto", ov_precision="f32", cache_dir=cache, check=False)


def test_the_check_command_measures_and_prints_each_stage(artifact, tmp_path):
    from .conftest import run_cli

    r = run_cli("check", "--model", str(artifact), "--device", "cpu", "--cache-dir", str(tmp_path / "c"))
    assert r.exit_code == 0, r.output
    assert "every component matches the CPU" in r.output and "unet" in r.output
    r = run_cli("check", "--model", str(artifact), "--device", "npu")
    assert r.exit_code == 2 and "OpenVINO has no NPU device here" in r.output


# -- ONNX Runtime: IO binding, DirectML and CUDA options ---------------------------------------------------------


def test_io_binding_gives_the_plain_outputs_and_copies_unchanged_inputs_once(artifact):
    from edgediff.runtime import load_manifest

    manifest = load_manifest(artifact)
    variant = manifest.variant("unet", "fp32")
    plain = open_session(artifact, "unet", variant, "onnxruntime", "cpu", BackendOptions())
    bound = open_session(artifact, "unet", variant, "onnxruntime", "cpu", BackendOptions(io_binding=True))
    assert isinstance(bound.run, BoundRun)
    rng = np.random.default_rng(0)
    text = rng.standard_normal((2, 77, 48)).astype(np.float32)
    for step in range(3):
        feeds = dict(sample=rng.standard_normal((2, 4, 16, 16)).astype(np.float32),
                     timestep=np.full(2, 900 - 300 * step, np.float32), encoder_hidden_states=text)
        np.testing.assert_array_equal(bound(**feeds)["out_sample"], plain(**feeds)["out_sample"])
    slot, = bound.run.slots.values()
    assert slot["fed"]["encoder_hidden_states"] is text  # bound once, never copied again


def test_directml_and_cuda_get_their_documented_options():
    import onnxruntime as ort

    so = ort_session_options(ort, "dml", BackendOptions())
    assert so.enable_mem_pattern is False and so.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert ort_providers("dml", BackendOptions(dml_adapter=1))[0] == ("DmlExecutionProvider", {"device_id": 1})
    assert ort_providers("cuda", BackendOptions(cuda_graph=True))[0] == ("CUDAExecutionProvider",
                                                                         {"enable_cuda_graph": "1"})
    assert ort_providers("cuda", BackendOptions())[0] == ("CUDAExecutionProvider", {})
    cpu = ort_session_options(ort, "cpu", BackendOptions())
    assert cpu.enable_mem_pattern is False and cpu.enable_cpu_mem_arena is True  # patterns cost 2.4 GB on SD1.5
