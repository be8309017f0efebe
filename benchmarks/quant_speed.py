"""Speed and size of each UNet precision on an architecture-size artifact, both backends, one sitting.

    edgediff export --random-weights sd15 /tmp/sd15
    python benchmarks/quant_speed.py /tmp/sd15 --out benchmarks/results/quant_speed_sd15_cpu

Adds the UNet variants the artifact lacks (``edgediff quantize --force``:
random weights draw no images, so the gate's figures mean nothing here and
are not the point), then runs ``edgediff bench`` for every (backend,
precision) pair at the benchmark size with the same threads, and writes the
rows (``.jsonl``) and a markdown table (``.md``) of UNet step medians, size
and ratios. Calibration (int8-static, nncf-*) records the UNet's inputs along
short denoising runs at ``--calib-size`` to keep it affordable on a CPU; the
graphs are shape-dynamic, so the timing size is independent of it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from edgediff.bench import machine, run_bench, write_rows
from edgediff.quantize import GateSettings, QualityGateError, quantize_artifact
from edgediff.quantize.quantize import NNCF_PRECISIONS
from edgediff.runtime import load_manifest

CONFIGS = (
    ("onnxruntime", "fp32"), ("onnxruntime", "int8"), ("onnxruntime", "int8-static"), ("onnxruntime", "int4"),
    ("openvino", "fp32"), ("openvino", "int8"), ("openvino", "int8-static"), ("openvino", "int8-static-attn"),
    ("openvino", "nncf-int8"), ("openvino", "nncf-hybrid"),
)


def ensure_variants(root: Path, precisions: set[str], calib_size: int, steps: int, threads: int) -> dict[str, float]:
    seconds = {}
    for precision in ("int8", "int4", "int8-static", "int8-static-attn", "nncf-int8", "nncf-hybrid"):
        if precision not in precisions or precision in load_manifest(root).components["unet"]:
            continue
        settings = GateSettings(prompts=("a photo of an astronaut riding a horse on mars",), seeds=(0,), steps=steps,
                                size=calib_size, threads=threads)
        t0 = time.perf_counter()
        print(f"quantizing unet to {precision} ...", flush=True)
        try:
            quantize_artifact(root, precision, ("unet",), force=True, settings=settings, progress=print)
        except QualityGateError as e:  # force adds it anyway
            print(e)
        seconds[precision] = round(time.perf_counter() - t0, 1)
    return seconds


def table(rows: list[dict], root: Path) -> list[str]:
    m = load_manifest(root)
    fp32_bytes = m.variant("unet").bytes
    by = {}
    for r in rows:
        by.setdefault((r["backend"], r["precision"]["unet"]), []).append(r)
    step = {k: statistics.median(r["unet_rest_median_s"] for r in v) for k, v in by.items()}
    base = {b: step.get((b, "fp32")) for b in ("onnxruntime", "openvino")}
    best_fp32 = min(v for v in base.values() if v)
    out = ["| backend | UNet precision | executes as | UNet GB | size vs fp32 | UNet s/step (median) | first step s "
           "| vs same backend fp32 | vs best fp32 |", "|---" * 9 + "|"]
    for (backend, prec), group in by.items():
        v = m.variant("unet", prec)
        r0 = group[0]
        first = statistics.median(r["unet_first_s"] for r in group)
        out.append(f"| {backend} | {prec} | {r0['execution_precision']['unet']} | {v.bytes / 1e9:.2f} "
                   f"| {fp32_bytes / v.bytes:.1f}x smaller | {step[(backend, prec)]:.2f} | {first:.2f} "
                   f"| {base[backend] / step[(backend, prec)]:.2f}x | {best_fp32 / step[(backend, prec)]:.2f}x |")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("artifact", type=Path)
    p.add_argument("--out", type=Path, required=True, help="path stem: writes OUT.jsonl and OUT.md")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--steps", type=int, default=3, help="UNet calls per run (the first is reported apart)")
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--calib-size", type=int, default=256)
    p.add_argument("--calib-steps", type=int, default=4)
    p.add_argument("--configs", default=",".join(f"{b}:{q}" for b, q in CONFIGS))
    p.add_argument("--table-only", action="store_true", help="rewrite OUT.md from the rows already in OUT.jsonl")
    args = p.parse_args()
    configs = [tuple(c.split(":")) for c in args.configs.split(",")]
    jsonl = args.out.with_suffix(".jsonl")
    quantize_s, rows = {}, []
    if args.table_only:
        configs, rows = [], [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    else:
        quantize_s = ensure_variants(args.artifact, {q for _, q in configs}, args.calib_size, args.calib_steps, args.threads)
        jsonl.unlink(missing_ok=True)
    for backend, prec in configs:
        if backend == "onnxruntime" and prec in NNCF_PRECISIONS:
            continue
        print(f"bench {backend} unet={prec} ...", flush=True)
        got = run_bench(args.artifact, backend=backend, device="cpu", precision={"unet": prec}, width=args.size,
                        height=args.size, steps=args.steps, runs=args.runs, warmup=0, threads=args.threads)
        write_rows(got, jsonl)
        rows += got
        print(f"  unet {statistics.median(r['unet_rest_median_s'] for r in got):.2f} s/step", flush=True)
    mach = machine()
    lines = [f"# UNet precisions on {mach.get('cpu')} ({args.threads} threads, {args.size}x{args.size}, CFG batch 2)", "",
             f"Artifact: `{load_manifest(args.artifact).family}` random weights; {args.steps} UNet calls per run, "
             f"median of calls 2..{args.steps}; machine flags {', '.join(mach.get('cpu_flags', []))}; backends "
             f"{json.dumps(mach.get('backends'))}. Calibration (int8-static, nncf-*) at {args.calib_size}x"
             f"{args.calib_size}, {args.calib_steps} steps"
             + (f"; quantization wall time: {json.dumps(quantize_s)}" if quantize_s else "") + ".", ""]
    lines += table(rows, args.artifact)
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
