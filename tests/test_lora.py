"""LoRA merged at load time vs diffusers' ``load_lora_weights`` + ``fuse_lora``: same weights, seed, scheduler.

Each file is made here in a layout people download (kohya/A1111 with LoCon 3x3 kernels, SDXL's original UNet
names, diffusers/PEFT as diffusers saves it) and must change the image: the base model's image is far from
the LoRA'd one, ours within 40 dB of diffusers' on both backends.
"""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from edgediff.runtime import LoraError, LoraSpec, Pipeline
from edgediff.runtime.metrics import psnr

from . import lora_files
from .conftest import run_cli

PROMPT, NEGATIVE = "a red circle on a blue background", "blurry"
STEPS, GUIDANCE, SEED, W, H = 6, 6.0, 3, 64, 48
BACKENDS = ["onnxruntime", "openvino"]


def _pipeline_class(src):
    import diffusers

    return diffusers.DiffusionPipeline.from_pretrained(str(src))


def diffusers_image(src, loras: list[tuple[str, float]], prompt=PROMPT, xl=False) -> np.ndarray:
    """diffusers' image with each LoRA loaded and fused at its scale (loras applied one after the other)."""
    pipe = _pipeline_class(src)
    pipe.set_progress_bar_config(disable=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for k, (path, scale) in enumerate(loras):
            pipe.load_lora_weights(str(path), adapter_name=f"l{k}")
            pipe.fuse_lora(lora_scale=scale, adapter_names=[f"l{k}"])
            pipe.unload_lora_weights()
    out = pipe(prompt=prompt, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
               width=W, height=H, output_type="np", generator=torch.Generator().manual_seed(SEED)).images[0]
    return (out * 255).round().astype(np.uint8)


def ours(artifact, backend, loras, prompt=PROMPT, **load) -> np.ndarray:
    pipe = Pipeline.load(artifact, backend=backend, device="cpu", ov_precision="f32", loras=loras, **load)
    return np.asarray(pipe.txt2img(prompt, NEGATIVE, steps=STEPS, guidance=GUIDANCE, seed=SEED, width=W, height=H,
                                   rng="torch")[0])


@pytest.fixture(scope="module")
def sd1_files(tiny_sd1, tmp_path_factory):
    src, _ = tiny_sd1
    folder = tmp_path_factory.mktemp("sd1-loras")
    return {
        "kohya": lora_files.kohya(_pipeline_class(src), folder / "kohya.safetensors"),
        "locon-unet": lora_files.kohya(_pipeline_class(src), folder / "locon.safetensors", models=("unet",), seed=1,
                                       rank=8, alpha=8.0),
        "text-only": lora_files.kohya(_pipeline_class(src), folder / "te.safetensors", models=("text_encoder",),
                                      seed=2),
        "peft": lora_files.peft(_pipeline_class(src), folder / "peft"),
        "diffusers-old": lora_files.peft(_pipeline_class(src), folder / "old", seed=5, old_names=True),
    }


def test_weight_map_names_every_layer_with_its_value(tiny_sd1):
    """Every Linear / Conv2d / Embedding weight of the UNet and text encoder is mapped to the initializer that
    holds it, as is or transposed, value for value."""
    import onnx
    from onnx import numpy_helper

    src, artifact = tiny_sd1
    pipe = _pipeline_class(src)
    for component, model in (("unet", pipe.unet), ("text_encoder", pipe.text_encoder)):
        record = json.loads((artifact / component / "weights.json").read_text())
        graph = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(artifact / component / "model.onnx")).graph.initializer}
        expected = {f"{n}.weight" for n, m in model.named_modules()
                    if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Embedding))}
        assert set(record["weights"]) == expected
        params = dict(model.named_parameters())
        layouts = set()
        for param, (initializer, layout, shape) in record["weights"].items():
            value = params[param].detach().numpy()
            assert list(value.shape) == shape
            np.testing.assert_array_equal(graph[initializer], value.T if layout == "transposed" else value)
            layouts.add(layout)
        assert layouts == {"as_is", "transposed"}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["kohya", "locon-unet", "text-only", "peft", "diffusers-old"])
