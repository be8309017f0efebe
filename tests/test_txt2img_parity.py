"""The whole txt2img image vs diffusers' StableDiffusionPipeline: same weights, seed, scheduler."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")  # diffusers is the reference

from edgediff.runtime import Pipeline
from edgediff.runtime.schedulers import schedulers_for

from edgediff.runtime.metrics import psnr

from .scheduler_harness import diffusers_scheduler

PROMPT = "a red circle on a blue background"
NEGATIVE = "blurry"
STEPS, GUIDANCE, SEED, W, H = 8, 7.5, 42, 64, 48

_REFERENCE_CACHE: dict = {}


def generators(seed: int | list[int]):
    """diffusers' generator for one image, or one generator per image (our image k is seeded seed + k)."""
    if isinstance(seed, list):
        return [torch.Generator().manual_seed(s) for s in seed]
    return torch.Generator().manual_seed(seed)


def diffusers_image(src, scheduler: str, **kw) -> np.ndarray:
    import diffusers

    key = (str(src), scheduler, repr(sorted(kw.items())))
    if key not in _REFERENCE_CACHE:
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(src), safety_checker=None, requires_safety_checker=False)
        pipe.scheduler = diffusers_scheduler(scheduler, pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        args = dict(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                    width=W, height=H, output_type="np")
        args.update(kw)
        out = pipe(**args, generator=generators(args.pop("seed", SEED))).images
        _REFERENCE_CACHE[key] = (out * 255).round().astype(np.uint8)
    return _REFERENCE_CACHE[key]


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
@pytest.mark.parametrize("scheduler", schedulers_for("epsilon"))  # the tiny SD model predicts epsilon
def test_txt2img_matches_diffusers(tiny_sd1, backend, scheduler, parity_log):
    src, artifact = tiny_sd1
    pipe = Pipeline.load(artifact, backend=backend, device="cpu", ov_precision="f32")
    ours = pipe.txt2img(PROMPT, NEGATIVE, steps=STEPS, guidance=GUIDANCE, seed=SEED, width=W, height=H,
                        scheduler=scheduler, rng="torch")
    ref = diffusers_image(src, scheduler)[0]
    got = np.asarray(ours[0])
    assert got.shape == ref.shape == (H, W, 3)
    score = psnr(got, ref)
    parity_log(("sd1-epsilon", backend, scheduler, score))
    assert score >= 40, f"{scheduler} on {backend}: PSNR {score:.1f} dB vs diffusers"


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
@pytest.mark.parametrize("scheduler", ["ddim", "euler", "dpmpp_2m", "unipc"])
def test_v_prediction_matches_diffusers(tiny_sd2v, backend, scheduler, parity_log):
    src, artifact = tiny_sd2v
    pipe = Pipeline.load(artifact, backend=backend, device="cpu", ov_precision="f32")
    assert pipe.manifest.prediction_type == "v_prediction"
    ours = np.asarray(pipe.txt2img(PROMPT, NEGATIVE, steps=STEPS, guidance=GUIDANCE, seed=SEED, width=W, height=H,
                                   scheduler=scheduler, rng="torch")[0])
    score = psnr(ours, diffusers_image(src, scheduler)[0])
    parity_log(("sd2-v", backend, scheduler, score))
    assert score >= 40, f"{scheduler} on {backend}: PSNR {score:.1f} dB vs diffusers"


def test_batch_no_guidance_and_num_images(tiny_sd1):
    """Two prompts x two images, guidance 1 (no uncond pass): each image matches diffusers."""
    src, artifact = tiny_sd1
    pipe = Pipeline.load(artifact, backend="onnxruntime", device="cpu")
    prompts = [PROMPT, "a small green triangle"]
    ours = pipe.txt2img(prompts, steps=4, guidance=1.0, seed=7, width=W, height=H, scheduler="euler",
                        num_images=2, rng="torch")
    assert len(ours.timings.stages["unet"]) == 4 and ours.seeds == (7, 8, 9, 10)
    ref = diffusers_image(src, "euler", prompt=prompts, negative_prompt=None, num_inference_steps=4,
                          guidance_scale=1.0, num_images_per_prompt=2, seed=[7, 8, 9, 10])
    assert len(ours) == 4
    for got, want in zip(ours, ref):
        assert psnr(np.asarray(got), want) >= 40


def test_explicit_latents_replace_the_seeded_noise(tiny_sd1):
    _, artifact = tiny_sd1
    pipe = Pipeline.load(artifact, backend="onnxruntime", device="cpu")
    from edgediff.runtime.rng import TorchRandn

    latents = TorchRandn(42).randn((1, 4, H // 8, W // 8))
    a = np.asarray(pipe.txt2img(PROMPT, steps=3, seed=42, width=W, height=H, rng="torch")[0])
    b = np.asarray(pipe.txt2img(PROMPT, steps=3, seed=999, width=W, height=H, latents=latents)[0])
    assert np.array_equal(a, b)
    with pytest.raises(ValueError, match="latents must have shape"):
        pipe.txt2img(PROMPT, steps=3, width=W, height=H, latents=latents[:, :, :2])


def test_parity_threshold_discriminates(tiny_sd1):
    """Another seed must fall far below the 40 dB bar, or the parity tests prove nothing."""
    src, artifact = tiny_sd1
    pipe = Pipeline.load(artifact, backend="onnxruntime", device="cpu")
    other = np.asarray(pipe.txt2img(PROMPT, NEGATIVE, steps=STEPS, guidance=GUIDANCE, seed=SEED + 1, width=W,
                                    height=H, scheduler="ddim", rng="torch")[0])
    assert other.std() > 10
    assert psnr(other, diffusers_image(src, "ddim")[0]) < 30
