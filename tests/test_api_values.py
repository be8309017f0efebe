"""Settings and results as values: per-image seeds, one pipeline serving threads, the same PNGs from the API and CLI."""

from __future__ import annotations

import dataclasses
import json
import shutil
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from edgediff.models import default_model_path
from edgediff.runtime import ArtifactError, GenerationSettings, Pipeline, Result, save_result

from .conftest import run_cli

pytestmark = pytest.mark.fast  # on the embedded model: no torch

PROMPT = "a red circle on a blue background"


def pixels(images) -> list[np.ndarray]:
    return [np.asarray(image) for image in images]


@pytest.mark.parametrize("rng", ["numpy", "torch"])
def test_image_k_of_a_batch_is_the_image_of_seed_plus_k(rng):
    """Euler a draws noise at every step: each image's own stream must serve it, whatever the batch."""
    pipe = Pipeline.load(backend="onnxruntime", device="cpu")
    kw = dict(steps=3, guidance=5.0, width=32, height=32, scheduler="euler_a", rng=rng)
    batch = pipe.txt2img([PROMPT, "a green star"], "blurry", seed=11, num_images=2, **kw)
    assert batch.seeds == (11, 12, 13, 14)
    prompts = [PROMPT, PROMPT, "a green star", "a green star"]
    for k, image in enumerate(pixels(batch)):
        (alone,) = pipe.txt2img(prompts[k], "blurry", seed=11 + k, **kw)
        assert np.array_equal(image, np.asarray(alone)), f"image {k}"
    assert not np.array_equal(pixels(batch)[0], pixels(batch)[1])  # the seeds differ, so do the images


def test_image_k_of_an_img2img_batch_is_alone_too():
    pipe = Pipeline.load(backend="onnxruntime", device="cpu")
    source = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    kw = dict(steps=4, strength=0.7, scheduler="euler_a")
    batch = pipe.img2img(PROMPT, source, seed=3, num_images=3, **kw)
    for k, image in enumerate(pixels(batch)):
        assert np.array_equal(image, np.asarray(pipe.img2img(PROMPT, source, seed=3 + k, **kw)[0])), f"image {k}"


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_one_pipeline_serves_concurrent_calls(backend):
    pipe = Pipeline.load(backend=backend, device="cpu", ov_precision="f32")
    kw = dict(steps=3, guidance=4.0, width=32, height=32, scheduler="dpmpp_2m")
    sequential = [pixels(pipe.txt2img(PROMPT, seed=s, **kw)) for s in range(8)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda s: pipe.txt2img(PROMPT, seed=s, **kw), range(8)))
    for seed, (result, alone) in enumerate(zip(results, sequential)):
        assert np.array_equal(pixels(result)[0], alone[0]), f"seed {seed}"
    assert all(len(r.timings.stages["unet"]) == 3 for r in results)  # each call's own timings, none shared


def test_result_records_what_was_used():
    pipe = Pipeline.load(backend="onnxruntime", device="cpu")
    result = pipe.txt2img(PROMPT, seed=5, steps=2, num_images=2)
    assert isinstance(result, Result) and len(result) == 2 and result[1] is result.images[1]
    s = result.settings
    assert (s.steps, s.guidance, s.width, s.height, s.scheduler) == (2, 4.0, 128, 128, pipe.manifest.scheduler)
    assert result.seeds == (5, 6) and result.task == "txt2img"
    assert set(result.timings.stages) == {"text_encoder", "unet", "vae_decoder"}
    assert result.components["unet"]["precision"] == "fp32" and result.components["unet"]["backend"] == "onnxruntime"
    assert "Seed: 6, Size: 128x128" in result.parameters(1)


def test_api_and_cli_write_the_same_files(tmp_path):
    artifact = str(default_model_path())
    r = run_cli("generate", PROMPT, "--model", artifact, "--backend", "onnxruntime", "--steps", "2", "--seed", "9",
                "--num-images", "2", "--negative", "blurry", "--output", str(tmp_path / "cli.png"))
    assert r.exit_code == 0, r.output
    pipe = Pipeline.load(artifact, backend="onnxruntime")
    paths = save_result(pipe.txt2img(PROMPT, "blurry", steps=2, seed=9, num_images=2), tmp_path / "api.png")
    assert [p.name for p in paths] == ["api-1.png", "api-2.png"]
    for k in (1, 2):
        cli, api = Image.open(tmp_path / f"cli-{k}.png"), Image.open(tmp_path / f"api-{k}.png")
        assert np.array_equal(np.asarray(cli), np.asarray(api))
        assert cli.info["parameters"] == api.info["parameters"]
        assert json.loads(cli.info["edgediff"]) == json.loads(api.info["edgediff"])
    record = json.loads(Image.open(tmp_path / "cli-2.png").info["edgediff"])
    assert record["seed"] == 10 and record["index"] == 1 and record["steps"] == 2
    # the second image regenerates alone from what its PNG records
    (alone,) = pipe.txt2img(record["prompt"], record["negative"], steps=record["steps"], guidance=record["guidance"],
                            seed=record["seed"], scheduler=record["scheduler"], rng=record["rng"])
    assert np.array_equal(np.asarray(alone), np.asarray(Image.open(tmp_path / "cli-2.png")))


def test_settings_are_a_frozen_checked_value():
    s = GenerationSettings("a cat", "blurry", steps=4, images_per_prompt=2)
    assert s.prompts == ("a cat",) and s.negative_prompts == ("blurry",) and s.batch == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.steps = 5
    with pytest.raises(ValueError, match="2 negative prompts for 1 prompts"):
        GenerationSettings("a cat", ["x", "y"])
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        GenerationSettings("a cat", steps=0)
    assert s.images(1, 1).seeds == (1,)


def test_a_bare_precision_applies_where_it_exists(tmp_path):
    pytest.importorskip("onnxruntime.quantization")
    from edgediff.quantize import GateSettings, quantize_artifact

    artifact = tmp_path / "artifact"
    shutil.copytree(default_model_path(), artifact)
    quantize_artifact(artifact, "int8", ("text_encoder",), force=True,
                      settings=GateSettings(prompts=("x",), seeds=(0,), steps=2))
    with pytest.warns(UserWarning, match="int8 applies to text_encoder; unet, unet_shallow, controlnet_mask, vae_decoder, vae_encoder have no int8"):
        pipe = Pipeline.load(artifact, backend="onnxruntime", precision="int8")
    assert pipe.describe()["text_encoder"]["precision"] == "int8" and pipe.describe()["unet"]["precision"] == "fp32"
    with pytest.raises(ArtifactError, match="unet has no 'int8' variant"):
        Pipeline.load(artifact, backend="onnxruntime", precision="unet=int8")
    with pytest.raises(ArtifactError, match="no component has a 'int4' variant"):
        Pipeline.load(artifact, backend="onnxruntime", precision="int4")
    r = run_cli("generate", "x", "--model", str(artifact), "--precision", "int8", "--steps", "1",
                "--output", str(tmp_path / "o.png"))
    assert r.exit_code == 0, r.output
    assert "note: int8 applies to text_encoder" in r.output
