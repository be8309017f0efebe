"""taesana, Sana's tiny decoder (export/taesana.py, after madebyollin/taesd's F32Decoder): strict loading of its
state dict, refusals of bad files, and a Sana artifact's ``tiny`` vae_decoder against SanaPipeline's latents decoded
by the PyTorch module as taesd's README says (the latents as the transformer leaves them, [0, 1] images)."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")  # the module and diffusers are the reference

from edgediff.export.components import ExportError  # noqa: E402
from edgediff.export.taesana import (F32Decoder, decode, load_taesana, random_taesana,  # noqa: E402
                                     save_random_taesana)
from edgediff.runtime import Pipeline, load_manifest  # noqa: E402
from edgediff.runtime.metrics import psnr  # noqa: E402

from .conftest import run_cli  # noqa: E402

PROMPT = "a red circle on a blue background"
STEPS, GUIDANCE, SEED, W, H = 4, 4.5, 42, 64, 96


def test_the_module_has_taesd_py_s_tensors_and_loads_its_own_state_dict_strictly(tmp_path):
    """F32Decoder(32) is taesd.py's: 105 tensors, 8,301,763 parameters, the last conv at index 29; a state dict
    saved from it (.pth, or .safetensors) loads with strict keys and gives the same images."""
    decoder = random_taesana(32, seed=1)
    state = decoder.state_dict()
    assert len(state) == 105 and sum(v.numel() for v in state.values()) == 8_301_763
    assert tuple(state["1.weight"].shape) == (256, 32, 3, 3) and tuple(state["29.weight"].shape) == (3, 64, 3, 3)
    assert "8.bias" not in state  # the convs after each upsampling have no bias, as in taesd.py
    torch.save(state, tmp_path / "taesana_decoder.pth")
    x = torch.randn(1, 32, 3, 4)
    for path in (tmp_path / "taesana_decoder.pth", save_random_taesana(tmp_path / "st", seed=1)):
        loaded = load_taesana(path)
        assert list(loaded.state_dict()) == list(state)
        with torch.no_grad():
            assert torch.equal(loaded(x), decoder(x)) and loaded(x).shape == (1, 3, 96, 128)
    with torch.no_grad():  # and another seed is another decoder
        assert not torch.allclose(random_taesana(32, seed=2)(x), decoder(x))
    # the test recipes' 2x one: the last stage of five
    small = load_taesana(save_random_taesana(tmp_path / "small", seed=0, latent_channels=4, upscale=2))
    assert sorted({int(k.split(".")[0]) for k in small.state_dict()}) == [1, 3, 4, 5, 7, 8, 9]


def _saved(tmp_path, name, state):
    path = tmp_path / name
    torch.save(state, path)
    return path


def test_bad_files_are_refused_by_name(tmp_path):
    state = F32Decoder(32).state_dict()
    encoder_like = {"0.weight": torch.zeros(32, 3, 3, 3), "0.bias": torch.zeros(32)}
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "garbage.pth").write_bytes(b"not a pickle")
    cases = [
        (tmp_path, "a folder"),
        (tmp_path / "missing.pth", "not found"),
        (tmp_path / "notes.txt", "accepted: .safetensors, .pth, .pt"),
        (tmp_path / "garbage.pth", "could not be read as a .pth state dict"),
        (_saved(tmp_path, "tensor.pth", torch.zeros(3)), "holds a Tensor, not a state dict"),
        (_saved(tmp_path, "encoder.pth", encoder_like), "is a TAESD encoder"),
        (_saved(tmp_path, "other.pth", {"decoder.layers.0.weight": torch.zeros(1)}), "no 4-d tensor '1.weight'"),
        (_saved(tmp_path, "missing_key.pth", {k: v for k, v in state.items() if k != "28.conv.2.weight"}),
         "missing: 28.conv.2.weight"),
        (_saved(tmp_path, "extra_key.pth", state | {"28.conv.9.weight": torch.zeros(1)}),
         "unexpected: 28.conv.9.weight"),
        (_saved(tmp_path, "shape.pth", state | {"5.conv.0.weight": torch.zeros(256, 256, 1, 1)}),
         "wrong shape: 5.conv.0.weight (256, 256, 1, 1) (expected (256, 256, 3, 3))"),
        (_saved(tmp_path, "index.pth", state | {"31.weight": torch.zeros(1)}), "its last module index is 31"),
    ]
    for path, words in cases:
        with pytest.raises(ExportError) as e:
            load_taesana(path)
        assert words in str(e.value), (path, str(e.value))
    assert load_taesana(_saved(tmp_path, "ok.pth", state))  # the same dict, whole, loads


@pytest.fixture(scope="module")
def taesana(tiny_sana, tmp_path_factory):
    """(diffusers folder, taesana file, artifact): tiny-sana exported with a random taesana, kept by
    --force-tiny-vae (the gate measures it against the DC-AE's images and refuses it: random weights)."""
    src, _ = tiny_sana
    root = tmp_path_factory.mktemp("taesana")
    tiny = save_random_taesana(root / "taesana", seed=0, latent_channels=4, upscale=2)
    r = run_cli("export", str(src), str(root / "artifact"), "--tiny-vae", str(tiny), "--force-tiny-vae")
    assert r.exit_code == 0, r.output
    return src, tiny, root / "artifact"


def test_export_records_a_tiny_decoder_only_in_taesana_s_units(taesana):
    _, _, artifact = taesana
    manifest = json.loads((artifact / "manifest.json").read_text())
    decoders, encoders = manifest["components"]["vae_decoder"]["variants"], manifest["components"]["vae_encoder"]
    assert set(decoders) == {"fp32", "tiny"} and set(encoders["variants"]) == {"fp32"}  # no taesana encoder
    tiny = decoders["tiny"]
    assert tiny["file"] == "vae_decoder/model.tiny.onnx" and (artifact / tiny["file"]).is_file()
    assert tiny["scaling_factor"] == 1.0 and tiny["shift_factor"] == 0.0  # the transformer's latents as they are
    assert load_manifest(artifact).scaling_factor == 0.41407  # the DC-AE's, beside it
    assert tiny["quality"]["parity_vs_torch"]["max_rel_err"] < 1e-4  # the graph is the PyTorch module
    gate = tiny["quality"]["gate"]
    assert gate["passed"] is False and gate["forced"] is True and tiny["quality"]["psnr_db"] < 20


def reference(src, tiny, divide: bool = False) -> np.ndarray:
    """SanaPipeline's final latents (output_type="latent"), decoded by the PyTorch taesana as taesd's README says
    (or, ``divide``, in the DC-AE's input units latents / scaling_factor: the wrong units), then the pipeline's own
    postprocessing."""
    import diffusers

    pipe = diffusers.SanaPipeline.from_pretrained(str(src))
    pipe.set_progress_bar_config(disable=True)
    latents = pipe(prompt=PROMPT, num_inference_steps=STEPS, guidance_scale=GUIDANCE, width=W, height=H,
                   use_resolution_binning=False, output_type="latent",
                   generator=torch.Generator().manual_seed(SEED)).images
    if divide:
        latents = latents / pipe.vae.config.scaling_factor
    image = pipe.image_processor.postprocess(decode(load_taesana(tiny), latents), output_type="np")[0]
    return (image * 255).round().astype(np.uint8)


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_txt2img_with_taesana_matches_sana_pipeline_latents_decoded_by_it(taesana, backend, parity_log):
    src, tiny, artifact = taesana
    pipe = Pipeline.load(artifact, backend=backend, device="cpu", vae="tiny", ov_precision="f32")
    assert pipe.describe()["vae_decoder"]["precision"] == "tiny"
    got = np.asarray(pipe.txt2img(PROMPT, guidance=GUIDANCE, steps=STEPS, seed=SEED, width=W, height=H,
                                  rng="torch")[0])
    want = reference(src, tiny)
    score = psnr(got, want)
    parity_log(("sana taesana", backend, f"{W}x{H}", score))
    assert got.std() > 5 and score >= 40, f"{backend}: PSNR {score:.1f} dB vs SanaPipeline + taesana"
    # it can fail: the same latents in the DC-AE's units (/ 0.41407) are another image ...
    assert psnr(got, reference(src, tiny, divide=True)) < 25
    # ... and the full DC-AE draws another image from the same latents
    full = Pipeline.load(artifact, backend=backend, device="cpu", ov_precision="f32")
    other = np.asarray(full.txt2img(PROMPT, guidance=GUIDANCE, steps=STEPS, seed=SEED, width=W, height=H,
                                    rng="torch")[0])
    assert psnr(other, got) < 25


def test_generate_vae_tiny_on_the_command_line(taesana, tmp_path):
    from PIL import Image

    src, tiny, artifact = taesana
    out = tmp_path / "tiny.png"
    r = run_cli("generate", PROMPT, "--model", str(artifact), "--vae", "tiny", "--steps", str(STEPS), "--guidance",
                str(GUIDANCE), "--seed", str(SEED), "--width", str(W), "--height", str(H), "--rng", "torch",
                "--backend", "onnxruntime", "--device", "cpu", "-o", str(out))
    assert r.exit_code == 0, r.output
    assert psnr(np.asarray(Image.open(out).convert("RGB")), reference(src, tiny)) >= 40


def test_tiny_vae_files_are_checked_against_the_family_before_any_graph(tiny_sana, tmp_path):
    """A taesana that does not fit tiny-sana's 4-channel 2x DC-AE, a folder for Sana and a decoder file for an SD
    checkpoint are refused by name, before a graph is written."""
    from edgediff.export import families
    from edgediff.export.recipes import tiny_vae_config
    from edgediff.export.tiny_vae import build_random_tiny_vae, check_family

    src, _ = tiny_sana
    wide = save_random_taesana(tmp_path / "wide", seed=0, latent_channels=32, upscale=2)
    deep = save_random_taesana(tmp_path / "deep", seed=0, latent_channels=4, upscale=32)
    taesd = build_random_tiny_vae(tmp_path / "taesd", 0, **tiny_vae_config("tiny-sd1"))  # an AutoencoderTiny folder
    for tiny, words in ((wide, "takes 32 latent channels, the checkpoint's autoencoder gives 4"),
                        (deep, "upsamples 32x, the checkpoint's autoencoder 2x"),
                        (taesd, "a folder; give the decoder's weight file, taesana_decoder.pth")):
        out = tmp_path / "out"
        r = run_cli("export", str(src), str(out), "--tiny-vae", str(tiny), "--force-tiny-vae")
        assert r.exit_code == 2 and words in " ".join(r.output.split()), (tiny, r.output)
        assert not out.exists()
    with pytest.raises(ExportError, match="is a file; a Stable Diffusion 1.x/2.x checkpoint.s tiny VAE is a diffusers"):
        check_family(families.sd, None, wide)


def test_random_weights_recipe_gets_a_random_taesana(tmp_path):
    """`export --random-weights tiny-sana --tiny-vae random`: the recipe's taesana (4 channels, 2x), not gated."""
    out = tmp_path / "artifact"
    r = run_cli("export", "--random-weights", "tiny-sana", str(out), "--tiny-vae", "random")
    assert r.exit_code == 0, r.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["components"]["vae_decoder"]["variants"]) == {"fp32", "tiny"}
    assert set(manifest["components"]["vae_encoder"]["variants"]) == {"fp32"}
    tiny = manifest["components"]["vae_decoder"]["variants"]["tiny"]
    assert tiny["quality"]["gate"] == {"passed": None, "not_measured": "random weights draw noise"}
    image = np.asarray(Pipeline.load(out, backend="onnxruntime", device="cpu", vae="tiny")
                       .txt2img(PROMPT, steps=2, seed=0, width=W, height=H)[0])
    assert image.shape == (H, W, 3) and image.std() > 5
