"""img2img, inpainting (both UNet kinds) and outpainting vs diffusers, on both backends."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")  # diffusers is the reference
from PIL import Image

from edgediff.runtime import Pipeline
from edgediff.runtime.schedulers import schedulers_for

from edgediff.runtime.metrics import psnr

from .conftest import run_cli
from .scheduler_harness import diffusers_scheduler

PROMPT, NEGATIVE = "a red circle on a blue background", "blurry"
W, H, STEPS, SEED = 64, 48, 10, 11


@pytest.fixture(scope="module")
def tiny_inpaint(tmp_path_factory):
    from edgediff.export.recipes import build_pipeline

    root = tmp_path_factory.mktemp("inpaint")
    src = build_pipeline("tiny-sd1", root / "diffusers", seed=0, inpainting=True)
    r = run_cli("export", str(src), str(root / "artifact"))
    assert r.exit_code == 0, r.output
    return src, root / "artifact"


def photo() -> Image.Image:
    rng = np.random.default_rng(5)
    base = np.zeros((H, W, 3), np.float32)
    base[..., 0] = np.linspace(0, 255, W)[None]
    base[..., 2] = np.linspace(255, 0, H)[:, None]
    base[12:36, 20:44] = (250, 220, 30)
    return Image.fromarray(np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8))


def mask_image() -> Image.Image:
    m = np.zeros((H, W), np.uint8)
    m[8:40, 16:48] = 255
    return Image.fromarray(m)


def reference(kind: str, src, scheduler: str, **kw) -> np.ndarray:
    import diffusers

    cls = {"img2img": diffusers.StableDiffusionImg2ImgPipeline, "inpaint": diffusers.StableDiffusionInpaintPipeline}[kind]
    pipe = cls.from_pretrained(str(src), safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = diffusers_scheduler(scheduler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=7.5,
               generator=torch.Generator().manual_seed(SEED), output_type="np", **kw).images[0]
    return (out * 255).round().astype(np.uint8)


OV_SUBSET = ("ddim", "euler_a", "dpmpp_2m", "heun", "lcm")


def _cases(subset):
    unet_schedulers = schedulers_for("epsilon")
    return [(b, s) for b in ("onnxruntime", "openvino") for s in unet_schedulers if b == "onnxruntime" or s in subset]


@pytest.mark.parametrize("backend, scheduler", _cases(OV_SUBSET))
def test_img2img_matches_diffusers(tiny_sd1, backend, scheduler, parity_log):
    src, artifact = tiny_sd1
    pipe = Pipeline.load(artifact, backend=backend, device="cpu", ov_precision="f32")
    for strength in (0.6, 1.0):
        (ours,) = pipe.img2img(PROMPT, photo(), NEGATIVE, strength=strength, steps=STEPS, seed=SEED,
                               scheduler=scheduler, rng="torch")
        score = psnr(np.asarray(ours), reference("img2img", src, scheduler, image=photo(), strength=strength))
        parity_log((f"img2img-{strength}", backend, scheduler, score))
        assert score >= 35, f"img2img {scheduler} strength {strength} on {backend}: {score:.1f} dB"


@pytest.mark.parametrize("backend, scheduler", _cases(("ddim", "euler", "dpmpp_2m")))
@pytest.mark.parametrize("unet", ["inpainting-unet", "ordinary-unet"])
def test_inpaint_matches_diffusers(tiny_sd1, tiny_inpaint, unet, backend, scheduler, parity_log):
    src, artifact = tiny_inpaint if unet == "inpainting-unet" else tiny_sd1
    pipe = Pipeline.load(artifact, backend=backend, device="cpu", ov_precision="f32")
    for strength in (1.0, 0.75):
        (ours,) = pipe.inpaint(PROMPT, photo(), mask_image(), NEGATIVE, strength=strength, steps=STEPS, seed=SEED,
                               scheduler=scheduler, rng="torch")
        ref = reference("inpaint", src, scheduler, image=photo(), mask_image=mask_image(), strength=strength,
                        height=H, width=W)
        score = psnr(np.asarray(ours), ref)
        parity_log((f"inpaint-{unet[:4]}-{strength}", backend, scheduler, score))
        assert score >= 35, f"inpaint ({unet}) {scheduler} strength {strength} on {backend}: {score:.1f} dB"


def test_manifest_says_inpainting(tiny_inpaint):
    pipe = Pipeline.load(tiny_inpaint[1], backend="onnxruntime")
    assert pipe.manifest.denoiser.in_channels == 9
    with pytest.raises(ValueError, match="inpainting UNet .* use inpaint"):
        pipe.txt2img(PROMPT, steps=2)
    r = run_cli("generate", PROMPT, "--model", str(tiny_inpaint[1]), "--steps", "2")
    assert r.exit_code == 2 and "inpainting UNet" in r.output


def test_strength_edge_cases(tiny_sd1):
    pipe = Pipeline.load(tiny_sd1[1], backend="onnxruntime")
    result = pipe.img2img(PROMPT, photo(), strength=0.01, steps=10, scheduler="euler")
    assert len(result.timings.stages["unet"]) == 1  # diffusers would run none; we run one
    result = pipe.img2img(PROMPT, photo(), strength=1.0, steps=10, scheduler="euler")
    assert len(result.timings.stages["unet"]) == 10
    for bad in (0.0, 1.5, -0.2):
        with pytest.raises(ValueError, match=r"strength must be in \(0, 1\]"):
            pipe.img2img(PROMPT, photo(), strength=bad)


def test_bad_image_inputs(tiny_sd1, tmp_path):
    pipe = Pipeline.load(tiny_sd1[1], backend="onnxruntime")
    not_image = tmp_path / "x.png"
    not_image.write_text("hello")
    with pytest.raises(ValueError, match="cannot read .*x.png as an image"):
        pipe.img2img(PROMPT, not_image)
    with pytest.raises(ValueError, match="mask size 32x32 differs from the image's 64x48"):
        pipe.inpaint(PROMPT, photo(), Image.new("L", (32, 32)))
    # sizes not a multiple of 8 are rounded down (Lanczos), as diffusers does
    (out,) = pipe.img2img(PROMPT, photo().resize((70, 50)), steps=2)
    assert out.size == (64, 48)
    r = run_cli("generate", PROMPT, "--model", str(tiny_sd1[1]), "--mask", str(not_image))
    assert r.exit_code == 2 and "need an input --image" in r.output


def test_keep_unmasked_and_outpaint(tiny_sd1, tmp_path):
    pipe = Pipeline.load(tiny_sd1[1], backend="onnxruntime")
    src = photo()
    (out,) = pipe.inpaint(PROMPT, src, mask_image(), steps=3, keep_unmasked=True)
    a, b, m = np.asarray(out), np.asarray(src), np.asarray(mask_image()) > 0
    assert np.array_equal(a[~m], b[~m]) and not np.array_equal(a[m], b[m])
    (wide,) = pipe.outpaint(PROMPT, src, {"left": 16, "bottom": 8}, steps=3)
    assert wide.size == (W + 16, H + 8)
    assert np.array_equal(np.asarray(wide)[:H, 16:], b)  # the original stays, pasted back
    path = tmp_path / "in.png"
    src.save(path)
    r = run_cli("generate", PROMPT, "--model", str(tiny_sd1[1]), "--image", str(path), "--extend", "right=32",
                "--steps", "2", "--output", str(tmp_path / "o.png"))
    assert r.exit_code == 0, r.output
    assert Image.open(tmp_path / "o.png").size == (W + 32, H)
    r = run_cli("generate", PROMPT, "--model", str(tiny_sd1[1]), "--image", str(path), "--extend", "up=32")
    assert r.exit_code == 2 and "unknown side(s) ['up']" in r.output


def test_inpainting_unet_cfg_cutoff_matches_diffusers(tiny_inpaint):
    """The CFG cut-off on a 9-channel inpainting UNet: its mask and masked-image channels follow the guidance to the
    conditional half (``Guidance.rows``). diffusers' SDCFGCutoffCallback halves only the prompt embeddings (its
    inpainting pipeline then fails on the doubled mask), so the reference's callback also halves the mask and the
    masked image's latents, which the pipeline lets a callback replace."""
    import diffusers
    from diffusers.callbacks import SDCFGCutoffCallback

    class InpaintCutoff(SDCFGCutoffCallback):
        tensor_inputs = ["prompt_embeds", "mask", "masked_image_latents"]

        def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
            if step_index == int(pipeline.num_timesteps * self.config.cutoff_step_ratio):
                for name in ("mask", "masked_image_latents"):
                    callback_kwargs[name] = callback_kwargs[name][len(callback_kwargs[name]) // 2:]
            return super().callback_fn(pipeline, step_index, timestep, callback_kwargs)

    src, artifact = tiny_inpaint
    pipe = Pipeline.load(artifact, backend="onnxruntime", device="cpu")
    (ours,) = pipe.inpaint(PROMPT, photo(), mask_image(), NEGATIVE, strength=1.0, steps=STEPS, seed=SEED,
                           scheduler="euler", rng="torch", cfg_until=0.4)
    ref = diffusers.StableDiffusionInpaintPipeline.from_pretrained(str(src), safety_checker=None,
                                                                   requires_safety_checker=False)
    ref.scheduler = diffusers_scheduler("euler", ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    callback = InpaintCutoff(cutoff_step_ratio=0.4)
    want = ref(prompt=PROMPT, negative_prompt=NEGATIVE, image=photo(), mask_image=mask_image(), strength=1.0,
               num_inference_steps=STEPS, guidance_scale=7.5, height=H, width=W, output_type="np",
               generator=torch.Generator().manual_seed(SEED), callback_on_step_end=callback,
               callback_on_step_end_tensor_inputs=callback.tensor_inputs).images[0]
    want = (want * 255).round().astype(np.uint8)
    assert psnr(np.asarray(ours), want) >= 35
    (full,) = pipe.inpaint(PROMPT, photo(), mask_image(), NEGATIVE, strength=1.0, steps=STEPS, seed=SEED,
                           scheduler="euler", rng="torch")
    assert psnr(np.asarray(full), want) < psnr(np.asarray(ours), want)  # the cut-off is what matches
