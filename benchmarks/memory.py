"""Where the memory goes: peak resident memory of one 512x512 image on the SD1.5 architecture, per mode.

Each configuration runs in a fresh process, twice: first with an empty compile cache ("cold": the backend
optimizes / compiles and writes the cache), then again from that cache ("warm": what every later run of a
user's ``generate`` pays). Resident memory is sampled every 5 ms from /proc/self/statm, with the stage it was
in (load, text, each UNet step, decode), and split into anonymous memory (what the process allocated) and
file-backed pages (weights memory-mapped from the artifact or the cache) where the peak happens.

    python benchmarks/memory.py --artifact /tmp/peers/sd15 --out benchmarks/results/memory_sd15_cpu

Configurations: each backend by default and with ``low_memory`` (one stage's graphs at a time, ONNX Runtime
without its arena, the VAE in tiles past the native size), and OpenVINO with the ``ov-fp16`` text encoder
and UNet (IR with fp16 weights) in both modes where the artifact has them.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

STEPS = 3

# one run: the peak and where it happened; printed as one JSON line
RUN = r"""
import json, resource, sys, time
import numpy as np
import onnxruntime, openvino
from edgediff.bench import PeakMemory
from edgediff.runtime import Pipeline

memory = PeakMemory().start()
args = json.loads(sys.argv[1])
t0 = time.perf_counter()
memory.stage = "load"
pipe = Pipeline.load(args["artifact"], backend=args["backend"], device="cpu", threads=args["threads"],
                     precision=args["precision"], low_memory=args["low_memory"], cache_dir=args["cache"])
load_s = time.perf_counter() - t0
def step(done, total):
    memory.stage = "decode" if done == total else f"unet step {done + 1}"
memory.stage = "text + unet step 1"
t0 = time.perf_counter()
result = pipe.txt2img("a photo of an astronaut riding a horse", steps=args["steps"], seed=0, callback=step)
total_s = time.perf_counter() - t0
time.sleep(0.05)
t = result.timings.stages
print(json.dumps({"load_s": round(load_s, 2), "generate_s": round(total_s, 2),
                  "unet_step_s": round(float(np.median(t["unet"][1:])), 3), "vae_decode_s": round(sum(t["vae_decoder"]), 2),
                  "peak_gb": round(memory.peak / 1e9, 2), "peak_file_backed_gb": round(memory.peak_file / 1e9, 2),
                  "peak_stage": memory.peak_stage, "ru_maxrss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2),
                  "by_stage_gb": {k: round(v / 1e9, 2) for k, v in memory.by_stage.items()},
                  "execution_precision": {c: d["execution_precision"] for c, d in pipe.describe().items()}}))
"""


def configurations(artifact: Path) -> list[dict]:
    from edgediff.runtime import load_manifest

    manifest = load_manifest(artifact)
    configs = []
    for backend in ("onnxruntime", "openvino"):
        for low in (False, True):
            configs.append({"backend": backend, "low_memory": low, "precision": None})
    if all("ov-fp16" in manifest.components[c] for c in ("unet", "text_encoder")):
        for low in (False, True):
            configs.append({"backend": "openvino", "low_memory": low, "precision": "unet=ov-fp16,text_encoder=ov-fp16"})
    return configs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True, help="results path without suffix (.json and .md written)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=STEPS)
    args = ap.parse_args()
    from edgediff.bench import machine

    rows = []
    for config in configurations(args.artifact):
        with tempfile.TemporaryDirectory() as cache:
            for state in ("cold", "warm"):
                run = config | {"artifact": str(args.artifact), "threads": args.threads, "steps": args.steps,
                                "cache": cache}
                out = subprocess.run([sys.executable, "-c", RUN, json.dumps(run)], capture_output=True, text=True)
                if out.returncode != 0:
                    raise SystemExit(f"{config} failed:\n{out.stderr[-3000:]}")
                row = config | {"cache": state} | json.loads(out.stdout.strip().splitlines()[-1])
                print(json.dumps(row), flush=True)
                rows.append(row)
    record = {"machine": machine(), "artifact": str(args.artifact), "size": "512x512", "guidance": "on (UNet batch 2)",
              "steps": args.steps, "threads": args.threads, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    lines = [f"# Peak resident memory, SD1.5 architecture (random weights), 512x512, {args.steps} steps, guidance on",
             "", f"Machine: {record['machine'].get('cpu', '?')}, {args.threads} threads. "
             "Generated by `benchmarks/memory.py`; each row a fresh process.", "",
             "| backend | mode | precision | cache | peak GB | of it file-backed | peak during | load s | UNet step s | "
             "decode s | total s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['backend']} | {'low-memory' if r['low_memory'] else 'default'} | "
                     f"{r['precision'] or 'fp32'} | {r['cache']} | {r['peak_gb']} | {r['peak_file_backed_gb']} | "
                     f"{r['peak_stage']} | {r['load_s']} | {r['unet_step_s']} | {r['vae_decode_s']} | "
                     f"{r['generate_s']} |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}.md and .json")


if __name__ == "__main__":
    main()
