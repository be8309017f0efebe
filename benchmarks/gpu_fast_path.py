"""GPU fast path, run by hand on a lent CUDA machine (an H200; onnxruntime-gpu and a CUDA torch): how far ONNX
Runtime's own Stable Diffusion recipe (the ``fp16-cuda`` variant, ``quantize/cuda_fp16.py``) takes edgediff's UNet
against diffusers on the same GPU. One process, side by side, medians of ``--runs`` calls after ``--warmup``:

1. SD 1.5 UNet step, 512x512, batch 2 (CFG): diffusers fp16 eager and ``torch.compile``; edgediff's fp32 graph on
   the CUDA EP, through the runtime (numpy in and out, what ``Pipeline`` does) and with IO binding (device
   buffers); the fp16-cuda variant with IO binding, and with a CUDA graph (``enable_cuda_graph`` + IO binding on
   fixed device buffers). Plus the fp16-cuda step's output against the fp32 graph's on the same inputs.
2. A 20-step 512x512 image end to end (text encoder, 20 CFG steps, VAE decode): edgediff fp32 and fp16-cuda
   UNet through the runtime as shipped, diffusers fp16; and diffusers' in-pipeline UNet steps
   (``gpu_check.diffusers_latency``).
3. SDXL UNet step at 1024x1024, batch 2: edgediff fp32 and fp16-cuda (IO binding, CUDA graph) vs diffusers fp16
   eager.

    python benchmarks/gpu_fast_path.py OUT --sd15 /tmp/sd15 [--sdxl /tmp/sdxl] [--runs 20] [--warmup 5]

An artifact path that does not exist is exported there first (``edgediff export --random-weights sd15|sdxl``, the
weights ``build_pipeline`` draws, seed 0); one without an fp16-cuda UNet gets it (``quantize_artifact``, its gate
run on the CUDA EP; forced, since random weights draw noise: the measured figures are recorded either way).
diffusers' UNets are built from the same recipes (random weights: step time does not depend on them). Writes
OUT/gpu_fast_path.json after every measurement (a failed one records its error and the run goes on) and
OUT/gpu_fast_path.md at the end. Importable without a GPU: torch and CUDA are imported where used.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_check  # noqa: E402  (parity, latency, diffusers_latency: the plain fp32 GPU check)

from edgediff.runtime.metrics import psnr  # noqa: E402
from edgediff.runtime.manifest import residual_inputs, zero_residuals  # noqa: E402

SECTIONS = ("sd15_step", "sd15_e2e", "sdxl_step")
PROMPT = "a photo of an astronaut riding a horse"
CUDA = "CUDAExecutionProvider"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="folder for gpu_fast_path.json and gpu_fast_path.md")
    p.add_argument("--sd15", type=Path, help="SD 1.5 artifact (exported there with random weights if missing)")
    p.add_argument("--sdxl", type=Path, help="SDXL artifact (exported there with random weights if missing)")
    p.add_argument("--runs", type=int, default=20, help="timed calls per measurement (median reported)")
    p.add_argument("--warmup", type=int, default=5, help="untimed calls first (CUDA graph capture, autotuning)")
    p.add_argument("--steps", type=int, default=20, help="denoising steps of the end-to-end image")
    p.add_argument("--e2e-runs", type=int, default=3, help="timed images per end-to-end measurement")
    p.add_argument("--compile-mode", default="reduce-overhead",
                   help="torch.compile mode of the diffusers UNet (reduce-overhead: CUDA graphs, like ORT's)")
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections: {', '.join(SECTIONS)}")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile (its compile takes minutes)")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------
# timing


def timed(fn: Callable[[], Any], runs: int, warmup: int, sync: Callable[[], Any] = lambda: None) -> dict[str, Any]:
    """Median (and p90, min) milliseconds of ``runs`` calls of ``fn`` after ``warmup`` calls; ``sync`` waits
    for the GPU after each call (ONNX Runtime's run already does)."""
    t0 = time.perf_counter()
    for _ in range(max(1, warmup)):
        fn()
        sync()
    warm_s = time.perf_counter() - t0
    ms = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        sync()
        ms.append((time.perf_counter() - t) * 1e3)
    return {"median_ms": round(statistics.median(ms), 3), "p90_ms": round(float(np.percentile(ms, 90)), 3),
            "min_ms": round(min(ms), 3), "runs": runs, "warmup": max(1, warmup), "warmup_s": round(warm_s, 2)}


def _torch_sync():
    import torch

    return torch.cuda.synchronize


# ---------------------------------------------------------------------------
# artifacts


def ensure_artifact(path: Path, recipe: str, log: Callable[[str], None]) -> dict[str, Any]:
    """Export ``recipe`` with random weights at ``path`` if it is not there; add its fp16-cuda UNet if missing."""
    from edgediff.quantize import GateSettings, quantize_artifact
    from edgediff.runtime import load_manifest

    info: dict[str, Any] = {"path": str(path)}
    if not (path / "manifest.json").exists():
        log(f"exporting {recipe} with random weights to {path}")
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "from edgediff.cli import main; main()", "export", "--random-weights",
                        recipe, str(path)], check=True)
        info["export_s"] = round(time.perf_counter() - t0, 1)
    manifest = load_manifest(path)
    unet = manifest.denoiser.name
    if "fp16-cuda" not in manifest.components[unet]:
        log(f"adding the fp16-cuda {unet} to {path} (gate on the CUDA EP)")
        t0 = time.perf_counter()
        settings = GateSettings(prompts=("a photo of a cat",), seeds=(0,), steps=4, size=min(512, manifest.sample_size))
        quantize_artifact(path, "fp16-cuda", (unet,), force=True, settings=settings, progress=log)
        info["fp16_cuda_s"] = round(time.perf_counter() - t0, 1)
    variant = load_manifest(path).variant(unet, "fp16-cuda")
    info["fp16_cuda"] = {"bytes": variant.bytes, "quality": variant.quality}
    return info


