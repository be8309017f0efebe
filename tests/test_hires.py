"""Hires fix (``generate --hires 2 --hires-strength 0.5``, ``pipe.hires_fix``): drawn at the model's size,
enlarged, redrawn at the larger size with img2img; recorded in the PNG. Torch-free, on the embedded model."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from edgediff.runtime import Pipeline
from edgediff.runtime.metrics import psnr
from edgediff.runtime.upscale import lanczos

from .conftest import run_cli

pytestmark = pytest.mark.fast
PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.load(backend="onnxruntime", device="cpu")


def test_hires_redraws_the_enlarged_image(pipe):
    first = pipe.txt2img([PROMPT, "a small green star"], steps=6, seed=4)
    result = pipe.hires_fix(first, 2, 0.5)
    assert [im.size for im in result] == [(256, 256), (256, 256)] and result.seeds == first.seeds
    assert result.task == "txt2img+hires" and len(result.timings.stages["unet"]) == 2 * 3  # 6 steps x 0.5, each
    for k in range(2):
        enlarged = np.asarray(lanczos(first[k], 2))
        redrawn = np.asarray(result[k])
        assert 15 < psnr(redrawn, enlarged) < 60  # redrawn, not just resized, and still the same picture
        assert "Hires upscale: 2, Hires upscaler: Lanczos" in result.parameters(k)
        assert "Denoising strength: 0.5" in result.parameters(k)
    again = pipe.hires_fix(pipe.txt2img([PROMPT, "a small green star"], steps=6, seed=4), 2, 0.5)
    assert np.array_equal(np.asarray(again[1]), np.asarray(result[1]))  # seeded: the same image again
    with pytest.raises(ValueError, match=r"the hires scale must be a number in \(1, 4\]"):
        pipe.hires_fix(first, 8)


def test_generate_hires_writes_the_large_png(tmp_path):
    out = tmp_path / "big.png"
    r = run_cli("generate", PROMPT, "--steps", "4", "--hires", "1.5", "--hires-strength", "0.4", "-o", str(out))
    assert r.exit_code == 0, r.output
    with Image.open(out) as image:
        assert image.size == (192, 192) and "Hires upscale: 1.5" in image.text["parameters"]
    r = run_cli("generate", PROMPT, "--hires-strength", "0.4", "-o", str(tmp_path / "x.png"))
    assert r.exit_code == 2 and "go with --hires SCALE" in r.output
    Image.new("RGB", (128, 128)).save(tmp_path / "in.png")
    r = run_cli("generate", PROMPT, "--hires", "2", "--image", str(tmp_path / "in.png"), "-o", str(tmp_path / "y.png"))
    assert r.exit_code == 2 and "--hires redraws a txt2img image" in r.output


def test_the_shipped_upscaler_beats_lanczos_on_fresh_renders():
    from edgediff.models import shapes_upscaler
    from edgediff.models.shapes import dataset
    from edgediff.runtime.upscale import Upscaler

    up = Upscaler.load(shapes_upscaler(), backend="onnxruntime", device="cpu")
    assert (up.architecture, up.scale) == ("SRVGGNetCompact", 2)
    rng = np.random.default_rng(20_000)  # not the training (0) or evaluation (10,000) seeds
    high, _, _ = dataset.sample(rng, 24)
    trained, plain = [], []
    for image in high:
        low = Image.fromarray(dataset.low_resolution(image, rng))
        trained.append(psnr(np.asarray(up.upscale(low)), image))
        plain.append(psnr(np.asarray(lanczos(low, 2)), image))
    print(f"x2 on fresh renders: upscaler {np.mean(trained):.2f} dB, Lanczos {np.mean(plain):.2f} dB")
    assert np.mean(trained) >= np.mean(plain) + 0.5
