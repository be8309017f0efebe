"""benchmarks/unet_profile.py and unet_step_ratio.py on the embedded model: the profilers' nodes land in buckets that
add up, int8 kernels are told from float ones, and interleaved ratios are written."""

from __future__ import annotations

import json
import sys

import pytest

pytest.importorskip("onnx")  # quantizes (the quantize extra)

from edgediff.quantize import quantize_artifact
from edgediff.runtime import load_manifest

from .conftest import REPO


@pytest.fixture(scope="module")
def scripts():
    sys.path.insert(0, str(REPO / "benchmarks"))
    import unet_profile
    import unet_step_ratio

    yield unet_profile, unet_step_ratio
    sys.path.remove(str(REPO / "benchmarks"))


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    import shutil

    from edgediff.models import default_model_path

    root = tmp_path_factory.mktemp("profile") / "artifact"
    shutil.copytree(default_model_path(), root)
    quantize_artifact(root, "int8-static", ("unet",), force=True)
    return root


def test_profile_buckets_add_up_and_tell_int8_from_float(scripts, quantized, tmp_path, monkeypatch):
    unet_profile, _ = scripts
    out = tmp_path / "profile"
    monkeypatch.setattr(sys, "argv", ["unet_profile.py", str(quantized), "--precisions", "fp32,int8-static",
                                      "--size", "64", "--calls", "1", "--out", str(out)])
    unet_profile.main()
    info = json.loads(out.with_suffix(".json").read_text())
    assert [(r["backend"], r["precision"]) for r in info["results"]] == [
        ("onnxruntime", "fp32"), ("openvino", "fp32"), ("onnxruntime", "int8-static"), ("openvino", "int8-static")]
    for r in info["results"]:
        total = sum(b["ms"] for b in r["buckets"].values())
        assert total == pytest.approx(r["profiled_ms"], abs=0.1 * len(r["buckets"]))  # each bucket rounded
        assert sum(b["nodes"] for b in r["buckets"].values()) > 20
        int8 = r["buckets"]["int8 compute (conv, matmul)"]
        assert (int8["nodes"] > 0) == (r["precision"] == "int8-static")
        if r["precision"] == "fp32":
            assert r["buckets"]["float convolution"]["nodes"] > 0
    assert "| int8 compute (conv, matmul) |" in out.with_suffix(".md").read_text()


@pytest.mark.parametrize("op, name, precision, expected", [
    ("Subgraph", "/unet/down_blocks.0/attentions.0/transformer_blocks.0/attn1/MatMul_1", "BF16",
     "float attention products (QK^T, AV)"),
    ("Subgraph", "/unet/down_blocks.0/attentions.0/transformer_blocks.0/attn1/MatMul_1", "I8", "int8 compute (conv, matmul)"),
    ("FullyConnected", "/unet/mid_block/attentions.0/transformer_blocks.0/attn1/to_q/MatMul", "BF16",
     "float linear (matmul with weights)"),
    ("MatMul", "/unet/mid_block/attentions.0/transformer_blocks.0/attn2/MatMul", "", "float attention products (QK^T, AV)"),
    ("QLinearConv", "/unet/conv_in/Conv", "", "int8 compute (conv, matmul)"),
    ("DequantizeLinear", "x", "", "Q/DQ conversions"),
    ("Convolution", "/unet/conv_in/Conv", "I8", "int8 compute (conv, matmul)"),
    ("Convolution", "/unet/conv_in/Conv", "BF16", "float convolution"),
])
def test_buckets_by_op_name_and_kernel(scripts, op, name, precision, expected):
    assert scripts[0].bucket(op, name, precision) == expected


def test_step_ratio_interleaves_and_divides_by_the_first(scripts, quantized, tmp_path, monkeypatch):
    _, ratio = scripts
    out = tmp_path / "ratio"
    monkeypatch.setattr(sys, "argv", ["unet_step_ratio.py", str(quantized), "--variants",
                                      "openvino:fp32,onnxruntime:int8-static", "--size", "64", "--rounds", "3",
                                      "--out", str(out)])
    ratio.main()
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [r["variant"] for r in rows] == ["openvino:fp32", "onnxruntime:int8-static"]
    assert rows[0]["ratio_to_first"] == 1.0 and all(len(r["raw_s"]) == 3 for r in rows)
    assert rows[1]["ratio_to_first"] == pytest.approx(rows[1]["median_s"] / rows[0]["median_s"], rel=0.01)
    assert load_manifest(quantized).variant("unet", "int8-static")  # the artifact is left as it was
