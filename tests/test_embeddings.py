"""Textual inversion vs diffusers' ``load_textual_inversion``: the same vectors, seed and prompt give the same
image (tiny SD1 and SDXL, both backends); bad files are refused naming the file and what is accepted."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from safetensors.torch import save_file

from edgediff.runtime import LoraError, Pipeline
from edgediff.runtime.metrics import psnr

RUN = dict(num_inference_steps=5, guidance_scale=6.0, width=64, height=48)
PROMPT = "a <teal-shape> on a blue background"


def _diffusers(src, xl=False):
    import diffusers

    cls = diffusers.StableDiffusionXLPipeline if xl else diffusers.StableDiffusionPipeline
    pipe = cls.from_pretrained(str(src))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _image(pipe, prompt):
    out = pipe(prompt=prompt, negative_prompt="blurry", output_type="np", generator=torch.Generator().manual_seed(5),
               **RUN).images[0]
    return (out * 255).round().astype(np.uint8)


def _ours(artifact, backend, prompt, embeddings):
    pipe = Pipeline.load(artifact, backend=backend, device="cpu", ov_precision="f32", embeddings=embeddings)
    return np.asarray(pipe.txt2img(prompt, "blurry", steps=RUN["num_inference_steps"], guidance=RUN["guidance_scale"],
                                   width=RUN["width"], height=RUN["height"], seed=5, rng="torch")[0])


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_embedding_matches_diffusers_sd1(tiny_sd1, tmp_path, backend, parity_log):
    """A two-vector diffusers-format file and a one-vector A1111 file (``emb_params``, named by the file)."""
    src, artifact = tiny_sd1
    width = _diffusers(src).text_encoder.config.hidden_size
    g = torch.Generator().manual_seed(0)
    save_file({"<teal-shape>": torch.randn(2, width, generator=g) * 2}, str(tmp_path / "teal.safetensors"))
    save_file({"emb_params": torch.randn(1, width, generator=g) * 2}, str(tmp_path / "glossy.safetensors"))
    prompt = PROMPT + ", glossy"
    reference = _diffusers(src)
    plain = _image(reference, prompt)
    reference.load_textual_inversion(str(tmp_path / "teal.safetensors"))
    reference.load_textual_inversion(str(tmp_path / "glossy.safetensors"), token="glossy")
    ref = _image(reference, prompt)
    assert psnr(plain, ref) < 40, "the embeddings must change the image"
    score = psnr(_ours(artifact, backend, prompt, [tmp_path / "teal.safetensors", tmp_path / "glossy.safetensors"]), ref)
    parity_log(("textual inversion sd1", backend, "default", score))
    assert score >= 40


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_embedding_matches_diffusers_sdxl(tiny_sdxl, tmp_path, backend, parity_log):
    src, artifact = tiny_sdxl
    reference = _diffusers(src, xl=True)
    g = torch.Generator().manual_seed(1)
    clip_l = torch.randn(2, reference.text_encoder.config.hidden_size, generator=g) * 2
    clip_g = torch.randn(2, reference.text_encoder_2.config.hidden_size, generator=g) * 2
    save_file({"clip_l": clip_l, "clip_g": clip_g}, str(tmp_path / "<teal-shape>.safetensors"))
    reference.load_textual_inversion(clip_l, token="<teal-shape>", text_encoder=reference.text_encoder,
                                     tokenizer=reference.tokenizer)
    reference.load_textual_inversion(clip_g, token="<teal-shape>", text_encoder=reference.text_encoder_2,
                                     tokenizer=reference.tokenizer_2)
    ref = _image(reference, PROMPT)
    score = psnr(_ours(artifact, backend, PROMPT, [tmp_path / "<teal-shape>.safetensors"]), ref)
    parity_log(("textual inversion sdxl", backend, "default", score))
    assert score >= 40


def test_embedding_with_a_lora_and_in_a_weighted_long_prompt(tiny_sd1, tmp_path):
    """Embeddings and LoRAs patch the same text encoder together; the word works inside weights and chunks;
    the PNG records the embedding."""
    from . import lora_files

    src, artifact = tiny_sd1
    pipe = _diffusers(src)
    save_file({"<teal-shape>": torch.randn(1, pipe.text_encoder.config.hidden_size) * 2}, str(tmp_path / "t.safetensors"))
    lora = lora_files.kohya(pipe, tmp_path / "l.safetensors", models=("text_encoder",))
    ours = Pipeline.load(artifact, backend="onnxruntime", device="cpu", embeddings=[tmp_path / "t.safetensors"],
                         loras=[lora])
    long = "(<teal-shape>:1.2) circle, " + "plain studio light, " * 20 + "BREAK <teal-shape>"
    chunks = ours.tokenizer.chunks(long)
    teal = ours.tokenizer.chunks("<teal-shape>").ids[0, 1]
    assert len(chunks.ids) == 3 and (chunks.ids == teal).sum() == 2 and teal >= 49408
    result = ours.txt2img(long, steps=2, width=64, height=48)
    assert result.metadata(0)["embeddings"] == {"<teal-shape>": str(tmp_path / "t.safetensors")}
    ours.set_loras([])  # the embedding stays
    assert ours.tokenizer.chunks("<teal-shape>").ids[0, 1] == teal
    ours.txt2img("<teal-shape>", steps=2, width=64, height=48)


def test_bad_embeddings_are_refused(tiny_sd1, tiny_sdxl, tmp_path):
    sd1 = tiny_sd1[1]
    width = _diffusers(tiny_sd1[0]).text_encoder.config.hidden_size
    save_file({"<wide>": torch.zeros(1, width + 8)}, str(tmp_path / "wide.safetensors"))
    with pytest.raises(LoraError, match=rf"wide.safetensors: the embedding for text_encoder is \[1, {width + 8}\], "
                                        rf"but that encoder's tokens are {width} wide"):
        Pipeline.load(sd1, backend="onnxruntime", device="cpu", embeddings=[tmp_path / "wide.safetensors"])
    save_file({"clip_l": torch.zeros(1, width), "clip_g": torch.zeros(1, 64)}, str(tmp_path / "xl.safetensors"))
    with pytest.raises(LoraError, match=r"xl.safetensors is an SDXL embedding"):
        Pipeline.load(sd1, backend="onnxruntime", device="cpu", embeddings=[tmp_path / "xl.safetensors"])
    save_file({"<one>": torch.zeros(1, width)}, str(tmp_path / "one.safetensors"))
    with pytest.raises(LoraError, match=r"an SD 1.x/2.x embedding; this SDXL artifact has two text encoders"):
        Pipeline.load(tiny_sdxl[1], backend="onnxruntime", device="cpu", embeddings=[tmp_path / "one.safetensors"])
    save_file({"a": torch.zeros(1, width)}, str(tmp_path / "a.safetensors"))
    with pytest.raises(ValueError, match=r"the embedding's word 'a' is already a token"):
        Pipeline.load(sd1, backend="onnxruntime", device="cpu", embeddings=[tmp_path / "a.safetensors"])
    save_file({"x": torch.zeros(1, width), "y": torch.zeros(1, width), "z": torch.zeros(2)},
              str(tmp_path / "many.safetensors"))
    with pytest.raises(LoraError, match=r"is not a textual-inversion embedding: it holds 3 tensors"):
        Pipeline.load(sd1, backend="onnxruntime", device="cpu", embeddings=[tmp_path / "many.safetensors"])
    (tmp_path / "e.pt").write_bytes(b"pickle")
    with pytest.raises(LoraError, match=r"e.pt: a .pt file is a Python pickle"):
        Pipeline.load(sd1, backend="onnxruntime", device="cpu", embeddings=[tmp_path / "e.pt"])
