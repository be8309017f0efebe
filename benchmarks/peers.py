"""edgediff side by side with the tools users would pick instead, on one machine, in one sitting.

    python benchmarks/peers.py --help

The peers' pins clash with each other and with ours, so each runs in its own
virtual environment (``setup`` makes them) and this file is run by each
one's Python: the ``run`` command needs only that tool's libraries, never
edgediff. ``all`` drives everything and writes ``benchmarks/RESULTS.md``.

Every tool gets the same SD1.5-architecture checkpoint (``edgediff export
--random-weights sd15`` and the diffusers folder ``build`` writes from the
same recipe and seed), prompt, steps, guidance (7.5, so the UNet runs a CFG
batch of 2) and thread count. Stages are timed from outside each tool's
calls (a wrapper around its UNet / VAE / text encoder call) or read from the
tool's own performance counters (OpenVINO GenAI), first UNet call apart.

    # once: venvs for the peers, the shared checkpoint in both layouts
    python benchmarks/peers.py setup --work /tmp/peers
    python benchmarks/peers.py build --work /tmp/peers --artifact /tmp/peers/sd15
    # the comparison (about 20 minutes on 2 cores)
    python benchmarks/peers.py all --work /tmp/peers --artifact /tmp/peers/sd15
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROMPT = "a photo of an astronaut riding a horse on mars"
GUIDANCE = 7.5
PEERS = {  # name: (venv, pip requirements) -- versions that resolved together here (shared FIELD-NOTES)
    "optimum": ["torch==2.13.0", "optimum-onnx==0.1.0", "optimum~=2.1.0", "transformers==4.57.6", "diffusers==0.39.0",
                "onnxruntime==1.32.0"],
    "ovgenai": ["openvino==2026.4.1", "openvino-genai==2026.4.1", "openvino-tokenizers==2026.4.1", "transformers<5.6",
                "tokenizers", "numpy", "pillow"],
}


def _dir_bytes(path: Path, suffixes: tuple[str, ...] = ()) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file() and (not suffixes or f.suffix in suffixes))


def _rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


class _Timed:
    """Wraps a callable; keeps each call's wall time."""

    def __init__(self, fn):
        self.fn, self.times = fn, []

    def __call__(self, *a, **k):
        t0 = time.perf_counter()
        out = self.fn(*a, **k)
        self.times.append(time.perf_counter() - t0)
        return out


def _row(tool: str, size: int, steps: int, threads: int, load: float, total: float, te: float, unet: list[float],
         vae: float, disk: int, **extra) -> dict:
    return {"tool": tool, "size": size, "steps": steps, "threads": threads, "load_s": round(load, 3),
            "text_encoder_s": round(te, 4), "unet_first_s": round(unet[0], 4),
            "unet_rest_median_s": round(statistics.median(unet[1:] or unet), 4), "unet_calls": len(unet),
            "vae_decode_s": round(vae, 4), "end_to_end_s": round(total, 3), "peak_rss_mb": _rss_mb(),
            "disk_bytes": disk, "raw_unet_s": [round(x, 4) for x in unet]} | extra


# -- one tool per process -------------------------------------------------------------


def run_diffusers(model: Path, size: int, steps: int, threads: int) -> dict:
    import diffusers
    import torch

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(model), torch_dtype=torch.float32, safety_checker=None,
                                                             requires_safety_checker=False)
    load = time.perf_counter() - t0
    pipe.set_progress_bar_config(disable=True)
    unet, vae, te = _Timed(pipe.unet.forward), _Timed(pipe.vae.decode), _Timed(pipe.text_encoder.forward)
    pipe.unet.forward, pipe.vae.decode, pipe.text_encoder.forward = unet, vae, te
    t0 = time.perf_counter()
    with torch.inference_mode():
        pipe(PROMPT, num_inference_steps=steps, guidance_scale=GUIDANCE, width=size, height=size,
             generator=torch.Generator().manual_seed(0), output_type="np")
    total = time.perf_counter() - t0
    return _row("diffusers PyTorch fp32", size, steps, threads, load, total, sum(te.times), unet.times, sum(vae.times),
                _dir_bytes(model, (".safetensors",)), versions={"torch": torch.__version__, "diffusers": diffusers.__version__})


