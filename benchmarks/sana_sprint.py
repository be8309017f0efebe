"""Sana-Sprint 0.6B on this CPU: each stage's time and the peak memory of one image, at 512x512 and 1024x1024.

Architecture-exact random weights (``export/recipes.py``: ``sana-sprint-0.6b``, its transformer 0.59 B and DC-AE
312 M counted against the published sizes; Gemma2-2B 2.61 B), 2 steps (SCM through intermediate_timesteps 1.3),
guidance 4.5 fed to the model, no CFG.

Gemma2-2B is 10.4 GB in fp32: tracing it beside the DiT and the DC-AE in one export does not fit a 24 GB machine,
so it is exported and timed on its own (its own process), and the pipeline's artifact carries a one-layer Gemma2
of the same width standing in for it (its time is reported and left out of the sum). Gemma2 is fed the length
Sana gives it: the instruction prefix (about 200 tokens with Gemma's tokenizer, 1,057 characters; ``--prefix-tokens``)
+ 298. The end-to-end figure is Gemma2-2B's time + the pipeline's transformer and decoder times, measured in the
same process one after the other.

    python benchmarks/sana_sprint.py --work /tmp/sana-bench --out benchmarks/results/sana_sprint_cpu

Each backend runs in a fresh process; OpenVINO at its default execution precision (bf16 on a BF16 CPU), ONNX
Runtime fp32. With a tiny decoder in the artifact (``--tiny-vae random`` at export, taesana's architecture) the
decoder is timed both ways.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

# backend:size:vae:memory (memory "low": low-memory mode, Gemma2 released before the pipeline loads)
CONFIGS = ("openvino:512:tiny:default", "openvino:512:full:default", "openvino:1024:tiny:default",
           "openvino:1024:full:default", "openvino:1024:tiny:low", "openvino:512:tiny:low",
           "onnxruntime:512:tiny:default", "onnxruntime:1024:tiny:default")
PREFIX_TOKENS = 200  # Sana's complex human instruction with Gemma's tokenizer (DITS.md: about 200 tokens)

EXPORT_GEMMA = r"""
import json, sys, torch
from pathlib import Path
from transformers import Gemma2Config, Gemma2Model
from edgediff.export.components import export_component
from edgediff.export.gemma import gemma_encoder_contract
from edgediff.export.recipes import GEMMA2_2B
out = Path(sys.argv[1])
torch.manual_seed(0)
model = Gemma2Model(Gemma2Config(**GEMMA2_2B, attn_implementation="eager")).eval()
print(json.dumps({"gemma_params": sum(p.numel() for p in model.parameters())}), flush=True)
contract = gemma_encoder_contract(model, 300)
del model  # the contract holds it; export_component drops it once traced, before its parity session opens
variant = export_component(contract, out, print, release=lambda: None)
print(json.dumps({"file": variant.file, "quality": variant.quality}))
"""

BUILD = r"""
import sys
from pathlib import Path
import edgediff.export.recipes as R
r = dict(R.RECIPES["sana-sprint-0.6b"])
r["gemma"] = r["gemma"] | {"num_hidden_layers": 1, "vocab_size": 1024}  # the stand-in: Gemma2-2B's width, one layer
R._build_sana(r, Path(sys.argv[1]), 0)
"""

RUN = r"""
import json, sys, time
import numpy as np
from edgediff.bench import PeakMemory, machine, machine_label
from edgediff.runtime import Pipeline
args = json.loads(sys.argv[1])
memory = PeakMemory().start()
row = {"machine": machine_label(machine()), "backend": args["backend"], "size": args["size"], "steps": 2,
       "gemma_weights": args.get("gemma_precision", "fp32")}
if args["backend"] == "openvino":
    import openvino as ov
    core = ov.Core()
    compiled = core.compile_model(args["gemma"], "CPU", {"INFERENCE_NUM_THREADS": args["threads"]})
    run_gemma = lambda feeds: compiled(feeds)
    row["gemma_precision"] = str(compiled.get_property("INFERENCE_PRECISION_HINT"))
else:
    import onnxruntime as ort
    o = ort.SessionOptions(); o.intra_op_num_threads = args["threads"]
    session = ort.InferenceSession(args["gemma"], o, providers=["CPUExecutionProvider"])
    run_gemma = lambda feeds: session.run(None, feeds)
    row["gemma_precision"] = "f32"
length = args["gemma_tokens"]
feeds = {"input_ids": np.full((1, length), 5, np.int64), "attention_mask": np.ones((1, length), np.int64)}
feeds["input_ids"][0, 0] = 2
memory.stage = "gemma"
run_gemma(feeds)  # first call: compiles / allocates
times = []
for _ in range(args["runs"]):
    t0 = time.perf_counter(); run_gemma(feeds); times.append(time.perf_counter() - t0)
row["gemma2_2b_s"] = round(float(np.median(times)), 3)
row["gemma_peak_gb"] = round(memory.peak / 1e9, 2)
if args["low_memory"]:  # low memory: the text encoder is released before the next stage loads
    run_gemma = compiled = session = None
    import gc; gc.collect()
