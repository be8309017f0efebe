"""ControlNet: export with --controlnet, and generation against diffusers' ControlNet pipelines (SD1, SDXL;
txt2img, img2img, inpainting; one ControlNet and two at once; guidance windows), on both backends."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")  # diffusers is the reference
from PIL import Image

from edgediff.runtime import Control, Pipeline, load_manifest
from edgediff.runtime.manifest import MID_RESIDUAL, ArtifactError
from edgediff.runtime.metrics import psnr

from .conftest import run_cli
from .test_img2img_inpaint import mask_image, photo  # the same 64x48 input image and mask

PROMPT, NEGATIVE = "a red circle on a blue background", "blurry"
W, H, STEPS, SEED = 64, 48, 8, 3
MIN_DB = 40.0  # the parity bound
NAMES = ("edges", "depth")


def control_images(w: int = W, h: int = H) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)) for _ in NAMES]


def _export_with_controlnets(tmp_path_factory, recipe: str):
    from edgediff.export.recipes import build_controlnet, build_pipeline

    root = tmp_path_factory.mktemp(f"controlnet-{recipe}")
    src = build_pipeline(recipe, root / "diffusers", seed=0)
    nets = [build_controlnet(src, root / name, seed=10 + k, copy_unet=k == 0) for k, name in enumerate(NAMES)]
    r = run_cli("export", str(src), str(root / "artifact"), *[f"--controlnet={n}={p}" for n, p in zip(NAMES, nets)])
    assert r.exit_code == 0, r.output
    return src, nets, root / "artifact"


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    return _export_with_controlnets(tmp_path_factory, "tiny-sd1")


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    return _export_with_controlnets(tmp_path_factory, "tiny-sdxl")


def guidance_of(kind: str) -> float:
    return 5.0 if kind == "sdxl" else 7.5  # each pipeline's default


def reference(kind: str, src, nets, which, scales, start=0.0, end=1.0, scheduler=None, **kw) -> np.ndarray:
    import diffusers

    cls = {"txt2img": diffusers.StableDiffusionControlNetPipeline,
           "img2img": diffusers.StableDiffusionControlNetImg2ImgPipeline,
           "inpaint": diffusers.StableDiffusionControlNetInpaintPipeline,
           "sdxl": diffusers.StableDiffusionXLControlNetPipeline}[kind]
    models = [diffusers.ControlNetModel.from_pretrained(str(nets[k])) for k in which]
    extra = {} if kind == "sdxl" else {"safety_checker": None, "requires_safety_checker": False}
    pipe = cls.from_pretrained(str(src), controlnet=models if len(models) > 1 else models[0], **extra)
    if scheduler is not None:
        from .scheduler_harness import diffusers_scheduler

        pipe.scheduler = diffusers_scheduler(scheduler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    images = [control_images()[k] for k in which]
    key = "control_image" if kind in ("img2img", "inpaint") else "image"
    single = len(which) == 1
    out = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS,
               guidance_scale=guidance_of(kind), width=W, height=H,
               controlnet_conditioning_scale=scales[0] if single else list(scales),
               control_guidance_start=start, control_guidance_end=end, **{key: images[0] if single else images},
               generator=torch.Generator().manual_seed(SEED), output_type="np", **kw).images[0]
    return (out * 255).round().astype(np.uint8)


def controls(which, scales, start=0.0, end=1.0) -> list[Control]:
    return [Control(NAMES[k], control_images()[k], s, start, end) for k, s in zip(which, scales)]


CASES = {"one": ((0,), (1.0,), 0.0, 1.0), "two": ((0, 1), (0.8, 1.3), 0.0, 1.0),
         "two-windowed": ((0, 1), (1.0, 0.6), 0.2, 0.7)}


def test_manifest_and_graph_contract(sd1):
    _, _, artifact = sd1
    m = load_manifest(artifact)
    assert [(c.name, c.control, c.conditioning_channels) for c in m.controlnets] == \
        [("controlnet_edges", "edges", 3), ("controlnet_depth", "depth", 3)]
    assert m.roles["controlnet_edges"] == "controlnet"
    unet_inputs = [t.name for t in m.variant("unet").inputs]
    cn_outputs = [t.name for t in m.variant("controlnet_edges").outputs]
    assert unet_inputs[3:] == cn_outputs and cn_outputs[-1] == MID_RESIDUAL  # one graph's outputs, the other's inputs
    assert [t.shape[2] for t in m.variant("controlnet_edges").outputs] == ["height/1", "height/1", "height/2",
                                                                          "height/2", "height/2"]
    for comp in ("unet", "controlnet_edges", "controlnet_depth"):
        for figure in m.variant(comp).quality["parity_vs_torch"].get("outputs", [m.variant(comp).quality["parity_vs_torch"]]):
            assert figure["max_rel_err"] < 1e-4


def check_txt2img(exported, kind: str, backend: str, case: str, parity_log) -> None:
    """Our txt2img with ``case``'s ControlNets against diffusers' pipeline ``kind``, and far from the image without."""
    src, nets, artifact = exported
    which, scales, start, end = CASES[case]
    pipe = Pipeline.load(artifact, backend=backend, device="cpu", ov_precision="f32", cache=False)
    expected = reference(kind, src, nets, which, scales, start, end)
    kw = dict(steps=STEPS, guidance=guidance_of(kind), seed=SEED, width=W, height=H, rng="torch")
    ours = np.asarray(pipe.txt2img(PROMPT, NEGATIVE, controls=controls(which, scales, start, end), **kw)[0])
    plain = np.asarray(pipe.txt2img(PROMPT, NEGATIVE, **kw)[0])
    score = psnr(ours, expected)
    model, scheduler = ("tiny-sdxl", "euler") if kind == "sdxl" else ("tiny-sd1", "pndm")  # the recipes' own
    parity_log((f"{model} controlnet {case}", backend, scheduler, score))
    assert score >= MIN_DB, f"{case} on {backend}: {score:.1f} dB"
    assert psnr(plain, expected) < score - 15  # the ControlNets change the image: a test they can fail


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
@pytest.mark.parametrize("case", list(CASES))
def test_txt2img_matches_diffusers(sd1, backend, case, parity_log):
    check_txt2img(sd1, "txt2img", backend, case, parity_log)


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_img2img_and_inpaint_match_diffusers(sd1, backend, parity_log):
    src, nets, artifact = sd1
    pipe = Pipeline.load(artifact, backend=backend, device="cpu", ov_precision="f32", cache=False)
    kw = dict(steps=STEPS, guidance=7.5, seed=SEED, rng="torch")
    which, scales, start, end = CASES["two"]
    ours = np.asarray(pipe.img2img(PROMPT, photo(), NEGATIVE, strength=0.6,
                                   controls=controls(which, scales), **kw)[0])
    expected = reference("img2img", src, nets, which, scales, image=photo(), strength=0.6)
    parity_log(("tiny-sd1 controlnet img2img", backend, "pndm", psnr(ours, expected)))
    assert psnr(ours, expected) >= MIN_DB
    ours = np.asarray(pipe.inpaint(PROMPT, photo(), mask_image(), NEGATIVE, controls=controls((0,), (1.2,)), **kw)[0])
    expected = reference("inpaint", src, nets, (0,), (1.2,), image=photo(), mask_image=mask_image())
    parity_log(("tiny-sd1 controlnet inpaint", backend, "pndm", psnr(ours, expected)))
    assert psnr(ours, expected) >= MIN_DB


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
@pytest.mark.parametrize("case", ["one", "two-windowed"])
def test_sdxl_matches_diffusers(sdxl, backend, case, parity_log):
    check_txt2img(sdxl, "sdxl", backend, case, parity_log)


def test_without_controls_the_unet_is_the_plain_one(sd1):
    """The UNet exported with residual inputs, fed zeros, draws what diffusers' plain pipeline draws."""
    import diffusers

    src, _, artifact = sd1
    pipe = Pipeline.load(artifact, backend="onnxruntime", device="cpu", cache=False)
    ours = np.asarray(pipe.txt2img(PROMPT, NEGATIVE, steps=STEPS, guidance=7.5, seed=SEED, width=W, height=H,
                                   rng="torch")[0])
    ref = diffusers.StableDiffusionPipeline.from_pretrained(str(src), safety_checker=None,
                                                            requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    expected = ref(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=7.5, width=W,
                   height=H, generator=torch.Generator().manual_seed(SEED), output_type="np").images[0]
    assert psnr(ours, (expected * 255).round().astype(np.uint8)) >= 60
    # DeepCache still works without controls, and is refused with them
    pipe.txt2img(PROMPT, steps=4, width=W, height=H, cache_interval=2)
    with pytest.raises(ValueError, match="DeepCache"):
        pipe.txt2img(PROMPT, steps=4, width=W, height=H, cache_interval=2, controls=controls((0,), (1.0,)))


def test_bad_controls_are_clear_errors(sd1, tmp_path):
    _, _, artifact = sd1
    pipe = Pipeline.load(artifact, backend="onnxruntime", device="cpu", cache=False)
    image = control_images()[0]
    run = lambda *c: pipe.txt2img(PROMPT, steps=2, width=W, height=H, controls=list(c))  # noqa: E731
    with pytest.raises(ValueError, match=r"unknown control 'pose'; this artifact's ControlNets: edges, depth"):
        run(Control("pose", image))
    with pytest.raises(ValueError, match=r"start \(0.6\) must be below end \(0.6\)"):
        run(Control("edges", image, start=0.6, end=0.6))
    with pytest.raises(ValueError, match=r"scale must be a number in \[0, 5\]"):
        run(Control("edges", image, scale=-1))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"cannot read control image for edges .*broken.png"):
        run(Control("edges", broken))
    with pytest.raises(ValueError, match="unknown preprocessor 'sobel'"):
        run(Control("edges", image, preprocess="sobel"))
    with pytest.warns(UserWarning, match=r"control image for edges \(in memory\) is 96x80; resized to the generation's 64x48"):
        resized = pipe.txt2img(PROMPT, steps=2, width=W, height=H, seed=1,
                               controls=[Control("edges", image.resize((96, 80), Image.LANCZOS))])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the right size: no warning
        same = pipe.txt2img(PROMPT, steps=2, width=W, height=H, seed=1, controls=[Control("edges", image)])
    assert psnr(np.asarray(resized[0]), np.asarray(same[0])) > 20
    for text, message in (("edges", "NAME=IMAGE"), ("=a.png", "NAME=IMAGE")):
        with pytest.raises(ValueError, match=message):
            Control.parse(text)
    assert Control.parse("edges=C:/maps/e.png:0.7") == Control("edges", "C:/maps/e.png", 0.7)
    assert Control.parse("edges=maps/e.png") == Control("edges", "maps/e.png", 1.0)


