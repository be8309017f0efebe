"""A model's recommended steps and guidance: recorded at export, used when the caller names none."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from edgediff.export import recipes
from edgediff.runtime import Pipeline, load_manifest
from edgediff.runtime.manifest import DEFAULT_GUIDANCE, DEFAULT_STEPS

from .conftest import run_cli


@pytest.fixture(scope="module")
def recommended(tiny_sd1, tmp_path_factory):
    out = tmp_path_factory.mktemp("recommended") / "artifact"
    r = run_cli("export", str(tiny_sd1[0]), str(out), "--default-steps", "3", "--default-guidance", "2")
    assert r.exit_code == 0, r.output
    return out


def test_export_records_them(recommended):
    m = load_manifest(recommended)
    assert m.defaults == {"steps": 3, "guidance": 2.0}
    assert m.settings() == (3, 2.0) and m.settings(5, None) == (5, 2.0) and m.settings(None, 0.0) == (3, 0.0)
    assert json.loads((recommended / "manifest.json").read_text())["defaults"] == {"steps": 3, "guidance": 2.0}


def test_an_artifact_without_them_uses_the_global_defaults(tiny_sd1):
    m = load_manifest(tiny_sd1[1])
    assert m.defaults == {} and "defaults" not in json.loads((tiny_sd1[1] / "manifest.json").read_text())
    assert m.settings() == (DEFAULT_STEPS, DEFAULT_GUIDANCE) == (25, 7.5)


def test_pipeline_uses_them_when_not_given(recommended):
    pipe = Pipeline.load(recommended, backend="onnxruntime")
    calls = []
    (implicit,) = pipe.txt2img("a cat", seed=1, scheduler="ddim", callback=lambda done, total: calls.append(total))
    assert calls[-1] == 3  # DDIM: one UNet call per step
    (implicit,) = pipe.txt2img("a cat", seed=1)
    (explicit,) = pipe.txt2img("a cat", seed=1, steps=3, guidance=2.0)
    (other,) = pipe.txt2img("a cat", seed=1, steps=3, guidance=7.5)
    assert np.array_equal(np.asarray(implicit), np.asarray(explicit))
    assert not np.array_equal(np.asarray(implicit), np.asarray(other))  # the guidance default mattered


def test_cli_generate_uses_and_reports_them(recommended, tmp_path):
    out = tmp_path / "x.png"
    r = run_cli("generate", "a cat", "--model", str(recommended), "--output", str(out))
    assert r.exit_code == 0, r.output
    params = Image.open(out).info["parameters"]
    assert "Steps: 3," in params and "CFG scale: 2.0" in params
    r = run_cli("info", str(recommended))
    assert "3 steps, guidance 2" in " ".join(r.output.split())


@pytest.mark.parametrize("args, message", [
    (["--default-steps", "0"], "--default-steps/--default-guidance.steps must be an integer >= 1 (at most 1000), got 0"),
    (["--default-guidance", "-1"], "--default-steps/--default-guidance.guidance must be a finite number >= 0"),
])
def test_bad_values_are_refused_before_exporting(tiny_sd1, tmp_path, args, message):
    out = tmp_path / "artifact"
    r = run_cli("export", str(tiny_sd1[0]), str(out), *args)
    assert r.exit_code == 2
    assert message in " ".join(r.output.split())
    assert not out.exists()


def test_random_weights_recipes_carry_theirs(tmp_path, monkeypatch):
    """sd-turbo records 1 step without guidance, sdxl guidance 5; a flag overrides a recipe's value."""
    assert recipes.RECIPES["sd-turbo"]["defaults"] == {"steps": 1, "guidance": 0.0}
    assert recipes.RECIPES["sdxl"]["defaults"] == {"guidance": 5.0}
    monkeypatch.setitem(recipes.RECIPES["tiny-sd1"], "defaults", {"steps": 1, "guidance": 0.0})
    out = tmp_path / "artifact"
    r = run_cli("export", "--random-weights", "tiny-sd1", str(out), "--default-steps", "2")
    assert r.exit_code == 0, r.output
    assert load_manifest(out).defaults == {"steps": 2, "guidance": 0.0}