memory.stage = "load"
pipe = Pipeline.load(args["artifact"], backend=args["backend"], device="cpu", threads=args["threads"],
                     vae=args["vae"], low_memory=args["low_memory"])
w = h = args["size"]
pipe.txt2img("a red fox in the snow", seed=0, width=w, height=h)  # warm-up
best = None
for _ in range(args["runs"]):
    memory.stage = "generate"
    t0 = time.perf_counter()
    result = pipe.txt2img("a red fox in the snow", seed=0, width=w, height=h)
    total = time.perf_counter() - t0
    if best is None or total < best[0]:
        best = (total, result.timings.stages)
total, stages = best
row.update(vae=args["vae"], low_memory=args["low_memory"],
           transformer_s=round(sum(stages["transformer"]), 3),
           transformer_step_s=round(float(np.median(stages["transformer"])), 3),
           decoder_s=round(sum(stages["vae_decoder"]), 3), stand_in_text_s=round(sum(stages["text_encoder"]), 3),
           pipeline_s=round(total, 3))
row["end_to_end_s"] = round(row["gemma2_2b_s"] + total - row["stand_in_text_s"], 3)
row["peak_gb"] = round(memory.peak / 1e9, 2)
row["peak_stage"] = memory.peak_stage
print(json.dumps(row))
"""


def run(code: str, *args: str) -> list[dict]:
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="folder for the built models and artifacts")
    ap.add_argument("--out", type=Path, required=True, help="results prefix: writes OUT.json and OUT.md")
    ap.add_argument("--configs", default=",".join(CONFIGS), help="backend:size:vae:memory, comma-separated")
    ap.add_argument("--runs", type=int, default=1, help="timed runs after one warm-up (the best is kept)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prefix-tokens", type=int, default=PREFIX_TOKENS)
    ap.add_argument("--gemma-precision", default="fp32", choices=("fp32", "nncf-w8"),
                    help="Gemma2-2B's graph: fp32, or int8 weights (OpenVINO configurations only)")
    ap.add_argument("--tiny-vae", default="random", help="a taesana decoder file, or 'random' (its architecture)")
    args = ap.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    gemma = work / "gemma2-2b" / "text_encoder" / "model.onnx"  # 10.4 GB: its export peaks at 18.8 GB RSS
    if not gemma.exists():
        print("exporting Gemma2-2B alone", flush=True)
        run(EXPORT_GEMMA, str(work / "gemma2-2b"))
    if args.gemma_precision == "nncf-w8":  # edgediff quantize's int8 weight compression, applied to the lone graph
        compressed = gemma.with_name("model.nncf-w8.xml")
        if not compressed.exists():
            print("compressing Gemma2-2B's weights to int8 (nncf-w8)", flush=True)
            from edgediff.quantize.quantize import compress_nncf_w8

            compress_nncf_w8(gemma, compressed)
        gemma = compressed
    artifact = work / "artifact"
    if not (artifact / "manifest.json").exists():
        print("building and exporting the DiT and DC-AE (Gemma2 stand-in)", flush=True)
        run(BUILD, str(work / "diffusers"))
        tiny_vae = args.tiny_vae
        if tiny_vae == "random":  # taesana's architecture with random weights
            from edgediff.export.taesana import save_random_taesana

            tiny_vae = str(save_random_taesana(work / "taesana", latent_channels=32, upscale=32))
        from edgediff.export.exporter import export_artifact

        # random weights: the tiny decoder is not gated against the (random) DC-AE, as for the recipes
        export_artifact(str(work / "diffusers"), artifact, random_weights=True, source_label="sana-sprint-0.6b",
                        tiny_vae=tiny_vae, force_tiny_vae=True, progress=print)
    configs = [c.split(":") for c in args.configs.split(",")]
    rows = []
    for backend, size, vae, memory in configs:
        spec = {"backend": backend, "size": int(size), "vae": vae, "low_memory": memory == "low",
                "gemma_precision": args.gemma_precision,
                "artifact": str(artifact), "gemma": str(gemma), "threads": args.threads,
                "runs": args.runs, "gemma_tokens": args.prefix_tokens + 298}
        row = run(RUN, json.dumps(spec))[0]
        print(json.dumps(row), flush=True)
        rows.append(row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps(rows, indent=1))
    lines = [f"Sana-Sprint 0.6B, 2 steps, guidance 4.5 (distilled), {rows[0]['machine']}, {args.threads} threads, "
             f"Gemma2-2B {args.gemma_precision}",
             f"(Gemma2-2B fed {args.prefix_tokens + 298} tokens: the instruction prefix + 298)", "",
             "| backend | size | decoder | low memory | Gemma2-2B s | DiT step s | decoder s | end to end s | peak GB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['backend']} | {r['size']} | {r['vae']} | {r['low_memory']} | {r['gemma2_2b_s']} | "
                     f"{r['transformer_step_s']} | {r['decoder_s']} | {r['end_to_end_s']} | {r['peak_gb']} |")
    Path(f"{args.out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
