"""SD3 / SD3.5: CLIP-L + CLIP-G + T5 and the MMDiT with flow matching, against diffusers' StableDiffusion3Pipeline
and StableDiffusion3Img2ImgPipeline on the tiny-sd3 recipe (same weights, seed and noise), on both backends."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")  # diffusers is the reference

from edgediff.runtime import Pipeline, load_manifest  # noqa: E402
from edgediff.runtime.families import FAMILIES, family_of  # noqa: E402
from edgediff.runtime.families.sd3 import sd3_start_index  # noqa: E402
from edgediff.runtime.manifest import ArtifactError  # noqa: E402
from edgediff.runtime.metrics import psnr  # noqa: E402

from .conftest import diffusers_images, edgediff_images, run_cli  # noqa: E402

PROMPT = "a red circle on a blue background"
STEPS, GUIDANCE, SEED, W, H = 4, 5.0, 42, 32, 48


def reference(src, *, pipeline="StableDiffusion3Pipeline", shift=None, no_t5=False, scheduler=None, **kw) -> np.ndarray:
    import diffusers

    extra = {"text_encoder_3": None, "tokenizer_3": None} if no_t5 else {}
    pipe = getattr(diffusers, pipeline).from_pretrained(str(src), **extra)
    if shift is not None:
        pipe.scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift=shift)
    if scheduler is not None:
        pipe.scheduler = scheduler(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    args = dict(prompt=PROMPT, num_inference_steps=STEPS, guidance_scale=GUIDANCE)
    args.update(width=W, height=H)  # the img2img pipeline too: by default it resizes the image to the model's size
    args.update(kw)
    return diffusers_images(pipe, args.pop("seed", SEED), **args)


def ours(artifact, backend="onnxruntime", **kw) -> np.ndarray:
    args = dict(prompt=PROMPT, steps=STEPS, guidance=GUIDANCE, seed=SEED, width=W, height=H, rng="torch") | kw
    return edgediff_images(artifact, backend, **args)


@pytest.fixture(scope="module")
def no_t5(tiny_sd3, tmp_path_factory):
    """The same checkpoint exported with --no-t5 (diffusers' text_encoder_3=None)."""
    out = tmp_path_factory.mktemp("sd3-no-t5") / "artifact"
    r = run_cli("export", str(tiny_sd3[0]), str(out), "--no-t5")
    assert r.exit_code == 0, r.output
    return out


def test_manifest_describes_the_sd3_parts(tiny_sd3):
    m = load_manifest(tiny_sd3[1])
    assert (m.family, m.prediction_type, m.scheduler) == ("sd3", "flow", "flow_euler")
    assert (m.latent_channels, m.vae_scale_factor, m.shift_factor, m.scaling_factor) == (16, 2, 0.0609, 1.5035)
    assert [(t.name, t.kind, t.max_length, t.hidden_size, t.tokenizer) for t in m.text_encoders] == [
        ("text_encoder", "clip", 77, 32, "tokenizer/tokenizer.json"),
        ("text_encoder_2", "clip", 77, 32, "tokenizer_2/tokenizer.json"),
        ("text_encoder_3", "t5", 256, 80, "tokenizer_3/tokenizer.json")]
    assert (m.denoiser.name, m.denoiser.kind, m.denoiser.in_channels) == ("transformer", "transformer", 16)
    assert m.shallow_denoiser is None and "unet" not in m.components  # DeepCache is a UNet method
    assert {m.roles[c] for c in ("text_encoder", "text_encoder_2", "text_encoder_3")} == {"text_encoder"}
    inputs = m.variant("transformer").inputs
    assert [(i.name, i.shape) for i in inputs] == [
        ("sample", ("batch", 16, "height", "width")), ("timestep", ("batch",)),
        ("encoder_hidden_states", ("batch", "sequence", 80)), ("pooled_projections", ("batch", 64))]
    for clip in ("text_encoder", "text_encoder_2"):
        assert [o.name for o in m.variant(clip).outputs] == ["penultimate_hidden_state", "text_embeds"]
    d = json.loads((tiny_sd3[1] / "manifest.json").read_text())
    assert d["components"]["text_encoder_3"]["kind"] == "t5" and d["components"]["text_encoder"]["kind"] == "clip"
    assert family_of(m) is FAMILIES["sd3"]
    assert m.defaults == {"steps": 28, "guidance": 7.0}  # diffusers' StableDiffusion3Pipeline defaults


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
@pytest.mark.parametrize("size", [(32, 48), (40, 24)])
def test_txt2img_matches_diffusers(tiny_sd3, backend, size, parity_log):
    """At two sizes (the transformer's graph is dynamic in height and width), with CFG."""
    w, h = size
    got = ours(tiny_sd3[1], backend, width=w, height=h)[0]
    want = reference(tiny_sd3[0], width=w, height=h)[0]
    score = psnr(got, want)
    parity_log(("sd3", backend, f"{w}x{h}", score))
    assert got.std() > 5 and score >= 40, f"{backend} {w}x{h}: PSNR {score:.1f} dB vs diffusers"


@pytest.mark.parametrize("scheduler", ["dpmpp_2m_flow", "unipc_flow"])
def test_other_flow_schedulers_match_diffusers(tiny_sd3, scheduler):
    """The multistep solvers' flow variants, as diffusers runs them on the checkpoint's scheduler config."""
    from .scheduler_harness import diffusers_scheduler

    got = ours(tiny_sd3[1], scheduler=scheduler, steps=5)[0]
    # the model's shift carried to the solver's flow_shift, as edgediff carries it (schedulers.carried_shift)
    want = reference(tiny_sd3[0], scheduler=lambda config: diffusers_scheduler(
        scheduler, dict(config, flow_shift=config["shift"])), num_inference_steps=5)[0]
    assert psnr(got, want) >= 40
    assert psnr(got, ours(tiny_sd3[1], steps=5)[0]) < 30  # not flow_euler's image


def test_the_parity_test_can_fail(tiny_sd3):
    """Another shift (6 for the model's 3), another prompt or another seed in the reference is at least 15 dB below
    the 40 dB bar."""
    got = ours(tiny_sd3[1])[0]
    assert psnr(got, reference(tiny_sd3[0])[0]) >= 40
    for other in (reference(tiny_sd3[0], shift=6.0), reference(tiny_sd3[0], prompt="a green star"),
                  reference(tiny_sd3[0], seed=SEED + 1)):
        assert psnr(got, other[0]) < 25


def test_negative_prompt_batch_and_no_guidance(tiny_sd3):
    got = ours(tiny_sd3[1], negative_prompt="blurry")[0]
    assert psnr(got, reference(tiny_sd3[0], negative_prompt="blurry")[0]) >= 40
    assert psnr(got, ours(tiny_sd3[1])[0]) < 30  # the negative prompt is encoded, not ignored
    prompts = [PROMPT, "a green star"]
    got = ours(tiny_sd3[1], prompt=prompts, guidance=1.0, seed=7)
    want = reference(tiny_sd3[0], prompt=prompts, guidance_scale=1.0, seed=[7, 8])
    for a, b in zip(got, want):
        assert psnr(a, b) >= 40
    got = ours(tiny_sd3[1], prompt=prompts, num_images=2, seed=3)  # two images per prompt, with CFG
    want = reference(tiny_sd3[0], prompt=prompts, num_images_per_prompt=2, seed=[3, 4, 5, 6])
    assert len(got) == 4 and min(psnr(a, b) for a, b in zip(got, want)) >= 40


def test_long_prompt_cut_for_clip_as_diffusers(tiny_sd3):
    """CLIP reads 77 tokens (the rest dropped with a warning), T5 reads on: the same image as diffusers."""
    long = ", ".join(["a red circle on a blue background"] * 12) + ", and a green star"
    with pytest.warns(UserWarning, match="was cut to CLIP's 77 tokens for text_encoder .*dropped: "):
        got = ours(tiny_sd3[1], prompt=long)[0]
    assert psnr(got, reference(tiny_sd3[0], prompt=long)[0]) >= 40


def test_weighted_prompt_is_refused(tiny_sd3):
    pipe = Pipeline.load(tiny_sd3[1], backend="onnxruntime", device="cpu")
    with pytest.raises(ValueError, match=r"uses a weight of 1.3 on 'red', which SD3's text encoders cannot apply"):
        pipe.txt2img("a (red:1.3) circle", steps=1, width=W, height=H)


def test_without_t5_matches_diffusers(tiny_sd3, no_t5):
    m = load_manifest(no_t5)
    assert [t.kind for t in m.text_encoders] == ["clip", "clip"] and "text_encoder_3" not in m.components
    assert not (no_t5 / "tokenizer_3").exists()
    got = ours(no_t5)[0]
    assert psnr(got, reference(tiny_sd3[0], no_t5=True)[0]) >= 40
    assert psnr(got, ours(tiny_sd3[1])[0]) < 30  # T5's part counts: zeros are not its encoding


def test_t5_off_at_load_matches_the_export_without_t5(tiny_sd3, no_t5, tmp_path):
    """An artifact with T5 run with t5=False (generate --no-t5): T5 is not loaded, and the image is the one of the
    artifact exported without it (diffusers' text_encoder_3=None)."""
    pipe = Pipeline.load(tiny_sd3[1], backend="onnxruntime", device="cpu", t5=False)
    assert "text_encoder_3" not in pipe.manifest.components and "text_encoder_3" not in pipe.sessions
    got = np.asarray(pipe.txt2img(PROMPT, steps=STEPS, guidance=GUIDANCE, seed=SEED, width=W, height=H, rng="torch")[0])
    assert psnr(got, ours(no_t5)[0]) == float("inf")
    out = tmp_path / "x.png"
    r = run_cli("generate", PROMPT, "--model", str(tiny_sd3[1]), "--no-t5", "--steps", "2", "--width", "32",
                "--height", "32", "--output", str(out))
    assert r.exit_code == 0 and out.is_file(), r.output
    r = run_cli("generate", PROMPT, "--model", str(no_t5), "--no-t5", "--steps", "2", "--output", str(tmp_path / "y.png"))
    assert r.exit_code == 2 and "--no-t5): this sd3 artifact has no T5 text encoder to leave out" in r.output
    assert not (tmp_path / "y.png").exists()


@pytest.mark.parametrize("backend, strength", [("onnxruntime", 0.6), ("onnxruntime", 0.9), ("openvino", 0.6)])
def test_img2img_matches_diffusers(tiny_sd3, backend, strength):
    from PIL import Image

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8))
    pipe = Pipeline.load(tiny_sd3[1], backend=backend, device="cpu", ov_precision="f32")
    result = pipe.img2img(PROMPT, image, strength=strength, steps=5, guidance=GUIDANCE, seed=SEED, rng="torch")
    want = reference(tiny_sd3[0], pipeline="StableDiffusion3Img2ImgPipeline", image=image, strength=strength,
                     num_inference_steps=5)[0]
    assert psnr(np.asarray(result[0]), want) >= 40
    assert len(result.timings.stages["transformer"]) == 5 - sd3_start_index(5, strength, 1)


