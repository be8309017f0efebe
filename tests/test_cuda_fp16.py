"""``fp16-cuda`` (quantize/cuda_fp16.py): ONNX Runtime's Stable Diffusion CUDA fusions on our UNet export.

No GPU is needed: the fused fp16 graph is checked for its operators, weights and IO types; its arithmetic is
checked in fp32 on the CPU EP twice, once with the fusions that have CPU kernels (the ``convert_cpu_fused``
form) and once with the CUDA-only operators of the CUDA form written back as standard ONNX from their specs.
Where a CUDA EP works, the fp16 graph also runs there against fp32.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")  # the quantize extra
ort = pytest.importorskip("onnxruntime")
from onnx import helper, numpy_helper  # noqa: E402

from edgediff.quantize import GateSettings, quantize_artifact  # noqa: E402
from edgediff.quantize import cuda_fp16  # noqa: E402
from edgediff.runtime import load_manifest  # noqa: E402

from .conftest import load_script  # noqa: E402

CUDA_ONLY = ("GroupNorm", "SkipGroupNorm", "BiasSplitGelu", "BiasAdd", "NhwcConv")


@pytest.fixture(scope="module")
def graphs(tiny_sd1, tmp_path_factory):
    """The tiny UNet (fp32), its fp16-cuda graph, the CPU form and the CUDA form's fusions before fp16."""
    out = tmp_path_factory.mktemp("cuda_fp16")
    src = tiny_sd1[1] / "unet" / "model.onnx"
    cuda_method = cuda_fp16.convert_cuda_fp16(src, out / "cuda.onnx")
    cpu_method = cuda_fp16.convert_cpu_fused(src, out / "cpu.onnx")
    fused32 = cuda_fp16.optimize_unet(src, cuda=True).model
    return {"src": src, "cuda": out / "cuda.onnx", "cpu": out / "cpu.onnx", "fused32": fused32,
            "cuda_method": cuda_method, "cpu_method": cpu_method, "manifest": load_manifest(tiny_sd1[1])}


def feeds_for(manifest, batch=2, latent=8, seed=0):
    rng = np.random.default_rng(seed)
    spec = {s.name: s for s in manifest.variant("unet").inputs}
    ctx = spec["encoder_hidden_states"].shape[-1]
    return {"sample": rng.standard_normal((batch, 4, latent, latent)).astype(np.float32),
            "timestep": np.array([999.0, 1.0][:batch], np.float32),
            "encoder_hidden_states": rng.standard_normal((batch, 77, ctx)).astype(np.float32)}


def run_cpu(model_or_path, feeds):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    graph = model_or_path.SerializeToString() if hasattr(model_or_path, "SerializeToString") else str(model_or_path)
    return ort.InferenceSession(graph, so, providers=["CPUExecutionProvider"]).run(None, feeds)


def max_rel_err(ref, got):
    return max(float(np.abs(a - b).max() / np.abs(a).max()) for a, b in zip(ref, got))


def test_cuda_form_has_the_demo_fusions_fp16_weights_and_fp32_io(graphs):
    counts = graphs["cuda_method"]["fused_ops"]
    # the tiny UNet: 4 transformer blocks (down 0, mid, up 1 x2), 21 group norms, 33 convolutions
    assert counts["MultiHeadAttention"] == 8  # 4 self-attention (packed QKV) + 4 cross-attention (packed KV)
    assert counts["Attention"] == 0
    assert counts["GroupNorm"] > 0 and counts["SkipGroupNorm"] > 0
    assert counts["GroupNorm"] + counts["SkipGroupNorm"] == 21
    assert counts["BiasSplitGelu"] == 4 and counts["BiasAdd"] == 4 and counts["SkipLayerNormalization"] == 8
    assert counts["NhwcConv"] == 33
    model = onnx.load(str(graphs["cuda"]))
    assert cuda_fp16.fused_counts(model) == counts
    packed = [n for n in model.graph.node if n.op_type == "MultiHeadAttention"]
    assert sum(1 for n in packed if len([i for i in n.input if i]) == 1) == 4  # packed QKV: one input
    # weights fp16; fp32 left only where kept on purpose: GroupNorm's gamma/beta (the converter's
    # ALWAYS_FLOAT_INPUTS) and the timestep projection's frequencies
    weights = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    big = {n: w for n, w in weights.items() if w.dtype.kind == "f" and w.ndim >= 2}
    assert big and all(w.dtype == np.float16 for n, w in big.items() if "time_proj" not in n)
    assert graphs["cuda_method"]["kept_float"]["time_projection_nodes"] > 3
    # IO: what the runtime feeds and reads (the manifest's float32 specs)
    fp32 = graphs["manifest"].variant("unet")
    elem = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16"}
    assert [(i.name, elem[i.type.tensor_type.elem_type]) for i in model.graph.input] == [(s.name, s.dtype) for s in fp32.inputs]
    assert [(o.name, elem[o.type.tensor_type.elem_type]) for o in model.graph.output] == [(s.name, s.dtype) for s in fp32.outputs]
    method = graphs["cuda_method"]
    assert method["backends"] == ("onnxruntime",) and method["devices"] == ["cuda"] and method["io"] == "fp32"
    assert {"enable_packed_qkv", "enable_nhwc_conv", "enable_group_norm", "enable_bias_splitgelu"} <= set(method["fusions"])
    # the graph is well formed (ONNX Runtime resolves its types, contrib schemas included); the CPU EP then
    # stops at the first CUDA-only kernel, as it should
    with pytest.raises(Exception, match="NOT_IMPLEMENTED.*(" + "|".join(CUDA_ONLY) + ")"):
        run_cpu(graphs["cuda"], feeds_for(graphs["manifest"]))


