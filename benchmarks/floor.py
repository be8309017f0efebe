"""The physical floor of a UNet step on this CPU: the graph's FLOPs over the measured matmul rates.

    python benchmarks/floor.py ARTIFACT [--size 512] [--threads 2] [--json out.json]

FLOPs are counted on the exported ONNX graph itself (2 x multiply-adds of
every convolution and matrix product, shapes resolved by OpenVINO at the
given size with a CFG batch of 2), so they describe exactly what the
runtimes execute. The rates are ONNX Runtime's on a large square product
with the given threads: MatMul in fp32 and MatMulInteger (uint8 x int8), the
int8 path static quantization uses; and OpenVINO's fp32 MatMul.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def unet_flops(artifact: Path, size: int, batch: int = 2, latent_factor: int = 8) -> dict[str, float]:
    """FLOPs per UNet call by op type, read off the graph reshaped to static shapes by OpenVINO.

    (ONNX's own shape inference stops at the attention reshapes, whose shapes
    are computed at run time; OpenVINO resolves them.)
    """
    import openvino as ov

    model = ov.Core().read_model(str(Path(artifact) / "unet" / "model.onnx"))
    h = w = size // latent_factor
    shapes = {}
    for inp in model.inputs:
        rank = inp.get_partial_shape().rank.get_length()
        name = inp.get_any_name()
        shapes[name] = {"sample": [batch, -1, h, w], "timestep": [batch], "time_ids": [batch, 6]}.get(name)
        if shapes[name] is None:
            shapes[name] = [batch, 77, -1] if rank == 3 else [batch, -1]
        ps = inp.get_partial_shape()
        shapes[name] = [d if d != -1 else ps[i].get_length() for i, d in enumerate(shapes[name])]
    model.reshape(shapes)
    totals: dict[str, float] = {}
    for op in model.get_ordered_ops():
        kind = op.get_type_name()
        if kind not in ("Convolution", "GroupConvolution", "MatMul"):
            continue
        out = list(op.get_output_shape(0))
        a, b = list(op.get_input_shape(0)), list(op.get_input_shape(1))
        if kind == "Convolution":
            macs = np.prod(out) * np.prod(b[1:])  # each output element: C_in x kH x kW
        elif kind == "GroupConvolution":
            macs = np.prod(out) * np.prod(b[2:])
        else:
            k = a[-2] if op.get_attributes().get("transpose_a") else a[-1]
            macs = np.prod(out) * k
        totals[kind] = totals.get(kind, 0.0) + 2.0 * float(macs)
    totals["total"] = sum(totals.values())
    return totals


def matmul_rates(threads: int, n: int = 2048, repeats: int = 5) -> dict[str, float]:
    """ONNX Runtime's GFLOP/s for an n x n x n product: fp32 MatMul, uint8 x int8 MatMulInteger."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    rates = {}
    for name, op, ta, tb, a, b in (
        ("fp32_matmul", "MatMul", TensorProto.FLOAT, TensorProto.FLOAT,
         rng.standard_normal((n, n), dtype=np.float32), rng.standard_normal((n, n), dtype=np.float32)),
        ("int8_matmulinteger", "MatMulInteger", TensorProto.UINT8, TensorProto.INT8,
         rng.integers(0, 255, (n, n), dtype=np.uint8), rng.integers(-127, 127, (n, n), dtype=np.int8)),
    ):
        out_type = TensorProto.FLOAT if op == "MatMul" else TensorProto.INT32
        graph = helper.make_graph(
            [helper.make_node(op, ["A", "B"], ["C"])], name,
            [helper.make_tensor_value_info("A", ta, [n, n])], [helper.make_tensor_value_info("C", out_type, [n, n])],
            [onnx.numpy_helper.from_array(b, "B")])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        sess.run(None, {"A": a})
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            sess.run(None, {"A": a})
            times.append(time.perf_counter() - t0)
        rates[name] = round(2 * n**3 / min(times) / 1e9, 1)
    try:  # OpenVINO's fp32 GEMM (oneDNN) can be faster than ONNX Runtime's (MLAS) on the same CPU
        import openvino as ov
        import openvino.opset13 as ops

        a = rng.standard_normal((n, n), dtype=np.float32)
        x = ops.parameter([n, n], ov.Type.f32, name="A")
        model = ov.Model([ops.matmul(x, ops.constant(rng.standard_normal((n, n), dtype=np.float32)), False, False)], [x])
        compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32"})
        request = compiled.create_infer_request()
        request.infer({0: a})
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            request.infer({0: a})
            times.append(time.perf_counter() - t0)
        rates["fp32_matmul_openvino"] = round(2 * n**3 / min(times) / 1e9, 1)
    except ImportError:
        pass
    return rates


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("artifact", type=Path)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    flops = unet_flops(args.artifact, args.size)
    rates = matmul_rates(args.threads)
    floor = {k: round(flops["total"] / (v * 1e9), 2) for k, v in rates.items()}
    result = {"size": args.size, "batch": 2, "unet_gflop_per_step": {k: round(v / 1e9, 1) for k, v in flops.items()},
              "gflops_per_s": rates, "floor_s_per_step": floor, "threads": args.threads}
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