def test_img2img_start_rule_is_sd3s():
    """diffusers' SD3 get_timesteps: int(steps - steps * strength) skipped, not SD's int(steps * strength) kept."""
    assert [sd3_start_index(5, s, 1) for s in (0.6, 0.9, 1.0, 0.3)] == [2, 0, 0, 3]
    assert sd3_start_index(5, 0.05, 1) == 4  # at least one call runs
    assert FAMILIES["sd3"].start_index is sd3_start_index


def test_a_non_flow_scheduler_deepcache_and_embeddings_are_refused(tiny_sd3, tmp_path):
    pipe = Pipeline.load(tiny_sd3[1], backend="onnxruntime", device="cpu")
    with pytest.raises(ValueError, match="ddim .*flow"):
        pipe.txt2img(PROMPT, steps=2, width=W, height=H, scheduler="ddim")
    with pytest.raises(ArtifactError, match="DeepCache .* caches a UNet's deep features; this artifact's denoiser is "
                                            "a transformer"):
        pipe.txt2img(PROMPT, steps=4, width=W, height=H, cache_interval=2)
    from safetensors.numpy import save_file

    save_file({"clip_l": np.ones((1, 32), np.float32), "clip_g": np.ones((1, 32), np.float32)},
              str(tmp_path / "word.safetensors"))
    with pytest.raises(ValueError, match="textual-inversion embeddings are not applied to Stable Diffusion 3 models"):
        Pipeline.load(tiny_sd3[1], backend="onnxruntime", device="cpu", embeddings=[tmp_path / "word.safetensors"])
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": np.ones((4, 32), np.float32),
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": np.ones((32, 4), np.float32)},
              str(tmp_path / "lora.safetensors"))
    with pytest.raises(ValueError, match="LoRAs are applied to UNet models .*; this sd3 artifact's denoiser is a "
                                         "transformer, for which edgediff merges no LoRA yet"):
        Pipeline.load(tiny_sd3[1], backend="onnxruntime", device="cpu", loras=[tmp_path / "lora.safetensors"])


