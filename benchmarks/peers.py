"""edgediff side by side with the tools users would pick instead, on one machine, in one sitting.

    python benchmarks/peers.py --help

The peers' pins clash with each other and with ours, so each runs in its own
virtual environment (``setup`` makes them) and this file is run by each
one's Python: the ``run`` command needs only that tool's libraries, never
edgediff. ``all`` drives everything and writes ``benchmarks/RESULTS.md``.

Every tool gets the same checkpoint of one recipe (``--recipe``: ``sd15``,
SD1.5's architecture, or ``sd-turbo``, SD2.1's UNet and text encoder at
512x512), built with seeded random weights (``edgediff export --random-weights
RECIPE --tiny-vae random`` and the diffusers folder ``build`` writes from the
same recipe and seed), prompt, steps, guidance and thread count. The steps
and guidance follow the recipe unless given (sd15: 20 steps, guidance 7.5, so
the UNet runs a CFG batch of 2; sd-turbo: 1 step, guidance 0, no CFG).
Stages are timed from outside each tool's calls (a wrapper around its UNet /
VAE / text encoder call) or read from the tool's own performance counters
(OpenVINO GenAI), first UNet call apart. edgediff's rows may add its savings
(``--ours backend:precision:vae=tiny+cache=3+cfg=0.4``: tiny VAE, DeepCache,
guidance cut-off).

    # once: venvs for the peers, the shared checkpoint in each tool's layout
    python benchmarks/peers.py setup --work /tmp/peers
    python benchmarks/peers.py build --work /tmp/peers --artifact /tmp/peers/sd15
    # the comparison (sd15, 20 steps, 512 and 256, three peers and four edgediff rows: about an hour on 2 AVX2
    # cores, half that where OpenVINO runs bf16; the 4-step run of 2026-11 took about 20 minutes)
    python benchmarks/peers.py all --work /tmp/peers --artifact /tmp/peers/sd15
    # SD-Turbo (1 step, no guidance), OpenVINO GenAI and diffusers against edgediff with and without its tiny VAE
    python benchmarks/peers.py setup --work /tmp/peers --peers ovgenai
    python benchmarks/peers.py build --work /tmp/peers --artifact /tmp/peers/sd-turbo --recipe sd-turbo \
        --peers diffusers,ovgenai
    python benchmarks/peers.py all --work /tmp/peers --artifact /tmp/peers/sd-turbo --recipe sd-turbo --sizes 512 \
        --peers diffusers,ovgenai --ours openvino:fp32,openvino:fp32:vae=tiny
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
RECIPES = {  # --recipe: what `all` runs unless --steps / --guidance say otherwise (the models: export/recipes.py)
    "sd15": {"steps": 20, "guidance": GUIDANCE},
    "sd-turbo": {"steps": 1, "guidance": 0.0},  # its model card's usage (export/recipes.py RECIPES "defaults")
}
LAYOUTS = {"diffusers": "diffusers", "optimum": "optimum", "ovgenai": "openvino"}  # peer: its folder, work/RECIPE-...
# --ours savings: name: (run_bench's keyword, type); e.g. vae=tiny+cache=3+cfg=0.4
SAVINGS = {"vae": ("vae", str), "cache": ("cache_interval", int), "cfg": ("cfg_until", float)}
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


def _row(tool: str, size: int, steps: int, guidance: float, threads: int, load: float, total: float, te: float,
         unet: list[float], vae: float, disk: int, **extra) -> dict:
    return {"tool": tool, "size": size, "steps": steps, "guidance": guidance, "threads": threads, "load_s": round(load, 3),
            "text_encoder_s": round(te, 4), "unet_first_s": round(unet[0], 4),
            "unet_rest_median_s": round(statistics.median(unet[1:] or unet), 4), "unet_calls": len(unet),
            "vae_decode_s": round(vae, 4), "end_to_end_s": round(total, 3), "peak_rss_mb": _rss_mb(),
            "disk_bytes": disk, "raw_unet_s": [round(x, 4) for x in unet]} | extra


# -- one tool per process -------------------------------------------------------------


def run_diffusers(model: Path, size: int, steps: int, threads: int, guidance: float = GUIDANCE) -> dict:
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
        pipe(PROMPT, num_inference_steps=steps, guidance_scale=guidance, width=size, height=size,
             generator=torch.Generator().manual_seed(0), output_type="np")
    total = time.perf_counter() - t0
    return _row("diffusers PyTorch fp32", size, steps, guidance, threads, load, total, sum(te.times), unet.times,
                sum(vae.times), _dir_bytes(model, (".safetensors",)),
                versions={"torch": torch.__version__, "diffusers": diffusers.__version__})


def run_optimum(model: Path, size: int, steps: int, threads: int, guidance: float = GUIDANCE) -> dict:
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
    pipe(PROMPT, num_inference_steps=steps, guidance_scale=guidance, width=size, height=size, output_type="np")
    total = time.perf_counter() - t0
    return _row("Optimum ORTStableDiffusionPipeline fp32 (CPU EP)", size, steps, guidance, threads, load, total,
                sum(te.times), unet.times, sum(vae.times), _dir_bytes(model, (".onnx", ".onnx_data", ".data")),
                versions={"onnxruntime": ort.__version__})


def run_ovgenai(model: Path, size: int, steps: int, threads: int, guidance: float = GUIDANCE) -> dict:
    """GenAI runs guidance (a UNet batch of 2) only for guidance_scale > 1 (UNet2DConditionModel::
    do_classifier_free_guidance); at 0, as SD-Turbo is run, one conditional UNet batch per step."""
    import openvino_genai as ov_genai

    t0 = time.perf_counter()
    pipe = ov_genai.Text2ImagePipeline(str(model), "CPU", INFERENCE_NUM_THREADS=threads)
    load = time.perf_counter() - t0
    t0 = time.perf_counter()
    pipe.generate(PROMPT, width=size, height=size, num_inference_steps=steps, guidance_scale=guidance,
                  rng_seed=0)
    total = time.perf_counter() - t0
    m = pipe.get_performance_metrics()
    unet = [d / 1e6 for d in m.raw_metrics.unet_inference_durations]  # microseconds
    te = sum(m.get_text_encoder_infer_duration().values()) / 1e3
    return _row("OpenVINO GenAI Text2ImagePipeline, fp32 IR (its default execution precision)", size, steps, guidance,
                threads, load, total, te, unet, m.get_vae_decoder_infer_duration() / 1e3,
                _dir_bytes(model, (".xml", ".bin")),
                versions={"openvino_genai": ov_genai.__version__})


# -- preparing the shared checkpoint in each tool's layout ------------------------------


def model_dir(work: Path, recipe: str, tool: str) -> Path:
    """The recipe's checkpoint in a peer's layout: work/sd15-diffusers, work/sd-turbo-openvino, ..."""
    return work / f"{recipe}-{LAYOUTS[tool]}"


def build(work: Path, artifact: Path, recipe: str = "sd15", peers: tuple[str, ...] = tuple(LAYOUTS)) -> None:
    """The artifact (with a random-weight tiny VAE and DeepCache's graphs), the diffusers folder (same recipe and
    seed), and of the given peers Optimum's ONNX export and GenAI's IR folder."""
    from edgediff.export.recipes import build_pipeline
    from edgediff.runtime import load_manifest

    seed = 0
    if not artifact.exists():
        subprocess.run([str(Path(sys.executable).parent / "edgediff"), "export", "--random-weights", recipe, str(artifact),
                        "--seed", str(seed), "--tiny-vae", "random"], check=True)
    manifest = load_manifest(artifact)
    assert manifest.random_weights
    source = str(manifest.provenance.get("source", ""))
    if not source.startswith(f"random-weights:{recipe}:"):
        raise SystemExit(f"{artifact} was exported from {source or 'an unknown source'}, not --recipe {recipe}")
    lacks = [what for what, missing in (("DeepCache graphs (cache=)", manifest.shallow_denoiser is None),
                                        ("tiny VAE (vae=tiny)", "tiny" not in manifest.components.get("vae_decoder", {})))
             if missing]
    if lacks:
        print(f"note: {artifact} has no {' and no '.join(lacks)}: `all` skips the rows that need them (delete it and "
              "rerun build to re-export it)", flush=True)
    diffusers_dir = model_dir(work, recipe, "diffusers")
    if not diffusers_dir.exists():
        build_pipeline(recipe, diffusers_dir, seed=seed)
    optimum_dir = model_dir(work, recipe, "optimum")
    if "optimum" in peers and not optimum_dir.exists():
        subprocess.run([str(work / "optimum" / "bin" / "optimum-cli"), "export", "onnx", "--model", str(diffusers_dir),
                        "--task", "text-to-image", str(optimum_dir)], check=True)
    ov_dir = model_dir(work, recipe, "ovgenai")
    if "ovgenai" in peers and not ov_dir.exists():
        subprocess.run([str(work / "ovgenai" / "bin" / "python"), __file__, "ov-ir", "--artifact", str(artifact),
                        "--diffusers", str(diffusers_dir), "--out", str(ov_dir)], check=True)


def ov_ir(artifact: Path, diffusers_dir: Path, out: Path) -> None:
    """OpenVINO GenAI's folder layout (Optimum Intel's) from the same ONNX graphs: fp32 IR, OpenVINO tokenizer.

    Optimum Intel's own exporter needs a torch + torchvision pair that clashes
    here (shared FIELD-NOTES); converting the same weights' ONNX graphs with
    ``openvino.convert_model`` gives GenAI the files it reads. Our UNet graph also outputs DeepCache's
    ``deep_feature``; GenAI reads the UNet's one output, so its IR keeps only ``out_sample``.
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
        if ours == "unet":
            keep = [r for r in model.get_results() if "out_sample" in r.get_output_tensor(0).get_names()]
            assert len(keep) == 1, f"{artifact / ours / 'model.onnx'}: no single out_sample output"
            model = ov.Model(keep, model.get_parameters(), model.get_friendly_name())  # deep_feature dropped
            # GenAI feeds the timestep as int64 (Optimum's export); ours takes float32
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