def run_optimum(model: Path, size: int, steps: int, threads: int) -> dict:
    import onnxruntime as ort
    from optimum.onnxruntime import ORTStableDiffusionPipeline

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    t0 = time.perf_counter()
    pipe = ORTStableDiffusionPipeline.from_pretrained(str(model), provider="CPUExecutionProvider", session_options=so)
    load = time.perf_counter() - t0
    pipe.set_progress_bar_config(disable=True)
    unet, vae, te = _Timed(pipe.unet.forward), _Timed(pipe.vae_decoder.forward), _Timed(pipe.text_encoder.forward)
    pipe.unet.forward, pipe.vae_decoder.forward, pipe.text_encoder.forward = unet, vae, te
    t0 = time.perf_counter()
    pipe(PROMPT, num_inference_steps=steps, guidance_scale=GUIDANCE, width=size, height=size, output_type="np")
    total = time.perf_counter() - t0
    return _row("Optimum ORTStableDiffusionPipeline fp32 (CPU EP)", size, steps, threads, load, total, sum(te.times),
                unet.times, sum(vae.times), _dir_bytes(model, (".onnx", ".onnx_data", ".data")),
                versions={"onnxruntime": ort.__version__})


def run_ovgenai(model: Path, size: int, steps: int, threads: int) -> dict:
    import openvino_genai as ov_genai

    t0 = time.perf_counter()
    pipe = ov_genai.Text2ImagePipeline(str(model), "CPU", INFERENCE_NUM_THREADS=threads)
    load = time.perf_counter() - t0
    t0 = time.perf_counter()
    pipe.generate(PROMPT, width=size, height=size, num_inference_steps=steps, guidance_scale=GUIDANCE,
                  rng_seed=0)
    total = time.perf_counter() - t0
    m = pipe.get_performance_metrics()
    unet = [d / 1e6 for d in m.raw_metrics.unet_inference_durations]  # microseconds
    te = sum(m.get_text_encoder_infer_duration().values()) / 1e3
    return _row("OpenVINO GenAI Text2ImagePipeline, fp32 IR (its default execution precision)", size, steps, threads,
                load, total, te, unet, m.get_vae_decoder_infer_duration() / 1e3, _dir_bytes(model, (".xml", ".bin")),
                versions={"openvino_genai": ov_genai.__version__})


# -- preparing the shared checkpoint in each tool's layout ------------------------------


def build(work: Path, artifact: Path) -> None:
    """The diffusers folder (same recipe and seed as the artifact), Optimum's ONNX export, GenAI's IR folder."""
    from edgediff.export.recipes import build_pipeline
    from edgediff.runtime import load_manifest

    seed = 0
    if not artifact.exists():
        subprocess.run([str(Path(sys.executable).parent / "edgediff"), "export", "--random-weights", "sd15", str(artifact),
                        "--seed", str(seed)], check=True)
    assert load_manifest(artifact).random_weights
    diffusers_dir = work / "sd15-diffusers"
    if not diffusers_dir.exists():
        build_pipeline("sd15", diffusers_dir, seed=seed)
    optimum_dir = work / "sd15-optimum"
    if not optimum_dir.exists():
        subprocess.run([str(work / "optimum" / "bin" / "optimum-cli"), "export", "onnx", "--model", str(diffusers_dir),
                        "--task", "text-to-image", str(optimum_dir)], check=True)
    ov_dir = work / "sd15-openvino"
    if not ov_dir.exists():
        subprocess.run([str(work / "ovgenai" / "bin" / "python"), __file__, "ov-ir", "--artifact", str(artifact),
                        "--diffusers", str(diffusers_dir), "--out", str(ov_dir)], check=True)