def test_manifest_with_kinds_out_of_order_is_refused(tiny_sd3, tmp_path):
    root = tmp_path / "a"
    shutil.copytree(tiny_sd3[1], root)
    d = json.loads((root / "manifest.json").read_text())
    d["components"] = {"text_encoder_3": d["components"].pop("text_encoder_3")} | d["components"]  # T5 first
    (root / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(ArtifactError, match="an SD3 model's text encoders are CLIP-L, CLIP-G and optionally T5, in "
                                            "that order; this one has t5, clip, clip"):
        Pipeline.load(root, backend="onnxruntime", device="cpu")


def test_no_t5_on_a_model_without_t5_is_an_error(tiny_sd1, tmp_path):
    r = run_cli("export", str(tiny_sd1[0]), str(tmp_path / "out"), "--no-t5")
    assert r.exit_code == 2 and "--no-t5: " in r.output and "has no T5 text encoder" in r.output
    assert not (tmp_path / "out").exists()


def test_inpaint_matches_diffusers(tiny_sd3):
    """On OpenVINO (img2img and txt2img cover ONNX Runtime too): a 16-channel transformer inpaints by pasting the known region back, noised to the next level, after each
    step, as StableDiffusion3InpaintPipeline does; from pure noise (strength 1) and from the image (0.6)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8))
    m = np.zeros((H, W), np.uint8)
    m[8:40, 4:20] = 255
    pipe = Pipeline.load(tiny_sd3[1], backend="openvino", device="cpu", ov_precision="f32")
    for strength in (1.0, 0.6):
        got = np.asarray(pipe.inpaint(PROMPT, image, Image.fromarray(m), strength=strength, steps=5, guidance=GUIDANCE,
                                      seed=SEED, rng="torch")[0])
        want = reference(tiny_sd3[0], pipeline="StableDiffusion3InpaintPipeline", image=image,
                         mask_image=Image.fromarray(m), strength=strength, num_inference_steps=5)[0]
        other = reference(tiny_sd3[0], pipeline="StableDiffusion3InpaintPipeline", image=image,
                          mask_image=Image.fromarray(255 - m), strength=strength, num_inference_steps=5)[0]
        assert psnr(got, want) >= 40 and psnr(got, other) < 25, strength


def test_fp16_leaves_t5_out_and_bench_times_the_transformer(tiny_sd3, tmp_path):
    """T5 overflows in fp16: quantize --precision fp16 leaves it at fp32 and refuses it by name; int8 (fp32
    activations) takes it. bench times the transformer as the denoiser."""
    root = tmp_path / "sd3"
    shutil.copytree(tiny_sd3[1], root)
    gate = ("--steps", "2", "--seeds", "1", "--prompts", PROMPT)
    r = run_cli("quantize", str(root), "--precision", "fp16", "--components", "text_encoder_3", *gate)
    assert r.exit_code == 2 and "text_encoder_3 is T5, whose activations overflow fp16" in r.output
    r = run_cli("quantize", str(root), "--precision", "fp16", *gate)
    assert r.exit_code == 0, r.output
    m = load_manifest(root)
    assert "fp16" in m.components["transformer"] and "fp16" not in m.components["text_encoder_3"]
    r = run_cli("quantize", str(root), "--precision", "int8", "--components", "text_encoder_3", *gate)
    assert r.exit_code == 0 and "int8" in load_manifest(root).components["text_encoder_3"], r.output
    rows = tmp_path / "b.jsonl"
    r = run_cli("bench", str(root), "--backend", "onnxruntime", "--device", "cpu", "--size", "32x32", "--steps", "2",
                "--runs", "1", "--warmup", "0", "--json", str(rows))
    assert r.exit_code == 0, r.output
    row = json.loads(rows.read_text().splitlines()[0])
    assert (row["family"], row["denoiser"], row["unet_calls"]) == ("sd3", "transformer", 2)
    assert set(row["precision"]) == {"text_encoder", "text_encoder_2", "text_encoder_3", "transformer", "vae_decoder"}


def test_sd35_medium_recipe_has_the_published_sizes():
    """The architecture-exact recipe, counted on the meta device (no weights): SD3.5 medium's MMDiT 2.24 B, CLIP-L
    0.12 B, CLIP-G 0.70 B, the VAE 84 M, and T5-XXL's encoder 4.76 B (left out of the recipe: 19 GB in fp32)."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from edgediff.export.recipes import RECIPES, SD3_T5_XXL

    r = RECIPES["sd35-medium"]
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    with torch.device("meta"):
        sizes = (count(diffusers.SD3Transformer2DModel(**r["transformer"])),
                 count(CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=49408, **r["text"]))),
                 count(CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=49408, **r["text_2"]))),
                 count(diffusers.AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4,
                                               up_block_types=("UpDecoderBlock2D",) * 4, **r["vae"])),
                 count(T5EncoderModel(T5Config(**SD3_T5_XXL))))
    assert [round(s / 1e9, 2) for s in sizes] == [2.24, 0.12, 0.69, 0.08, 4.76]
    assert r["t5"] is None and r["transformer"]["dual_attention_layers"] == tuple(range(13))


