"""The shapes dataset and its evaluation helpers (no trained model needed)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from edgediff.models.shapes import dataset, evaluate
from edgediff.runtime import Manifest

pytestmark = pytest.mark.fast



def test_classifier_reads_every_drawn_scene():
    rng = np.random.default_rng(123)
    scenes = dataset.all_scenes()
    assert len(scenes) == 8 * 4 * 2 * 7
    for scene in scenes[::3]:
        reading = evaluate.classify(np.asarray(dataset.draw(scene, rng)))
        assert all(evaluate.score(reading, scene).values()), (scene, reading)


def test_classifier_rejects_wrong_answers():
    rng = np.random.default_rng(0)
    scene = dataset.Scene("red", "star", "large", "blue")
    reading = evaluate.classify(np.asarray(dataset.draw(scene, rng)))
    wrong = dataset.Scene("green", "circle", "small", "white")
    assert not any(evaluate.score(reading, wrong).values())


def test_blank_image_has_no_object():
    reading = evaluate.classify(np.full((128, 128, 3), 200, np.uint8))
    assert reading.shape is None and reading.color is None


def test_noise_does_not_fool_the_shape_reader():
    """A blurred, noisy rendering (what a diffusion model draws) still reads right."""
    from PIL import ImageFilter

    rng = np.random.default_rng(1)
    for scene in [dataset.Scene(c, s, z, "black") for c, s, z in
                  [("red", "circle", "large"), ("yellow", "triangle", "large"), ("white", "star", "large"),
                   ("green", "square", "small"), ("orange", "star", "small")]]:
        img = dataset.draw(scene, rng).filter(ImageFilter.GaussianBlur(1.2))
        noisy = np.clip(np.asarray(img).astype(np.int16) + rng.integers(-20, 21, (128, 128, 3)), 0, 255).astype(np.uint8)
        assert all(evaluate.score(evaluate.classify(noisy), scene).values()), scene


def test_training_data_excludes_held_out_pairs_and_is_seeded():
    a_imgs, a_caps, a_scenes = dataset.sample(np.random.default_rng(7), 300)
    b_imgs, b_caps, _ = dataset.sample(np.random.default_rng(7), 300)
    assert np.array_equal(a_imgs, b_imgs) and a_caps == b_caps
    assert not any((s.color, s.shape) in dataset.HELD_OUT for s in a_scenes)
    assert a_imgs.shape == (300, 128, 128, 3)
    assert len(set(a_caps)) > 250  # templates and synonyms: not one fixed sentence
    for cap, s in zip(a_caps, a_scenes):
        assert s.color in cap and s.background in cap


def test_prompt_set_and_summary():
    held = evaluate.prompt_set(held_out=True)
    assert held and all((s.color, s.shape) in dataset.HELD_OUT for s in held)
    assert evaluate.prompt_set(20) == evaluate.prompt_set(20)
    rows = [{"held_out": False, "color": True, "background": True, "shape": False, "size": True},
            {"held_out": True, "color": False, "background": True, "shape": True, "size": True}]
    s = evaluate.summarize(rows)
    assert s["all"] == {"n": 2, "color": 0.5, "background": 1.0, "shape": 0.5, "size": 1.0}
    assert s["seen"]["shape"] == 0.0 and s["held_out"]["color"] == 0.0


@pytest.mark.parametrize("shape", dataset.SHAPES)
def test_plain_prompt_form(shape):
    assert dataset.Scene("red", shape, "small", "blue").plain_prompt() == f"a small red {shape} on a blue background"
    assert dataset.Scene("red", shape, "small", "blue").plain_prompt(False) == f"a red {shape} on a blue background"


def test_plain_scenes_are_the_distinct_plain_prompts():
    scenes = evaluate.plain_scenes()
    prompts = [sc.plain_prompt(with_size=False) for sc in scenes]
    assert len(prompts) == len(set(prompts)) == 8 * 4 * 7
    assert "a red circle on a blue background" in prompts
    held = evaluate.plain_scenes(held_out=True)
    assert len(held) == 5 * 7 and all((sc.color, sc.shape) in dataset.HELD_OUT for sc in held)


class _DrawingPipe:
    """Stands in for a model: draws the asked scene exactly (so every attribute must score 1.0)."""

    def __init__(self):
        self.calls = []
        # the real resolution of Manifest.settings, over a model that recommends 20 steps / guidance 4
        recommends = SimpleNamespace(defaults={"steps": 20, "guidance": 4.0})
        self.manifest = SimpleNamespace(settings=lambda steps=None, guidance=None: Manifest.settings(recommends, steps, guidance))

    def txt2img(self, prompt, **kw):
        self.calls.append((prompt, kw))
        for scene in dataset.all_scenes():
            if prompt in (scene.plain_prompt(), scene.plain_prompt(with_size=False)):
                return [dataset.draw(scene, np.random.default_rng(kw["seed"]))]
        raise AssertionError(prompt)


def test_report_covers_both_prompt_forms_with_the_models_settings():
    pipe = _DrawingPipe()
    report = evaluate.report(pipe, seeds=2, scenes=6)
    assert report["with_size"]["all"] == {"n": 12, "color": 1.0, "background": 1.0, "shape": 1.0, "size": 1.0}
    assert report["plain_form"]["all"]["n"] == 6 and "size" not in report["plain_form"]["all"]
    assert report["with_size"]["settings"] == {"steps": 20, "guidance": 4.0, "scheduler": None, "seeds": [0, 1]}
    assert "rows" not in report["with_size"] and report["seconds"] >= 0
    assert {kw["guidance"] for _, kw in pipe.calls} == {4.0}  # the model's recommended guidance was used
