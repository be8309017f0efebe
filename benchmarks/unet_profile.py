"""Where a UNet step's time goes, per variant and backend, from the backends' own profilers.

    edgediff export --random-weights sd15 /tmp/sd15
    edgediff quantize /tmp/sd15 --precision int8-static --components unet --force --size 256 --steps 4 --prompts 1
    python benchmarks/unet_profile.py /tmp/sd15 --precisions fp32,int8-static \
        --out benchmarks/results/unet_profile_sd15_cpu

- ONNX Runtime: ``SessionOptions.enable_profiling`` writes a Chrome-trace JSON with every node's run time
  (after ORT's graph fusions, so a fused QLinearConv shows as one node).
- OpenVINO: ``PERF_COUNT`` gives each executed layer's real time, its layer type and the kernel that ran it
  (``exec_type``: ``brgconv_avx512_amx_I8``, ``jit_avx512_BF16``, ``ref_any_FP32``...), after its own fusions.

One UNet call on the CFG batch (2 x 4 x H/8 x W/8, 77 tokens) with the same random inputs for every variant;
the first call is a warm-up, the profile is taken over ``--calls`` more. Each node is put in one bucket
(``BUCKETS``: int8 compute, float convolution, float attention products, Q/DQ conversions, normalisation, layout
reorders, elementwise...) by its op type and its name in the exported graph, and the table gives each bucket's
milliseconds per call and share. Writes OUT.json (every bucket, the 25 slowest nodes) and OUT.md.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgediff.bench import machine, machine_label
from edgediff.runtime import load_manifest
from edgediff.runtime.manifest import MODEL_SUFFIXES, artifact_file, residual_inputs, zero_residuals

# (bucket, test on (op type, node name, precision)) in order: the first that matches takes the node
INT8_OPS = {"QLinearConv", "QLinearMatMul", "MatMulIntegerToFloat", "ConvInteger", "MatMulInteger", "QLinearAdd",
            "QLinearMul", "QLinearSigmoid", "QLinearGlobalAveragePool", "QLinearConcat", "DynamicQuantizeLinear",
            "DynamicQuantizeMatMul", "QGemm", "NhwcQLinearConv"}
QDQ_OPS = {"QuantizeLinear", "DequantizeLinear", "FakeQuantize"}
LAYOUT_OPS = {"ReorderInput", "ReorderOutput", "Reorder", "Transpose", "Reshape", "Squeeze", "Unsqueeze", "Concat",
              "Split", "Slice", "Gather", "Shape", "Expand", "Flatten", "Convert", "StridedSlice", "ShapeOf"}
NORM_OPS = {"GroupNormalization", "GroupNorm", "InstanceNormalization", "LayerNormalization", "MVN",
            "SkipLayerNormalization", "NormalizeL2"}
ELEMENTWISE_OPS = {"Add", "Mul", "Sub", "Div", "Sigmoid", "Silu", "Swish", "Gelu", "BiasGelu", "FastGelu", "QuickGelu",
                   "Eltwise", "Subgraph", "Erf", "Pow", "Sqrt", "ReduceMean", "Multiply", "Divide", "Power", "Tanh",
                   "Cos", "Sin", "Exp", "Clamp", "BiasAdd", "Where", "Equal", "Cast", "Neg", "SplitGelu",
                   "BiasSplitGelu", "MulAdd", "Select", "Interpolate", "Resize", "Range", "Math"}
ATTENTION_PRODUCT = re.compile(r"/attn[12]/(?!to_)[^/]*(MatMul|Einsum|bmm|ScaledDotProduct)", re.IGNORECASE)
BUCKETS = ("int8 compute (conv, matmul)", "float convolution", "float linear (matmul with weights)",
           "float attention products (QK^T, AV)", "softmax", "Q/DQ conversions", "normalisation",
           "layout, reorders, reshapes", "elementwise (adds, SiLU, GELU, scale)", "other")


def bucket(op: str, name: str, precision: str) -> str:
    """One bucket per node: ``precision`` is the kernel's (OpenVINO's I8/BF16/FP32; '' for ONNX Runtime)."""
    compute = any(k in op for k in ("Conv", "FullyConnected", "MatMul", "Gemm", "Attention", "Einsum"))
    if op in QDQ_OPS:
        return "Q/DQ conversions"
    if op in INT8_OPS or (compute and precision in ("I8", "U8")):
        return "int8 compute (conv, matmul)"
    if compute and "Conv" in op:
        return "float convolution"
    if compute:
        return "float attention products (QK^T, AV)" if ATTENTION_PRODUCT.search(name) or "Attention" in op \
            else "float linear (matmul with weights)"
    if op == "Subgraph" and ATTENTION_PRODUCT.search(name):  # OpenVINO's fused attention: QK^T, softmax, AV
        return "float attention products (QK^T, AV)" if precision not in ("I8", "U8") else "int8 compute (conv, matmul)"
    if op in ("Softmax", "SoftMax"):
        return "softmax"
    if op in NORM_OPS:
        return "normalisation"
    if op in LAYOUT_OPS:
        return "layout, reorders, reshapes"
    if op in ELEMENTWISE_OPS:
        return "elementwise (adds, SiLU, GELU, scale)"
    return "other"


def unet_feeds(manifest, size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs of the CFG batch for the manifest's UNet signature."""
    rng = np.random.default_rng(seed)
    latent, tokens = size // 8, 77
    dims = {"batch": 2, "height": latent, "width": latent, "sequence": tokens}
    feeds = {}
    specs = manifest.variant(manifest.denoiser.name).inputs
    residuals = residual_inputs(specs)  # a UNet exported with ControlNets: zeros, its plain step
    for spec in (s for s in specs if s not in residuals):
        shape = [d if isinstance(d, int) else dims.get(d, 2) for d in spec.shape]
        if spec.name == "timestep":
            feeds[spec.name] = np.full(shape, 500, dtype=spec.dtype)
        else:
            feeds[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
    return feeds | zero_residuals(residuals, feeds["sample"].shape)


def profile_ort(path: Path, feeds: dict, threads: int, calls: int) -> tuple[list[dict], float]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    with tempfile.TemporaryDirectory() as tmp:
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(tmp) / "ort")
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        sess.run(None, feeds)  # warm-up
        t0 = time.perf_counter()
        for _ in range(calls):
            sess.run(None, feeds)
        wall = (time.perf_counter() - t0) / calls
        trace = json.loads(Path(sess.end_profiling()).read_text())
    runs = [e for e in trace if e.get("cat") == "Session" and e.get("name") == "model_run"]
    start = runs[1]["ts"] if len(runs) > 1 else 0  # skip the warm-up's events
    nodes: dict[str, dict] = {}
    for e in trace:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time") or e["ts"] < start:
            continue
        name = e["name"][: -len("_kernel_time")]
        n = nodes.setdefault(name, {"name": name, "op": e["args"].get("op_name", "?"), "precision": "", "ms": 0.0})
        n["ms"] += e["dur"] / 1000 / calls
    return list(nodes.values()), wall


