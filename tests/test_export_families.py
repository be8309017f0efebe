"""Export detects a checkpoint's family and refuses what it does not run: no stand-in scheduler, no assumed
prediction type, no DiT read as Stable Diffusion (export/families/)."""

from __future__ import annotations

import json
import shutil

import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")

from edgediff.export import ExportError  # noqa: E402
from edgediff.export.families import detect, prediction_type, scheduler_name, sd, sdxl  # noqa: E402
from edgediff.runtime import load_manifest  # noqa: E402

from .conftest import run_cli  # noqa: E402


def _pipeline_named(name: str):
    return type(name, (), {})()


def test_a_dit_checkpoint_is_refused_by_its_family_name():
    with pytest.raises(ExportError, match=r"src is a FLUX.1 checkpoint, which edgediff does not export yet; edgediff "
                                          r"exports Sana \(SanaPipeline, SanaSprintPipeline, SanaSprintImg2ImgPipeline\); Stable Diffusion 3 "
                                          r"\(StableDiffusion3Pipeline.*; Stable Diffusion XL \(StableDiffusionXLPipeline"):
        detect(_pipeline_named("FluxPipeline"), "src")
    with pytest.raises(ExportError, match="src is a KandinskyPipeline checkpoint; edgediff exports"):
        detect(_pipeline_named("KandinskyPipeline"), "src")


@pytest.mark.parametrize("cls,expected", [("EulerDiscreteScheduler", "euler"), ("PNDMScheduler", "pndm"),
                                          ("DPMSolverMultistepScheduler", "dpmpp_2m"), ("DDPMScheduler", "euler")])
def test_the_checkpoints_scheduler_is_ours_or_a_named_stand_in(cls, expected):
    assert scheduler_name({"_class_name": cls}, "epsilon", sd, "src") == expected


def test_an_unknown_scheduler_class_is_an_export_error_not_euler():
    with pytest.raises(ExportError, match=r"src's scheduler is FlowMatchEulerDiscreteScheduler, which edgediff does not "
                                          r"run for a Stable Diffusion XL model predicting epsilon; accepted: "
                                          r".*DDPMScheduler.*EulerDiscreteScheduler"):
        scheduler_name({"_class_name": "FlowMatchEulerDiscreteScheduler"}, "epsilon", sdxl, "src")
    with pytest.raises(ExportError, match="src's scheduler is KDPM2DiscreteScheduler"):  # no port of it
        scheduler_name({"_class_name": "KDPM2DiscreteScheduler"}, "v_prediction", sd, "src")


@pytest.mark.parametrize("config", [{}, {"prediction_type": "sample"}, {"prediction_type": "flow_prediction"}])
def test_a_prediction_type_the_family_lacks_is_an_export_error(config):
    with pytest.raises(ExportError, match="a Stable Diffusion 1.x model predicts epsilon or v_prediction"):
        prediction_type(config, "sd1", "src")


def test_export_refuses_a_flow_scheduler_before_writing_anything(tiny_sd1, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_sd1[0], src)
    config = json.loads((src / "scheduler" / "scheduler_config.json").read_text())
    (src / "scheduler" / "scheduler_config.json").write_text(json.dumps(config | {"_class_name": "FlowMatchEulerDiscreteScheduler"}))
    index = json.loads((src / "model_index.json").read_text())  # the class diffusers loads comes from here
    (src / "model_index.json").write_text(json.dumps(index | {"scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]}))
    r = run_cli("export", str(src), str(tmp_path / "out"))
    assert r.exit_code == 2 and "FlowMatchEulerDiscreteScheduler, which edgediff does not run" in " ".join(r.output.split())
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))


@pytest.mark.parametrize("width,family", [(768, "sd1"), (1024, "sd2"), (32, "sd")])
def test_sd_versions_are_told_by_their_text_width(width, family):
    from types import SimpleNamespace

    pipe = SimpleNamespace(unet=SimpleNamespace(config=SimpleNamespace(cross_attention_dim=width)))
    assert sd.name(pipe) == family


def test_the_detected_family_is_the_manifests(tiny_sd1, tiny_sdxl):
    assert load_manifest(tiny_sd1[1]).family == "sd"  # the tiny model's text is 32 wide: neither 1.x nor 2.x
    m = load_manifest(tiny_sdxl[1])
    assert m.family == "sdxl" and [t.name for t in m.text_encoders] == ["text_encoder", "text_encoder_2"]
    assert [t.tokenizer for t in m.text_encoders] == ["tokenizer/tokenizer.json", "tokenizer_2/tokenizer.json"]
