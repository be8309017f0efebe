"""Tried as a hostile or careless user would: nothing lost, nothing read or deleted outside the artifact, no traceback.

Each case asserts the exact outcome: the error line and exit code 2, the
user's files (and a marker file outside the artifact) untouched, the marker's
content never in the output, nothing written that looks valid.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgediff.runtime import ArtifactError, GenerationError, Pipeline, load_manifest

from .conftest import run_cli

SECRET = "SECRET-MARKER-do-not-print"


pytestmark = pytest.mark.fast


@pytest.fixture
def artifact(embedded_copy):
    """A private copy of the embedded model's artifact, free to damage."""
    return embedded_copy


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "outside" / "secret.onnx"
    path.parent.mkdir()
    path.write_text(SECRET)
    return path


def edit_manifest(root: Path, change) -> None:
    d = json.loads((root / "manifest.json").read_text())
    change(d)
    (root / "manifest.json").write_text(json.dumps(d))


def cli_subprocess(*args: str, memory_gb: float | None = None, cwd: Path | None = None):
    """The CLI in its own process (optionally under an address-space limit): what a user's shell sees."""
    def limit():
        if memory_gb:
            size = int(memory_gb * 2**30)
            resource.setrlimit(resource.RLIMIT_AS, (size, size))

    return subprocess.run([sys.executable, "-c", "from edgediff.cli import main; main()", *args], cwd=cwd,
                          preexec_fn=limit, capture_output=True, text=True, timeout=600)


# -- escapes: every path the manifest names stays inside the artifact --------------------------


def _outside_copy(artifact: Path, marker: Path) -> str:
    """A real UNet graph outside the artifact, named relative to it."""
    shutil.copy(artifact / "unet" / "model.onnx", marker.parent / "model.onnx")
    return os.path.relpath(marker.parent / "model.onnx", artifact)


@pytest.mark.parametrize("case", ["dotdot", "absolute", "symlink_file", "symlink_folder", "backslash"])
@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_component_paths_cannot_leave_the_artifact(artifact, marker, case, backend):
    if case == "dotdot":
        rel = _outside_copy(artifact, marker)
        edit_manifest(artifact, lambda d: d["components"]["unet"]["variants"]["fp32"].update(file=rel))
    elif case == "absolute":
        edit_manifest(artifact, lambda d: d["components"]["unet"]["variants"]["fp32"].update(file=str(marker)))
    elif case == "symlink_file":
        (artifact / "unet" / "model.onnx").unlink()
        (artifact / "unet" / "model.onnx").symlink_to(marker)
    elif case == "symlink_folder":
        shutil.copy(artifact / "unet" / "model.onnx", marker.parent / "model.onnx")
        shutil.rmtree(artifact / "unet")
        (artifact / "unet").symlink_to(marker.parent, target_is_directory=True)
    else:
        edit_manifest(artifact, lambda d: d["components"]["unet"]["variants"]["fp32"].update(file="unet\\model.onnx"))
    with pytest.raises(ArtifactError) as e:
        Pipeline.load(artifact, backend=backend, device="cpu")
    assert "outside the artifact" in str(e.value) or "leaves the artifact" in str(e.value) \
        or "not a relative path inside the artifact" in str(e.value)
    assert SECRET not in str(e.value)
    r = run_cli("generate", "x", "--model", str(artifact), "--backend", backend, "--output", str(artifact.parent / "o.png"))
    assert r.exit_code == 2 and SECRET not in r.output
    assert marker.read_text() == SECRET and not (artifact.parent / "o.png").exists()


@pytest.mark.parametrize("what", ["tokenizer/tokenizer.json", "scheduler/scheduler_config.json", "unet/model.onnx.data",
                                  "manifest.json"])
def test_side_files_cannot_be_symlinks_out(artifact, marker, what):
    target = marker.with_suffix(Path(what).suffix)
    if what == "manifest.json":
        shutil.copy(artifact / what, target)
    else:
        target.write_text(SECRET)
    (artifact / what).unlink(missing_ok=True)
    (artifact / what).symlink_to(target)
    with pytest.raises(ArtifactError, match="resolves outside the artifact folder") as e:
        load_manifest(artifact)
    assert SECRET not in str(e.value)


