"""``edgediff quantize``: every precision runs on both backends, the gate and the run-time guard bite."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")  # skipped where the export/quantize extras are not installed
numpy_helper = onnx.numpy_helper

from edgediff.quantize import Gate, GateSettings, QualityGateError, quantize_artifact
from edgediff.quantize import quantize as q
from edgediff.runtime import Pipeline, PrecisionError, load_manifest

from .conftest import run_cli

FAST = dict(prompts=("a red circle on a blue background", "a small green star"), seeds=(0,), steps=4)


@pytest.fixture(scope="module")
def quantized(tiny_sd1, tmp_path_factory):
    """A copy of the tiny artifact with every precision added through the CLI."""
    root = tmp_path_factory.mktemp("quantized") / "artifact"
    shutil.copytree(tiny_sd1[1], root)
    for precision in ("fp16", "int8", "int8-static", "int8-static-attn", "int4", "nncf-int8", "nncf-hybrid", "ov-fp16"):
        r = run_cli("quantize", str(root), "--precision", precision, "--steps", "4", "--seeds", "1",
                    "--prompts", "a red circle on a blue background|a small green star")
        assert r.exit_code == 0, r.output
        assert f"added {precision} variants" in r.output
    return root


def test_manifest_records_every_variant(quantized):
    m = load_manifest(quantized)
    expected = {"fp16": {"text_encoder", "unet", "vae_decoder", "vae_encoder"}, "int8": {"text_encoder", "unet"},
                "int8-static": {"unet"}, "int8-static-attn": {"unet"}, "int4": {"text_encoder", "unet"}}
    for precision, comps in expected.items():
        for comp in comps:
            v = m.variant(comp, precision)
            assert (quantized / v.file).is_file() and v.file.endswith(f"model.{precision}.onnx")
            assert v.bytes == (quantized / v.file).stat().st_size
            assert v.quality["gate"]["passed"] and v.quality["psnr_db"] >= 20 and v.quality["ssim"] >= 0.7
            assert v.quality["method"]["tool"].startswith("onnxruntime")
            assert [i.name for i in v.inputs] == [i.name for i in m.variant(comp).inputs]
    assert m.variant("unet", "int8-static").quality["method"]["calibration_samples"] > 4
    assert m.variant("unet", "int8-static").bytes < 0.5 * m.variant("unet").bytes
    assert m.variant("unet", "fp16").bytes < 0.6 * m.variant("unet").bytes
    assert m.variant("unet").quality["parity_vs_torch"]  # originals stay
    for precision in ("nncf-int8", "nncf-hybrid"):  # OpenVINO IR made by NNCF, calibrated like int8-static
        v = m.variant("unet", precision)
        assert v.backends == ("openvino",) and v.file == f"unet/model.{precision}.xml"
        # int8 weights; on this toy UNet the IR's graph text and float norms weigh more than in a real one
        assert v.bytes == sum((quantized / f).stat().st_size for f in v.files()) < 0.75 * m.variant("unet").bytes
        assert v.quality["backend"] == "openvino" and v.quality["gate"]["passed"]
        assert v.quality["method"]["tool"].startswith("nncf") and v.quality["method"]["calibration_samples"] > 4
        assert not list(quantized.glob("unet/*partial*"))
    for comp in ("text_encoder", "unet", "unet_shallow"):  # OpenVINO IR with fp16 weights, by OpenVINO itself
        v = m.variant(comp, "ov-fp16")
        assert v.backends == ("openvino",) and v.file == f"{comp}/model.ov-fp16.xml"
        assert v.quality["gate"]["passed"] and v.quality["psnr_db"] >= 40  # fp16 weights, f32 arithmetic
        bin_file = quantized / v.files()[1]
        assert bin_file.stat().st_size < 0.6 * (quantized / m.variant(comp).file).stat().st_size


def test_int8_static_multiplies_uint8_activations_by_int8_weights(quantized):
    """The pair x86's int8 kernels take natively (VNNI vpdpbusd, AVX2 vpmaddubsw): every activation quantized to
    uint8 with its own zero point, every Conv/MatMul weight to int8 per channel; attention products stay float."""
    graph = onnx.load(str(quantized / "unet" / "model.int8-static.onnx")).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    activations = [n for n in graph.node if n.op_type == "QuantizeLinear"]
    assert activations and {inits[n.input[2]].dtype for n in activations} == {np.dtype(np.uint8)}
    weights = [n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
               and inits[n.input[0]].dtype == np.int8]
    assert weights and all(inits[n.input[1]].size > 1 for n in weights if inits[n.input[0]].ndim > 1)  # per channel
    producers = {o: n for n in graph.node for o in n.output}
    attention = [n for n in graph.node if n.op_type == "MatMul"
                 and not any(i in inits or producers.get(i, n).op_type == "DequantizeLinear" for i in n.input)]
    assert attention  # both inputs activations, neither dequantized: the float products
    method = load_manifest(quantized).variant("unet", "int8-static").quality["method"]
    assert method["activations"].startswith("uint8 asymmetric") and method["kept_float"]["attention_matmuls"] == len(attention)


def test_int8_static_attn_quantizes_the_attention_products_with_symmetric_int8(quantized):
    """Every MatMul's inputs dequantized (none left in float), every activation int8 with zero point 0: the form
    OpenVINO fuses into its int8 attention kernel."""
    graph = onnx.load(str(quantized / "unet" / "model.int8-static-attn.onnx")).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    matmuls = [n for n in graph.node if n.op_type == "MatMul"]
    assert matmuls and all(producers[i].op_type == "DequantizeLinear" for n in matmuls for i in n.input)
    zero_points = [inits[n.input[2]] for n in graph.node if n.op_type == "QuantizeLinear"]
    assert zero_points and all(z.dtype == np.int8 and not z.any() for z in zero_points)
    assert load_manifest(quantized).variant("unet", "int8-static-attn").quality["method"]["kept_float"]["attention_matmuls"] == 0


@pytest.mark.parametrize("precision", ["nncf-int8", "nncf-hybrid", "ov-fp16"])
def test_openvino_only_variants(quantized, precision):
    ref = Pipeline.load(quantized, backend="openvino", device="cpu", ov_precision="f32")
    pipe = Pipeline.load(quantized, backend="openvino", device="cpu", precision={"unet": precision}, ov_precision="f32")
    kw = dict(steps=4, seed=3, width=64, height=64)
    a = np.asarray(ref.txt2img("a red circle", **kw)[0]).astype(float)
    b = np.asarray(pipe.txt2img("a red circle", **kw)[0]).astype(float)
    assert 10 * np.log10(255**2 / max(np.mean((a - b) ** 2), 1e-9)) > 20
    with pytest.raises(ValueError, match=f"unet {precision} .* runs only on openvino, not on onnxruntime"):
        Pipeline.load(quantized, backend="onnxruntime", precision={"unet": precision})


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
@pytest.mark.parametrize("precision", ["fp16", "int8", "int8-static", "int8-static-attn", "int4"])
def test_every_precision_runs_on_both_backends(quantized, backend, precision):
    ref = Pipeline.load(quantized, backend=backend, device="cpu", ov_precision="f32")
    pipe = Pipeline.load(quantized, backend=backend, device="cpu", precision={"unet": precision}, ov_precision="f32")
    assert pipe.describe()["unet"]["precision"] == precision
    kw = dict(steps=4, seed=3, width=64, height=64)
    a = np.asarray(ref.txt2img("a red circle", **kw)[0]).astype(float)
    b = np.asarray(pipe.txt2img("a red circle", **kw)[0]).astype(float)
    assert np.isfinite(b).all()
    mse = np.mean((a - b) ** 2)
    assert 10 * np.log10(255**2 / max(mse, 1e-9)) > 20


def test_per_component_precision_from_cli_and_api(quantized, tmp_path):
    out = tmp_path / "x.png"
    r = run_cli("generate", "a red circle", "--model", str(quantized), "--steps", "3", "--width", "64", "--height", "64",
                "--precision", "unet=int8,vae_decoder=fp16", "--backend", "onnxruntime", "--output", str(out))
    assert r.exit_code == 0, r.output
    from PIL import Image

    meta = json.loads(Image.open(out).text["edgediff"])
    assert meta["precision"] == {"text_encoder": "fp32", "unet": "int8", "vae_decoder": "fp16"}
    pipe = Pipeline.load(quantized, backend="onnxruntime", precision="fp16")
    assert {s.variant.precision for s in pipe.sessions.values()} == {"fp16"}
    with pytest.raises(Exception, match="has no 'int3' variant; available: fp32"):
        Pipeline.load(quantized, precision="unet=int3")
    with pytest.raises(ValueError, match="unknown component 'vae'"):
        Pipeline.load(quantized, precision="vae=fp16")


def test_gate_refuses_a_broken_variant(tiny_sd1, tmp_path, monkeypatch):
    root = tmp_path / "a"
    shutil.copytree(tiny_sd1[1], root)
    before = (root / "manifest.json").read_text()

    def broken_int4(src, dst):
        model = onnx.load(str(src))
        for init in model.graph.initializer:  # as if the quantizer had scrambled the weights
            w = numpy_helper.to_array(init)
            if w.dtype == np.float32 and w.ndim >= 2:
                init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(w[::-1]) * 3, init.name))
        onnx.save(model, str(dst))
        return {"tool": "onnxruntime (deliberately broken)"}

    monkeypatch.setattr(q, "quantize_int4", broken_int4)
    settings = GateSettings(**FAST)
    with pytest.raises(QualityGateError, match=r"unet int4: PSNR .* dB < 20"):
        quantize_artifact(root, "int4", ("unet",), settings=settings)
    assert (root / "manifest.json").read_text() == before
    assert not list((root / "unet").glob("model.int4*"))
    # --force adds it, marked as below the gate
    quantize_artifact(root, "int4", ("unet",), force=True, settings=GateSettings(**FAST))
    v = load_manifest(root).variant("unet", "int4")
    assert v.quality["gate"] == {"min_psnr": 20.0, "min_ssim": 0.7, "passed": False, "forced": True}
    # a stricter gate refuses even a good variant (SSIM 1.0: only identical images pass; fp16 draws them here)
    with pytest.raises(QualityGateError, match="SSIM"):
        quantize_artifact(root, "int8", ("text_encoder",), gate=Gate(min_psnr=0, min_ssim=1.0),
                          settings=GateSettings(**FAST))


@pytest.fixture
def overflowing(tiny_sd1, tmp_path):
    """An artifact whose VAE decoder runs fine in fp32 but overflows fp16 (activations ~1e6)."""
    root = tmp_path / "overflow"
    shutil.copytree(tiny_sd1[1], root)
    path = root / "vae_decoder" / "model.onnx"
    model = onnx.load(str(path))
    conv_in = next(n for n in model.graph.node if n.op_type == "Conv" and "conv_in" in n.name)
    for init in model.graph.initializer:
        if init.name in conv_in.input[1:]:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * np.float32(1e6), init.name))
    onnx.save(model, str(path))
    return root


def test_fp16_guard_and_fallback(overflowing):
    fp32 = Pipeline.load(overflowing, backend="onnxruntime")
    kw = dict(steps=3, seed=1, width=64, height=64)
    (good,) = fp32.txt2img("a red circle", **kw)
    assert np.asarray(good).std() > 1
    with pytest.raises(QualityGateError, match="vae_decoder fp16: it produced NaN/Inf"):
        quantize_artifact(overflowing, "fp16", ("vae_decoder",), settings=GateSettings(**FAST))
    quantize_artifact(overflowing, "fp16", ("vae_decoder",), force=True, settings=GateSettings(**FAST))
    pipe = Pipeline.load(overflowing, backend="onnxruntime", precision={"vae_decoder": "fp16"})
    with pytest.raises(PrecisionError, match="vae_decoder at fp16 produced NaN/Inf"):
        pipe.txt2img("a red circle", **kw)
    pipe = Pipeline.load(overflowing, backend="onnxruntime", precision={"vae_decoder": "fp16"}, fallback=True)
    with pytest.warns(UserWarning, match="rerunning it in fp32"):
        (image,) = pipe.txt2img("a red circle", **kw)
    assert np.array_equal(np.asarray(image), np.asarray(good))
    assert pipe.describe()["vae_decoder"]["precision"] == "fp32"


def test_bad_precision_and_component(tiny_sd1):
    with pytest.raises(ValueError, match="unknown precision 'int2'; valid: fp16, int8, int8-static, int8-static-attn, int4"):
        quantize_artifact(tiny_sd1[1], "int2")
    with pytest.raises(ValueError, match="int8-static is calibrated on the UNet"):
        quantize_artifact(tiny_sd1[1], "int8-static", ("text_encoder",))
