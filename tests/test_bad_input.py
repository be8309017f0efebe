"""Bad input gets a clear error that says what was wrong and what is accepted."""

from __future__ import annotations

import json

import pytest

from edgediff.runtime import ArtifactError, BackendError, Pipeline, load_manifest

from .conftest import run_cli

pytestmark = pytest.mark.fast  # on the embedded model: no torch


@pytest.fixture
def artifact_copy(embedded_copy):
    return embedded_copy


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.load(backend="onnxruntime", device="cpu")  # the embedded model


def test_missing_folder(tmp_path):
    with pytest.raises(ArtifactError, match="not an artifact folder"):
        load_manifest(tmp_path / "nope")


def test_missing_manifest(artifact_copy):
    (artifact_copy / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match="manifest.json is missing"):
        load_manifest(artifact_copy)


def test_corrupt_manifest(artifact_copy):
    (artifact_copy / "manifest.json").write_text("{ not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        load_manifest(artifact_copy)


def test_manifest_missing_key(artifact_copy):
    d = json.loads((artifact_copy / "manifest.json").read_text())
    del d["prediction_type"]
    (artifact_copy / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(ArtifactError, match="lacks the required key 'prediction_type'"):
        load_manifest(artifact_copy)


def test_newer_format_version(artifact_copy):
    d = json.loads((artifact_copy / "manifest.json").read_text())
    d["format_version"] = 99
    (artifact_copy / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(ArtifactError, match="format_version 99, newer than this edgediff reads"):
        load_manifest(artifact_copy)


@pytest.mark.parametrize("defaults, message", [
    ({"steps": 0}, "defaults.steps must be an integer >= 1 \\(at most 1000\\), got 0"),
    ({"steps": True}, "defaults.steps must be an integer >= 1"),
    ({"steps": 2.5}, "defaults.steps must be an integer >= 1"),
    ({"guidance": -1}, "defaults.guidance must be a finite number >= 0, got -1"),
    ({"guidance": "high"}, "defaults.guidance must be a finite number >= 0"),
    ({"cfg": 4}, "unknown keys \\['cfg'\\]; accepted: steps, guidance"),
    ([20, 4], "defaults must be an object with steps and/or guidance"),
])
def test_bad_recommended_settings_are_refused(artifact_copy, defaults, message):
    d = json.loads((artifact_copy / "manifest.json").read_text())
    d["defaults"] = defaults
    (artifact_copy / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(ArtifactError, match=message):
        load_manifest(artifact_copy)


def test_missing_onnx_file(artifact_copy):
    (artifact_copy / "unet" / "model.onnx").unlink()
    with pytest.raises(ArtifactError, match="unet.*model.onnx is missing"):
        load_manifest(artifact_copy)


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_corrupt_onnx_file(artifact_copy, backend):
    path = artifact_copy / "unet" / "model.onnx"
    path.write_bytes(b"\x00garbage" * (path.stat().st_size // 8) + b"\x00" * (path.stat().st_size % 8))  # same size
    with pytest.raises(BackendError, match="could not (load|compile).*unet"):
        Pipeline.load(artifact_copy, backend=backend, device="cpu")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"width": 60}, "width must be a positive multiple of 8"),
        ({"height": 0}, "height must be a positive multiple of 8"),
        ({"steps": 0}, "steps must be an integer >= 1"),
        ({"scheduler": "karras9"}, "unknown scheduler 'karras9'; valid: ddim, pndm, lms, euler, euler_a, dpmpp_2m"),
        ({"rng": "cuda"}, "unknown rng 'cuda'; valid: numpy, torch"),
        ({"guidance": -1.0}, "guidance must be a finite number >= 0"),
        ({"num_images": 0}, "num_images must be an integer >= 1"),
        ({"seed": -3}, "seed must be a non-negative integer"),
    ],
)
def test_bad_generation_arguments(pipe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pipe.txt2img("a red circle", **kwargs)


def test_unknown_device_and_backend():
    with pytest.raises(BackendError, match="unknown device 'tpu'; valid: auto, cpu, cuda, dml, gpu, npu"):
        Pipeline.load(device="tpu")
    with pytest.raises(BackendError, match="unknown backend 'tensorrt'"):
        Pipeline.load(backend="tensorrt")
    with pytest.raises(BackendError, match="onnxruntime runs on devices cpu, cuda, dml"):
        Pipeline.load(backend="onnxruntime", device="npu")
    with pytest.raises(BackendError, match="no CUDAExecutionProvider"):
        Pipeline.load(backend="onnxruntime", device="cuda")


def test_session_checks_inputs(pipe):
    import numpy as np

    unet = pipe.sessions["unet"]
    ok = dict(sample=np.zeros((2, 4, 8, 8), np.float32), timestep=np.zeros(2, np.float32),
              encoder_hidden_states=np.zeros((2, 77, 48), np.float32))
    with pytest.raises(BackendError, match="missing \\['timestep'\\]"):
        unet(sample=ok["sample"], encoder_hidden_states=ok["encoder_hidden_states"])
    with pytest.raises(BackendError, match="unet.timestep: expected dtype float32, got int64"):
        unet(**{**ok, "timestep": np.zeros(2, np.int64)})
    with pytest.raises(BackendError, match="unet.sample: axis 1 must be 4"):
        unet(**{**ok, "sample": np.zeros((2, 3, 8, 8), np.float32)})
    with pytest.raises(BackendError, match="expected rank 3"):
        unet(**{**ok, "encoder_hidden_states": np.zeros((2, 77), np.float32)})


def test_long_prompt_is_chunked_not_truncated(pipe):
    long = " ".join(["red circle"] * 60)  # 120 tokens: two chunks of at most 75
    chunks = pipe.tokenizer.chunks(long)
    assert chunks.ids.shape == (2, 77)
    assert (chunks.ids[:, 0] == pipe.tokenizer.bos).all()
    assert chunks.ids[0, 76] == pipe.tokenizer.eos and (chunks.ids[0] != pipe.tokenizer.eos).sum() == 76


def test_cli_reports_errors_without_traceback():
    r = run_cli("generate", "x", "--width", "100")
    assert r.exit_code == 2
    assert "width must be a positive multiple of 8" in r.output
    r = run_cli("generate", "x", "--scheduler", "nope")
    assert r.exit_code == 2 and "valid: ddim" in r.output
    r = run_cli("generate", "x", "--model", "/nonexistent/artifact")
    assert r.exit_code == 2 and "not an artifact folder" in r.output