def test_the_other_family_is_refused_at_export(sd1, sdxl, tmp_path):
    src, _, _ = sd1
    _, xl_nets, _ = sdxl
    out = tmp_path / "artifact"
    r = run_cli("export", str(src), str(out), f"--controlnet=xl={xl_nets[0]}")
    assert r.exit_code != 0
    assert "is a SDXL ControlNet and this checkpoint is" in r.output and "added conditioning" in r.output
    assert not out.exists() and not list(tmp_path.glob(".artifact.partial-*"))
    for arg, message in ((f"edges={tmp_path / 'missing'}", "no such file or folder"),
                         ("Bad Name=x", "lowercase letters"), (f"a={tmp_path}", "a folder without config.json")):
        r = run_cli("export", str(src), str(out), f"--controlnet={arg}")
        assert r.exit_code != 0 and message in r.output, r.output
        assert not out.exists()


def test_a_single_safetensors_file_exports(sd1, tmp_path):
    """A ControlNet as one .safetensors file in diffusers' layout (its config taken from the base UNet)."""
    import diffusers
    from safetensors.torch import save_file

    src, nets, _ = sd1
    model = diffusers.ControlNetModel.from_pretrained(str(nets[1]))
    single = tmp_path / "depth.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(single))
    r = run_cli("export", str(src), str(tmp_path / "artifact"), f"--controlnet={single}", "--no-deepcache")
    assert r.exit_code == 0, r.output
    pipe = Pipeline.load(tmp_path / "artifact", backend="onnxruntime", device="cpu", cache=False)
    assert [c.control for c in pipe.manifest.controlnets] == ["depth"]  # named after the file
    ours = np.asarray(pipe.txt2img(PROMPT, NEGATIVE, steps=STEPS, guidance=7.5, seed=SEED, width=W, height=H,
                                   rng="torch", controls=controls((1,), (1.0,)))[0])
    assert psnr(ours, reference("txt2img", src, nets, (1,), (1.0,))) >= MIN_DB