def test_second_tokenizer_path_is_confined(artifact, marker):
    def add_text_2(d):
        d["components"]["text_encoder_2"] = dict(d["components"]["text_encoder"], tokenizer="../outside/secret.json")
    marker.with_suffix(".json").write_text(SECRET)
    edit_manifest(artifact, add_text_2)
    with pytest.raises(ArtifactError, match="text_encoder_2 tokenizer: '../outside/secret.json' leaves the artifact folder"):
        load_manifest(artifact)


def test_ir_weights_beside_the_xml_are_confined(artifact, marker):
    d = json.loads((artifact / "manifest.json").read_text())
    v = dict(d["components"]["unet"]["variants"]["fp32"], file="unet/model.nncf-int8.xml", backends=["openvino"])
    (artifact / "unet" / "model.nncf-int8.xml").write_text("<net/>")
    (artifact / "unet" / "model.nncf-int8.bin").symlink_to(marker)
    d["components"]["unet"]["variants"]["nncf-int8"] = v
    (artifact / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(ArtifactError, match="model.nncf-int8.bin.*resolves outside the artifact folder"):
        load_manifest(artifact)


def test_a_fifo_is_refused_not_read(artifact):
    (artifact / "tokenizer" / "tokenizer.json").unlink()
    os.mkfifo(artifact / "tokenizer" / "tokenizer.json")  # reading it would block forever
    with pytest.raises(ArtifactError, match="tokenizer.json \\(tokenizer\\) is not a regular file"):
        load_manifest(artifact)


def test_remove_variant_never_deletes_outside(artifact, marker):
    from edgediff.quantize import remove_variant

    rel = os.path.relpath(marker, artifact)
    d = json.loads((artifact / "manifest.json").read_text())
    d["components"]["unet"]["variants"]["fp16"] = dict(d["components"]["unet"]["variants"]["fp32"], file=rel)
    (artifact / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(ArtifactError, match="leaves the artifact folder"):
        remove_variant(artifact, "unet", "fp16")
    assert marker.read_text() == SECRET
    # a variant inside the artifact is removed with its file, nothing else
    shutil.copy(artifact / "unet" / "model.onnx", artifact / "unet" / "model.fp16.onnx")
    d["components"]["unet"]["variants"]["fp16"]["file"] = "unet/model.fp16.onnx"
    (artifact / "manifest.json").write_text(json.dumps(d))
    remove_variant(artifact, "unet", "fp16")
    assert not (artifact / "unet" / "model.fp16.onnx").exists() and (artifact / "unet" / "model.onnx").exists()
    assert "fp16" not in load_manifest(artifact).components["unet"]


# -- resource limits, under an address-space limit --------------------------------------------


@pytest.mark.parametrize("args, message", [
    (["--width", "100000"], "over the pixel budget of 1,048,576 per image"),
    (["--height", "99992", "--width", "99992"], "over the pixel budget"),
    (["--num-images", "300", "--width", "1024", "--height", "1024"], "exceed 268,435,456 pixels in one call"),
])
def test_sizes_are_refused_before_allocation(tmp_path, args, message):
    r = cli_subprocess("generate", "x", "--backend", "onnxruntime",
                       "--output", str(tmp_path / "o.png"), *args, memory_gb=3)
    assert r.returncode == 2, r.stderr
    assert message in " ".join(r.stderr.split()) and "Traceback" not in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_huge_input_image_and_canvas_are_refused(tmp_path):
    big = tmp_path / "big.png"
    Image.new("L", (12000, 12000)).save(big)  # 144 MP, a few hundred KB of PNG
    small = tmp_path / "small.png"
    Image.new("RGB", (64, 64), "red").save(small)
    common = ["--backend", "onnxruntime", "--output", str(tmp_path / "o.png")]
    r = cli_subprocess("generate", "x", "--image", str(big), *common, memory_gb=3)
    assert r.returncode == 2 and "input images are read up to 64,000,000 pixels" in " ".join(r.stderr.split()), r.stderr
    r = cli_subprocess("generate", "x", "--image", str(small), "--extend", "left=100000", *common, memory_gb=3)
    assert r.returncode == 2 and "the extended canvas would be 100064x64" in r.stderr, r.stderr
    assert not (tmp_path / "o.png").exists()


def test_max_pixels_lifts_the_budget(tmp_path):
    pipe = Pipeline.load(backend="onnxruntime", device="cpu", max_pixels=64 * 48)
    (image,) = pipe.txt2img("x", steps=1, width=64, height=48)
    assert image.size == (64, 48)
    with pytest.raises(ValueError, match="64x56 = 3,584 pixels, over the pixel budget of 3,072"):
        pipe.txt2img("x", steps=1, width=64, height=56)


def test_unet_batches_are_capped():
    pipe = Pipeline.load(backend="onnxruntime", device="cpu", max_batch=2)
    batches = []
    run = pipe.sessions["unet"].run
    pipe.sessions["unet"].run = lambda feeds: batches.append(len(feeds["sample"])) or run(feeds)
    progress = []
    images = pipe.txt2img(["a", "b"], steps=2, guidance=3.0, num_images=3, seed=5, width=32, height=32,
                          scheduler="euler", callback=lambda done, total: progress.append((done, total)))
    assert len(images) == 6
    assert batches == [4, 4, 4, 4, 4, 4]  # 2 images x CFG per call, 3 chunks x 2 steps
    assert progress == [(1, 6), (2, 6), (3, 6), (4, 6), (5, 6), (6, 6)]
    # image k is seeded seed + k whatever its chunk: the chunked batch equals the batch run at once
    whole = Pipeline.load(backend="onnxruntime", device="cpu", max_batch=6).txt2img(
        ["a", "b"], steps=2, guidance=3.0, num_images=3, seed=5, width=32, height=32, scheduler="euler")
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(images, whole))


def test_manifest_sizes_are_range_checked(artifact):
    edit_manifest(artifact, lambda d: d["components"]["text_encoder"].update(max_length=10**9))
    with pytest.raises(ArtifactError, match="'max_length' must be in \\[3, 4096\\], got 1000000000"):
        load_manifest(artifact)


@pytest.mark.parametrize("path, value, message", [
    (("sample_size",), 0, "'sample_size' must be in \\[8, 16384\\]"),
    (("sample_size",), 10**9, "'sample_size' must be in"),
    (("vae_scale_factor",), 0, "'vae_scale_factor' must be one of"),
    (("vae_scale_factor",), 3, "'vae_scale_factor' must be one of"),
    (("latent_channels",), 10**6, "'latent_channels' must be in \\[1, 256\\]"),
    (("components", "unet", "in_channels"), 7, "the denoiser's input channels must be latent_channels"),
    (("scaling_factor",), float("nan"), "'scaling_factor' must be in"),
    (("scaling_factor",), 0, "'scaling_factor' must be in"),
    (("scaling_factor",), -0.18, "'scaling_factor' must be in"),
    (("shift_factor",), float("inf"), "'shift_factor' must be in"),
    (("components", "text_encoder", "hidden_size"), 0, "'hidden_size' must be in"),
    (("components", "text_encoder", "pad_token_id"), -1, "'pad_token_id' must be in"),
    (("components", "text_encoder", "pad_token_id"), 10**8, "'pad_token_id' must be in"),
    (("components", "unet_shallow", "method"), "taylorseer", "is a 'taylorseer' shallow denoiser; this edgediff runs: deepcache"),
    (("components", "vae_decoder", "variants", "tiny", "scaling_factor"), 0, "'scaling_factor' must be in"),
    (("fast_profile", "settings", "cache_interval"), 0, "fast_profile.settings.cache_interval must be"),
    (("random_weights",), "yes", "'random_weights' must be bool"),
    (("provenance",), [1], "'provenance' must be an object"),
    (("scheduler", "default"), "karras9", "default 'karras9' is not one of"),
    (("components", "unet"), 5, "components.unet must be an object"),
    (("components", "unet", "variants", "fp32", "file"), 5, "a file path must be a non-empty string, got 5"),
    (("components", "unet", "variants", "fp32", "file"), "unet/model.txt", "must end in .onnx or .xml"),
    (("components", "unet", "variants", "fp32", "bytes"), float("inf"), "bytes must be a positive integer, got inf"),
    (("components", "unet", "variants", "fp32", "bytes"), "12", "bytes must be a positive integer"),
    (("components", "unet", "variants", "fp32", "bytes"), True, "bytes must be a positive integer"),
    (("components", "unet", "variants", "fp32", "inputs", 0, "dtype"), "float128", "dtype 'float128' is not one of"),
    (("components", "unet", "variants", "fp32", "inputs", 0, "shape"), [-1], "shape must be a list"),
    (("components", "unet", "variants", "fp32", "outputs"), [], "outputs must be a non-empty list"),
    (("components", "unet", "variants", "fp32", "backends"), ["tensorrt"], "backends must be a list of onnxruntime"),
    (("defaults",), {"guidance": float("inf")}, "defaults.guidance must be a finite number >= 0, got inf"),
])
def test_malformed_manifest_fields(artifact, path, value, message):
    def change(d):
        node = d
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    edit_manifest(artifact, change)
    with pytest.raises(ArtifactError, match=message):
        load_manifest(artifact)
    r = run_cli("info", str(artifact))
    assert r.exit_code == 2 and "Traceback" not in r.output


def test_unparseable_manifests(artifact):
    (artifact / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ArtifactError, match="nested too deeply"):
        load_manifest(artifact)
    (artifact / "manifest.json").write_bytes(b"\xff\xfe not utf-8")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        load_manifest(artifact)


# -- silent wrong results ---------------------------------------------------------------------


def test_non_finite_settings_are_refused(artifact, tmp_path):
    for guidance in ("inf", "nan"):
        r = run_cli("generate", "x", "--model", str(artifact), "--guidance", guidance, "--output", str(tmp_path / "o.png"))
        assert r.exit_code == 2 and "guidance must be a finite number >= 0" in r.output
    assert not (tmp_path / "o.png").exists()


def test_nan_in_any_stage_is_an_error_at_fp32(artifact, tmp_path):
    r = run_cli("generate", "x", "--model", str(artifact), "--guidance", "1e300", "--steps", "2",
                "--output", str(tmp_path / "o.png"))
    assert r.exit_code == 2
    assert "unet produced NaN/Inf values at step 1 of " in r.output and "(guidance 1e+300) at fp32" in r.output
    assert not (tmp_path / "o.png").exists()
    pipe = Pipeline.load(artifact, backend="onnxruntime", device="cpu")
    run = pipe.sessions["vae_decoder"].run
    pipe.sessions["vae_decoder"].run = lambda feeds: [np.full_like(run(feeds)[0], np.nan)]
    with pytest.raises(GenerationError, match="vae_decoder produced NaN/Inf values in its output sample at fp32"):
        pipe.txt2img("x", steps=1)


def test_quantize_gate_needs_an_image(artifact):
    from edgediff.quantize import GateSettings, quantize_artifact
    from edgediff.quantize.quantize import Gate, passes

    r = run_cli("quantize", str(artifact), "-p", "fp16", "--seeds", "0")
    assert r.exit_code == 2 and "--seeds" in r.output
    r = run_cli("quantize", str(artifact), "-p", "fp16", "--prompts", " | ")
    assert r.exit_code == 2 and "--prompts needs at least one prompt" in r.output
    with pytest.raises(ValueError, match="needs at least one prompt and one seed"):
        quantize_artifact(artifact, "fp16", ("unet",), settings=GateSettings(seeds=()))
    assert passes({"psnr_db": float("nan"), "ssim": 0.99}, Gate()) == ["psnr_db is nan (not a finite number)"]
    assert set(load_manifest(artifact).components["unet"]) == {"fp32"}


# -- tracebacks where an error line belongs ----------------------------------------------------


@pytest.mark.parametrize("output, message", [
    ("/proc/edgediff-test.png", "cannot write into /proc"),
    ("{tmp}", "is a folder"),
    ("{tmp}/out.txt", "images are written as PNG"),
    ("{tmp}/a-file/out.png", "a-file is a file, not a folder"),
    ("{tmp}/existing.png", "already exists; pass --overwrite"),
])
def test_output_paths_are_checked_before_the_model_loads(tmp_path, output, message):
    (tmp_path / "a-file").write_text("mine")
    (tmp_path / "existing.png").write_bytes(b"my picture")
    # a model that does not exist: the output's error comes first, without loading anything
    r = run_cli("generate", "x", "--model", str(tmp_path / "no-model"), "--output", output.format(tmp=tmp_path))
    assert r.exit_code == 2 and message in " ".join(r.output.split())
    assert (tmp_path / "a-file").read_text() == "mine" and (tmp_path / "existing.png").read_bytes() == b"my picture"


def test_overwrite_replaces_and_nothing_half_written_stays(artifact, tmp_path):
    out = tmp_path / "existing.png"
    out.write_bytes(b"my picture")
    r = run_cli("generate", "x", "--model", str(artifact), "--steps", "1", "--output", str(out), "--overwrite")
    assert r.exit_code == 0, r.output
    assert Image.open(out).size == (128, 128)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifact", "existing.png"]  # no temporary files


@pytest.mark.parametrize("change, message", [
    (lambda a: (a / "tokenizer" / "tokenizer.json").write_text(""), "tokenizer.json is not a usable tokenizer.json"),
    (lambda a: (a / "scheduler" / "scheduler_config.json").write_text("{ nope"),
     "scheduler_config.json is not valid JSON"),
    (lambda a: (a / "scheduler" / "scheduler_config.json").write_text('{"beta_schedule": "cubic"}'),
     "scheduler_config.json does not configure the dpmpp_2m scheduler"),
])
def test_broken_side_files_name_the_file(artifact, change, message):
    change(artifact)
    with pytest.raises(ArtifactError, match=message):
        Pipeline.load(artifact, backend="onnxruntime", device="cpu")


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_a_graph_copied_over_another_is_named(artifact, backend):
    unet = artifact / "unet" / "model.onnx"
    shutil.copy(artifact / "vae_decoder" / "model.onnx", unet)
    with pytest.raises(ArtifactError, match="bytes on disk but the manifest recorded"):  # noticed by size first
        load_manifest(artifact)
    edit_manifest(artifact, lambda d: d["components"]["unet"]["variants"]["fp32"].update(bytes=unet.stat().st_size))
    with pytest.raises(ArtifactError, match="unet fp32\\) is not the graph the manifest describes"):
        Pipeline.load(artifact, backend=backend, device="cpu")


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_a_renamed_output_is_named(artifact, backend):
    edit_manifest(artifact, lambda d: d["components"]["vae_decoder"]["variants"]["fp32"]["outputs"][0].update(name="image"))
    with pytest.raises(ArtifactError, match="vae_decoder fp32\\) is not the graph the manifest describes"):
        Pipeline.load(artifact, backend=backend, device="cpu")


def test_truncated_model_file_is_noticed_by_info(artifact):
    path = artifact / "unet" / "model.onnx"
    path.write_bytes(path.read_bytes()[:1000])
    r = run_cli("info", str(artifact))
    assert r.exit_code == 2 and "is 1000 bytes on disk but the manifest recorded" in " ".join(r.output.split())


def test_bench_argument_and_file_errors(artifact, tmp_path):
    r = run_cli("bench", str(artifact), "--runs", "0")
    assert r.exit_code == 2 and "--runs" in r.output
    r = run_cli("bench", str(artifact), "--json", "/proc/rows.jsonl", "--steps", "1")
    assert r.exit_code == 2 and "--json /proc/rows.jsonl: cannot write it" in r.output and "run 0" not in r.output
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"artifact": "x", "backend": "onnxruntime"}) + "\n")
    r = run_cli("bench", "--compare", str(rows))
    assert r.exit_code == 2 and "rows.jsonl:1 is not an edgediff bench row: it lacks device" in " ".join(r.output.split())


