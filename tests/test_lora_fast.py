"""LoRA on the embedded model without torch: a kohya file made with numpy, merged at load, gives the image of a
graph whose weights were merged on disk (``W + scale * alpha / rank * up @ down``, written with onnx), on both
backends. The parity with diffusers' fuse_lora is tests/test_lora.py (full tier)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import save_file

from edgediff.runtime import LoraError, Pipeline
from edgediff.runtime.metrics import psnr

pytestmark = pytest.mark.fast

RUN = dict(steps=4, seed=1)
PROMPT = "a red circle on a blue background"


MODEL_OF = {"unet": "unet", "unet_shallow": "unet", "text_encoder": "text_encoder"}


def _kohya_file(artifact, path, rank=4, alpha=2.0, scale=0.3):
    """A kohya LoCon on every UNet and text encoder layer the weight maps name; returns each parameter's
    expected change at scale 1, by (model, parameter)."""
    rng = np.random.default_rng(0)
    tensors, deltas = {}, {}
    for model, prefix in (("unet", "lora_unet_"), ("text_encoder", "lora_te_text_model_")):
        for param, (_, _, shape) in json.loads((artifact / model / "weights.json").read_text())["weights"].items():
            if "embedding" in param:
                continue  # embedding tables take textual inversion, not LoRA
            down = (rng.standard_normal((rank, *shape[1:])) * scale).astype(np.float16)
            up = (rng.standard_normal((shape[0], rank, *((1, 1) if len(shape) == 4 else ()))) * scale).astype(np.float16)
            key = prefix + param.removesuffix(".weight").replace(".", "_")
            tensors |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
                        f"{key}.alpha": np.array(alpha, dtype=np.float32)}
            delta = up.reshape(shape[0], rank).astype(np.float32) @ down.reshape(rank, -1).astype(np.float32)
            deltas[(model, param)] = delta.reshape(shape) * np.float32(alpha / rank)
    save_file(tensors, str(path))
    return deltas


def _merged_on_disk(artifact, deltas, scale, out):
    """A copy of the artifact with the deltas added to its graphs' initializers by onnx: the reference."""
    import onnx
    from onnx import numpy_helper

    shutil.copytree(artifact, out)
    manifest = json.loads((out / "manifest.json").read_text())
    for component, model_name in MODEL_OF.items():
        path = out / component / "model.onnx"
        weights = json.loads((out / component / "weights.json").read_text())["weights"]
        targets = {init: (deltas[(model_name, p)], layout) for p, (init, layout, _) in weights.items()
                   if (model_name, p) in deltas}
        model = onnx.load(str(path))
        for tensor in model.graph.initializer:
            if tensor.name in targets:
                delta, layout = targets[tensor.name]
                base = numpy_helper.to_array(tensor)
                merged = base + np.float32(scale) * (delta.T if layout == "transposed" else delta)
                tensor.CopyFrom(numpy_helper.from_array(merged.astype(base.dtype), tensor.name))
        onnx.save(model, str(path))
        manifest["components"][component]["variants"]["fp32"]["bytes"] = path.stat().st_size
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_lora_at_load_equals_weights_merged_on_disk(embedded_copy, tmp_path, backend):
    deltas = _kohya_file(embedded_copy, tmp_path / "locon.safetensors")
    merged = _merged_on_disk(embedded_copy, deltas, 0.7, tmp_path / "merged")
    load = dict(backend=backend, device="cpu", ov_precision="f32", cache=False)
    ours = Pipeline.load(embedded_copy, loras=[(tmp_path / "locon.safetensors", 0.7)], **load)
    with_lora = np.asarray(ours.txt2img(PROMPT, **RUN)[0])
    on_disk = np.asarray(Pipeline.load(merged, **load).txt2img(PROMPT, **RUN)[0])
    base = np.asarray(Pipeline.load(embedded_copy, **load).txt2img(PROMPT, **RUN)[0])
    assert psnr(with_lora, base) < 30, "the LoRA must change the image"
    assert psnr(with_lora, on_disk) >= 45
    ours.set_loras([])
    np.testing.assert_array_equal(np.asarray(ours.txt2img(PROMPT, **RUN)[0]), base)


def test_int8_unet_is_refused_by_name(embedded_copy, tmp_path):
    _kohya_file(embedded_copy, tmp_path / "l.safetensors")
    manifest = json.loads((embedded_copy / "manifest.json").read_text())
    unet = manifest["components"]["unet"]["variants"]
    unet["int8"] = dict(unet["fp32"])  # a stand-in: the refusal comes before any graph is read
    (embedded_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(LoraError, match=r"a LoRA changes unet, loaded here at int8: LoRAs and embeddings merge into float weights"):
        Pipeline.load(embedded_copy, backend="onnxruntime", device="cpu", precision="unet=int8",
                      loras=[tmp_path / "l.safetensors"])


def test_bfloat16_files_are_read(embedded_copy, tmp_path):
    """numpy has no bfloat16, which many LoRAs are saved in: such a file loads as its float32 widening would."""
    from edgediff.runtime.lora import read_tensors

    values = np.array([[1.5, -2.25], [0.0078125, 3.0]], dtype=np.float32)
    header = json.dumps({"w": {"dtype": "BF16", "shape": [2, 2], "data_offsets": [0, 8]}}).encode()
    raw = (values.view(np.uint32) >> 16).astype(np.uint16).tobytes()
    (tmp_path / "bf16.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + raw)
    tensors, _ = read_tensors(tmp_path / "bf16.safetensors")
    np.testing.assert_array_equal(tensors["w"], values)


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_embedding_word_on_the_embedded_model(embedded_copy, tmp_path, backend):
    """An A1111 embedding (emb_params, named by its file) is a new word: a prompt using it gets the file's
    vectors (a different image from the prompt without the embedding loaded), with or without a LoRA."""
    load = dict(backend=backend, device="cpu", ov_precision="f32", cache=False)
    base = Pipeline.load(embedded_copy, **load)
    width = base.manifest.text_encoders[0].hidden_size
    vectors = np.random.default_rng(3).standard_normal((2, width)).astype(np.float32) * 3
    save_file({"emb_params": vectors}, str(tmp_path / "shiny.safetensors"))
    ours = Pipeline.load(embedded_copy, embeddings=[tmp_path / "shiny.safetensors"], **load)
    ids = ours.tokenizer.chunks("a shiny circle").ids[0]
    assert ids[2] >= 49408 and ids[3] == ids[2] + 1  # two new tokens past CLIP's vocabulary, where "shiny" was
    prompt = "a shiny red circle on a blue background"
    assert not np.array_equal(np.asarray(ours.txt2img(prompt, **RUN)[0]), np.asarray(base.txt2img(prompt, **RUN)[0]))
    np.testing.assert_array_equal(np.asarray(ours.txt2img("a red circle", **RUN)[0]),
                                  np.asarray(base.txt2img("a red circle", **RUN)[0]))


def test_cli_names_a_missing_lora_as_given(tmp_path):
    """The error prints the path as written: a name with colons is not turned into an emoji by the console."""
    from .conftest import run_cli

    result = run_cli("generate", "x", "--lora", str(tmp_path / "nope.safetensors:abc"), "-o", str(tmp_path / "o.png"))
    assert result.exit_code == 2 and "nope.safetensors:abc: no such file" in result.output
    assert not (tmp_path / "o.png").exists()