def unet_feeds(manifest, size: int, batch: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    """float32 feeds for the artifact's UNet from its manifest's input specs: ``size`` pixels, CFG batch 2."""
    rng = np.random.default_rng(seed)
    latent = size // manifest.vae_scale_factor
    dims = {"batch": batch, "height": latent, "width": latent, "sequence": 77}
    feeds = {}
    specs = manifest.variant(manifest.denoiser.name).inputs
    residuals = residual_inputs(specs)  # a UNet exported with ControlNets: zeros, its plain step
    for spec in (s for s in specs if s not in residuals):
        shape = tuple(dims[d] if isinstance(d, str) else d for d in spec.shape)
        if spec.name == "timestep":
            feeds[spec.name] = np.full(shape, 999.0, np.float32)
        elif spec.name == "time_ids":
            feeds[spec.name] = np.tile(np.array([size, size, 0, 0, size, size], np.float32), (batch, 1))
        else:
            feeds[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
    return feeds | zero_residuals(residuals, feeds["sample"].shape)


# ---------------------------------------------------------------------------
# ONNX Runtime on the CUDA EP


def ort_session(path: Path, cuda_graph: bool = False, device: str = "cuda"):
    """A session on the CUDA EP (``cuda_graph``: captured on the first runs, replayed after); ``device="cpu"``
    only to check this script without a GPU."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    if device == "cpu":
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()
    options = {"device_id": 0, "arena_extend_strategy": "kSameAsRequested", "enable_cuda_graph": "1" if cuda_graph else "0"}
    sess = ort.InferenceSession(str(path), so, providers=[(CUDA, options), "CPUExecutionProvider"])
    if sess.get_providers()[0] != CUDA:
        raise RuntimeError(f"{path}: ONNX Runtime gave {sess.get_providers()}, not the CUDA EP")
    return sess


class Bound:
    """A session with IO binding on fixed device buffers: inputs copied to the GPU once, outputs allocated there.
    What a CUDA graph needs (captured on the first ``run_with_iobinding``: a CUDA-graph session gets the output
    ``shapes`` from elsewhere, never a plain run first); without one, the step minus host copies."""

    def __init__(self, sess, feeds: dict[str, np.ndarray], device: str = "cuda", shapes: list | None = None):
        import onnxruntime as ort

        self.sess = sess
        shapes = shapes or [o.shape for o in sess.run(None, feeds)]
        self.inputs = {k: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v), device, 0) for k, v in feeds.items()}
        self.outputs = [ort.OrtValue.ortvalue_from_shape_and_type(s, np.float32, device, 0) for s in shapes]
        self.binding = sess.io_binding()
        for name, value in self.inputs.items():
            self.binding.bind_ortvalue_input(name, value)
        for out, value in zip(sess.get_outputs(), self.outputs):
            self.binding.bind_ortvalue_output(out.name, value)

    def __call__(self) -> None:
        self.sess.run_with_iobinding(self.binding)

    def result(self) -> list[np.ndarray]:
        return [v.numpy() for v in self.outputs]


def ort_step(path: Path, feeds: dict[str, np.ndarray], args, cuda_graph: bool = False,
             shapes: list | None = None) -> tuple[dict, list[np.ndarray]]:
    if cuda_graph and not shapes:
        shapes = [o.shape for o in ort_session(path).run(None, feeds)]
    t0 = time.perf_counter()
    bound = Bound(ort_session(path, cuda_graph), feeds, shapes=shapes)
    load_s = time.perf_counter() - t0
    row = timed(bound, args.runs, args.warmup) | {"load_s": round(load_s, 2)}
    out = bound.result()
    del bound
    return row, out


def runtime_step(root: Path, precision: str, feeds: dict[str, np.ndarray], args) -> dict[str, Any]:
    """The step as edgediff's runtime makes it: the Pipeline's session, numpy feeds in, numpy outputs back."""
    from edgediff.runtime import Pipeline

    pipe = Pipeline.load(root, backend="onnxruntime", device="cuda", precision={"unet": precision})
    session = pipe.sessions[pipe.manifest.denoiser.name]
    row = timed(lambda: session.run(feeds), args.runs, args.warmup)
    del pipe, session
    return row | {"device": "cuda", "io": "numpy (host copies each call)"}


def compare(ref: list[np.ndarray], got: list[np.ndarray], names: list[str]) -> dict[str, Any]:
    out = {}
    for name, a, b in zip(names, ref, got):
        a, b = a.astype(np.float64), b.astype(np.float64)
        err = np.abs(a - b)
        peak = float(np.abs(a).max()) or 1.0
        mse = float(np.mean((a - b) ** 2))
        out[name] = {"max_abs_err": float(err.max()), "mean_abs_err": float(err.mean()), "ref_peak": peak,
                     "psnr_db_vs_peak": round(10 * np.log10(peak**2 / mse), 2) if mse > 0 else float("inf"),
                     "finite": bool(np.isfinite(b).all())}
    return out


# ---------------------------------------------------------------------------
# diffusers


def diffusers_unet(recipe: str):
    """diffusers' UNet of ``recipe`` (the architecture edgediff's random-weight export has), fp16, on the GPU."""
    import diffusers
    import torch

    from edgediff.export.recipes import RECIPES

    r = RECIPES[recipe]
    context = r["text"]["hidden_size"] + (r["text_2"]["hidden_size"] if "text_2" in r else 0)
    with torch.device("cuda"):
        unet = diffusers.UNet2DConditionModel(in_channels=4, out_channels=4, cross_attention_dim=context, **r["unet"])
    return unet.to(torch.float16).eval()


def diffusers_inputs(feeds: dict[str, np.ndarray]):
    import torch

    t = {k: torch.from_numpy(v).to("cuda", torch.float16) for k, v in feeds.items()}
    kwargs = {"added_cond_kwargs": {"text_embeds": t["text_embeds"], "time_ids": t["time_ids"]}} if "time_ids" in t else {}
    return (t["sample"], t["timestep"], t["encoder_hidden_states"]), kwargs


def diffusers_step(recipe: str, feeds: dict[str, np.ndarray], args, compile_mode: str | None = None) -> dict[str, Any]:
    import torch

    unet = diffusers_unet(recipe)
    pos, kw = diffusers_inputs(feeds)
    info: dict[str, Any] = {"dtype": "float16", "attention": type(next(iter(unet.attn_processors.values()))).__name__}
    if compile_mode:
        unet = unet.to(memory_format=torch.channels_last)
        unet = torch.compile(unet, mode=compile_mode, fullgraph=True)
        info |= {"compile_mode": compile_mode, "channels_last": True}
        t0 = time.perf_counter()
        with torch.inference_mode():
            unet(*pos, **kw, return_dict=False)
        torch.cuda.synchronize()
        info["compile_s"] = round(time.perf_counter() - t0, 1)

    def step():
        with torch.inference_mode():
            unet(*pos, **kw, return_dict=False)

    row = timed(step, args.runs, args.warmup, _torch_sync()) | info
    del unet
    torch.cuda.empty_cache()
    return row


# ---------------------------------------------------------------------------
# the sections


def recorder(rows: dict, save: Callable[[], None]) -> Callable[[str, Callable[[], dict]], None]:
    """``record(name, measure)``: ``rows[name]`` is the measurement, or its error (one failed measurement must not
    lose the others); the report is saved after each."""

    def record(name: str, measure: Callable[[], dict]) -> None:
        try:
            rows[name] = measure()
        except Exception as e:
            rows[name] = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
        save()

    return record


def unet_case(root: Path, size: int, report: dict, key: str):
    """(manifest, CFG-batch feeds at ``size``, the UNet's name, its output names, the report's rows for ``key``)."""
    from edgediff.runtime import load_manifest

    manifest = load_manifest(root)
    unet = manifest.denoiser.name
    return (manifest, unet_feeds(manifest, size), unet, [o.name for o in manifest.variant(unet).outputs],
            report.setdefault(key, {}))


def sd15_step(root: Path, args, report: dict, save: Callable[[], None]) -> None:
    manifest, feeds, unet, names, rows = unet_case(root, 512, report, "sd15_unet_step_512_b2")

    record = recorder(rows, save)
    record("diffusers_fp16_eager", lambda: diffusers_step("sd15", feeds, args))
    if not args.no_compile:
        record("diffusers_fp16_compile", lambda: diffusers_step("sd15", feeds, args, args.compile_mode))
    record("edgediff_fp32_runtime", lambda: runtime_step(root, "fp32", feeds, args))
    outs = {}

    def ort_row(key, precision, cuda_graph=False):
        shapes = [o.shape for o in outs[precision]] if cuda_graph and precision in outs else None
        row, outs[key] = ort_step(root / manifest.variant(unet, precision).file, feeds, args, cuda_graph, shapes)
        return row

    record("edgediff_fp32_iobinding", lambda: ort_row("fp32", "fp32"))
    record("edgediff_fp16_cuda_runtime", lambda: runtime_step(root, "fp16-cuda", feeds, args))
    record("edgediff_fp16_cuda_iobinding", lambda: ort_row("fp16-cuda", "fp16-cuda"))
    record("edgediff_fp16_cuda_cudagraph", lambda: ort_row("fp16-cuda-graph", "fp16-cuda", cuda_graph=True))
    if "fp32" in outs:
        for key in ("fp16-cuda", "fp16-cuda-graph"):
            if key in outs:
                report.setdefault("sd15_fp16_cuda_vs_fp32_outputs", {})[key] = compare(outs["fp32"], outs[key], names)
    save()


def sd15_e2e(root: Path, args, report: dict, save: Callable[[], None]) -> None:
    from edgediff.runtime import Pipeline

    rows = report.setdefault(f"sd15_image_512_{args.steps}_steps", {})
    images = {}
    for precision in ("fp32", "fp16-cuda"):
        try:
            pipe = Pipeline.load(root, backend="onnxruntime", device="cuda", precision={"unet": precision})
            kw = dict(width=512, height=512, scheduler="euler", seed=0)
            pipe.txt2img("warm up", steps=2, **kw)
            walls, results = [], []
            for _ in range(args.e2e_runs):
                t0 = time.perf_counter()
                results.append(pipe.txt2img(PROMPT, steps=args.steps, **kw))
                walls.append(time.perf_counter() - t0)
            stages = results[-1].timings.stages
            rows[f"edgediff_unet_{precision}"] = {
                "image_s": round(statistics.median(walls), 3), "runs": args.e2e_runs,
                "unet_median_ms": round(statistics.median(stages["unet"][1:]) * 1e3, 2),
                "text_encoder_ms": round(sum(stages["text_encoder"]) * 1e3, 2),
                "vae_decode_ms": round(sum(stages["vae_decoder"]) * 1e3, 2), "devices": pipe.describe()}
            images[precision] = np.asarray(results[-1][0])
            del pipe
        except Exception as e:
            rows[f"edgediff_unet_{precision}"] = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
        save()
    if len(images) == 2:
        rows["image_psnr_fp16_cuda_vs_fp32_db"] = round(psnr(images["fp32"], images["fp16-cuda"]), 2)
    try:
        rows["diffusers_fp16"] = diffusers_image(args)
    except Exception as e:
        rows["diffusers_fp16"] = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
    save()
    try:  # diffusers' UNet steps inside its pipeline, fp32 and fp16 (the plain GPU check's baseline)
        rows["diffusers_pipeline_unet_steps"] = gpu_check.diffusers_latency("sd15", 512, args.steps)
    except Exception as e:
        rows["diffusers_pipeline_unet_steps"] = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
    save()


def diffusers_image(args) -> dict[str, Any]:
    """A diffusers fp16 image, same size, steps and scheduler, from the folder gpu_check builds (sd15, seed 0)."""
    import diffusers
    import torch

    from edgediff.export.recipes import build_pipeline

    src = Path("/tmp/edgediff-gpu-check-src")  # gpu_check.diffusers_latency's
    if not (src / "model_index.json").exists():
        build_pipeline("sd15", src, seed=0)
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(src), torch_dtype=torch.float16).to("cuda")
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(height=512, width=512, generator=torch.Generator("cuda").manual_seed(0))
    pipe(prompt="warm up", num_inference_steps=2, **kw)
    walls = []
    for _ in range(args.e2e_runs):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        pipe(prompt=PROMPT, num_inference_steps=args.steps, **kw)
        torch.cuda.synchronize()
        walls.append(time.perf_counter() - t0)
    del pipe
    torch.cuda.empty_cache()
    return {"image_s": round(statistics.median(walls), 3), "runs": args.e2e_runs, "attention": "diffusers default (SDPA)"}


def sdxl_step(root: Path, args, report: dict, save: Callable[[], None]) -> None:
    manifest, feeds, unet, names, rows = unet_case(root, 1024, report, "sdxl_unet_step_1024_b2")
    outs = {}

    def ort_row(key, precision, cuda_graph=False):
        shapes = [o.shape for o in outs[precision]] if cuda_graph and precision in outs else None
        row, outs[key] = ort_step(root / manifest.variant(unet, precision).file, feeds, args, cuda_graph, shapes)
        return row

    record = recorder(rows, save)
    record("diffusers_fp16_eager", lambda: diffusers_step("sdxl", feeds, args))
    record("edgediff_fp32_iobinding", lambda: ort_row("fp32", "fp32"))
    record("edgediff_fp16_cuda_iobinding", lambda: ort_row("fp16-cuda", "fp16-cuda"))
    record("edgediff_fp16_cuda_cudagraph", lambda: ort_row("fp16-cuda-graph", "fp16-cuda", cuda_graph=True))
    if "fp32" in outs and "fp16-cuda" in outs:
        report["sdxl_fp16_cuda_vs_fp32_outputs"] = {"fp16-cuda": compare(outs["fp32"], outs["fp16-cuda"], names)}
    save()


# ---------------------------------------------------------------------------
# the report


def markdown(report: dict) -> str:
    lines = [f"# GPU fast path ({report.get('gpu')}, onnxruntime {report.get('onnxruntime')}, torch "
             f"{report.get('torch')})", ""]
    for section in ("sd15_unet_step_512_b2", "sdxl_unet_step_1024_b2"):
        rows = report.get(section)
        if not rows:
            continue
        base = rows.get("diffusers_fp16_eager", {}).get("median_ms")
        lines += [f"## {section}", "", "| measurement | median ms | p90 ms | vs diffusers fp16 eager |",
                  "|---|---:|---:|---:|"]
        for name, row in rows.items():
            if "error" in row:
                lines.append(f"| {name} | error: {row['error'][:120]} | | |")
                continue
            ratio = f"{base / row['median_ms']:.2f}x faster" if base and row.get("median_ms") else ""
            lines.append(f"| {name} | {row['median_ms']:.2f} | {row['p90_ms']:.2f} | {ratio} |")
        lines.append("")
    for key in ("sd15_fp16_cuda_vs_fp32_outputs", "sdxl_fp16_cuda_vs_fp32_outputs"):
        for variant, outputs in report.get(key, {}).items():
            for out, c in outputs.items():
                lines.append(f"- {key} {variant} {out}: max abs err {c['max_abs_err']:.3g} (peak {c['ref_peak']:.3g}), "
                             f"PSNR {c['psnr_db_vs_peak']} dB, finite {c['finite']}")
    e2e = next((v for k, v in report.items() if k.startswith("sd15_image_512")), None)
    if e2e:
        lines += ["", "## 512x512 image end to end", "", "| pipeline | image s | UNet step ms |", "|---|---:|---:|"]
        for name, row in e2e.items():
            if isinstance(row, dict) and "image_s" in row:
                lines.append(f"| {name} | {row['image_s']:.3f} | {row.get('unet_median_ms', '')} |")
            elif isinstance(row, dict) and "error" in row:
                lines.append(f"| {name} | error: {row['error'][:120]} | |")
        if "image_psnr_fp16_cuda_vs_fp32_db" in e2e:
            lines.append(f"\nfp16-cuda image vs fp32 image, same seed: PSNR {e2e['image_psnr_fp16_cuda_vs_fp32_db']} dB")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(only) - set(SECTIONS)
    if unknown:
        raise SystemExit(f"unknown sections {sorted(unknown)}; valid: {', '.join(SECTIONS)}")
    import onnxruntime as ort

    args.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"python": platform.python_version(), "onnxruntime": ort.__version__,
                              "providers": ort.get_available_providers(), "runs": args.runs, "warmup": args.warmup}
    try:
        import diffusers
        import torch

        report |= {"torch": torch.__version__, "diffusers": diffusers.__version__,
                   "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    except ImportError as e:
        report["torch"] = f"missing ({e.name})"
    if CUDA not in report["providers"]:
        raise SystemExit(f"no {CUDA} here ({report['providers']}): install onnxruntime-gpu on a CUDA machine")

    def save():
        (args.out / "gpu_fast_path.json").write_text(json.dumps(report, indent=2, default=str))

    def log(msg: str) -> None:
        print(f"[gpu_fast_path] {msg}", flush=True)

    if args.sd15 and {"sd15_step", "sd15_e2e"} & set(only):
        report["sd15_artifact"] = ensure_artifact(args.sd15, "sd15", log)
        save()
        if "sd15_step" in only:
            log("SD 1.5 UNet step")
            sd15_step(args.sd15, args, report, save)
        if "sd15_e2e" in only:
            log("SD 1.5 image end to end")
            sd15_e2e(args.sd15, args, report, save)
    if args.sdxl and "sdxl_step" in only:
        report["sdxl_artifact"] = ensure_artifact(args.sdxl, "sdxl", log)
        save()
        log("SDXL UNet step")
        sdxl_step(args.sdxl, args, report, save)
    save()
    (args.out / "gpu_fast_path.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
