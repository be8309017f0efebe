"""The tiny VAE (TAESD, diffusers' AutoencoderTiny): export with its gate, parity vs diffusers, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")  # diffusers is the reference
diffusers = pytest.importorskip("diffusers")

from edgediff.runtime import ArtifactError, Pipeline  # noqa: E402
from edgediff.runtime.metrics import psnr  # noqa: E402

from .conftest import run_cli  # noqa: E402
from .test_img2img_inpaint import photo  # noqa: E402

PROMPT, NEGATIVE, STEPS, SEED, W, H = "a red circle on a blue background", "blurry", 6, 3, 64, 48


@pytest.fixture(scope="module")
def taesd(tiny_sd1, tmp_path_factory):
    """(diffusers folder, AutoencoderTiny folder, artifact with the tiny VAE kept by --force-tiny-vae)."""
    from edgediff.export.recipes import tiny_vae_config
    from edgediff.export.tiny_vae import build_random_tiny_vae

    src, _ = tiny_sd1
    root = tmp_path_factory.mktemp("taesd")
    tiny = build_random_tiny_vae(root / "taesd", 0, **tiny_vae_config("tiny-sd1"))
    r = run_cli("export", str(src), str(root / "artifact"), "--tiny-vae", str(tiny), "--force-tiny-vae")
    assert r.exit_code == 0, r.output
    return src, tiny, root / "artifact"


def reference(kind: str, src, tiny, **kw) -> np.ndarray:
    cls = {"txt2img": diffusers.StableDiffusionPipeline, "img2img": diffusers.StableDiffusionImg2ImgPipeline}[kind]
    pipe = cls.from_pretrained(str(src), vae=diffusers.AutoencoderTiny.from_pretrained(str(tiny)), safety_checker=None,
                               requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=7.5,
               generator=torch.Generator().manual_seed(SEED), output_type="np", **kw).images[0]
    return (out * 255).round().astype(np.uint8)


def test_export_records_the_tiny_variants(taesd):
    _, _, artifact = taesd
    manifest = json.loads((artifact / "manifest.json").read_text())
    for name, output in (("vae_decoder", "sample"), ("vae_encoder", "latents")):
        tiny = manifest["components"][name]["variants"]["tiny"]
        assert tiny["file"] == f"{name}/model.tiny.onnx" and (artifact / tiny["file"]).is_file()
        assert tiny["scaling_factor"] == 1.0 and tiny["shift_factor"] == 0.0  # TAESD works on the scaled latents
        assert tiny["outputs"][0]["name"] == output
        assert tiny["quality"]["parity_vs_torch"]["max_rel_err"] < 1e-4
        gate = tiny["quality"]["gate"]
        assert gate["passed"] is False and gate["forced"] is True  # random weights: far below the gate, kept by force
        assert tiny["quality"]["psnr_db"] < 20
    # the full VAE is untouched beside it
    assert manifest["components"]["vae_decoder"]["variants"]["fp32"]["file"] == "vae_decoder/model.onnx"


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_txt2img_with_the_tiny_vae_matches_diffusers(taesd, backend, parity_log):
    src, tiny, artifact = taesd
    pipe = Pipeline.load(artifact, backend=backend, device="cpu", vae="tiny", ov_precision="f32")
    assert pipe.describe()["vae_decoder"]["precision"] == "tiny"
    result = pipe.txt2img(PROMPT, NEGATIVE, steps=STEPS, guidance=7.5, seed=SEED, width=W, height=H, rng="torch")
    score = psnr(np.asarray(result[0]), reference("txt2img", src, tiny, width=W, height=H))
    parity_log(("sd1 tiny vae", backend, "txt2img", score))
    assert score >= 40
    assert "VAE: tiny" in result.parameters(0)
    # and it is another decoder: the full VAE draws another image from the same latents
    full = Pipeline.load(artifact, backend=backend, device="cpu", ov_precision="f32")
    (other,) = full.txt2img(PROMPT, NEGATIVE, steps=STEPS, guidance=7.5, seed=SEED, width=W, height=H, rng="torch")
    assert psnr(np.asarray(other), np.asarray(result[0])) < 30


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_img2img_with_the_tiny_encoder_matches_diffusers(taesd, backend, parity_log):
    src, tiny, artifact = taesd
    pipe = Pipeline.load(artifact, backend=backend, device="cpu", vae="tiny", ov_precision="f32")
    (ours,) = pipe.img2img(PROMPT, photo(), NEGATIVE, strength=0.6, steps=STEPS, guidance=7.5, seed=SEED, rng="torch")
    # diffusers' AutoencoderTiny encodes without sampling: the noise is the first draw, as ours
    score = psnr(np.asarray(ours), reference("img2img", src, tiny, image=photo(), strength=0.6))
    parity_log(("sd1 tiny vae", backend, "img2img", score))
    assert score >= 40


def test_encode_decode_speak_the_denoisers_latents(taesd):
    """Pipeline.encode/decode work in the denoiser's (scaled) units whichever VAE is loaded."""
    _, tiny, artifact = taesd
    image = (np.asarray(photo(), np.float32).transpose(2, 0, 1)[None] / 127.5 - 1).astype(np.float32)
    pipe = Pipeline.load(artifact, backend="onnxruntime", device="cpu", vae="tiny")
    vae = diffusers.AutoencoderTiny.from_pretrained(str(tiny)).eval()
    with torch.no_grad():
        want = vae.encode(torch.from_numpy(image)).latents.numpy()
        decoded = vae.decode(torch.from_numpy(want)).sample.numpy()
    np.testing.assert_allclose(pipe.encode(image), want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(pipe.decode(want), decoded, rtol=1e-4, atol=1e-4)


def test_the_gate_refuses_a_tiny_vae_that_draws_other_images(tiny_sd1, taesd, tmp_path):
    src, _ = tiny_sd1
    _, tiny, _ = taesd
    out = tmp_path / "artifact"
    r = run_cli("export", str(src), str(out), "--tiny-vae", str(tiny))
    assert r.exit_code == 2
    assert "without the tiny VAE" in r.output and "PSNR" in r.output and "--force-tiny-vae" in r.output
    manifest = json.loads((out / "manifest.json").read_text())  # the artifact itself was written
    assert all("tiny" not in c["variants"] for c in manifest["components"].values())
    assert not list(out.glob("vae_*/model.tiny.onnx*"))  # nothing of the refused graphs is left
    with pytest.raises(ArtifactError, match="no tiny VAE.*--tiny-vae"):
        Pipeline.load(out, backend="onnxruntime", device="cpu", vae="tiny")


def test_bad_tiny_vae_arguments(tiny_sd1, tmp_path):
    src, artifact = tiny_sd1
    (tmp_path / "notaesd").mkdir()
    (tmp_path / "notaesd" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    cases = [
        (["--tiny-vae", "random"], "goes with --random-weights"),
        (["--tiny-vae", str(tmp_path / "missing")], "not a hub id"),
        (["--tiny-vae", str(tmp_path / "notaesd")], "not an AutoencoderTiny"),
        (["--tiny-vae", str(artifact / "manifest.json")], "is a file"),
    ]
    for args, words in cases:
        r = run_cli("export", str(src), str(tmp_path / "out"), *args)
        assert r.exit_code == 2 and words in r.output, (args, r.output)
    r = run_cli("generate", "a red circle", "--model", str(artifact), "--vae", "huge", "-o", str(tmp_path / "x.png"))
    assert r.exit_code == 2 and "unknown vae 'huge'; valid: full, tiny" in r.output
    r = run_cli("generate", "a red circle", "--model", str(artifact), "--vae", "tiny", "-o", str(tmp_path / "x.png"))
    assert r.exit_code == 2 and "has no tiny VAE" in r.output
    assert not (tmp_path / "x.png").exists()
