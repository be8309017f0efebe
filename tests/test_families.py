"""The manifest's family selects the conditioner and the image-to-image start rule (runtime/families/)."""

from __future__ import annotations

import json

import pytest

from edgediff.runtime import ArtifactError, Pipeline
from edgediff.runtime.families import FAMILIES, family_of, sd_start_index
from edgediff.runtime.manifest import load_manifest

pytestmark = pytest.mark.fast


def _edit(root, change):
    d = json.loads((root / "manifest.json").read_text())
    change(d)
    (root / "manifest.json").write_text(json.dumps(d))


def test_the_embedded_model_is_an_sd_family_with_one_clip_conditioner(embedded_copy):
    family = family_of(load_manifest(embedded_copy))
    assert family is FAMILIES["sd"]
    pipe = Pipeline.load(embedded_copy, backend="onnxruntime")
    assert pipe.family is family and type(pipe.conditioning).__name__ == "TextConditioning"
    assert pipe.conditioning.components == ("text_encoder",)


def test_an_unknown_family_is_refused_naming_the_known_ones(embedded_copy):
    _edit(embedded_copy, lambda d: d.update(family="flux9"))
    with pytest.raises(ArtifactError, match=r"family 'flux9' is not one this edgediff runs; accepted: sd1, sd2, sd, sdxl"):
        Pipeline.load(embedded_copy, backend="onnxruntime")


def test_a_family_is_not_guessed_from_its_text_encoders(embedded_copy):
    # one text encoder declared SDXL: before, the encoder count picked SD's conditioner and it ran
    _edit(embedded_copy, lambda d: d.update(family="sdxl"))
    with pytest.raises(ArtifactError, match="Stable Diffusion XL model has 2 text encoder"):
        Pipeline.load(embedded_copy, backend="onnxruntime")


def test_every_family_accepts_its_manifests_prediction_types_only(embedded_copy):
    manifest = load_manifest(embedded_copy)
    manifest.prediction_type = "flow"  # what a flow-matching DiT predicts: no SD family runs it
    with pytest.raises(ArtifactError, match="predicts epsilon or v_prediction, not 'flow'"):
        family_of(manifest)


@pytest.mark.parametrize("steps,strength,order,expected", [(10, 0.6, 1, 4), (10, 1.0, 1, 0), (10, 0.01, 1, 9),
                                                           (10, 0.5, 2, 10), (4, 0.3, 1, 3)])
def test_sd_start_index_is_diffusers_get_timesteps(steps, strength, order, expected):
    # diffusers: init_timestep = min(int(steps * strength), steps); t_start = max(steps - init_timestep, 0) * order;
    # edgediff runs at least one step where diffusers' would run none
    assert sd_start_index(steps, strength, order) == expected


def test_a_flow_scheduler_on_an_sd_model_is_refused_when_settings_resolve(embedded_copy):
    # flow_euler exists for the DiTs; on a v-prediction UNet it would draw noise without a word
    pipe = Pipeline.load(embedded_copy, backend="onnxruntime")
    with pytest.raises(ValueError, match=r"the flow_euler scheduler cannot sample a model predicting 'v_prediction' "
                                         r"\(it takes flow\); valid for this model: ddim, pndm"):
        pipe.txt2img("a red circle", steps=2, scheduler="flow_euler")
    assert len(pipe.txt2img("a red circle", steps=2, scheduler="ddim").images) == 1


def test_a_manifest_whose_default_scheduler_cannot_sample_its_model_is_refused(embedded_copy):
    _edit(embedded_copy, lambda d: d["scheduler"].update(default="scm"))
    with pytest.raises(ArtifactError, match="default: the scm scheduler cannot sample a model predicting 'v_prediction'"):
        Pipeline.load(embedded_copy, backend="onnxruntime")