def test_cpu_form_keeps_the_unet_arithmetic(graphs):
    counts = graphs["cpu_method"]["fused_ops"]
    assert counts["Attention"] == 4 and counts["MultiHeadAttention"] == 4  # self (QKV in one) and cross attention
    assert counts["Gelu"] == 4 and counts["SkipLayerNormalization"] == 8
    assert not any(counts[op] for op in CUDA_ONLY)
    feeds = feeds_for(graphs["manifest"])
    ref, got = run_cpu(graphs["src"], feeds), run_cpu(graphs["cpu"], feeds)
    assert max_rel_err(ref, got) < 1e-5  # measured 7e-7 (out_sample), 6e-7 (deep_feature)


def test_cuda_form_fusions_written_out_match_fp32(graphs):
    """The CUDA form's graph before fp16, every CUDA-only operator rewritten as standard ONNX from ONNX Runtime's
    operator specs: equal to the fp32 graph. The fusion pass wired each fused node to the right tensors
    (NHWC weights, packed QKV/KV layouts, the skip and bias of each SkipGroupNorm, GEGLU's halves)."""
    model = onnx.ModelProto()
    model.CopyFrom(graphs["fused32"])
    assert all(cuda_fp16.fused_counts(model)[op] for op in CUDA_ONLY)
    unfused = unfuse(model)
    assert not any(n.domain == "com.microsoft" and n.op_type in CUDA_ONLY + ("MultiHeadAttention",) for n in unfused.graph.node)
    feeds = feeds_for(graphs["manifest"])
    ref, got = run_cpu(graphs["src"], feeds), run_cpu(unfused, feeds)
    assert max_rel_err(ref, got) < 1e-5  # measured 5.7e-7
    # and the check bites: GEGLU's halves swapped
    bad = unfuse(_copy(graphs["fused32"]), swap_geglu=True)
    assert max_rel_err(ref, run_cpu(bad, feeds)) > 1e-2


def test_sdxl_unet_fuses_and_keeps_its_deep_feature(tiny_sdxl, tmp_path):
    """SDXL's UNet (text_time conditioning, several transformer layers per block, linear projections): the same
    fusions, both forms equal to fp32, and DeepCache's ``deep_feature`` output kept: it is a resnet's
    ``/ output_scale_factor`` (a Div by 1), which ONNX Runtime 1.32's optimizer would remove with the output."""
    src = tiny_sdxl[1] / "unet" / "model.onnx"
    method = cuda_fp16.convert_cuda_fp16(src, tmp_path / "cuda.onnx")
    counts = method["fused_ops"]
    assert counts["MultiHeadAttention"] == 16 and counts["BiasSplitGelu"] == 8 and counts["NhwcConv"] > 0
    assert counts["GroupNorm"] + counts["SkipGroupNorm"] == 21 and counts["SkipGroupNorm"] > 0
    model = onnx.load(str(tmp_path / "cuda.onnx"))
    assert [o.name for o in model.graph.output] == ["out_sample", "deep_feature"]
    assert {i.type.tensor_type.elem_type for i in list(model.graph.input) + list(model.graph.output)} == {onnx.TensorProto.FLOAT}
    time_ids_proj = [n for n in model.graph.node if "add_time_proj" in n.name and n.op_type in ("Sin", "Cos", "Mul")]
    assert time_ids_proj  # SDXL's size/crop ids (1024 and more) projected in fp32, like the timestep
    manifest = load_manifest(tiny_sdxl[1])
    rng = np.random.default_rng(0)
    spec = {s.name: s for s in manifest.variant("unet").inputs}
    feeds = feeds_for(manifest) | {
        "text_embeds": rng.standard_normal((2, spec["text_embeds"].shape[-1])).astype(np.float32),
        "time_ids": np.tile(np.array([1024, 1024, 0, 0, 1024, 1024], np.float32), (2, 1))}
    ref = run_cpu(src, feeds)
    cuda_fp16.convert_cpu_fused(src, tmp_path / "cpu.onnx")
    assert max_rel_err(ref, run_cpu(tmp_path / "cpu.onnx", feeds)) < 1e-5  # measured 5.7e-7
    assert max_rel_err(ref, run_cpu(unfuse(cuda_fp16.optimize_unet(src).model), feeds)) < 1e-5  # measured 5.6e-7