def setup(work: Path, peers: list[str]) -> None:
    """One virtual environment per peer (only the given ones), with its pinned requirements."""
    for name in peers:
        reqs, venv = PEERS[name], work / name
        if not (venv / "bin" / "python").exists():
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
            subprocess.run([str(venv / "bin" / "pip"), "install", "-q", *reqs], check=True)


# -- the comparison ------------------------------------------------------------------


def run_peer(work: Path, recipe: str, tool: str, size: int, steps: int, guidance: float, threads: int) -> dict:
    python = {"diffusers": sys.executable, "optimum": work / "optimum" / "bin" / "python",
              "ovgenai": work / "ovgenai" / "bin" / "python"}[tool]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    out = subprocess.run([str(python), __file__, "run", tool, "--model", str(model_dir(work, recipe, tool)), "--size",
                          str(size), "--steps", str(steps), "--guidance", str(guidance), "--threads", str(threads)],
                         check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def parse_ours(spec: str) -> list[tuple[str, str, str, dict]]:
    """``--ours``: comma-separated ``backend:unet-precision[:savings]``, the savings ``+``-separated ``vae=tiny``,
    ``cache=N`` (DeepCache's interval), ``cfg=F`` (guidance for that fraction of the steps); returns (backend,
    precision, savings as written, run_bench's keyword arguments) per entry. A malformed entry is a ValueError."""
    jobs = []
    for entry in filter(None, spec.split(",")):
        parts = entry.split(":")
        if len(parts) not in (2, 3) or not all(parts[:2]):
            raise ValueError(f"--ours {entry!r}: expected backend:unet-precision[:savings], e.g. openvino:fp32:vae=tiny")
        savings = parts[2] if len(parts) == 3 else ""
        kwargs: dict = {}
        for item in filter(None, savings.split("+")):
            key, sep, value = item.partition("=")
            if not sep or key not in SAVINGS:
                raise ValueError(f"--ours {entry!r}: saving {item!r} is not one of "
                                 f"{', '.join(k + '=...' for k in SAVINGS)}")
            name, kind = SAVINGS[key]
            try:
                kwargs[name] = kind(value)
            except ValueError:
                raise ValueError(f"--ours {entry!r}: {key}={value!r} is not {kind.__name__}") from None
        if kwargs.get("vae", "full") not in ("full", "tiny"):
            raise ValueError(f"--ours {entry!r}: vae= is full or tiny")
        jobs.append((parts[0], parts[1], savings, kwargs))
    return jobs


def missing_for(manifest, precision: str, savings: dict) -> str | None:
    """What the artifact lacks for one edgediff configuration (None: it can run)."""
    from edgediff.runtime.manifest import DEEP_FEATURE

    unet = manifest.components["unet"]
    if precision not in unet:
        return f"unet {precision} is not in the artifact (edgediff quantize it first)"
    if savings.get("vae") == "tiny" and "tiny" not in manifest.components.get("vae_decoder", {}):
        return "the artifact has no tiny VAE (export --tiny-vae)"
    if savings.get("cache_interval") not in (None, 1):
        if manifest.shallow_denoiser is None:
            return "the artifact has no DeepCache graphs (re-export it)"
        if DEEP_FEATURE not in [o.name for o in unet[precision].outputs]:
            return f"unet {precision} gives no {DEEP_FEATURE} for DeepCache (re-quantize it)"
    return None


def run_ours(artifact: Path, size: int, steps: int, threads: int, backend: str, precision: str | None,
             guidance: float = GUIDANCE, savings: str = "", saving_kwargs: dict | None = None) -> dict:
    """edgediff's bench in its own process too, so peak memory is this configuration's alone; ``saving_kwargs``
    (vae, cache_interval, cfg_until) go to run_bench, ``savings`` as written (vae=tiny+cache=3) names the row."""
    extra = "".join(f", {k}={v!r}" for k, v in (saving_kwargs or {}).items())
    code = (
        "import json,sys\nfrom edgediff.bench import run_bench\n"
        f"r = run_bench({str(artifact)!r}, backend={backend!r}, device='cpu', precision={'unet=' + precision!r}, width={size}, "
        f"height={size}, steps={steps}, runs=1, warmup=0, threads={threads}, guidance={guidance!r}{extra})[0]\n"
        "print(json.dumps(r))"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    raw = r["raw"]["unet"]
    named = "".join(f" {s}" for s in savings.split("+") if s)
    label = f"edgediff {backend} unet={precision or 'fp32'}{named} ({r['execution_precision']['unet']})"
    return _row(label, size, steps, guidance, threads, r["load_s"], r["end_to_end_s"], r["text_encoder_s"], raw,
                r["vae_decode_s"], r["disk_bytes"]) | {
        "load_cached_s": r.get("load_cached_s"), "compile_cache": r.get("compile_cache"),
        "peak_rss_mb": r["peak_rss_mb"], "machine": r["machine"], "savings": r.get("savings", {}),
        "unet_shallow_median_s": r.get("unet_shallow_median_s"), "unet_shallow_calls": r.get("unet_shallow_calls", 0),
        "raw_unet_shallow_s": r["raw"].get("unet_shallow", [])}


def first_image(row: dict) -> float:
    """Seconds from a process's start of loading to its first image: the load (from the warm compile cache where
    the row has one: edgediff's later processes) plus that image (the rows' images are each process's first)."""
    warm = row.get("load_cached_s")
    return (row["load_s"] if warm is None else warm) + row["end_to_end_s"]


def _ratio(value: float, ref: dict | None, key: str) -> str:
    return f"{value / ref[key]:.2f}x" if ref and ref.get(key) else "–"


def results_md(rows: list[dict], machine: dict, args, floors: dict[str, dict] | None = None) -> str:
    """RESULTS.md: one table per recipe and size (and steps and guidance, where rows differ in them), rows without a
    recipe being sd15's at guidance 7.5 (the first runs); ratios against the group's edgediff OpenVINO fp32 row
    without savings and its OpenVINO GenAI row ("–" without one); ``floors``: recipe -> benchmarks/floor.py's
    figures."""
    lines = [
        "# edgediff side by side (CPU)", "",
        f"Measured {time.strftime('%Y-%m-%d')} in one sitting on **{machine.get('cpu')}**, {machine.get('cores')} cores "
        f"({', '.join(machine.get('cpu_flags', [])) or 'no AVX2'}), {machine.get('ram_gb')} GB RAM, "
        f"{args.threads} threads for every tool. Each table is one recipe's checkpoint with seeded random weights (dense "
        "compute: the real model's cost; sd15: SD1.5's architecture, sd-turbo: SD2.1's UNet and text encoder), the "
        "same weights for every tool; one prompt, the steps and guidance its heading names (guidance above 1: the UNet "
        "runs a CFG batch of 2); one image per configuration, the UNet figure is the median of the calls after the first "
        "(the first call is shown apart). edgediff's savings, where a row names them: vae=tiny decodes with the tiny "
        "VAE (TAESD's architecture); cache=N runs the full UNet every N steps (its figures) and DeepCache's shallow "
        "branch between (UNet shallow s, the median of those calls); cfg=F keeps the guidance for that fraction of "
        "the steps, the rest at UNet batch 1 (the UNet median then mixes both batches). Rerun: "
        "`python benchmarks/peers.py all` (see its --help); rows added with `--append` come from a later run in "
        "the same sitting.", "",
    ]
    # (recipe, size), and within it steps and guidance: the ratios compare like with like
    keys: dict[tuple[str, int, int, float], list[dict]] = {}
    for r in rows:
        keys.setdefault((r.get("recipe", "sd15"), r["size"], r["steps"], float(r.get("guidance", GUIDANCE))), []).append(r)
    recipes = list(dict.fromkeys(k[0] for k in keys))
    for key in sorted(keys, key=lambda k: (recipes.index(k[0]), -k[1], -k[2], -k[3])):
        recipe, size, steps, guidance = key
        group = keys[key]
        ref = next((r for r in group if r["tool"].startswith("edgediff openvino unet=fp32 (")), None)
        genai = next((r for r in group if r["tool"].startswith("OpenVINO GenAI")), None)
        lines += [f"## {recipe}, {size}x{size}, {steps} step{'s' if steps != 1 else ''}, guidance {guidance:g} "
                  f"({'CFG batch 2' if guidance > 1 else 'no CFG: UNet batch 1'})", "",
                  "| tool | load s (cold / warm cache) | text enc s | UNet first s | UNet s/step | UNet shallow s "
                  "| VAE decode s | end to end s | first image of a process s (warm load + image) "
                  "| peak RSS GB | disk GB | UNet step vs edgediff OV fp32 | end to end vs edgediff OV fp32 "
                  "| end to end vs GenAI | first image vs GenAI |", "|---" * 15 + "|"]
        for r in group:
            shallow = r.get("unet_shallow_median_s")
            shallow_s = "–" if shallow is None else f"{shallow:.2f} ({r.get('unet_shallow_calls', 0)} calls)"
            warm = r.get("load_cached_s")
            loads = f"{r['load_s']:.1f} / {warm:.1f}" if warm is not None else f"{r['load_s']:.1f}"
            lines.append(
                f"| {r['tool']} | {loads} | {r['text_encoder_s']:.2f} | {r['unet_first_s']:.2f} "
                f"| {r['unet_rest_median_s']:.2f} "
                f"| {shallow_s} "
                f"| {r['vae_decode_s']:.2f} | {r['end_to_end_s']:.1f} | {first_image(r):.1f} "
                f"| {r['peak_rss_mb'] / 1024:.1f} | {r['disk_bytes'] / 1e9:.2f} "
                f"| {_ratio(r['unet_rest_median_s'], ref, 'unet_rest_median_s')} "
                f"| {_ratio(r['end_to_end_s'], ref, 'end_to_end_s')} "
                f"| {_ratio(r['end_to_end_s'], genai, 'end_to_end_s')} "
                f"| {f'{first_image(r) / first_image(genai):.2f}x' if genai else '–'} |")
        lines.append("")
    for recipe, floor in (floors or {}).items():
        if recipe not in recipes:
            continue
        g, r, f = floor["unet_gflop_per_step"], floor["gflops_per_s"], floor["floor_s_per_step"]
        batch = floor.get("batch", 2)
        lines += [f"## The physical floor ({recipe}, {floor['size']}x{floor['size']}, "
                  "`python benchmarks/floor.py ARTIFACT`)", "",
                  f"One UNet step ({'CFG batch 2' if batch == 2 else f'batch {batch}'}) is **{g['total']:,.0f} GFLOP** "
                  f"({g.get('Convolution', 0):,.0f} in "
                  f"convolutions, {g.get('MatMul', 0):,.0f} in matrix products), counted on the exported graph. This CPU "
                  f"multiplies at {r['fp32_matmul']} GFLOP/s in fp32 (ONNX Runtime; OpenVINO "
                  f"{r.get('fp32_matmul_openvino', '?')}) and {r['int8_matmulinteger']} GOP/s in int8 (MatMulInteger) "
                  f"with {floor['threads']} threads: a UNet step cannot take less than about "
                  f"{min(v for k, v in f.items() if k.startswith('fp32')):.1f} s in fp32 or "
                  f"{f['int8_matmulinteger']:.1f} s in int8 here. A row that executes in bf16 (the precision in its "
                  "tool column; OpenVINO's default on BF16 CPUs) can go below the fp32 floor, int8 below both, by at "
                  "most their rate ratio; the savings do less work instead.", ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[2:]))
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("setup", help="create the peers' virtual environments")
    s.add_argument("--work", type=Path, required=True)
    s.add_argument("--peers", default=",".join(PEERS), help=f"peers whose venv to make (default: all, {','.join(PEERS)})")
    b = sub.add_parser("build", help="the shared checkpoint: artifact, diffusers folder, Optimum ONNX, OpenVINO IR")
    b.add_argument("--work", type=Path, required=True)
    b.add_argument("--artifact", type=Path, required=True)
    b.add_argument("--peers", default=",".join(LAYOUTS),
                   help="peers whose layout to write (the diffusers folder always: the others are made from it)")
    o = sub.add_parser("ov-ir", help="(run by build in the ovgenai venv)")
    o.add_argument("--artifact", type=Path, required=True)
    o.add_argument("--diffusers", type=Path, required=True)
    o.add_argument("--out", type=Path, required=True)
    r = sub.add_parser("run", help="one tool, one image (run by `all` with that tool's Python)")
    r.add_argument("tool", choices=tuple(LAYOUTS))
    r.add_argument("--model", type=Path, required=True)
    r.add_argument("--guidance", type=float, default=GUIDANCE)
    a = sub.add_parser("all", help="every tool and edgediff configuration; writes RESULTS.md")
    a.add_argument("--work", type=Path, required=True)
    a.add_argument("--artifact", type=Path, required=True)
    a.add_argument("--out", type=Path, default=Path(__file__).parent / "RESULTS.md")
    a.add_argument("--sizes", default="512,256")
    a.add_argument("--peers", default=",".join(LAYOUTS), help="peers to run ('' for none)")
    a.add_argument("--append", action="store_true", help="keep the rows already in results/peers_cpu.jsonl")
    a.add_argument("--table-only", action="store_true", help="rewrite RESULTS.md from results/peers_cpu.jsonl, run nothing")
    a.add_argument("--ours", default="onnxruntime:fp32,openvino:fp32,onnxruntime:int8-static,openvino:int8-static",
                   help="backend:unet-precision[:savings] entries of edgediff to run, savings '+'-separated of "
                        "vae=tiny, cache=N (DeepCache interval), cfg=F (guidance cut-off), e.g. "
                        "openvino:fp32:vae=tiny+cache=3+cfg=0.4 (variants or graphs the artifact lacks are skipped)")
    a.add_argument("--guidance", type=float, help="guidance scale (default: the recipe's, sd15 7.5, sd-turbo 0)")
    for q in (b, a):
        q.add_argument("--recipe", choices=tuple(RECIPES), default="sd15",
                       help="the checkpoint's architecture (export/recipes.py) and its default steps and guidance")
    for q in (r, a):
        q.add_argument("--size", type=int, default=512)
        q.add_argument("--threads", type=int, default=2)
    r.add_argument("--steps", type=int, default=4)
    a.add_argument("--steps", type=int, help="UNet steps (default: the recipe's, sd15 20, sd-turbo 1)")
    args = p.parse_args()
    if args.cmd in ("setup", "build", "all"):
        peers = [t for t in args.peers.split(",") if t]
        valid = PEERS if args.cmd == "setup" else LAYOUTS
        if unknown := [t for t in peers if t not in valid]:
            p.error(f"{args.cmd} --peers: unknown {', '.join(unknown)}; valid: {', '.join(valid)}")
    if args.cmd == "setup":
        setup(args.work, peers)
    elif args.cmd == "build":
        build(args.work, args.artifact, args.recipe, tuple(peers))
    elif args.cmd == "ov-ir":
        ov_ir(args.artifact, args.diffusers, args.out)
    elif args.cmd == "run":
        fn = {"diffusers": run_diffusers, "optimum": run_optimum, "ovgenai": run_ovgenai}[args.tool]
        print(json.dumps(fn(args.model, args.size, args.steps, args.threads, args.guidance)))
    else:
        try:
            ours = parse_ours(args.ours)
        except ValueError as e:
            p.error(str(e))
        steps = RECIPES[args.recipe]["steps"] if args.steps is None else args.steps
        guidance = RECIPES[args.recipe]["guidance"] if args.guidance is None else args.guidance
        from edgediff.bench import machine

        rows = []
        jsonl = args.out.with_name("results") / "peers_cpu.jsonl"
        jsonl.parent.mkdir(parents=True, exist_ok=True)
        if (args.append or args.table_only) and jsonl.exists():
            rows = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
        else:
            jsonl.write_text("")
        manifest = None
        if not args.table_only:
            from edgediff.runtime import load_manifest

            manifest = load_manifest(args.artifact)
            source = str(manifest.provenance.get("source", ""))
            if manifest.random_weights and not source.startswith(f"random-weights:{args.recipe}:"):
                p.error(f"{args.artifact} was exported from {source}, not --recipe {args.recipe}")
        for size in ([] if args.table_only else [int(x) for x in args.sizes.split(",")]):
            jobs = [("peer", t, None, "", {}) for t in peers]
            jobs += [("ours", *entry) for entry in ours]
            for kind, name, prec, savings, kwargs in jobs:
                if kind == "ours" and (why := missing_for(manifest, prec, kwargs)):
                    print(f"skip edgediff {name} {prec} {savings}: {why}", flush=True)
                    continue
                print(f"{args.recipe} {size}: {kind} {name} {prec or ''} {savings} ...", flush=True)
                try:
                    row = (run_peer(args.work, args.recipe, name, size, steps, guidance, args.threads) if kind == "peer"
                           else run_ours(args.artifact, size, steps, args.threads, name, prec, guidance, savings, kwargs))
                except subprocess.CalledProcessError as e:
                    print(f"  failed: {e.stderr[-2000:]}", flush=True)
                    continue
                row = {"recipe": args.recipe} | row
                print(f"  unet {row['unet_rest_median_s']:.2f} s/step, end to end {row['end_to_end_s']:.1f} s", flush=True)
                rows.append(row)
                with open(jsonl, "a") as f:
                    f.write(json.dumps(row) + "\n")
        floors = {}
        for recipe in dict.fromkeys([r.get("recipe", "sd15") for r in rows] + [args.recipe]):
            floor_json = args.out.with_name("results") / f"floor_{recipe}_cpu.json"
            if recipe == args.recipe and (not args.table_only or not floor_json.exists()):
                from floor import matmul_rates, unet_flops

                batch = 2 if guidance > 1 else 1
                flops, rates = unet_flops(args.artifact, 512, batch), matmul_rates(args.threads)
                floor_json.write_text(json.dumps({
                    "size": 512, "batch": batch, "threads": args.threads, "gflops_per_s": rates,
                    "unet_gflop_per_step": {k: round(v / 1e9, 1) for k, v in flops.items()},
                    "floor_s_per_step": {k: round(flops["total"] / (v * 1e9), 2) for k, v in rates.items()}}, indent=2) + "\n")
            if floor_json.exists():
                floors[recipe] = json.loads(floor_json.read_text())
        args.out.write_text(results_md(rows, machine(), args, floors))
        print(args.out.read_text())


if __name__ == "__main__":
    main()
