"""DeepCache through the exported graph pair vs its authors' own helper (DeepCacheSDHelper) on diffusers' pipelines."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")  # diffusers is the reference
diffusers = pytest.importorskip("diffusers")
DeepCache = pytest.importorskip("DeepCache")  # .ci/run installs deepcache 0.1.1 (--no-deps)

from edgediff.runtime import ArtifactError, Pipeline  # noqa: E402
from edgediff.runtime.metrics import psnr  # noqa: E402

from .conftest import run_cli  # noqa: E402
from .scheduler_harness import diffusers_scheduler  # noqa: E402
from .test_img2img_inpaint import photo, tiny_inpaint  # noqa: E402,F401 (tiny_inpaint: a fixture)

PROMPT, NEGATIVE, STEPS, SEED, W, H = "a red circle on a blue background", "blurry", 10, 7, 64, 48


def calls(pipe) -> dict[str, list[int]]:
    """The batch of every full and shallow denoiser call."""
    rows: dict[str, list[int]] = {}
    for name in ("unet", "unet_shallow"):
        session = pipe.session(name)
        run = session.run
        session.run = lambda feeds, run=run, name=name: rows.setdefault(name, []).append(len(feeds["sample"])) or run(feeds)
    return rows


def reference(cls, src, scheduler: str, interval: int, branch: int, **kw) -> np.ndarray:
    pipe = cls.from_pretrained(str(src), **({} if cls is diffusers.StableDiffusionXLPipeline else
                                            {"safety_checker": None, "requires_safety_checker": False}))
    pipe.scheduler = diffusers_scheduler(scheduler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    helper = DeepCache.DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=interval, cache_branch_id=branch)
    helper.enable()
    out = pipe(prompt=PROMPT, num_inference_steps=STEPS, guidance_scale=7.5, output_type="np",
               generator=torch.Generator().manual_seed(SEED), **kw).images[0]
    helper.disable()
    return (out * 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def branch1(tiny_sd1, tmp_path_factory):
    """The tiny SD1 model exported with DeepCache's branch 1 (one layer deeper than the default 0)."""
    src, _ = tiny_sd1
    out = tmp_path_factory.mktemp("branch1") / "artifact"
    r = run_cli("export", str(src), str(out), "--deepcache-branch", "1")
    assert r.exit_code == 0, r.output
    return src, out


def test_export_writes_the_graph_pair(tiny_sd1):
    _, artifact = tiny_sd1
    manifest = json.loads((artifact / "manifest.json").read_text())
    shallow = manifest["components"]["unet_shallow"]
    assert shallow["role"] == "shallow_denoiser" and shallow["method"] == "deepcache" and shallow["branch"] == 0
    graph = shallow["variants"]["fp32"]
    assert [t["name"] for t in graph["inputs"]][-1] == "deep_feature"
    assert graph["quality"]["parity_vs_torch"]["max_rel_err"] < 1e-4
    unet = manifest["components"]["unet"]["variants"]["fp32"]
    assert [t["name"] for t in unet["outputs"]] == ["out_sample", "deep_feature"]
    # the shallow branch is a small part of the UNet
    assert graph["bytes"] < unet["bytes"] / 3


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
@pytest.mark.parametrize("scheduler, interval", [("euler", 3), ("ddim", 2), ("dpmpp_2m", 4)])
def test_txt2img_matches_the_authors_helper(tiny_sd1, backend, scheduler, interval, parity_log):
    src, artifact = tiny_sd1
    pipe = Pipeline.load(artifact, backend=backend, device="cpu", ov_precision="f32")
    rows = calls(pipe)
    (ours,) = pipe.txt2img(PROMPT, steps=STEPS, guidance=7.5, seed=SEED, width=W, height=H, scheduler=scheduler,
                           rng="torch", cache_interval=interval)
    full = len(range(0, STEPS, interval))
    assert rows == {"unet": [2] * full, "unet_shallow": [2] * (STEPS - full)}
    score = psnr(np.asarray(ours), reference(diffusers.StableDiffusionPipeline, src, scheduler, interval, 0,
                                             width=W, height=H))
    parity_log(("sd1 deepcache", backend, f"{scheduler} N={interval}", score))
    assert score >= 40
    (every_step,) = pipe.txt2img(PROMPT, steps=STEPS, guidance=7.5, seed=SEED, width=W, height=H,
                                 scheduler=scheduler, rng="torch")
    assert psnr(np.asarray(every_step), np.asarray(ours)) < 60  # the cache changed the image: it was used


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_a_deeper_branch_matches_too(branch1, backend, parity_log):
    src, artifact = branch1
    pipe = Pipeline.load(artifact, backend=backend, device="cpu", ov_precision="f32")
    (ours,) = pipe.txt2img(PROMPT, steps=STEPS, guidance=7.5, seed=SEED, width=W, height=H, scheduler="euler",
                           rng="torch", cache_interval=3)
    score = psnr(np.asarray(ours), reference(diffusers.StableDiffusionPipeline, src, "euler", 3, 1, width=W, height=H))
    parity_log(("sd1 deepcache b1", backend, "euler N=3", score))
    assert score >= 40


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_img2img_counts_the_steps_it_runs(tiny_sd1, backend, parity_log):
    src, artifact = tiny_sd1
    pipe = Pipeline.load(artifact, backend=backend, device="cpu", ov_precision="f32")
    rows = calls(pipe)
    (ours,) = pipe.img2img(PROMPT, photo(), strength=0.6, steps=STEPS, guidance=7.5, seed=SEED, scheduler="euler",
                           rng="torch", cache_interval=3)
    assert rows == {"unet": [2, 2], "unet_shallow": [2] * 4}  # 6 steps run: full at the 1st and 4th
    want = reference(diffusers.StableDiffusionImg2ImgPipeline, src, "euler", 3, 0, image=photo(), strength=0.6)
    score = psnr(np.asarray(ours), want)
    parity_log(("sd1 deepcache", backend, "img2img euler N=3", score))
    assert score >= 40


