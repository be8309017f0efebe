"""Sana and Sana-Sprint: Gemma2 with Sana's instruction prefix, the linear-attention DiT and the 32x-family
autoencoder (AutoencoderDC), against diffusers' SanaPipeline and SanaSprintPipeline on the tiny-sana and
tiny-sana-sprint recipes (same weights, seed and noise), on both backends."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")  # diffusers is the reference

from edgediff.runtime import Pipeline, load_manifest  # noqa: E402
from edgediff.runtime.families import FAMILIES, family_of  # noqa: E402
from edgediff.runtime.manifest import ArtifactError  # noqa: E402
from edgediff.runtime.metrics import psnr  # noqa: E402

from .conftest import diffusers_images, edgediff_images, run_cli  # noqa: E402

PROMPT = "a red circle on a blue background"
STEPS, GUIDANCE, SEED, W, H = 4, 4.5, 42, 64, 96  # diffusers takes sizes in multiples of 32


def reference(src, *, pipeline="SanaPipeline", scheduler=None, **kw) -> np.ndarray:
    import diffusers

    pipe = getattr(diffusers, pipeline).from_pretrained(str(src))
    if scheduler is not None:
        pipe.scheduler = scheduler(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    sprint = pipeline == "SanaSprintPipeline"
    args = dict(prompt=PROMPT, num_inference_steps=2 if sprint else STEPS, guidance_scale=GUIDANCE, width=W, height=H,
                use_resolution_binning=False)  # binning would map 64x96 to a 1024 bin
    args.update(kw)
    return diffusers_images(pipe, args.pop("seed", SEED), **args)


def ours(artifact, backend="onnxruntime", **kw) -> np.ndarray:
    args = dict(prompt=PROMPT, guidance=GUIDANCE, seed=SEED, width=W, height=H, rng="torch") | kw
    return edgediff_images(artifact, backend, **args)


def test_manifest_describes_the_sana_parts(tiny_sana, tiny_sana_sprint):
    m = load_manifest(tiny_sana[1])
    assert (m.family, m.prediction_type, m.scheduler) == ("sana", "flow", "dpmpp_2m_flow")
    assert (m.latent_channels, m.vae_scale_factor, m.scaling_factor, m.shift_factor) == (4, 2, 0.41407, 0.0)
    assert [(t.name, t.kind, t.max_length, t.hidden_size, t.tokenizer) for t in m.text_encoders] == [
        ("text_encoder", "gemma", 300, 16, "tokenizer/tokenizer.json")]
    assert (m.denoiser.name, m.denoiser.kind, m.denoiser.in_channels) == ("transformer", "transformer", 4)
    assert [(i.name, i.dtype, i.shape) for i in m.variant("transformer").inputs] == [
        ("sample", "float32", ("batch", 4, "height", "width")), ("timestep", "float32", ("batch",)),
        ("encoder_hidden_states", "float32", ("batch", "sequence", 16)),
        ("encoder_attention_mask", "int64", ("batch", "sequence"))]
    assert [o.name for o in m.variant("vae_encoder").outputs] == ["latents"]  # DC-AE: no distribution
    assert family_of(m) is FAMILIES["sana"] and m.defaults == {"steps": 20, "guidance": 4.5}
    s = load_manifest(tiny_sana_sprint[1])
    assert (s.family, s.prediction_type, s.scheduler) == ("sana_sprint", "trigflow", "scm")
    assert [i.name for i in s.variant("transformer").inputs][-1] == "guidance"
    assert family_of(s) is FAMILIES["sana_sprint"] and s.defaults == {"steps": 2, "guidance": 4.5}


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
@pytest.mark.parametrize("size", [(64, 96), (96, 32)])
def test_sana_txt2img_matches_diffusers(tiny_sana, backend, size, parity_log):
    """With CFG and the instruction prefix diffusers puts before every prompt, at two sizes (the graphs are dynamic
    in height, width and prompt length)."""
    w, h = size
    got = ours(tiny_sana[1], backend, width=w, height=h, steps=STEPS)[0]
    want = reference(tiny_sana[0], width=w, height=h)[0]
    score = psnr(got, want)
    parity_log(("sana", backend, f"{w}x{h}", score))
    assert got.std() > 5 and score >= 40, f"{backend} {w}x{h}: PSNR {score:.1f} dB vs diffusers"


@pytest.mark.parametrize("scheduler", ["flow_euler", "unipc_flow"])
def test_sana_other_flow_schedulers_match_diffusers(tiny_sana, scheduler):
    import diffusers

    from .scheduler_harness import diffusers_scheduler

    if scheduler == "flow_euler":  # Sana's other published sampler: FlowMatchEuler at the model's shift, which
        # edgediff carries from the checkpoint's flow_shift (schedulers.carried_shift)
        def make(config):
            return diffusers.FlowMatchEulerDiscreteScheduler(shift=config["flow_shift"])
    else:
        def make(config):
            return diffusers_scheduler(scheduler, config)
    got = ours(tiny_sana[1], scheduler=scheduler, steps=5)[0]
    assert psnr(got, reference(tiny_sana[0], scheduler=make, num_inference_steps=5)[0]) >= 40
    # not dpmpp_2m_flow's image (UniPC is, like it, a 2nd-order multistep solver on the same sigmas: 33 dB apart)
    assert psnr(got, ours(tiny_sana[1], steps=5)[0]) < 35


def test_sana_parity_can_fail(tiny_sana):
    """Another shift, prompt, seed, or the prompt without the instruction prefix in the reference is at least 15 dB
    below the 40 dB bar."""
    import diffusers

    got = ours(tiny_sana[1], steps=STEPS)[0]
    assert psnr(got, reference(tiny_sana[0])[0]) >= 40
    others = (reference(tiny_sana[0], scheduler=lambda c: diffusers.DPMSolverMultistepScheduler.from_config(
                  c, flow_shift=6.0)),
              reference(tiny_sana[0], prompt="zebra crossing at night"), reference(tiny_sana[0], seed=SEED + 1),
              reference(tiny_sana[0], complex_human_instruction=None))
    for other in others:
        assert psnr(got, other[0]) < 25


def test_sana_negative_prompt_batch_and_no_guidance(tiny_sana):
    got = ours(tiny_sana[1], negative_prompt="blurry", steps=STEPS)[0]
    assert psnr(got, reference(tiny_sana[0], negative_prompt="blurry")[0]) >= 40
    assert psnr(got, ours(tiny_sana[1], steps=STEPS)[0]) < 30  # the negative prompt is encoded, not ignored
    prompts = [PROMPT, "a small yellow star on a black background"]
    got = ours(tiny_sana[1], prompt=prompts, guidance=1.0, steps=STEPS, seed=7)
    want = reference(tiny_sana[0], prompt=prompts, guidance_scale=1.0, seed=[7, 8])
    assert all(psnr(g, w) >= 40 for g, w in zip(got, want))


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
@pytest.mark.parametrize("steps", [1, 2, 4])
def test_sprint_txt2img_matches_diffusers(tiny_sana_sprint, backend, steps, parity_log):
    """SCM at 1, 2 (through intermediate_timesteps 1.3, diffusers' default) and 4 steps, the guidance scale fed to
    the transformer, fresh noise at each step as diffusers draws it."""
    got = ours(tiny_sana_sprint[1], backend, steps=steps)[0]
    want = reference(tiny_sana_sprint[0], pipeline="SanaSprintPipeline", num_inference_steps=steps,
                     intermediate_timesteps=1.3 if steps == 2 else None)[0]
    score = psnr(got, want)
    parity_log(("sana-sprint", backend, f"{steps} steps", score))
    assert got.std() > 5 and score >= 40, f"{backend} {steps} steps: PSNR {score:.1f} dB vs diffusers"


def test_sprint_parity_can_fail(tiny_sana_sprint):
    """The reference at 1 step (no intermediate time) is 15 dB below the 40 dB bar. The tiny random Sprint model's
    image moves little with the noise or the guidance (35 dB apart, where ours is 90 dB from diffusers'): each is
    still told apart. (Its prompt moves it less still, 42 dB: the conditioner it shares with Sana is shown to bite
    there, 18 dB.)"""
    got = ours(tiny_sana_sprint[1])[0]
    assert psnr(got, reference(tiny_sana_sprint[0], pipeline="SanaSprintPipeline")[0]) >= 60
    one_step = reference(tiny_sana_sprint[0], pipeline="SanaSprintPipeline", num_inference_steps=1,
                         intermediate_timesteps=None)
    assert psnr(got, one_step[0]) < 25
    for other in (dict(seed=SEED + 1), dict(guidance_scale=1.0)):
        assert psnr(got, reference(tiny_sana_sprint[0], pipeline="SanaSprintPipeline", **other)[0]) < 40


def test_sprint_guidance_is_the_models_input(tiny_sana_sprint):
    """Another guidance scale is another image (the scale reaches the transformer: 34 dB apart at 12 on the tiny
    model), as in diffusers; one transformer call per step; no negative prompt."""
    got = ours(tiny_sana_sprint[1], guidance=12.0)[0]
    assert psnr(got, reference(tiny_sana_sprint[0], pipeline="SanaSprintPipeline", guidance_scale=12.0)[0]) >= 40
    assert psnr(got, ours(tiny_sana_sprint[1])[0]) < 36
    pipe = Pipeline.load(tiny_sana_sprint[1], backend="onnxruntime", device="cpu")
    result = pipe.txt2img(PROMPT, seed=SEED, width=W, height=H)
    assert len(result.timings.stages["transformer"]) == 2  # two steps, one call each: no CFG batch
    with pytest.raises(ValueError, match="no negative prompt"):
        pipe.txt2img(PROMPT, negative_prompt="blurry", width=W, height=H)


def test_wrong_scheduler_task_and_prompt_are_refused(tiny_sana, tiny_sana_sprint):
    from PIL import Image

    pipe = Pipeline.load(tiny_sana[1], backend="onnxruntime", device="cpu")
    for scheduler in ("ddim", "scm"):
        with pytest.raises(ValueError, match="flow_euler"):
            pipe.txt2img(PROMPT, scheduler=scheduler, width=W, height=H)
    with pytest.raises(ValueError, match="Gemma2"):
        pipe.txt2img("a (red:1.4) circle", width=W, height=H)
    with pytest.raises(ValueError, match="txt2img only"):  # diffusers has no Sana img2img pipeline
        pipe.img2img(PROMPT, image=Image.new("RGB", (W, H)), width=W, height=H)
    sprint = Pipeline.load(tiny_sana_sprint[1], backend="onnxruntime", device="cpu")
    with pytest.raises(ValueError, match="scm"):
        sprint.txt2img(PROMPT, scheduler="flow_euler", width=W, height=H)


def test_cli_generates_a_sprint_png(tiny_sana_sprint, tmp_path):
    out = tmp_path / "sprint.png"
    r = run_cli("generate", "-m", str(tiny_sana_sprint[1]), "a red circle", "--width", "64", "--height", "64",
                "--seed", "3", "-o", str(out))
    assert r.exit_code == 0, r.output
    from PIL import Image

    assert Image.open(out).size == (64, 64)


def test_a_denoiser_without_the_guidance_input_is_refused(tiny_sana_sprint, tmp_path):
    """A manifest whose family and denoiser disagree (Sprint's family, no guidance input) is an ArtifactError at
    load, not a failed session call mid-generation."""
    art = tmp_path / "artifact"
    shutil.copytree(tiny_sana_sprint[1], art)
    d = json.loads((art / "manifest.json").read_text())
    variant = d["components"]["transformer"]["variants"]["fp32"]
    variant["inputs"] = [i for i in variant["inputs"] if i["name"] != "guidance"]
    (art / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(ArtifactError, match="guidance input"):
        Pipeline.load(art, backend="onnxruntime", device="cpu")


def test_dcae_movedim_trap_is_what_the_export_avoids(tmp_path):
    """The TorchScript exporter writes DC-AE's movedim(1, -1) as a Transpose with a negative axis, which ONNX
    Runtime refuses to load; traced with the dims made positive, the graph loads and equals PyTorch."""
    import diffusers
    import onnxruntime as ort

    from edgediff.export.families.sana import positive_movedim
    from edgediff.export.recipes import RECIPES

    torch.manual_seed(0)
    vae = diffusers.AutoencoderDC(in_channels=3, **RECIPES["tiny-sana"]["vae"]).eval()

    class Decode(torch.nn.Module):
        def __init__(self, patched: bool):
            super().__init__()
            self.patched = patched

        def forward(self, z):
            if self.patched:
                with positive_movedim():
                    return vae.decode(z, return_dict=False)[0]
            return vae.decode(z, return_dict=False)[0]

    z = torch.randn(1, 4, 8, 6)
    vae.requires_grad_(False)
    for patched in (False, True):
        path = tmp_path / f"decoder-{patched}.onnx"
        with torch.no_grad():
            torch.onnx.export(Decode(patched), (z,), str(path), dynamo=False, opset_version=17, input_names=["z"])
        if not patched:
            with pytest.raises(Exception, match="perm"):
                ort.InferenceSession(str(path))
            continue
        out = ort.InferenceSession(str(path)).run(None, {"z": z.numpy()})[0]
        with torch.no_grad():
            assert np.abs(out - vae.decode(z, return_dict=False)[0].numpy()).max() < 1e-4


def test_fp16_leaves_gemma_out(tiny_sana, tmp_path):
    """Gemma2 overflows in fp16 (as T5 does): quantize --precision fp16 leaves it at fp32 and refuses it by name;
    the transformer's fp16 variant and Gemma2's int8 pass the gate and generate."""
    root = tmp_path / "sana"
    shutil.copytree(tiny_sana[1], root)
    gate = ("--steps", "2", "--seeds", "1", "--prompts", PROMPT)
    r = run_cli("quantize", str(root), "--precision", "fp16", "--components", "text_encoder", *gate)
    assert r.exit_code == 2 and "text_encoder is Gemma2, whose activations overflow fp16" in r.output
    r = run_cli("quantize", str(root), "--precision", "fp16", *gate)
    assert r.exit_code == 0, r.output
    m = load_manifest(root)
    assert "fp16" in m.components["transformer"] and "fp16" not in m.components["text_encoder"]
    # int8 weights keep Gemma2's activations wide: offered, gated, and it generates
    r = run_cli("quantize", str(root), "--precision", "int8", "--components", "text_encoder", *gate)
    assert r.exit_code == 0 and "int8" in load_manifest(root).components["text_encoder"], r.output
    pipe = Pipeline.load(root, backend="onnxruntime", device="cpu", precision="text_encoder=int8,transformer=fp16")
    image = np.asarray(pipe.txt2img(PROMPT, steps=2, seed=SEED, width=W, height=H)[0])
    assert image.std() > 5


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
@pytest.mark.parametrize("steps,strength", [(4, 0.5), (2, 0.6)])
def test_sprint_img2img_matches_diffusers(tiny_sana_sprint, backend, steps, strength, parity_log):
    """SanaSprintImg2ImgPipeline: the DC-AE's latents (deterministic), TrigFlow-noised to the start step (SD3's start
    rule), then SCM; at 4 steps from the middle, and at 2 steps from the top (strength 0.6 skips no step)."""
    import diffusers
    from PIL import Image

    rng = np.random.default_rng(0)
    image = Image.fromarray((rng.random((H, W, 3)) * 255).astype(np.uint8))
    pipe = Pipeline.load(tiny_sana_sprint[1], backend=backend, device="cpu", ov_precision="f32")
    got = np.asarray(pipe.img2img(PROMPT, image=image, strength=strength, steps=steps, guidance=GUIDANCE, seed=SEED,
                                  width=W, height=H, rng="torch")[0])
    ref = diffusers.SanaSprintImg2ImgPipeline.from_pretrained(str(tiny_sana_sprint[0]))
    ref.set_progress_bar_config(disable=True)
    want = ref(prompt=PROMPT, image=image, strength=strength, num_inference_steps=steps, guidance_scale=GUIDANCE,
               width=W, height=H, use_resolution_binning=False, output_type="np",
               intermediate_timesteps=1.3 if steps == 2 else None, generator=torch.Generator().manual_seed(SEED))
    want = (want.images[0] * 255).round().astype(np.uint8)
    score = psnr(got, want)
    parity_log(("sana-sprint img2img", backend, f"{steps} steps {strength}", score))
    assert score >= 40, f"{backend}: PSNR {score:.1f} dB vs diffusers"
    if steps == 4:  # the image is read: another input image gives another result (36 dB apart: the tiny Sprint
        # model's output moves little with its input, as with its noise, test_sprint_parity_can_fail)
        other = pipe.img2img(PROMPT, image=Image.new("RGB", (W, H), "white"), strength=strength, steps=steps,
                             seed=SEED, width=W, height=H, rng="torch")[0]
        assert psnr(got, np.asarray(other)) < 38


def test_a_long_prompt_is_cut_as_diffusers_cuts_it_with_a_note(tiny_sana):
    """Past its 300 tokens (after the instruction prefix) Gemma2 reads no more, in diffusers as here; the call's
    Result says what was dropped."""
    long = "a red circle on a blue background, " * 60
    pipe = Pipeline.load(tiny_sana[1], backend="onnxruntime", device="cpu")
    with pytest.warns(UserWarning, match="cut to Gemma2's"):
        result = pipe.txt2img(long, steps=STEPS, guidance=GUIDANCE, seed=SEED, width=W, height=H, rng="torch")
    assert len(result.notes) == 1 and "(its instruction prefix included)" in result.notes[0]
    assert psnr(np.asarray(result[0]), reference(tiny_sana[0], prompt=long)[0]) >= 40


def test_tune_on_sprint_measures_the_dit_and_skips_the_cfg_cut_off(tiny_sana_sprint, tmp_path):
    """tune covers the DiTs: the transformer's fp16 variant is measured against full compute; CFG's cut-off is not
    tried on a model whose guidance is an input (there is no unconditional pass to cut)."""
    root = tmp_path / "sprint"
    shutil.copytree(tiny_sana_sprint[1], root)
    gate = ("--steps", "2", "--seeds", "1", "--prompts", PROMPT)
    assert run_cli("quantize", str(root), "--precision", "fp16", "--components", "transformer", *gate).exit_code == 0
    r = run_cli("tune", str(root))
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    assert "cfg_until not tried: guidance 4.5: no classifier-free guidance to cut (Sana-Sprint takes it as a model" \
        in text
    assert "unet=fp16" in text and "cfg_until=0.4" not in text


def test_int8_weight_compression_takes_gemma_and_the_dit(tiny_sana, tmp_path):
    """nncf-w8 (NNCF's int8 weights, activations left f32/bf16: nothing for Gemma2 to overflow) is offered for the
    text encoder and the DiT by default, gated against fp32 and run by OpenVINO."""
    root = tmp_path / "sana"
    shutil.copytree(tiny_sana[1], root)
    r = run_cli("quantize", str(root), "--precision", "nncf-w8", "--steps", "2", "--seeds", "1", "--prompts", PROMPT)
    assert r.exit_code == 0, r.output
    m = load_manifest(root)
    for component in ("text_encoder", "transformer"):
        variant = m.components[component]["nncf-w8"]
        assert variant.file.endswith(".xml") and variant.backends == ("openvino",)
        assert variant.quality["psnr_db"] >= 40
    pipe = Pipeline.load(root, backend="openvino", device="cpu", precision="nncf-w8")
    assert np.asarray(pipe.txt2img(PROMPT, steps=2, seed=SEED, width=W, height=H)[0]).std() > 5