def test_lora_matches_diffusers_fuse_lora(tiny_sd1, sd1_files, backend, kind, parity_log):
    src, artifact = tiny_sd1
    path = sd1_files[kind]
    ref = diffusers_image(src, [(path, 0.8)])
    base = diffusers_image(src, [])
    assert psnr(base, ref) < 35, "the LoRA must change diffusers' image, or the test proves nothing"
    score = psnr(ours(artifact, backend, [(path, 0.8)]), ref)
    parity_log((f"lora sd1 {kind}", backend, "dpmpp/euler default", score))
    assert score >= 40, f"{kind} LoRA on {backend}: PSNR {score:.1f} dB vs diffusers' fuse_lora"


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_loras_with_scales_match_diffusers(tiny_sd1, sd1_files, backend, parity_log):
    src, artifact = tiny_sd1
    loras = [(sd1_files["kohya"], 0.6), (sd1_files["locon-unet"], -0.5)]
    ref = diffusers_image(src, loras)
    assert psnr(diffusers_image(src, loras[:1]), ref) < 35, "the second LoRA must matter"
    score = psnr(ours(artifact, backend, [f"{loras[0][0]}:0.6", (loras[1][0], -0.5)]), ref)
    parity_log(("lora sd1 two at once", backend, "default", score))
    assert score >= 40


@pytest.mark.parametrize("backend", BACKENDS)
def test_sdxl_loras_match_diffusers(tiny_sdxl, tmp_path, backend, parity_log):
    """SDXL: kohya with both text encoders (lora_te1_ / lora_te2_), the UNet in diffusers names and in the
    original UNet's (input_blocks...), and a PEFT file."""
    src, artifact = tiny_sdxl
    files = {
        "kohya": lora_files.kohya(_pipeline_class(src), tmp_path / "k.safetensors",
                                  models=("unet", "text_encoder", "text_encoder_2")),
        "kohya-sgm": lora_files.kohya(_pipeline_class(src), tmp_path / "sgm.safetensors", models=("unet",), sgm=True,
                                      seed=4),
        "peft": lora_files.peft(_pipeline_class(src), tmp_path / "peft", text_encoder=False),
    }
    assert any("input_blocks" in k for k in __import__("safetensors").safe_open(str(files["kohya-sgm"]), "np").keys())
    base = diffusers_image(src, [])
    for kind, path in files.items():
        ref = diffusers_image(src, [(path, 0.9)])
        assert psnr(base, ref) < 35
        score = psnr(ours(artifact, backend, [(path, 0.9)]), ref)
        parity_log((f"lora sdxl {kind}", backend, "default", score))
        assert score >= 40, f"SDXL {kind} LoRA on {backend}: PSNR {score:.1f} dB"


def test_set_loras_recompiles_only_what_changes(tiny_sd1, sd1_files):
    src, artifact = tiny_sd1
    pipe = Pipeline.load(artifact, backend="onnxruntime", device="cpu", cache=False)
    base = np.asarray(pipe.txt2img(PROMPT, steps=STEPS, seed=SEED, width=W, height=H)[0])
    before = dict(pipe.sessions)
    pipe.set_loras([(sd1_files["locon-unet"], 0.7)])  # the UNet only
    assert pipe.sessions["unet"] is not before["unet"]
    assert all(pipe.sessions[c] is before[c] for c in ("text_encoder", "vae_decoder"))
    with_lora = pipe.txt2img(PROMPT, steps=STEPS, seed=SEED, width=W, height=H)
    fresh = Pipeline.load(artifact, backend="onnxruntime", device="cpu", cache=False,
                          loras=[(sd1_files["locon-unet"], 0.7)])
    np.testing.assert_array_equal(np.asarray(with_lora[0]),
                                  np.asarray(fresh.txt2img(PROMPT, steps=STEPS, seed=SEED, width=W, height=H)[0]))
    assert psnr(np.asarray(with_lora[0]), base) < 35
    assert with_lora.loras == ({"file": str(sd1_files["locon-unet"]), "scale": 0.7},)
    assert "LoRAs: locon:0.7" in with_lora.parameters(0) and with_lora.metadata(0)["loras"][0]["scale"] == 0.7
    pipe.set_loras([])
    np.testing.assert_array_equal(np.asarray(pipe.txt2img(PROMPT, steps=STEPS, seed=SEED, width=W, height=H)[0]), base)


