"""The embedded model's shipped ControlNet ("mask"): the shape goes where the mask or the outline says.
Torch-free: the shipped artifact, held-out scenes and masks (``evaluate.control_cases``)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from edgediff.models.shapes import evaluate
from edgediff.runtime import Control, Pipeline
from edgediff.runtime.canny import canny

from .conftest import run_cli

pytestmark = pytest.mark.fast
CASES = 8


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.load(backend="onnxruntime", device="cpu", cache=False)


def mask_image(mask: np.ndarray) -> Image.Image:
    return Image.fromarray(mask.astype(np.uint8) * 255).convert("RGB")


def test_the_drawn_shape_follows_the_mask(pipe):
    assert [c.control for c in pipe.manifest.controlnets] == ["mask"]
    rows = {"without": [], "mask": [], "outline": []}
    for scene, mask in evaluate.control_cases(CASES):
        controls = {"without": [], "mask": [Control("mask", mask_image(mask))],
                    "outline": [Control("mask", mask_image(mask), preprocess="canny")]}
        for label, c in controls.items():
            image = np.asarray(pipe.txt2img(scene.plain_prompt(), seed=0, controls=c)[0])
            rows[label].append((evaluate.iou(evaluate.foreground(image), mask),
                                evaluate.classify(image).color == scene.color))
    iou = {k: float(np.mean([r[0] for r in v])) for k, v in rows.items()}
    # the shipped figures on 64 scenes x 2 seeds: 0.35 without, 0.85 with a mask, 0.84 with an outline
    assert iou["mask"] >= 0.75 and iou["outline"] >= 0.75, iou
    assert iou["without"] <= 0.5, iou
    colours = {k: np.mean([r[1] for r in v]) for k, v in rows.items()}
    assert colours["mask"] >= colours["without"] - 1 / CASES, colours  # the prompt still decides the colour


def test_cli_control_from_a_file(tmp_path):
    scene, mask = evaluate.control_cases(1, seed=7)[0]
    drawing = tmp_path / "drawing.png"
    canvas = Image.new("RGB", (128, 128), (245, 245, 245))
    canvas.paste((15, 15, 15), mask=Image.fromarray(mask.astype(np.uint8) * 255))
    canvas.save(drawing)  # a black shape on white: canny finds its outline
    out = tmp_path / "out.png"
    r = run_cli("generate", scene.plain_prompt(), "--backend", "onnxruntime", "--no-cache", "-o", str(out),
                "--control", f"mask={drawing}", "--preprocess", "mask=canny")
    assert r.exit_code == 0, r.output
    drawn = np.asarray(Image.open(out).convert("RGB"))
    assert evaluate.iou(evaluate.foreground(drawn), mask) >= 0.6
    assert "ControlNet 0: Model: mask, Module: canny" in Image.open(out).text["parameters"]
    assert np.asarray(canny(canvas)).any()


@pytest.mark.parametrize("shape", [["batch", 32, "height"], ["batch", 32, "height/3", "width/3"],
                                   ["batch", 32, "height/2", "width/4"], ["batch", "c", "height/2", "width/2"]])
def test_a_residual_input_of_another_shape_is_refused_at_load(embedded_copy, shape):
    """The residuals' shapes are what the runtime builds zeros from: a manifest saying otherwise does not load."""
    import json

    from edgediff.runtime import load_manifest
    from edgediff.runtime.manifest import ArtifactError

    path = embedded_copy / "manifest.json"
    d = json.loads(path.read_text())
    residual = next(t for t in d["components"]["unet"]["variants"]["fp32"]["inputs"]
                    if t["name"] == "down_block_residual_0")
    residual["shape"] = shape
    path.write_text(json.dumps(d))
    with pytest.raises(ArtifactError, match=r"a ControlNet residual's shape must be \[batch, channels"):
        load_manifest(embedded_copy)
