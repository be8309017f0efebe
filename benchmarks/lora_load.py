"""What a LoRA costs at load: edgediff (both backends) and, where it accepts the file, OpenVINO GenAI.

Each load runs in a fresh process (imports included, as a user's ``generate`` pays them), one after another,
so nothing competes for the 2 cores. The LoRA is random, rank 64, on every layer of the UNet and text
encoder that LoRAs train (attention, projections, feed-forward and, for the LoCon file, every convolution,
3x3 kernels included), made from the artifact's weight maps with numpy; GenAI refuses 3x3 LoRA kernels, so
it is also measured on the file without convolutions ("attention").

    python benchmarks/lora_load.py --artifact /tmp/peers/sd15 --work /tmp/lora-bench \\
        --genai-python /tmp/peers/ovgenai/bin/python --genai-model /tmp/peers/sd15-openvino \\
        --out benchmarks/results/lora_load_sd15_cpu

Cases: the artifact alone (no cache: compiled; then warm: from the compile cache), with the LoRA (no cache;
first load with a cache: merged, compiled and written; second: from the cache, on ONNX Runtime; OpenVINO
keeps no entry for a LoRA'd graph, so its three LoCon loads are one case measured three times), ``set_loras`` swapping
the loaded LoRA for another (only the touched graphs recompiled), and a UNet step at 512x512 with and
without a LoRA: merged at load it costs nothing per step, while GenAI runs its LoRA as extra graph
branches at every step.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RANK = 64
STEPS = 3  # for the UNet step time at 512x512 with guidance (the first step left out)
PROMPT = "a photo of an astronaut riding a horse"


def make_lora(artifact: Path, path: Path, conv: bool, seed: int) -> dict:
    """A kohya LoRA (LoCon with ``conv``) of rank 64 on every trained layer the weight maps name."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    tensors = {}
    for model, prefix in (("unet", "lora_unet_"), ("text_encoder", "lora_te_text_model_")):
        weights = json.loads((artifact / model / "weights.json").read_text())["weights"]
        for param, (_, _, shape) in weights.items():
            module = param.removesuffix(".weight")
            trained = any(k in module for k in ("attentions.", "resnets.", "samplers.", "self_attn.", "mlp."))
            if not trained or (len(shape) == 4 and not conv) or "embedding" in module:
                continue
            rank = min(RANK, shape[0], int(np.prod(shape[1:])))
            down = (rng.standard_normal((rank, *shape[1:])) * 0.01).astype(np.float16)
            up = (rng.standard_normal((shape[0], rank, *((1, 1) if len(shape) == 4 else ()))) * 0.01).astype(np.float16)
            key = prefix + module.replace(".", "_")
            tensors |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
                        f"{key}.alpha": np.array(rank, dtype=np.float16)}
    save_file(tensors, str(path))
    return {"file": str(path), "layers": len(tensors) // 3, "bytes": path.stat().st_size, "convolutions": conv}


def one(args) -> None:
    """(in a fresh process) one load, printed as JSON."""
    t0 = time.perf_counter()
    from edgediff.runtime import Pipeline

    loras = [args.lora] if args.lora else []
    cache = {"cache": False} if args.cache_dir is None else {"cache_dir": args.cache_dir}
    pipe = Pipeline.load(args.artifact, backend=args.backend, device="cpu", threads=args.threads, loras=loras, **cache)
    load = time.perf_counter() - t0
    out = {"load_s": round(load, 2), "unet_compile_cache": pipe.describe()["unet"]["compile_cache"]}
    if args.swap:
        t0 = time.perf_counter()
        pipe.set_loras([args.swap])
        out["set_loras_s"] = round(time.perf_counter() - t0, 2)
    if args.step:
        result = pipe.txt2img(PROMPT, steps=STEPS, guidance=7.5, width=512, height=512)
        out["unet_step_s"] = round(float(np.median(result.timings.stages["unet"][1:])), 2)
    print(json.dumps(out))


def genai(args) -> None:
    """(in GenAI's venv) its pipeline's load, with and without the LoRA, printed as JSON."""
    t0 = time.perf_counter()
    import openvino_genai as ov_genai

    kwargs = {"INFERENCE_NUM_THREADS": args.threads}
    if args.lora:
        kwargs["adapters"] = ov_genai.AdapterConfig(ov_genai.Adapter(args.lora), 1.0)
    try:
        pipe = ov_genai.Text2ImagePipeline(args.genai_model, "CPU", **kwargs)
        load = time.perf_counter() - t0
        out = {"load_s": round(load, 2), "version": ov_genai.__version__}
        if args.step:  # GenAI applies adapters while generating (its own LoRA branches in the graph), not at load
            pipe.generate(PROMPT, width=512, height=512, num_inference_steps=STEPS, guidance_scale=7.5, rng_seed=0)
            unet = [d / 1e6 for d in pipe.get_performance_metrics().raw_metrics.unet_inference_durations]
            out["unet_step_s"] = round(float(np.median(unet[1:])), 2)
    except Exception as e:  # GenAI raises RuntimeError with its own message
        print(json.dumps({"error": str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__}))
        return
    print(json.dumps(out))


def _run(python: str, *argv: str) -> dict:
    done = subprocess.run([python, __file__, *argv], capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        return {"error": (done.stderr.strip().splitlines() or ["?"])[-1][:300]}
    return json.loads(lines[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--artifact", type=Path)
    p.add_argument("--work", type=Path, default=Path("/tmp/lora-bench"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--backends", default="openvino,onnxruntime")
    p.add_argument("--genai-python")
    p.add_argument("--genai-model")
    p.add_argument("--out", type=Path)
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--genai", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--backend", help=argparse.SUPPRESS)
    p.add_argument("--lora", help=argparse.SUPPRESS)
    p.add_argument("--swap", help=argparse.SUPPRESS)
    p.add_argument("--cache-dir", help=argparse.SUPPRESS)
    p.add_argument("--step", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        return one(args)
    if args.genai:
        return genai(args)

    from edgediff.bench import machine

    args.work.mkdir(parents=True, exist_ok=True)
    files = {name: make_lora(args.artifact, args.work / f"{name}.safetensors", conv, seed)
             for name, conv, seed in (("locon", True, 0), ("attention", False, 1), ("locon-b", True, 2))}
    rows = []
    common = ["--one", "--artifact", str(args.artifact), "--threads", str(args.threads)]
    for backend in args.backends.split(","):
        cache = Path(tempfile.mkdtemp(prefix="lora-bench-cache-"))
        cases = [("no LoRA, no cache", []), ("no LoRA, warm cache", ["--cache-dir", str(cache)]),
                 ("no LoRA, warm cache", ["--cache-dir", str(cache)]),
                 ("LoCon, no cache", ["--lora", files["locon"]["file"]]),
                 ("LoCon, first load (cache written)", ["--lora", files["locon"]["file"], "--cache-dir", str(cache)]),
                 ("LoCon, next load (cache hit)", ["--lora", files["locon"]["file"], "--cache-dir", str(cache)]),
                 ("attention LoRA, no cache", ["--lora", files["attention"]["file"]]),
                 ("set_loras: LoCon -> another LoCon", ["--lora", files["locon"]["file"], "--cache-dir", str(cache),
                                                        "--swap", files["locon-b"]["file"]]),
                 ("UNet step, no LoRA", ["--cache-dir", str(cache), "--step"]),
                 ("UNet step, LoCon merged", ["--lora", files["locon"]["file"], "--cache-dir", str(cache), "--step"])]
        seen = set()
        for case, extra in cases:
            result = _run(sys.executable, *common, "--backend", backend, *extra)
            if case in seen:  # the first warm-cache load filled the cache: keep the second
                rows[-1] = rows[-1] | result
            else:
                rows.append({"tool": f"edgediff {backend}", "case": case, **result})
            seen.add(case)
            print(rows[-1], flush=True)
        shutil.rmtree(cache, ignore_errors=True)
    if args.genai_python:
        for case, extra in (("no LoRA", ["--step"]), ("attention LoRA", ["--lora", files["attention"]["file"], "--step"]),
                            ("LoCon", ["--lora", files["locon"]["file"], "--step"])):
            result = _run(args.genai_python, "--genai", "--genai-model", args.genai_model, "--threads",
                          str(args.threads), *extra)
            rows.append({"tool": "OpenVINO GenAI", "case": case, **result})
            print(rows[-1], flush=True)
    record = {"machine": machine(), "threads": args.threads, "artifact": str(args.artifact), "loras": files,
              "rows": rows}
    if args.out:
        args.out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
        lines = [f"# LoRA load times: {args.artifact.name}, {machine()['cpu']}, {args.threads} threads", "",
                 "Each load a fresh process (imports included). LoRAs: random rank 64 on every trained layer "
                 f"(LoCon: {files['locon']['layers']} layers with the convolutions, 3x3 included, "
                 f"{files['locon']['bytes'] / 2**20:.0f} MiB; attention: {files['attention']['layers']} layers, "
                 "no convolutions). UNet step: 512x512, guidance 7.5 (batch 2), median of steps 2-3.", "",
                 "| tool | case | load s | UNet compile cache | set_loras s | UNet step s |",
                 "| --- | --- | ---: | --- | ---: | ---: |"]
        for r in rows:
            lines.append(f"| {r['tool']} | {r['case']} | {r.get('load_s', r.get('error', '–'))} | "
                         f"{r.get('unet_compile_cache', '–')} | {r.get('set_loras_s', '–')} | "
                         f"{r.get('unet_step_s', '–')} |")
        args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