def test_compile_cache_keeps_one_patched_entry_per_graph(tiny_sd1, sd1_files, tmp_path):
    """ONNX Runtime caches a LoRA'd graph too (the same LoRA loads from the cache next time, same image);
    another LoRA set replaces that entry instead of adding one, and the base graph's entry stays. OpenVINO
    compiles a patched graph at each load (its cache would not save the merge) and keeps its base entries."""
    from edgediff.runtime import compile_cache

    src, artifact = tiny_sd1
    cache = tmp_path / "cache"
    ov = dict(backend="openvino", device="cpu", cache_dir=cache)
    assert Pipeline.load(artifact, **ov).describe()["unet"]["compile_cache"] == "written"
    patched = Pipeline.load(artifact, loras=[sd1_files["kohya"]], **ov).describe()
    assert patched["unet"]["compile_cache"] == "off" and patched["vae_decoder"]["compile_cache"] == "hit"
    load = dict(backend="onnxruntime", device="cpu", cache_dir=cache)
    plain = Pipeline.load(artifact, **load)
    first = Pipeline.load(artifact, loras=[(sd1_files["kohya"], 0.8)], **load)
    assert first.describe()["unet"]["compile_cache"] == "written"
    second = Pipeline.load(artifact, loras=[(sd1_files["kohya"], 0.8)], **load)
    assert second.describe()["unet"]["compile_cache"] == "hit"
    run = dict(steps=STEPS, seed=SEED, width=W, height=H)
    np.testing.assert_array_equal(np.asarray(first.txt2img(PROMPT, **run)[0]), np.asarray(second.txt2img(PROMPT, **run)[0]))
    assert psnr(np.asarray(second.txt2img(PROMPT, **run)[0]), np.asarray(plain.txt2img(PROMPT, **run)[0])) < 35
    count = len(compile_cache.entries(cache))
    Pipeline.load(artifact, loras=[(sd1_files["kohya"], 0.5)], **load)
    assert len(compile_cache.entries(cache)) == count  # replaced, not added
    assert Pipeline.load(artifact, **load).describe()["unet"]["compile_cache"] == "hit"  # the base entry stayed


def test_fp16_variant_merges_in_fp32(tiny_sd1, sd1_files, tmp_path):
    """An fp16 UNet takes the LoRA (merged in fp32, stored back as fp16); an int8 one is refused by name."""
    from edgediff.quantize import GateSettings, quantize_artifact

    src, artifact = tiny_sd1
    copy = tmp_path / "artifact"
    shutil.copytree(artifact, copy)
    quick = GateSettings(prompts=("a red circle",), seeds=(0,), steps=3)
    quantize_artifact(copy, "fp16", ("unet",), force=True, settings=quick)
    lora = [(sd1_files["locon-unet"], 0.8)]
    fp32, fp16 = ours(copy, "onnxruntime", lora), ours(copy, "onnxruntime", lora, precision="unet=fp16")
    base32, base16 = ours(copy, "onnxruntime", []), ours(copy, "onnxruntime", [], precision="unet=fp16")
    # fp16 costs what it costs without a LoRA (the tiny model's fp16 error), and the LoRA took effect
    assert psnr(fp16, fp32) >= psnr(base16, base32) - 3
    assert psnr(fp16, base16) < psnr(fp16, fp32) - 5
    quantize_artifact(copy, "int8", ("unet",), force=True, settings=quick)
    with pytest.raises(LoraError, match=r"unet, loaded here at int8.*unet=fp32"):
        Pipeline.load(copy, backend="onnxruntime", device="cpu", precision="unet=int8", loras=lora)