@pytest.mark.skipif(not cuda_fp16.cuda_available(), reason="needs ONNX Runtime's CUDA EP on a GPU")
def test_cuda_form_on_the_cuda_ep_matches_fp32(graphs):
    feeds = feeds_for(graphs["manifest"])
    ref = run_cpu(graphs["src"], feeds)
    sess = ort.InferenceSession(str(graphs["cuda"]), providers=["CUDAExecutionProvider"])
    got = sess.run(None, feeds)
    assert all(np.isfinite(g).all() for g in got)
    assert max_rel_err(ref, got) < 2e-2  # fp16


def test_quantize_refuses_without_cuda_and_force_records_it_unmeasured(tiny_sd1, tmp_path, monkeypatch):
    root = tmp_path / "artifact"
    shutil.copytree(tiny_sd1[1], root)
    before = (root / "manifest.json").read_text()
    monkeypatch.setattr(cuda_fp16, "cuda_available", lambda: False)
    settings = GateSettings(prompts=("a red circle",), seeds=(0,), steps=2)
    with pytest.raises(ValueError, match=r"fp16-cuda: .*only on ONNX Runtime's CUDA execution provider.*"
                                         r"quality gate cannot run here.*--force"):
        quantize_artifact(root, "fp16-cuda", settings=settings)
    assert (root / "manifest.json").read_text() == before and not list(root.glob("unet/model.fp16-cuda*"))
    results = quantize_artifact(root, "fp16-cuda", force=True, settings=settings)
    assert list(results) == ["unet"]  # the denoiser only (not the DeepCache shallow UNet)
    manifest = load_manifest(root)
    v = manifest.variant("unet", "fp16-cuda")
    assert v.backends == ("onnxruntime",) and v.file == "unet/model.fp16-cuda.onnx" and (root / v.file).is_file()
    assert v.bytes == (root / v.file).stat().st_size < 0.75 * manifest.variant("unet").bytes
    assert "psnr_db" not in v.quality  # never measured: no figure is made up
    assert v.quality["gate"]["passed"] is None and v.quality["gate"]["forced"] is True
    assert "CUDA execution provider" in v.quality["gate"]["not_measured"]
    method = v.quality["method"]
    assert method["devices"] == ["cuda"] and method["fused_ops"]["MultiHeadAttention"] == 8
    assert [s.name for s in v.inputs] == [s.name for s in manifest.variant("unet").inputs]
    assert "fp16-cuda" not in manifest.components["unet_shallow"]
    json.loads((root / "manifest.json").read_text())  # plain JSON (tuples saved as lists)
    assert not list(root.glob("unet/*partial*"))
    # its kernels are CUDA's: loading it elsewhere says so before any compile
    from edgediff.runtime import Pipeline

    with pytest.raises(ValueError, match="unet fp16-cuda .* runs only on cuda .*not on cpu"):
        Pipeline.load(root, backend="onnxruntime", device="cpu", precision="unet=fp16-cuda")