def test_sdxl_matches_the_authors_helper(tiny_sdxl, parity_log):
    src, artifact = tiny_sdxl
    pipe = Pipeline.load(artifact, backend="onnxruntime", device="cpu")
    (ours,) = pipe.txt2img(PROMPT, steps=STEPS, guidance=7.5, seed=SEED, width=W, height=H, scheduler="euler",
                           rng="torch", cache_interval=3)
    score = psnr(np.asarray(ours), reference(diffusers.StableDiffusionXLPipeline, src, "euler", 3, 0, width=W, height=H))
    parity_log(("sdxl deepcache", "onnxruntime", "euler N=3", score))
    assert score >= 40


def test_with_the_cfg_cutoff_the_cached_feature_halves(tiny_sd1):
    _, artifact = tiny_sd1
    pipe = Pipeline.load(artifact, backend="onnxruntime", device="cpu")
    rows = calls(pipe)
    result = pipe.txt2img(PROMPT, steps=STEPS, guidance=7.5, seed=SEED, width=W, height=H, scheduler="euler",
                          cache_interval=3, cfg_until=0.4)
    # guided for 5 steps, then batch 1; full at steps 0, 3, 6, 9
    assert rows == {"unet": [2, 2, 1, 1], "unet_shallow": [2, 2, 2, 1, 1, 1]}
    assert "DeepCache interval: 3" in result.parameters(0) and result.metadata(0)["cache_interval"] == 3


def test_bad_values_are_refused(tiny_sd1, tmp_path):
    src, artifact = tiny_sd1
    for value in ("0", "-2", "1001"):
        r = run_cli("generate", "x", "--model", str(artifact), "--cache-interval", value, "-o", str(tmp_path / "a.png"))
        assert r.exit_code == 2 and "cache_interval must be an integer in [1, 1000]" in r.output, r.output
    r = run_cli("export", str(src), str(tmp_path / "bad"), "--deepcache-branch", "7")
    assert r.exit_code == 2 and "valid ids: [0, 1, 3, 4]" in r.output, r.output
    assert not (tmp_path / "bad").exists()
    r = run_cli("export", str(src), str(tmp_path / "plain"), "--no-deepcache")
    assert r.exit_code == 0, r.output
    assert "unet_shallow" not in json.loads((tmp_path / "plain" / "manifest.json").read_text())["components"]
    pipe = Pipeline.load(tmp_path / "plain", backend="onnxruntime", device="cpu")
    pipe.txt2img(PROMPT, steps=2, width=W, height=H, cache_interval=1)  # 1: every step in full, needs no pair
    with pytest.raises(ArtifactError, match="no DeepCache graphs.*re-export"):
        pipe.txt2img(PROMPT, steps=2, width=W, height=H, cache_interval=2)