def ov_ir(artifact: Path, diffusers_dir: Path, out: Path) -> None:
    """OpenVINO GenAI's folder layout (Optimum Intel's) from the same ONNX graphs: fp32 IR, OpenVINO tokenizer.

    Optimum Intel's own exporter needs a torch + torchvision pair that clashes
    here (shared FIELD-NOTES); converting the same weights' ONNX graphs with
    ``openvino.convert_model`` gives GenAI the files it reads.
    """
    import openvino as ov
    from openvino_tokenizers import convert_tokenizer
    from transformers import CLIPTokenizer

    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    for ours, theirs, config in (("text_encoder", "text_encoder", "text_encoder"), ("unet", "unet", "unet"),
                                 ("vae_decoder", "vae_decoder", "vae")):
        (tmp / theirs).mkdir(parents=True)
        model = ov.convert_model(str(artifact / ours / "model.onnx"))
        if ours == "unet":  # GenAI feeds the timestep as int64 (Optimum's export); ours takes float32
            ppp = ov.preprocess.PrePostProcessor(model)
            ppp.input("timestep").tensor().set_element_type(ov.Type.i64)
            model = ppp.build()
        ov.save_model(model, str(tmp / theirs / "openvino_model.xml"), compress_to_fp16=False)
        shutil.copy(diffusers_dir / config / "config.json", tmp / theirs / "config.json")
    tok, detok = convert_tokenizer(CLIPTokenizer.from_pretrained(str(diffusers_dir / "tokenizer")), with_detokenizer=True)
    (tmp / "tokenizer").mkdir()
    ov.save_model(tok, str(tmp / "tokenizer" / "openvino_tokenizer.xml"))
    ov.save_model(detok, str(tmp / "tokenizer" / "openvino_detokenizer.xml"))
    for f in ("tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt"):
        if (diffusers_dir / "tokenizer" / f).exists():
            shutil.copy(diffusers_dir / "tokenizer" / f, tmp / "tokenizer" / f)
    shutil.copytree(diffusers_dir / "scheduler", tmp / "scheduler")
    shutil.copy(diffusers_dir / "model_index.json", tmp / "model_index.json")
    tmp.rename(out)


def setup(work: Path) -> None:
    for name, reqs in PEERS.items():
        venv = work / name
        if not (venv / "bin" / "python").exists():
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
            subprocess.run([str(venv / "bin" / "pip"), "install", "-q", *reqs], check=True)


# -- the comparison ------------------------------------------------------------------