def test_a_graph_over_the_protobuf_limit_reads_and_writes_external_data(tiny_sd1, tmp_path, monkeypatch):
    """An SD 1.5 / SDXL UNet (3.4 / 10 GB in fp32) comes with ``model.onnx.data``; its fp16-cuda graph (1.7 / 5 GB)
    is saved the same way when over the limit: here the limit is lowered so the tiny UNet takes that path."""
    from edgediff.export import onnx_io

    root = tmp_path / "artifact"
    shutil.copytree(tiny_sd1[1], root)
    src = root / "unet" / "model.onnx"
    onnx.save_model(onnx.load(str(src)), str(src), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=0)
    assert (root / "unet" / "model.onnx.data").is_file()
    from edgediff.runtime.manifest import disk_bytes

    meta = json.loads((root / "manifest.json").read_text())
    meta["components"]["unet"]["variants"]["fp32"]["bytes"] = disk_bytes(src)  # the size check at load
    (root / "manifest.json").write_text(json.dumps(meta))
    monkeypatch.setattr(cuda_fp16, "cuda_available", lambda: False)
    monkeypatch.setattr(onnx_io, "EXTERNAL_DATA_THRESHOLD", 1000)
    quantize_artifact(root, "fp16-cuda", force=True, settings=GateSettings(prompts=("a",), seeds=(0,), steps=1))
    v = load_manifest(root).variant("unet", "fp16-cuda")
    data = root / (v.file + ".data")
    assert data.is_file() and v.bytes == (root / v.file).stat().st_size + data.stat().st_size
    model = onnx.load(str(root / v.file), load_external_data=False)
    locations = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"model.fp16-cuda.onnx.data"}  # renamed with the file, never the partial's name
    model = onnx.load(str(root / v.file))
    assert cuda_fp16.fused_counts(model)["MultiHeadAttention"] == 8
    assert any(numpy_helper.to_array(t).dtype == np.float16 for t in model.graph.initializer)


def test_gpu_fast_path_script_imports_without_a_gpu(graphs, tmp_path, capsys):
    bench = load_script("benchmarks/gpu_fast_path.py")
    with pytest.raises(SystemExit) as e:
        bench.parse_args(["--help"])
    assert e.value.code == 0 and "--sdxl" in capsys.readouterr().out
    args = bench.parse_args([str(tmp_path), "--runs", "2", "--warmup", "1"])
    assert args.only.split(",") == list(bench.SECTIONS)
    # its pieces on the CPU EP: feeds from the manifest, IO binding on fixed buffers, timing, comparison, report
    feeds = bench.unet_feeds(graphs["manifest"], 64)
    assert feeds["sample"].shape == (2, 4, 8, 8) and feeds["timestep"].tolist() == [999.0, 999.0]
    bound = bench.Bound(bench.ort_session(graphs["src"], device="cpu"), feeds, device="cpu")
    row = bench.timed(bound, runs=2, warmup=1)
    assert row["runs"] == 2 and row["median_ms"] > 0
    cmp = bench.compare(run_cpu(graphs["src"], feeds), bound.result(), ["out_sample", "deep_feature"])
    assert cmp["out_sample"]["max_abs_err"] == 0 and cmp["out_sample"]["finite"]
    report = {"gpu": "none", "sd15_unet_step_512_b2": {"diffusers_fp16_eager": row | {"median_ms": 20.0},
                                                        "edgediff_fp16_cuda_iobinding": row | {"median_ms": 10.0},
                                                        "edgediff_fp16_cuda_cudagraph": {"error": "RuntimeError: x"}},
              "sd15_fp16_cuda_vs_fp32_outputs": {"fp16-cuda": cmp}}
    md = bench.markdown(report)
    assert "| edgediff_fp16_cuda_iobinding | 10.00 |" in md and "2.00x faster" in md and "error: RuntimeError" in md


# ---------------------------------------------------------------------------
# the CUDA-only contrib operators as standard ONNX (their specs: ONNX Runtime's docs/ContribOperators.md)


def _copy(model):
    m = onnx.ModelProto()
    m.CopyFrom(model)
    return m