def test_cli_generate_with_controls_records_them(sd1, tmp_path):
    _, _, artifact = sd1
    maps = []
    for k, image in enumerate(control_images()):
        maps.append(tmp_path / f"map{k}.png")
        image.save(maps[-1])
    out = tmp_path / "out.png"
    r = run_cli("generate", PROMPT, "--model", str(artifact), "--backend", "onnxruntime", "--steps", "3",
                "--width", str(W), "--height", str(H), "--no-cache", "-o", str(out),
                "--control", f"edges={maps[0]}:0.8", "--control", f"depth={maps[1]}", "--control-start", "0.1",
                "--control-end", "0.9", "--preprocess", "edges=canny")
    assert r.exit_code == 0, r.output
    text = Image.open(out).text
    assert f"ControlNet 0: Model: edges, Module: canny, Weight: 0.8, Guidance Start: 0.1, Guidance End: 0.9" \
        in text["parameters"]
    assert "ControlNet 1: Model: depth, Module: none, Weight: 1" in text["parameters"]
    record = json.loads(text["edgediff"])
    assert [c["name"] for c in record["controls"]] == ["edges", "depth"] and record["controls"][0]["low"] == 100
    info = run_cli("info", str(artifact))
    assert "ControlNets (generate --control NAME=IMAGE): edges (from" in info.output and "depth (from" in info.output
    for args, message in ((["--control", "pose=x.png"], "unknown control 'pose'"),
                          (["--control", f"edges={maps[0]}", "--control-start", "0.5", "--control-end", "0.5"],
                           "must be below end"),
                          (["--preprocess", "edges=canny"], "--preprocess names a --control"),
                          (["--control", f"edges={maps[0]}", "--preprocess", "edges=blur"], "unknown preprocessor")):
        r = run_cli("generate", PROMPT, "--model", str(artifact), "--steps", "2", "--width", str(W), "--height",
                    str(H), "--no-cache", "-o", str(tmp_path / "x.png"), *args)
        assert r.exit_code != 0 and message in r.output, r.output
        assert "Traceback" not in r.output and not (tmp_path / "x.png").exists()