# -- bad input: each a clear error naming the file and what is accepted ----------------------------------------

def test_sdxl_lora_on_sd1_is_refused(tiny_sd1, tiny_sdxl, tmp_path):
    src_xl, _ = tiny_sdxl
    xl = lora_files.kohya(_pipeline_class(src_xl), tmp_path / "xl.safetensors", models=("unet", "text_encoder_2"))
    with pytest.raises(LoraError, match=r"xl.safetensors changes text_encoder_2 \(an SDXL LoRA"):
        Pipeline.load(tiny_sd1[1], backend="onnxruntime", device="cpu", loras=[xl])
    unet_only = lora_files.kohya(_pipeline_class(src_xl), tmp_path / "xl-unet.safetensors", models=("unet",))
    with pytest.raises(LoraError, match=r"xl-unet.safetensors: \d+ of its \d+ layers name modules this sd\w* artifact"):
        Pipeline.load(tiny_sd1[1], backend="onnxruntime", device="cpu", loras=[unet_only])


def test_same_names_other_widths_are_refused(tiny_sd1, sd1_files, tmp_path):
    """A LoRA with this model's module names but other widths (an SD 2.x LoRA on SD 1.x) is refused with the
    shapes, before any graph is compiled."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(sd1_files["locon-unet"]))
    key = next(k for k in sorted(tensors) if k.endswith("attn2_to_k.lora_down.weight"))
    tensors[key] = torch.zeros(tensors[key].shape[0], tensors[key].shape[1] * 2, dtype=tensors[key].dtype)
    save_file(tensors, str(tmp_path / "wide.safetensors"))
    with pytest.raises(LoraError, match=r"wide.safetensors: layer .*attn2_to_k is \[.*\] but unet's .* weight is"):
        Pipeline.load(tiny_sd1[1], backend="onnxruntime", device="cpu", loras=[tmp_path / "wide.safetensors"])


@pytest.mark.parametrize("name, content, message", [
    ("model.ckpt", b"\x80\x04pickle", r"model.ckpt: a .ckpt file is a Python pickle.*only .safetensors"),
    ("broken.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json", r"broken.safetensors is not a readable"),
    ("missing.safetensors", None, r"missing.safetensors: no such file"),
])
def test_unreadable_files_are_refused(tiny_sd1, tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(LoraError, match=message):
        Pipeline.load(tiny_sd1[1], backend="onnxruntime", device="cpu", loras=[path])


def test_unknown_tensors_are_named_not_skipped(tiny_sd1, sd1_files, tmp_path):
    """A LoHa layer (or anything else) among LoRA layers fails the load, naming it: never a partial LoRA."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(sd1_files["kohya"]))
    tensors["lora_unet_conv_in.hada_w1_a"] = torch.zeros(4, 4)
    save_file(tensors, str(tmp_path / "mixed.safetensors"))
    with pytest.raises(LoraError, match=r"1 of its \d+ tensors are not part of a LoRA.*lora_unet_conv_in.hada_w1_a"):
        Pipeline.load(tiny_sd1[1], backend="onnxruntime", device="cpu", loras=[tmp_path / "mixed.safetensors"])


@pytest.mark.parametrize("value", ["x.safetensors:nan", "x.safetensors:inf", ("x.safetensors", float("nan")),
                                   ("x.safetensors", True), "x.safetensors:1e9"])
def test_scale_must_be_finite(value):
    with pytest.raises(LoraError, match="finite number"):
        LoraSpec.parse(value)