def unfuse(model, swap_geglu: bool = False):
    """``model`` (fp32) with NhwcConv, GroupNorm, SkipGroupNorm, BiasSplitGelu, BiasAdd and MultiHeadAttention
    (packed QKV / KV or not) rewritten in standard ONNX operators: a graph the CPU EP runs."""
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    nodes, new_inits, count = [], [], [0]

    def fresh(tag):
        count[0] += 1
        return f"unfused_{tag}_{count[0]}"

    def const(value, dtype=np.int64):
        name = fresh("c")
        new_inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def node(op, inputs, n_out=1, outputs=None, **attrs):
        outs = outputs or [fresh(op) for _ in range(n_out)]
        nodes.append(helper.make_node(op, inputs, outs, name=fresh(op + "_node"), **attrs))
        return outs[0] if n_out == 1 else outs

    def attr(n, key, default=None):
        return next((helper.get_attribute_value(a) for a in n.attribute if a.name == key), default)

    def group_norm(x_nhwc, gamma, beta, n, out):
        assert attr(n, "channels_last", 1) == 1
        groups = attr(n, "groups")
        x = node("Transpose", [x_nhwc], perm=[0, 3, 1, 2])
        normed = node("InstanceNormalization", [node("Reshape", [x, const([0, groups, -1])]),
                                                const(np.ones(groups), np.float32), const(np.zeros(groups), np.float32)],
                      epsilon=attr(n, "epsilon", 1e-5))
        y = node("Reshape", [normed, node("Shape", [x])])
        y = node("Add", [node("Mul", [y, node("Unsqueeze", [gamma, const([1, 2])])]),
                         node("Unsqueeze", [beta, const([1, 2])])])
        if attr(n, "activation", 0):  # SiLU
            y = node("Mul", [y, node("Sigmoid", [y])])
        node("Transpose", [y], outputs=[out], perm=[0, 2, 3, 1])

    def attention(q, k, v):  # (B, S, N, H) each: softmax(q k^T / sqrt(H)) v, as (B, S, N*H)
        q, v = (node("Transpose", [t], perm=[0, 2, 1, 3]) for t in (q, v))
        kt = node("Transpose", [k], perm=[0, 2, 3, 1])
        h = node("Cast", [node("Gather", [node("Shape", [q]), const(3)])], to=onnx.TensorProto.FLOAT)
        scores = node("Div", [node("MatMul", [q, kt]), node("Sqrt", [h])])
        y = node("MatMul", [node("Softmax", [scores], axis=-1), v])
        return node("Reshape", [node("Transpose", [y], perm=[0, 2, 1, 3]), const([0, 0, -1])])

    def unpack(x, parts):  # (B, S, N, parts, H) -> parts x (B, S, N, H)
        return [node("Squeeze", [t, const([3])]) for t in node("Split", [x], n_out=parts, axis=3)]

    for n in g.node:
        op = n.op_type if n.domain == "com.microsoft" else None
        if op == "NhwcConv":
            w = numpy_helper.to_array(inits[n.input[1]]).transpose(0, 3, 1, 2)  # OHWI -> OIHW
            y = node("Conv", [node("Transpose", [n.input[0]], perm=[0, 3, 1, 2]), const(w, np.float32), *n.input[2:]],
                     **{a.name: helper.get_attribute_value(a) for a in n.attribute})
            node("Transpose", [y], outputs=[n.output[0]], perm=[0, 2, 3, 1])
        elif op == "GroupNorm":
            group_norm(n.input[0], n.input[1], n.input[2], n, n.output[0])
        elif op == "SkipGroupNorm":  # Y = GroupNorm(X + skip [+ bias]), S = X + skip [+ bias]
            s = node("Add", [n.input[0], n.input[3]])
            if len(n.input) > 4 and n.input[4]:
                s = node("Add", [s, n.input[4]])
            if len(n.output) > 1 and n.output[1]:
                node("Identity", [s], outputs=[n.output[1]])
            group_norm(s, n.input[1], n.input[2], n, n.output[0])
        elif op == "BiasSplitGelu":  # (X + bias) split in halves on the last axis: left * Gelu(right)
            left, right = node("Split", [node("Add", [n.input[0], n.input[1]])], n_out=2, axis=-1)
            if swap_geglu:
                left, right = right, left
            erf = node("Erf", [node("Div", [right, const(np.sqrt(2.0), np.float32)])])
            gelu = node("Mul", [node("Mul", [right, const(0.5, np.float32)]), node("Add", [erf, const(1.0, np.float32)])])
            node("Mul", [left, gelu], outputs=[n.output[0]])
        elif op == "BiasAdd":  # X + bias + skip
            node("Add", [node("Add", [n.input[0], n.input[1]]), n.input[2]], outputs=[n.output[0]])
        elif op == "MultiHeadAttention":
            heads = attr(n, "num_heads")
            assert attr(n, "scale") is None and not any(n.input[3:])  # default scale; no bias, mask or past
            if not any(n.input[1:]):  # packed QKV: query (B, S, N, 3, H)
                q, k, v = unpack(n.input[0], 3)
            else:
                q = node("Reshape", [n.input[0], const([0, 0, heads, -1])])
                if len(n.input) > 2 and n.input[2]:
                    k, v = (node("Reshape", [t, const([0, 0, heads, -1])]) for t in n.input[1:3])
                else:  # packed KV: key (B, L, N, 2, H)
                    k, v = unpack(n.input[1], 2)
            node("Identity", [attention(q, k, v)], outputs=[n.output[0]])
        else:
            nodes.append(n)
    del g.node[:]
    g.node.extend(nodes)
    g.initializer.extend(new_inits)
    return model