def profile_ov(path: Path, feeds: dict, threads: int, calls: int, ov_precision: str) -> tuple[list[dict], float, str]:
    import openvino as ov

    config: dict[str, Any] = {"PERF_COUNT": "YES", "INFERENCE_NUM_THREADS": threads}
    if ov_precision != "auto":
        config["INFERENCE_PRECISION_HINT"] = ov_precision
    compiled = ov.Core().compile_model(str(path), "CPU", config)
    precision = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()  # f32, bf16, f16
    request = compiled.create_infer_request()
    request.infer(feeds)  # warm-up
    nodes: dict[str, dict] = {}
    t0 = time.perf_counter()
    for _ in range(calls):
        request.infer(feeds)
        for p in request.profiling_info:
            if str(p.status).endswith("NOT_RUN"):
                continue
            kernel = p.exec_type
            prec = kernel.rsplit("_", 1)[-1].upper() if "_" in kernel else ""
            n = nodes.setdefault(p.node_name, {"name": p.node_name, "op": p.node_type, "kernel": kernel,
                                               "precision": prec, "ms": 0.0})
            n["ms"] += p.real_time.total_seconds() * 1000 / calls
    wall = (time.perf_counter() - t0) / calls
    return list(nodes.values()), wall, precision


def summarize(nodes: list[dict]) -> dict[str, dict[str, float]]:
    total = sum(n["ms"] for n in nodes) or 1.0
    out: dict[str, dict[str, float]] = {b: {"ms": 0.0, "nodes": 0} for b in BUCKETS}
    for n in nodes:
        b = bucket(n["op"], n["name"], n.get("precision", ""))
        n["bucket"] = b
        out[b]["ms"] += n["ms"]
        out[b]["nodes"] += 1
    for b in out.values():
        b["share"] = round(b["ms"] / total, 4)
        b["ms"] = round(b["ms"], 1)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("artifact", type=Path)
    p.add_argument("--precisions", default="fp32,int8-static", help="UNet variants, comma-separated")
    p.add_argument("--graph", action="append", default=[], metavar="LABEL=PATH",
                   help="also profile a UNet graph outside the artifact (a candidate quantization), named LABEL")
    p.add_argument("--backends", default="onnxruntime,openvino")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--calls", type=int, default=2, help="profiled calls after one warm-up")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ov-precision", default="auto", help="OpenVINO's inference precision hint (auto: the CPU's default)")
    p.add_argument("--out", type=Path, required=True, help="path stem: writes OUT.json and OUT.md")
    args = p.parse_args()

    manifest = load_manifest(args.artifact)
    unet = manifest.denoiser.name
    feeds = unet_feeds(manifest, args.size)
    results = []
    graphs = []
    for precision in [p for p in args.precisions.split(",") if p]:
        variant = manifest.variant(unet, precision)
        graphs.append((precision, artifact_file(args.artifact, variant.file, f"{unet} {precision}", MODEL_SUFFIXES),
                       variant.backends))
    for entry in args.graph:
        label, sep, path = entry.partition("=")
        if not sep or not Path(path).is_file():
            p.error(f"--graph {entry!r}: expected LABEL=PATH of an existing .onnx or .xml file")
        graphs.append((label, Path(path), ("openvino",) if path.endswith(".xml") else ()))
    for precision, path, backends in graphs:
        for backend in args.backends.split(","):
            if backends and backend not in backends:
                continue
            print(f"profiling {precision} on {backend} ...", flush=True)
            if backend == "onnxruntime":
                nodes, wall = profile_ort(path, feeds, args.threads, args.calls)
                executes = "f32"
            else:
                nodes, wall, executes = profile_ov(path, feeds, args.threads, args.calls, args.ov_precision)
            buckets = summarize(nodes)
            slowest = sorted(nodes, key=lambda n: -n["ms"])[:25]
            results.append({"precision": precision, "backend": backend, "executes": executes,
                            "wall_s_per_call": round(wall, 3), "profiled_ms": round(sum(n["ms"] for n in nodes), 1),
                            "buckets": buckets, "slowest": [n | {"ms": round(n["ms"], 1)} for n in slowest]})
            print(f"  {wall:.2f} s per call", flush=True)
    info = {"machine": machine(), "artifact": str(args.artifact), "size": args.size, "threads": args.threads,
            "calls": args.calls, "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps(info, indent=1) + "\n")
    Path(f"{args.out}.md").write_text("\n".join(table(info)) + "\n")
    print("\n".join(table(info)))


def table(info: dict) -> list[str]:
    results = info["results"]
    head = [f"{r['backend']} {r['precision']} ({r['executes']})" for r in results]
    lines = [f"# UNet step profile on {machine_label(info['machine'])}", "",
             f"{info['size']}x{info['size']}, CFG batch 2, {info['threads']} threads, mean of {info['calls']} calls "
             "after a warm-up; ms per call by bucket (share of the profiled time).", "",
             "| bucket | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for b in BUCKETS:
        lines.append(f"| {b} | " + " | ".join(
            f"{r['buckets'][b]['ms']:.0f} ({r['buckets'][b]['share']:.0%})" for r in results) + " |")
    lines.append("| **profiled total ms** | " + " | ".join(f"{r['profiled_ms']:.0f}" for r in results) + " |")
    lines.append("| **wall s per call** | " + " | ".join(f"{r['wall_s_per_call']:.2f}" for r in results) + " |")
    return lines


if __name__ == "__main__":
    main()
