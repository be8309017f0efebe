"""The LoRA shipped for the embedded model teaches it "diamond", a shape its training never had: with the LoRA
the model draws diamonds, without it not. The full evaluation (every diamond scene, and the base vocabulary
with and without the LoRA) is models/shapes/loras/diamond.json, made by train_lora.py."""

from __future__ import annotations

import numpy as np
import pytest

from edgediff.models import shapes_lora
from edgediff.models.shapes import dataset, evaluate
from edgediff.runtime import Pipeline

pytestmark = pytest.mark.fast

SCENES = [dataset.Scene(color, "diamond", "large", background) for color, background in
          (("red", "blue"), ("yellow", "black"), ("white", "green"), ("blue", "white"))]


def _diamond_share(pipe) -> float:
    readings = [evaluate.classify(np.asarray(pipe.txt2img(sc.plain_prompt(), seed=0)[0]), ("diamond",))
                for sc in SCENES]
    return sum(r.shape == "diamond" for r in readings) / len(readings)


def test_diamond_lora_teaches_a_new_shape():
    base = Pipeline.load(backend="onnxruntime", device="cpu", cache=False)
    taught = Pipeline.load(backend="onnxruntime", device="cpu", cache=False, loras=[shapes_lora("diamond")])
    assert _diamond_share(base) <= 0.25
    assert _diamond_share(taught) >= 0.75


def test_the_classifier_tells_diamonds_from_triangles():
    rng = np.random.default_rng(0)
    for shape in ("diamond", "triangle"):
        for scene in [dataset.Scene("red", shape, size, "blue") for size in dataset.SIZES] * 3:
            assert evaluate.classify(np.asarray(dataset.draw(scene, rng)), ("diamond",)).shape == shape
    triangle = np.asarray(dataset.draw(dataset.Scene("red", "triangle", "large", "blue"), rng))
    assert evaluate.classify(triangle).shape == "triangle"  # the base reading is unchanged


def test_unknown_shipped_lora_is_named():
    with pytest.raises(ValueError, match="no shipped LoRA 'teal'; shipped: diamond"):
        shapes_lora("teal")