def test_a_recipe_without_t5_builds_as_diffusers_text_encoder_3_none(tmp_path):
    import diffusers

    from edgediff.export.recipes import RECIPES, _build_sd3

    src = _build_sd3({**RECIPES["tiny-sd3"], "t5": None}, tmp_path / "src", 0)
    pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(str(src), text_encoder_3=None, tokenizer_3=None)
    assert pipe.text_encoder_3 is None and pipe.transformer is not None
    # a folder saved without T5 ([null, null] in model_index.json) exports: diffusers needs the None passed
    r = run_cli("export", str(src), str(tmp_path / "artifact"))
    assert r.exit_code == 0, r.output
    assert [t.name for t in load_manifest(tmp_path / "artifact").text_encoders] == ["text_encoder", "text_encoder_2"]


def test_tiny_vae_in_sd3_units_matches_diffusers(tiny_sd3, tmp_path):
    """A 16-channel tiny VAE (taesd3's kind) with a shift factor: decoded with its own units (z / scaling + shift),
    as diffusers' StableDiffusion3Pipeline does with an AutoencoderTiny; txt2img and img2img. Its shift is made
    large (1.0; SD3's is 0.0609), so that the same graphs read without it differ (before, a tiny VAE's shift was
    recorded as 0)."""
    import dataclasses

    import diffusers
    from PIL import Image

    from edgediff.export.recipes import tiny_vae_config
    from edgediff.export.tiny_vae import build_random_tiny_vae

    tiny = build_random_tiny_vae(tmp_path / "tiny", 4, **(tiny_vae_config("tiny-sd3") | {"shift_factor": 1.0}))
    artifact = tmp_path / "artifact"
    r = run_cli("export", str(tiny_sd3[0]), str(artifact), "--tiny-vae", str(tiny), "--force-tiny-vae")
    assert r.exit_code == 0, r.output
    m = load_manifest(artifact)
    variant = m.components["vae_decoder"]["tiny"]
    assert (variant.scaling_factor, variant.shift_factor) == (1.5035, 1.0)
    pipe = Pipeline.load(artifact, backend="onnxruntime", device="cpu", vae="tiny")
    got = np.asarray(pipe.txt2img(PROMPT, steps=STEPS, guidance=GUIDANCE, seed=SEED, width=W, height=H, rng="torch")[0])
    ref = diffusers.StableDiffusion3Pipeline.from_pretrained(str(tiny_sd3[0]),
                                                            vae=diffusers.AutoencoderTiny.from_pretrained(str(tiny)))
    ref.set_progress_bar_config(disable=True)
    want = ref(PROMPT, num_inference_steps=STEPS, guidance_scale=GUIDANCE, width=W, height=H, output_type="np",
               generator=torch.Generator().manual_seed(SEED)).images[0]
    assert got.std() > 10 and psnr(got, (want * 255).round().astype(np.uint8)) >= 40
    assert psnr(got, ours(tiny_sd3[1])[0]) < 30  # not the full VAE's image
    unshifted = dataclasses.replace(m, components={c: v | ({"tiny": dataclasses.replace(v["tiny"], shift_factor=0.0)}
                                                           if "tiny" in v else {}) for c, v in m.components.items()})
    wrong = Pipeline.load(artifact, backend="onnxruntime", device="cpu", vae="tiny", manifest=unshifted)
    assert psnr(got, np.asarray(wrong.txt2img(PROMPT, steps=STEPS, guidance=GUIDANCE, seed=SEED, width=W, height=H,
                                              rng="torch")[0])) < 30
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (H, W, 3), dtype=np.uint8))
    got = np.asarray(pipe.img2img(PROMPT, image, strength=0.6, steps=5, guidance=GUIDANCE, seed=SEED, rng="torch")[0])
    ref = diffusers.StableDiffusion3Img2ImgPipeline(**ref.components)
    want = ref(PROMPT, image=image, strength=0.6, num_inference_steps=5, guidance_scale=GUIDANCE, width=W, height=H,
               output_type="np", generator=torch.Generator().manual_seed(SEED)).images[0]
    assert psnr(got, (want * 255).round().astype(np.uint8)) >= 40