def test_low_memory_draws_the_same(sd1):
    _, _, artifact = sd1
    kw = dict(steps=4, guidance=7.5, seed=SEED, width=W, height=H, controls=controls((0, 1), (1.0, 0.5)))
    normal = Pipeline.load(artifact, backend="onnxruntime", device="cpu", cache=False).txt2img(PROMPT, **kw)
    low = Pipeline.load(artifact, backend="onnxruntime", device="cpu", cache=False, low_memory=True).txt2img(PROMPT, **kw)
    assert psnr(np.asarray(low[0]), np.asarray(normal[0])) >= 60


def test_a_unet_variant_without_residual_inputs_is_refused(sd1, tiny_sd1, tmp_path):
    """A denoiser variant made from a graph without residual inputs (the same UNet exported without ControlNets)
    cannot take a ControlNet: a clear error before anything runs; without controls it runs."""
    import shutil
    from dataclasses import replace

    _, _, artifact = sd1
    copy = tmp_path / "artifact"
    shutil.copytree(artifact, copy)
    shutil.copyfile(tiny_sd1[1] / "unet" / "model.onnx", copy / "unet" / "model.plain.onnx")
    m = load_manifest(copy)
    plain = load_manifest(tiny_sd1[1]).variant("unet")
    m.components["unet"]["plain"] = replace(plain, precision="plain", file="unet/model.plain.onnx", weights=None)
    m.save(copy)
    pipe = Pipeline.load(copy, backend="onnxruntime", device="cpu", cache=False, precision="unet=plain")
    with pytest.raises(ArtifactError, match=r"unet plain \(unet/model.plain.onnx\) takes no ControlNet residuals"):
        pipe.txt2img(PROMPT, steps=2, width=W, height=H, controls=controls((0,), (1.0,)))
    pipe.txt2img(PROMPT, steps=2, width=W, height=H)


