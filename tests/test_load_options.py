"""LoadOptions: how a pipeline is opened, as one frozen, checked value that the CLI, the API and a server share."""

from __future__ import annotations

import dataclasses
import json

import pytest

from edgediff.runtime import LoadOptions, Pipeline

from .conftest import run_cli

pytestmark = pytest.mark.fast


def test_frozen_and_its_collections_too():
    options = LoadOptions(device={"unet": "cpu"}, loras=["a.safetensors"], precision={"unet": "fp32"})
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.backend = "openvino"
    with pytest.raises(TypeError):
        options.device["unet"] = "gpu"  # a read-only mapping: a shared options object cannot change under a pipe
    assert options.loras == ("a.safetensors",)
    assert LoadOptions(loras=["x"]) == LoadOptions(loras=("x",))  # lists and tuples are the same options
    assert json.loads(json.dumps(options.record()))["device"] == {"unet": "cpu"}


@pytest.mark.parametrize("field, value, message", [
    ("max_batch", 0, "max_batch must be a positive integer"),
    ("max_pixels", True, "max_pixels must be a positive integer"),
    ("threads", -2, "threads must be a positive integer"),
    ("low_memory", "yes", "low_memory must be True or False"),
    ("vae_tiling", "sometimes", "unknown vae_tiling 'sometimes'; valid: auto, on, off"),
    ("dml_adapter", -1, "dml_adapter must be a GPU index"),
    ("static_shapes", "on", "static_shapes must be True, False or None"),
    ("loras", "one.safetensors", "loras must be a list of files"),
])
def test_bad_values_are_refused_before_anything_is_read(field, value, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        LoadOptions(**{field: value})
    with pytest.raises(ValueError, match=message):  # load's keyword arguments go through the same checks
        Pipeline.load(tmp_path / "not-an-artifact", **{field: value})


def test_open_and_load_give_the_same_pipeline():
    options = LoadOptions(backend="onnxruntime", device="cpu", max_batch=2, vae_tiling="off", cache=False)
    opened = Pipeline.open(None, options)
    loaded = Pipeline.load(None, **options.kwargs())
    assert opened.load_options == loaded.load_options == options
    assert (opened.backend, opened.max_batch, opened.tiling) == ("onnxruntime", 2, "off")
    what = lambda pipe: {c: (d["precision"], d["backend"], d["device"]) for c, d in pipe.describe().items()}  # noqa
    assert what(opened) == what(loaded)
    a = opened.txt2img("a red circle on a blue background", steps=2, seed=1)[0]
    b = loaded.txt2img("a red circle on a blue background", steps=2, seed=1)[0]
    assert a.tobytes() == b.tobytes()
    from edgediff.models import default_model_path

    lora = str(default_model_path().parent / "loras" / "diamond.safetensors")
    opened.set_loras([lora])  # the options it reports follow its LoRAs
    assert opened.load_options.loras == (lora,) and opened.load_options.max_batch == 2
    with pytest.raises(ValueError, match="options must be a LoadOptions"):
        Pipeline.open(None, {"backend": "onnxruntime"})


def test_cli_refuses_a_bad_option_with_a_message(tmp_path):
    r = run_cli("generate", "a red circle", "--threads", "0", "-o", str(tmp_path / "x.png"))
    assert r.exit_code == 2 and "threads must be a positive integer, got 0" in r.output
    assert not (tmp_path / "x.png").exists()