def run_peer(work: Path, tool: str, size: int, steps: int, threads: int) -> dict:
    python, model = {"diffusers": (sys.executable, work / "sd15-diffusers"),
                     "optimum": (work / "optimum" / "bin" / "python", work / "sd15-optimum"),
                     "ovgenai": (work / "ovgenai" / "bin" / "python", work / "sd15-openvino")}[tool]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    out = subprocess.run([str(python), __file__, "run", tool, "--model", str(model), "--size", str(size), "--steps",
                          str(steps), "--threads", str(threads)], check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_ours(artifact: Path, size: int, steps: int, threads: int, backend: str, precision: str | None) -> dict:
    """edgediff's bench in its own process too, so peak memory is this configuration's alone."""
    code = (
        "import json,sys\nfrom edgediff.bench import run_bench\n"
        f"r = run_bench({str(artifact)!r}, backend={backend!r}, device='cpu', precision={'unet=' + precision!r}, width={size}, "
        f"height={size}, steps={steps}, runs=1, warmup=0, threads={threads})[0]\nprint(json.dumps(r))"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    raw = r["raw"]["unet"]
    label = f"edgediff {backend} unet={precision or 'fp32'} ({r['execution_precision']['unet']})"
    return _row(label, size, steps, threads, r["load_s"], r["end_to_end_s"], r["text_encoder_s"], raw,
                r["vae_decode_s"], r["disk_bytes"]) | {"peak_rss_mb": r["peak_rss_mb"], "machine": r["machine"]}


def results_md(rows: list[dict], machine: dict, args, floor: dict | None = None) -> str:
    lines = [
        "# edgediff side by side (CPU)", "",
        f"Measured {time.strftime('%Y-%m-%d')} in one sitting on **{machine.get('cpu')}**, {machine.get('cores')} cores "
        f"({', '.join(machine.get('cpu_flags', [])) or 'no AVX2'}), {machine.get('ram_gb')} GB RAM, "
        f"{args.threads} threads for every tool. SD1.5-architecture checkpoint with seeded random weights (dense compute: "
        "the real model's cost), same weights for every tool; prompt, guidance 7.5 (CFG batch 2), "
        f"{args.steps} UNet steps per image; one image per configuration, the UNet figure is the median of calls "
        f"2..{args.steps} (the first call is shown apart). Rerun: `python benchmarks/peers.py all` (see its --help); "
        "rows added with `--append` (here the int8 rows) come from a second run right after the first.", "",
    ]
    for size in sorted({r["size"] for r in rows}, reverse=True):
        group = [r for r in rows if r["size"] == size]
        ref = next((r for r in group if r["tool"].startswith("edgediff openvino unet=fp32")), group[0])
        lines += [f"## {size}x{size}", "",
                  "| tool | load s | text enc s | UNet first s | UNet s/step | VAE decode s | end to end s | peak RSS GB "
                  "| disk GB | UNet step vs edgediff OV fp32 | end to end vs edgediff OV fp32 |", "|---" * 11 + "|"]
        for r in group:
            lines.append(
                f"| {r['tool']} | {r['load_s']:.1f} | {r['text_encoder_s']:.2f} | {r['unet_first_s']:.2f} "
                f"| {r['unet_rest_median_s']:.2f} | {r['vae_decode_s']:.2f} | {r['end_to_end_s']:.1f} "
                f"| {r['peak_rss_mb'] / 1024:.1f} | {r['disk_bytes'] / 1e9:.2f} "
                f"| {r['unet_rest_median_s'] / ref['unet_rest_median_s']:.2f}x "
                f"| {r['end_to_end_s'] / ref['end_to_end_s']:.2f}x |")
        lines.append("")
    if floor:
        g, r, f = floor["unet_gflop_per_step"], floor["gflops_per_s"], floor["floor_s_per_step"]
        lines += [f"## The physical floor ({floor['size']}x{floor['size']}, `python benchmarks/floor.py ARTIFACT`)", "",
                  f"One UNet step (CFG batch 2) is **{g['total']:,.0f} GFLOP** ({g.get('Convolution', 0):,.0f} in "
                  f"convolutions, {g.get('MatMul', 0):,.0f} in matrix products), counted on the exported graph. This CPU "
                  f"multiplies at {r['fp32_matmul']} GFLOP/s in fp32 (ONNX Runtime; OpenVINO "
                  f"{r.get('fp32_matmul_openvino', '?')}) and {r['int8_matmulinteger']} GOP/s in int8 (MatMulInteger) "
                  f"with {floor['threads']} threads: a UNet step cannot take less than about "
                  f"{min(v for k, v in f.items() if k.startswith('fp32')):.1f} s in fp32 or "
                  f"{f['int8_matmulinteger']:.1f} s in int8 here. Every fp32 tool above sits on the fp32 floor; "
                  "only int8 goes below it, by at most the int8/fp32 rate ratio.", ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[2:]))
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("setup", help="create the peers' virtual environments")
    s.add_argument("--work", type=Path, required=True)
    b = sub.add_parser("build", help="the shared checkpoint: artifact, diffusers folder, Optimum ONNX, OpenVINO IR")
    b.add_argument("--work", type=Path, required=True)
    b.add_argument("--artifact", type=Path, required=True)
    o = sub.add_parser("ov-ir", help="(run by build in the ovgenai venv)")
    o.add_argument("--artifact", type=Path, required=True)
    o.add_argument("--diffusers", type=Path, required=True)
    o.add_argument("--out", type=Path, required=True)
    r = sub.add_parser("run", help="one tool, one image (run by `all` with that tool's Python)")
    r.add_argument("tool", choices=("diffusers", "optimum", "ovgenai"))
    r.add_argument("--model", type=Path, required=True)
    a = sub.add_parser("all", help="every tool and edgediff configuration; writes RESULTS.md")
    a.add_argument("--work", type=Path, required=True)
    a.add_argument("--artifact", type=Path, required=True)
    a.add_argument("--out", type=Path, default=Path(__file__).parent / "RESULTS.md")
    a.add_argument("--sizes", default="512,256")
    a.add_argument("--peers", default="diffusers,optimum,ovgenai", help="peers to run ('' for none)")
    a.add_argument("--append", action="store_true", help="keep the rows already in results/peers_cpu.jsonl")
    a.add_argument("--table-only", action="store_true", help="rewrite RESULTS.md from results/peers_cpu.jsonl, run nothing")
    a.add_argument("--ours", default="onnxruntime:fp32,openvino:fp32,onnxruntime:int8-static,openvino:int8-static",
                   help="backend:unet-precision pairs of edgediff to run (missing variants are skipped)")
    for q in (r, a):
        q.add_argument("--size", type=int, default=512)
        q.add_argument("--steps", type=int, default=4)
        q.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    if args.cmd == "setup":
        setup(args.work)
    elif args.cmd == "build":
        build(args.work, args.artifact)
    elif args.cmd == "ov-ir":
        ov_ir(args.artifact, args.diffusers, args.out)
    elif args.cmd == "run":
        fn = {"diffusers": run_diffusers, "optimum": run_optimum, "ovgenai": run_ovgenai}[args.tool]
        print(json.dumps(fn(args.model, args.size, args.steps, args.threads)))
    else:
        from edgediff.bench import machine
        from edgediff.runtime import load_manifest

        have = load_manifest(args.artifact).components["unet"]
        rows = []
        jsonl = args.out.with_name("results") / "peers_cpu.jsonl"
        jsonl.parent.mkdir(parents=True, exist_ok=True)
        if (args.append or args.table_only) and jsonl.exists():
            rows = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
        else:
            jsonl.write_text("")
        for size in ([] if args.table_only else [int(x) for x in args.sizes.split(",")]):
            jobs = [("peer", t, None) for t in args.peers.split(",") if t]
            jobs += [("ours", *pair.split(":")) for pair in args.ours.split(",") if pair]
            for kind, name, prec in jobs:
                if kind == "ours" and prec not in have:
                    print(f"skip edgediff {name} {prec}: not in the artifact (edgediff quantize it first)", flush=True)
                    continue
                print(f"{size}: {kind} {name} {prec or ''} ...", flush=True)
                try:
                    row = (run_peer(args.work, name, size, args.steps, args.threads) if kind == "peer"
                           else run_ours(args.artifact, size, args.steps, args.threads, name, prec))
                except subprocess.CalledProcessError as e:
                    print(f"  failed: {e.stderr[-2000:]}", flush=True)
                    continue
                print(f"  unet {row['unet_rest_median_s']:.2f} s/step, end to end {row['end_to_end_s']:.1f} s", flush=True)
                rows.append(row)
                with open(jsonl, "a") as f:
                    f.write(json.dumps(row) + "\n")
        floor_json = args.out.with_name("results") / "floor_sd15_cpu.json"
        if not args.table_only or not floor_json.exists():
            from floor import matmul_rates, unet_flops

            flops, rates = unet_flops(args.artifact, 512), matmul_rates(args.threads)
            floor_json.write_text(json.dumps({
                "size": 512, "batch": 2, "threads": args.threads, "gflops_per_s": rates,
                "unet_gflop_per_step": {k: round(v / 1e9, 1) for k, v in flops.items()},
                "floor_s_per_step": {k: round(flops["total"] / (v * 1e9), 2) for k, v in rates.items()}}, indent=2) + "\n")
        args.out.write_text(results_md(rows, machine(), args, json.loads(floor_json.read_text())))
        print(args.out.read_text())


if __name__ == "__main__":
    main()