def test_the_embedded_models_training_script_runs(tmp_path):
    """train_controlnet.py: its data (renders, captions, masks or outlines) and two steps of training give a
    ControlNet that fits the embedded model's UNet and changes its output."""
    import diffusers

    from edgediff.export.controlnet import check_fits
    from edgediff.models import default_model_source

    from .conftest import load_script

    script = load_script("models/shapes/training/train_controlnet.py")
    images, captions, controls = script.training_set(6, seed=0)
    assert images.shape == (6, 128, 128, 3) and len(captions) == 6 and controls.shape == (6, 128, 128, 3)
    assert set(np.unique(controls)) <= {0, 255} and all(c.any() for c in controls)
    controlnet, steps, _ = script.train(steps=2, batch=2, lr=1e-4, images=8, device="cpu", seed=0, max_minutes=None)
    assert steps == 2
    unet = diffusers.UNet2DConditionModel.from_pretrained(default_model_source(), subfolder="unet")
    check_fits(controlnet, unet, 8, "trained")
    zero_convs = [p for b in controlnet.controlnet_down_blocks for p in b.parameters()]
    assert any(float(p.abs().max()) > 0 for p in zero_convs)  # the zero convolutions moved: it is trained


def test_cfg_cutoff_with_controlnets_matches_diffusers(sd1):
    """The CFG cut-off with two ControlNets: their control images follow the guidance to the conditional half
    (``Guidance.rows``), as the UNet's inputs do. diffusers' SDCFGCutoffCallback halves only the prompt embeddings
    (the ControlNet then fails on the doubled control image), so the reference's callback also halves the control
    image, which the pipeline lets a callback replace."""
    from diffusers.callbacks import SDCFGCutoffCallback

    class ControlCutoff(SDCFGCutoffCallback):
        tensor_inputs = ["prompt_embeds", "image"]

        def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
            if step_index == int(pipeline.num_timesteps * self.config.cutoff_step_ratio):
                images = callback_kwargs["image"]
                callback_kwargs["image"] = [i[len(i) // 2:] for i in images] if isinstance(images, list) else \
                    images[len(images) // 2:]
            return super().callback_fn(pipeline, step_index, timestep, callback_kwargs)

    src, nets, artifact = sd1
    which, scales, start, end = CASES["two"]
    callback = ControlCutoff(cutoff_step_ratio=0.5)
    expected = reference("txt2img", src, nets, which, scales, start, end, scheduler="euler",
                         callback_on_step_end=callback, callback_on_step_end_tensor_inputs=callback.tensor_inputs)
    pipe = Pipeline.load(artifact, backend="onnxruntime", device="cpu", cache=False)
    kw = dict(steps=STEPS, guidance=7.5, seed=SEED, width=W, height=H, rng="torch", scheduler="euler",
              controls=controls(which, scales, start, end))
    ours = np.asarray(pipe.txt2img(PROMPT, NEGATIVE, cfg_until=0.5, **kw)[0])
    full = np.asarray(pipe.txt2img(PROMPT, NEGATIVE, **kw)[0])
    assert psnr(ours, expected) >= MIN_DB
    assert psnr(full, expected) < psnr(ours, expected) - 10  # the cut-off is what matches