def test_reduced_precision_variants_keep_the_feature(tiny_sd1, tmp_path):
    """fp16 of the graph pair (quantize picks the shallow denoiser too) runs DeepCache near its fp32 images."""
    import shutil

    from edgediff.quantize import GateSettings, quantize_artifact

    artifact = tmp_path / "artifact"
    shutil.copytree(tiny_sd1[1], artifact)
    settings = GateSettings(prompts=(PROMPT,), seeds=(0,), steps=4)
    results = quantize_artifact(artifact, "fp16", ("unet", "unet_shallow"), force=True, settings=settings)
    assert set(results) == {"unet", "unet_shallow"}
    m = json.loads((artifact / "manifest.json").read_text())
    assert [t["name"] for t in m["components"]["unet"]["variants"]["fp16"]["outputs"]] == ["out_sample", "deep_feature"]
    images = {}
    for precision in ("fp32", "fp16"):
        pipe = Pipeline.load(artifact, backend="onnxruntime", device="cpu", precision=precision)
        rows = calls(pipe)
        (images[precision],) = pipe.txt2img(PROMPT, steps=STEPS, guidance=7.5, seed=SEED, width=W, height=H,
                                            scheduler="euler", cache_interval=3)
        assert len(rows["unet_shallow"]) == 6 and pipe.describe()["unet_shallow"]["precision"] == precision
    assert psnr(np.asarray(images["fp16"]), np.asarray(images["fp32"])) >= 35


@pytest.mark.parametrize("unet", ["inpainting-unet", "ordinary-unet"])
def test_inpainting_matches_the_authors_helper(tiny_sd1, tiny_inpaint, unet, parity_log):
    """The shallow graph takes what the inpainting path feeds (a 9-channel UNet's mask and masked image, or the
    known region blended back after each step)."""
    from .test_img2img_inpaint import mask_image

    src, artifact = tiny_inpaint if unet == "inpainting-unet" else tiny_sd1
    pipe = Pipeline.load(artifact, backend="onnxruntime", device="cpu")
    rows = calls(pipe)
    (ours,) = pipe.inpaint(PROMPT, photo(), mask_image(), strength=1.0, steps=STEPS, guidance=7.5, seed=SEED,
                           scheduler="euler", rng="torch", cache_interval=3)
    assert len(rows["unet_shallow"]) == 6
    want = reference(diffusers.StableDiffusionInpaintPipeline, src, "euler", 3, 0, image=photo(),
                     mask_image=mask_image(), strength=1.0, height=H, width=W)
    score = psnr(np.asarray(ours), want)
    parity_log((f"deepcache inpaint-{unet[:4]}", "onnxruntime", "euler N=3", score))
    assert score >= 35


def test_an_int8_static_unet_keeps_the_feature(tiny_sd1, tmp_path):
    """int8-static is calibrated from the graph with the feature output and keeps it: DeepCache runs on it."""
    import shutil

    from edgediff.quantize import GateSettings, quantize_artifact

    artifact = tmp_path / "artifact"
    shutil.copytree(tiny_sd1[1], artifact)
    quantize_artifact(artifact, "int8-static", ("unet",), force=True,
                      settings=GateSettings(prompts=(PROMPT,), seeds=(0,), steps=4))
    m = json.loads((artifact / "manifest.json").read_text())
    assert [t["name"] for t in m["components"]["unet"]["variants"]["int8-static"]["outputs"]] == ["out_sample",
                                                                                                  "deep_feature"]
    for backend in ("onnxruntime", "openvino"):
        pipe = Pipeline.load(artifact, backend=backend, device="cpu", precision="unet=int8-static")
        rows = calls(pipe)
        (image,) = pipe.txt2img(PROMPT, steps=STEPS, guidance=7.5, seed=SEED, width=W, height=H, scheduler="euler",
                                cache_interval=3)
        assert rows == {"unet": [2] * 4, "unet_shallow": [2] * 6}
        assert np.asarray(image).std() > 1  # an image, not a flat field