def test_lora_spec_parsing():
    assert LoraSpec.parse("a/b.safetensors:0.5") == LoraSpec(__import__("pathlib").Path("a/b.safetensors"), 0.5)
    assert LoraSpec.parse("a/b.safetensors").scale == 1.0
    assert LoraSpec.parse(r"C:\loras\x.safetensors").path.name.endswith("x.safetensors")  # a drive's colon
    assert LoraSpec.parse("odd:name.safetensors").path.name == "odd:name.safetensors"


def test_artifact_without_weight_map_says_re_export(tiny_sd1, sd1_files, tmp_path):
    copy = tmp_path / "old"
    shutil.copytree(tiny_sd1[1], copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    for comp in manifest["components"].values():
        for variant in comp["variants"].values():
            variant.pop("weights", None)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(LoraError, match=r"exported before edgediff recorded weight maps: re-export it"):
        Pipeline.load(copy, backend="onnxruntime", device="cpu", loras=[sd1_files["kohya"]])


def test_bad_lora_fails_before_anything_changes(tiny_sd1, sd1_files, tmp_path):
    pipe = Pipeline.load(tiny_sd1[1], backend="onnxruntime", device="cpu", cache=False, loras=[sd1_files["kohya"]])
    sessions = dict(pipe.sessions)
    (tmp_path / "bad.safetensors").write_bytes(b"nonsense")
    with pytest.raises(LoraError):
        pipe.set_loras([sd1_files["locon-unet"], tmp_path / "bad.safetensors"])
    assert pipe.sessions == sessions and pipe.loras[0].path == sd1_files["kohya"]


def test_cli_lora(tiny_sd1, sd1_files, tmp_path):
    out = tmp_path / "x.png"
    result = run_cli("generate", PROMPT, "--model", str(tiny_sd1[1]), "--steps", "2", "--width", "64", "--height",
                     "48", "--backend", "onnxruntime", "--lora", f"{sd1_files['kohya']}:0.5", "--lora",
                     str(sd1_files["locon-unet"]), "-o", str(out), "--no-cache")
    assert result.exit_code == 0, result.output
    from PIL import Image

    meta = json.loads(Image.open(out).info["edgediff"])
    assert [x["scale"] for x in meta["loras"]] == [0.5, 1.0]
    bad = run_cli("generate", PROMPT, "--model", str(tiny_sd1[1]), "--lora", str(tmp_path / "nope.ckpt"),
                  "-o", str(tmp_path / "y.png"))
    assert bad.exit_code == 2 and "pickle" in bad.output and "Traceback" not in bad.output
    assert not (tmp_path / "y.png").exists()


def test_add_weight_maps_to_an_older_artifact(tiny_sd1, tmp_path):
    """An artifact exported before the maps existed gets them from its checkpoint, the same as a fresh export's;
    a checkpoint it was not exported from is refused."""
    from edgediff.export.exporter import add_weight_maps
    from edgediff.export.components import ExportError

    src, artifact = tiny_sd1
    old = tmp_path / "old"
    shutil.copytree(artifact, old)
    manifest = json.loads((old / "manifest.json").read_text())
    for comp in manifest["components"].values():
        comp["variants"]["fp32"].pop("weights", None)
    (old / "manifest.json").write_text(json.dumps(manifest))
    for f in old.glob("*/weights.json"):
        f.unlink()
    add_weight_maps(old, str(src))
    for component in ("text_encoder", "unet", "unet_shallow"):
        assert (old / component / "weights.json").read_text() == (artifact / component / "weights.json").read_text()
    assert Pipeline.load(old, backend="onnxruntime", device="cpu").manifest.components["unet"]["fp32"].weights
    from edgediff.export.recipes import build_pipeline

    other = build_pipeline("tiny-sd1", tmp_path / "other", seed=1)
    with pytest.raises(ExportError, match="exported from another checkpoint"):
        add_weight_maps(old, str(other))
