"""The open manifest (format version 2): components by role, version 1 still read, one atomic save."""

from __future__ import annotations

import json

import pytest

from edgediff.runtime import ArtifactError, Pipeline, load_manifest
from edgediff.runtime.manifest import ROLES, disk_bytes

pytestmark = pytest.mark.fast


def v2(root):
    """Save the (version-1) embedded manifest as version 2, as any write does, and return its JSON."""
    load_manifest(root).save(root)
    return json.loads((root / "manifest.json").read_text())


def as_version_1(root):
    """Rewrite ``root``'s manifest as version 1 wrote it: closed component names, the text encoder's sizes in
    ``text``, ``unet_in_channels``, no roles (and none of what came after: DeepCache, tiny VAE, fast profile)."""
    d = json.loads((root / "manifest.json").read_text())
    text = d["components"]["text_encoder"]
    d.update(format_version=1, text={k: text[k] for k in ("max_length", "hidden_size", "pad_token_id")},
             unet_in_channels=d["components"]["unet"]["in_channels"])
    d.pop("fast_profile", None)
    d["components"] = {name: {"variants": {"fp32": c["variants"]["fp32"]}} for name, c in d["components"].items()
                       if name in ("text_encoder", "unet", "vae_decoder", "vae_encoder")}
    (root / "manifest.json").write_text(json.dumps(d))


def test_version_1_reads_into_roles_and_saves_as_version_2(embedded_copy):
    as_version_1(embedded_copy)
    old = load_manifest(embedded_copy)
    assert old.format_version == 1  # artifacts written before roles still load
    d = v2(embedded_copy)
    assert d["format_version"] == 2 and "text" not in d and "unet_in_channels" not in d
    assert d["components"]["unet"] | {"variants": None} == {"role": "denoiser", "kind": "unet", "in_channels": 4,
                                                            "variants": None}
    assert d["components"]["text_encoder"]["tokenizer"] == "tokenizer/tokenizer.json"
    new = load_manifest(embedded_copy)
    assert (new.text_encoders, new.denoiser, new.roles, new.components) == \
        (old.text_encoders, old.denoiser, old.roles, old.components)
    (a,) = Pipeline.load(embedded_copy, backend="onnxruntime").txt2img("a red circle", steps=2, seed=1)
    (b,) = Pipeline.load(backend="onnxruntime").txt2img("a red circle", steps=2, seed=1)
    assert a.tobytes() == b.tobytes()
    assert not list(embedded_copy.glob(".manifest.json.*"))  # the atomic save leaves no temporary file


def _write(root, d):
    (root / "manifest.json").write_text(json.dumps(d))


@pytest.mark.parametrize("change, message", [
    (lambda c: c["vae_decoder"].update(role="upscaler"), "has the role 'upscaler', which this edgediff does not know; "
     f"accepted: {', '.join(ROLES)}"),
    (lambda c: c["unet"].update(kind="dit"), "is a 'dit' denoiser; this edgediff runs: unet, transformer"),
    (lambda c: c["text_encoder"].update(kind="gemma9"), "is a 'gemma9' text encoder; this edgediff runs: clip, t5"),
    (lambda c: c["text_encoder"].update(kind=3), "'kind' must be str"),
    (lambda c: c["unet"].update(role="text_encoder"), "lacks the required key 'tokenizer'"),
    (lambda c: c.pop("vae_decoder"), "one vae_decoder"),
    (lambda c: c["text_encoder"].pop("role"), "components.text_encoder lacks the required key 'role'"),
    (lambda c: c["unet"].update(in_channels=5), "the denoiser's input channels must be latent_channels"),
    (lambda c: c["text_encoder"].update(max_length=10**9), "'max_length' must be in \\[3, 4096\\]"),
])
def test_roles_are_checked(embedded_copy, change, message):
    d = v2(embedded_copy)
    change(d["components"])
    _write(embedded_copy, d)
    with pytest.raises(ArtifactError, match=message):
        load_manifest(embedded_copy)


def test_a_renamed_vae_is_refused_and_a_fourth_text_encoder_too(embedded_copy):
    d = v2(embedded_copy)
    d["components"]["decoder"] = d["components"].pop("vae_decoder")
    _write(embedded_copy, d)
    with pytest.raises(ArtifactError, match="the vae_decoder component must be named 'vae_decoder'"):
        load_manifest(embedded_copy)
    d["components"]["vae_decoder"] = d["components"].pop("decoder")
    for k in (2, 3, 4):
        d["components"][f"text_encoder_{k}"] = dict(d["components"]["text_encoder"])
    _write(embedded_copy, d)
    with pytest.raises(ArtifactError, match="1 to 3 text encoders"):
        load_manifest(embedded_copy)


def test_one_disk_size_function(embedded_copy):
    m = load_manifest(embedded_copy)
    v = m.variant("unet")
    assert disk_bytes(embedded_copy / v.file) == v.bytes
    (embedded_copy / (v.file + ".data")).write_bytes(b"1234")  # external data counts
    assert disk_bytes(embedded_copy / v.file) == v.bytes + 4