def test_bench_defaults_to_the_models_size(artifact, tmp_path):
    rows = tmp_path / "rows.jsonl"
    r = run_cli("bench", str(artifact), "--runs", "1", "--warmup", "0", "--steps", "1", "--backend", "onnxruntime",
                "--json", str(rows))
    assert r.exit_code == 0, r.output
    row = json.loads(rows.read_text())
    assert (row["width"], row["height"]) == (128, 128) == (load_manifest(artifact).sample_size,) * 2


def test_image_errors_name_the_file_and_the_size(artifact, tmp_path):
    corrupt = tmp_path / "broken.png"
    good = tmp_path / "good.png"
    Image.new("RGB", (64, 64), "red").save(good)
    corrupt.write_bytes(good.read_bytes()[:60])  # a valid header, the data cut off
    tiny = tmp_path / "tiny.png"
    Image.new("RGB", (1, 1)).save(tiny)
    common = ["--model", str(artifact), "--output", str(tmp_path / "o.png"), "--steps", "1"]
    r = run_cli("generate", "x", "--image", str(corrupt), *common)
    assert r.exit_code == 2 and f"cannot read image {corrupt} as an image" in " ".join(r.output.split())
    assert "PIL." not in r.output
    r = run_cli("generate", "x", "--image", str(tiny), *common)
    assert r.exit_code == 2 and "the input image is 1x1 pixels; it must be at least 8x8" in " ".join(r.output.split())


