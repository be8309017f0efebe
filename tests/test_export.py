"""``edgediff export``: the artifact contract, parity recorded, failures leave nothing that looks valid."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")  # skipped where the export/quantize extras are not installed

from edgediff.runtime import load_manifest

from .conftest import run_cli


def test_manifest_describes_the_model(tiny_sd1, tiny_sd2v):
    m = load_manifest(tiny_sd1[1])
    assert m.prediction_type == "epsilon" and m.scheduler == "pndm"
    assert (m.vae_scale_factor, m.latent_channels, m.denoiser.in_channels, m.sample_size) == (8, 4, 4, 64)
    assert m.format_version == 2 and json.loads((tiny_sd1[1] / "manifest.json").read_text())["format_version"] == 2
    assert m.scaling_factor == pytest.approx(0.18215)
    (text,) = m.text_encoders
    assert (text.max_length, text.hidden_size, text.pad_token_id, text.tokenizer) == (77, 32, 49407, "tokenizer/tokenizer.json")
    assert m.roles == {"text_encoder": "text_encoder", "unet": "denoiser", "unet_shallow": "shallow_denoiser",
                       "vae_decoder": "vae_decoder", "vae_encoder": "vae_encoder"}
    assert m.denoiser.name == "unet" and m.denoiser.kind == "unet"
    assert (m.shallow_denoiser.name, m.shallow_denoiser.method, m.shallow_denoiser.branch) == ("unet_shallow", "deepcache", 0)
    for comp, variants in m.components.items():
        parity = variants["fp32"].quality["parity_vs_torch"]
        assert 0 <= parity["max_rel_err"] < 1e-3, comp
    assert m.provenance["versions"]["torch"].startswith("2.13")
    m2 = load_manifest(tiny_sd2v[1])
    assert m2.prediction_type == "v_prediction" and m2.scheduler == "ddim" and m2.text_encoders[0].pad_token_id == 0


def test_onnx_graphs_are_opset17_with_dynamic_axes(tiny_sd1):
    m = load_manifest(tiny_sd1[1])
    unet = onnx.load(str(tiny_sd1[1] / m.variant("unet").file))
    assert max(o.version for o in unet.opset_import if o.domain in ("", "ai.onnx")) >= 17
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in unet.graph.input}
    assert dims["sample"] == ["batch", 4, "height", "width"]
    assert dims["timestep"] == ["batch"]


def test_unet_runs_at_sizes_not_multiple_of_64(tiny_sd1):
    """Traced at an odd latent size, the UNet accepts any multiple of 8 pixels (latent 5x7 here)."""
    from edgediff.runtime import Pipeline

    pipe = Pipeline.load(tiny_sd1[1], backend="onnxruntime", device="cpu")
    (image,) = pipe.txt2img("a red circle", steps=2, width=56, height=40)
    assert image.size == (56, 40)


def test_refuses_to_overwrite_without_force(tiny_sd1, tmp_path):
    out = tmp_path / "a"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = run_cli("export", str(tiny_sd1[0]), str(out))
    assert r.exit_code == 2 and "already exists and is not an edgediff artifact: it holds keep.txt" in r.output
    assert (out / "keep.txt").read_text() == "mine"


def test_force_replaces_an_artifact(tiny_sd1, tmp_path):
    out = tmp_path / "a"
    shutil.copytree(tiny_sd1[1], out)
    (out / "unet" / "model.fp16.onnx").write_bytes(b"a variant of the old export")
    d = json.loads((out / "manifest.json").read_text())  # named by the old manifest: --force replaces only those
    d["components"]["unet"]["variants"]["fp16"] = dict(d["components"]["unet"]["variants"]["fp32"], file="unet/model.fp16.onnx")
    (out / "manifest.json").write_text(json.dumps(d))
    r = run_cli("export", str(tiny_sd1[0]), str(out), "--force")
    assert r.exit_code == 0, r.output
    assert not (out / "unet" / "model.fp16.onnx").exists()
    assert load_manifest(out).prediction_type == "epsilon"
    # no temporary folders left behind; the lock file beside OUT stays (it is how writers queue)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".a.lock", "a"]


def test_failed_parity_leaves_no_artifact(tiny_sd1, tmp_path, monkeypatch):
    from edgediff.export import components

    real = components.check_parity

    def broken(path, contract, args, references):
        if contract.name == "vae_decoder":
            return real(path, contract, args, [r + 1.0 for r in references])  # as if the graph were wrong
        return real(path, contract, args, references)

    monkeypatch.setattr(components, "check_parity", broken)
    out = tmp_path / "a"
    r = run_cli("export", str(tiny_sd1[0]), str(out))
    assert r.exit_code == 2
    assert "vae_decoder: ONNX output sample differs from PyTorch" in r.output and "refusing" in r.output
    assert [p.name for p in tmp_path.iterdir()] == [".a.lock"]  # only the lock file writers queue on


def test_bad_sources(tmp_path):
    (tmp_path / "empty").mkdir()
    r = run_cli("export", str(tmp_path / "empty"), str(tmp_path / "out"))
    assert r.exit_code == 2 and "without model_index.json" in r.output
    r = run_cli("export", str(tmp_path / "missing.safetensors"), str(tmp_path / "out"))
    assert r.exit_code == 2 and "no such checkpoint file" in r.output
    r = run_cli("export", "not/a/hub/id", str(tmp_path / "out"))
    assert r.exit_code == 2 and "not a hub id" in r.output
    assert not (tmp_path / "out").exists()


def test_random_weights_export(tmp_path):
    r = run_cli("export", "--random-weights", "tiny-sd1", str(tmp_path / "rw"))
    assert r.exit_code == 0, r.output
    m = load_manifest(tmp_path / "rw")
    assert m.random_weights and m.provenance["source"] == "random-weights:tiny-sd1:seed=0"
    r = run_cli("export", "--random-weights", "sd99", str(tmp_path / "x"))
    assert r.exit_code == 2 and "unknown recipe 'sd99'" in r.output


def test_info_lists_components_and_backends(tiny_sd1):
    r = run_cli("info", str(tiny_sd1[1]))
    assert r.exit_code == 0, r.output
    assert "unet" in r.output and "fp32" in r.output and "CPUExecutionProvider" in r.output


def test_tokenizer_is_the_real_clip_bpe(tiny_sd1):
    from edgediff.runtime.text import PromptTokenizer

    tok = PromptTokenizer(tiny_sd1[1] / "tokenizer" / "tokenizer.json", 77, 49407)
    ids = tok.chunks("a red circle on a blue background").ids[0]
    # ids of openai/clip-vit-large-patch14 for this prompt
    assert ids[:9].tolist() == [49406, 320, 736, 7117, 525, 320, 1746, 5994, 49407]
    assert np.all(ids[9:] == 49407)


def test_external_data_layout(tiny_sd1, tmp_path, monkeypatch):
    """Graphs over the protobuf limit are saved as model.onnx + model.onnx.data (threshold lowered here)."""
    from edgediff.export import onnx_io
    from edgediff.runtime import Pipeline

    monkeypatch.setattr(onnx_io, "EXTERNAL_DATA_THRESHOLD", 1000)
    out = tmp_path / "ext"
    r = run_cli("export", str(tiny_sd1[0]), str(out))
    assert r.exit_code == 0, r.output
    m = load_manifest(out)
    for comp in m.components:
        graph, data = out / comp / "model.onnx", out / comp / "model.onnx.data"
        assert data.is_file() and data.stat().st_size > graph.stat().st_size
        assert m.variant(comp).bytes == graph.stat().st_size + data.stat().st_size
    for backend in ("onnxruntime", "openvino"):
        (image,) = Pipeline.load(out, backend=backend, device="cpu").txt2img("a red circle", steps=2, width=64, height=64)
        assert image.size == (64, 64)


def test_consolidating_torch_style_external_data(tiny_sd1, tmp_path):
    """torch writes one file per tensor for graphs over 2 GB; they are gathered, streaming, into model.onnx.data."""
    import onnx
    import onnxruntime as ort

    from edgediff.export.onnx_io import consolidate_external_data

    src = tiny_sd1[1] / "unet" / "model.onnx"
    path = tmp_path / "unet" / "model.onnx"
    path.parent.mkdir()
    onnx.save_model(onnx.load(str(src)), str(path), save_as_external_data=True, all_tensors_to_one_file=False,
                    size_threshold=0)
    assert len(list(path.parent.iterdir())) > 20  # per-tensor files, as torch leaves them
    size = consolidate_external_data(path)
    assert sorted(f.name for f in path.parent.iterdir()) == ["model.onnx", "model.onnx.data"]
    assert size == path.stat().st_size + (path.parent / "model.onnx.data").stat().st_size
    rng = np.random.default_rng(0)
    feeds = {"sample": rng.standard_normal((2, 4, 8, 8), dtype=np.float32), "timestep": np.array([10.0, 10.0], np.float32),
             "encoder_hidden_states": rng.standard_normal((2, 77, 32), dtype=np.float32)}
    want = ort.InferenceSession(str(src)).run(None, feeds)[0]
    got = ort.InferenceSession(str(path)).run(None, feeds)[0]
    np.testing.assert_array_equal(got, want)


def test_single_file_family_detection(tmp_path):
    """Original-layout files go to their family's loader by their tensor names: SD3 (joint_blocks), SDXL (a second
    text encoder under conditioner.embedders.1), SD (cond_stage_model); a file of none is refused, not read as SD."""
    import torch
    from safetensors.torch import save_file

    from edgediff.export import ExportError
    from edgediff.export.exporter import _tensor_names
    from edgediff.export.families import single_file_pipeline

    save_file({"conditioner.embedders.1.model.ln_final.weight": torch.zeros(2),
               "model.diffusion_model.out.2.bias": torch.zeros(2)}, str(tmp_path / "xl.safetensors"))
    save_file({"cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.zeros(2),
               "model.diffusion_model.out.2.bias": torch.zeros(2)}, str(tmp_path / "sd15.safetensors"))
    save_file({"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": torch.zeros(2),  # SD3's layout
               "text_encoders.clip_l.transformer.text_model.final_layer_norm.weight": torch.zeros(2)},
              str(tmp_path / "sd3.safetensors"))
    save_file({"model.diffusion_model.double_blocks.0.img_attn.qkv.weight": torch.zeros(2)},  # FLUX.1's layout
              str(tmp_path / "flux.safetensors"))
    pick = lambda name: single_file_pipeline(_tensor_names(tmp_path / name), name)  # noqa: E731
    assert pick("xl.safetensors") == "StableDiffusionXLPipeline"
    assert pick("sd15.safetensors") == "StableDiffusionPipeline"
    assert pick("sd3.safetensors") == "StableDiffusion3Pipeline"
    assert pick("model.ckpt") == "StableDiffusionPipeline"  # a pickle's names are not read before loading
    with pytest.raises(ExportError, match=r"flux.safetensors holds none of the tensors .*Stable Diffusion 3: "
                                          r"model.diffusion_model.joint_blocks.\*; Stable Diffusion XL: "
                                          r"conditioner.embedders.1.\*; Stable Diffusion 1.x/2.x: cond_stage_model"):
        pick("flux.safetensors")
