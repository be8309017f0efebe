"""Guidance only where it pays: ``cfg_until`` against diffusers' own SDCFGCutoffCallback / SDXLCFGCutoffCallback."""

from __future__ import annotations

import numpy as np
import pytest

from edgediff.runtime import GenerationSettings, Pipeline
from edgediff.runtime.metrics import psnr

from .conftest import run_cli

torch = pytest.importorskip("torch")  # diffusers is the reference
diffusers = pytest.importorskip("diffusers")

from diffusers.callbacks import SDCFGCutoffCallback, SDXLCFGCutoffCallback  # noqa: E402

from .scheduler_harness import diffusers_scheduler  # noqa: E402

PROMPT, NEGATIVE, STEPS, GUIDANCE, SEED, W, H = "a red circle on a blue background", "blurry", 10, 7.5, 42, 64, 48


def unet_batches(pipe) -> list[int]:
    """Record the denoiser's batch at every call."""
    rows: list[int] = []
    session = pipe.sessions[pipe.manifest.denoiser.name]
    run = session.run
    session.run = lambda feeds: rows.append(len(feeds["sample"])) or run(feeds)
    return rows


def reference(cls, src, scheduler, cutoff, callback_cls=SDCFGCutoffCallback, **kw):
    pipe = cls.from_pretrained(str(src), safety_checker=None, requires_safety_checker=False) \
        if cls is not diffusers.StableDiffusionXLPipeline else cls.from_pretrained(str(src))
    pipe.scheduler = diffusers_scheduler(scheduler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    callback = callback_cls(cutoff_step_ratio=cutoff)
    out = pipe(prompt=PROMPT, num_inference_steps=STEPS, guidance_scale=GUIDANCE, output_type="np",
               generator=torch.Generator().manual_seed(SEED), callback_on_step_end=callback,
               callback_on_step_end_tensor_inputs=callback.tensor_inputs, **kw).images[0]
    return (out * 255).round().astype(np.uint8)


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
@pytest.mark.parametrize("scheduler, cutoff", [("euler", 0.4), ("dpmpp_2m", 0.4), ("euler_a", 0.25), ("ddim", 0.0)])
def test_txt2img_cutoff_matches_diffusers(tiny_sd1, backend, scheduler, cutoff, parity_log):
    src, artifact = tiny_sd1
    pipe = Pipeline.load(artifact, backend=backend, device="cpu", ov_precision="f32")
    rows = unet_batches(pipe)
    (ours,) = pipe.txt2img(PROMPT, NEGATIVE, steps=STEPS, guidance=GUIDANCE, seed=SEED, width=W, height=H,
                           scheduler=scheduler, rng="torch", cfg_until=cutoff)
    guided = int(STEPS * cutoff) + 1
    assert rows == [2] * guided + [1] * (STEPS - guided)  # the saving: half the batch after the cut-off
    want = reference(diffusers.StableDiffusionPipeline, src, scheduler, cutoff, negative_prompt=NEGATIVE, width=W,
                     height=H)
    score = psnr(np.asarray(ours), want)
    parity_log(("sd1 cfg-until", backend, f"{scheduler} {cutoff}", score))
    assert score >= 40
    (full,) = pipe.txt2img(PROMPT, NEGATIVE, steps=STEPS, guidance=GUIDANCE, seed=SEED, width=W, height=H,
                           scheduler=scheduler, rng="torch")
    # the cut-off changes the image, and the reference tells the two apart: the parity bites
    assert not np.array_equal(np.asarray(full), np.asarray(ours)) and psnr(np.asarray(full), want) < score


def test_img2img_cutoff_counts_the_steps_run(tiny_sd1):
    from PIL import Image

    src, artifact = tiny_sd1
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (H, W, 3), dtype=np.uint8))
    pipe = Pipeline.load(artifact, backend="onnxruntime", device="cpu")
    rows = unet_batches(pipe)
    (ours,) = pipe.img2img(PROMPT, image, NEGATIVE, strength=0.6, steps=STEPS, guidance=GUIDANCE, seed=SEED,
                           scheduler="euler", rng="torch", cfg_until=0.5)
    run = int(STEPS * 0.6)
    assert rows == [2] * (int(run * 0.5) + 1) + [1] * (run - int(run * 0.5) - 1)
    want = reference(diffusers.StableDiffusionImg2ImgPipeline, src, "euler", 0.5, negative_prompt=NEGATIVE,
                     image=image, strength=0.6)
    assert psnr(np.asarray(ours), want) >= 40


def test_sdxl_cutoff_matches_diffusers(tiny_sdxl):
    src, artifact = tiny_sdxl
    pipe = Pipeline.load(artifact, backend="onnxruntime", device="cpu")
    (ours,) = pipe.txt2img(PROMPT, steps=STEPS, guidance=5.0, seed=SEED, width=W, height=H, scheduler="euler",
                           rng="torch", cfg_until=0.3)
    pipe_ref = diffusers.StableDiffusionXLPipeline.from_pretrained(str(src))
    pipe_ref.scheduler = diffusers_scheduler("euler", pipe_ref.scheduler.config)
    pipe_ref.set_progress_bar_config(disable=True)
    callback = SDXLCFGCutoffCallback(cutoff_step_ratio=0.3)
    want = pipe_ref(prompt=PROMPT, num_inference_steps=STEPS, guidance_scale=5.0, width=W, height=H, output_type="np",
                    generator=torch.Generator().manual_seed(SEED), callback_on_step_end=callback,
                    callback_on_step_end_tensor_inputs=callback.tensor_inputs).images[0]
    assert psnr(np.asarray(ours), (want * 255).round().astype(np.uint8)) >= 40


def test_bad_cutoffs_are_refused(tmp_path):
    for bad in (1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match=r"cfg_until must be a fraction of the steps in \[0, 1\]"):
            GenerationSettings("x", cfg_until=bad)
    r = run_cli("generate", "x", "--cfg-until", "1.5", "--output", str(tmp_path / "o.png"))
    assert r.exit_code == 2 and "cfg_until must be a fraction of the steps in [0, 1]" in " ".join(r.output.split())