def test_extend_misuse_is_refused(artifact, tmp_path):
    image = tmp_path / "in.png"
    Image.new("RGB", (64, 64)).save(image)
    common = ["--model", str(artifact), "--image", str(image), "--output", str(tmp_path / "o.png")]
    r = run_cli("generate", "x", "--extend", "", *common)
    assert r.exit_code == 2 and "got an empty value" in r.output
    r = run_cli("generate", "x", "--extend", "left=8", "--mask", str(image), *common)
    assert r.exit_code == 2 and "--mask (inpainting) and --extend (outpainting) exclude each other" in r.output
    assert not (tmp_path / "o.png").exists()


def test_huge_prompt_error_is_bounded(artifact):
    pipe = Pipeline.load(artifact, backend="onnxruntime", device="cpu")
    with pytest.raises(ValueError) as error:  # 88,000 characters: under the character cap, far over the token cap
        pipe.tokenizer.chunks("red circle " * 8_000)
    message = str(error.value)
    assert len(message) < 500 and "16,000 tokens long" in message and "at most 32 chunks" in message


def test_info_truncates_a_huge_provenance(artifact):
    edit_manifest(artifact, lambda d: d.update(provenance={"notes": "x" * 5_000_000}))
    r = run_cli("info", str(artifact))
    assert r.exit_code == 0, r.output[:500]
    assert len(r.output) < 20_000 and "more characters in manifest.json" in r.output


def test_model_that_is_a_file(tmp_path):
    png = tmp_path / "some_file.png"
    png.write_bytes(b"x")
    r = run_cli("generate", "x", "--model", str(png), "--output", str(tmp_path / "o.png"))
    assert r.exit_code == 2 and "is a file, not an artifact folder" in " ".join(r.output.split())


def test_a_symlink_loop_is_refused_not_followed(artifact):
    (artifact / "unet" / "model.onnx").unlink()
    (artifact / "unet" / "model.onnx").symlink_to(artifact / "unet" / "model.onnx")
    with pytest.raises(ArtifactError, match="unet/model.onnx' cannot be resolved"):
        load_manifest(artifact)
