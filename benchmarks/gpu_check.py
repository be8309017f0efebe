"""GPU check, run by hand on a lent CUDA machine (results committed in benchmarks/results/).

1. Parity: a tiny artifact on ONNX Runtime's CUDA EP vs its CPU EP, every
   scheduler, same seed: PSNR of the final images.
2. Latency: an SD1.5-architecture artifact (``edgediff export --random-weights sd15``)
   on the CUDA EP, fp32, 512x512, CFG (UNet batch 2): load, text encoder, UNet
   first step and median of the rest, VAE decode; and diffusers PyTorch on the
   same GPU with the same weights for the ratio, when diffusers is importable.

    python benchmarks/gpu_check.py --tiny ARTIFACT --sd15 ARTIFACT --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from edgediff.runtime.metrics import psnr


def parity(tiny: Path, device: str) -> dict:
    from edgediff.runtime import SCHEDULER_NAMES, Pipeline

    ref = Pipeline.load(tiny, backend="onnxruntime", device="cpu")
    gpu = Pipeline.load(tiny, backend="onnxruntime", device=device)
    rows = {}
    for name in SCHEDULER_NAMES:
        kw = dict(steps=8, guidance=7.5, seed=42, rng="torch", scheduler=name, width=64, height=64)
        a = np.asarray(ref.txt2img("a red circle on a blue background", **kw)[0])
        b = np.asarray(gpu.txt2img("a red circle on a blue background", **kw)[0])
        rows[name] = round(psnr(a, b), 2)
    return {"psnr_cuda_vs_cpu_db": rows, "devices": gpu.describe()}


def latency(artifact: Path, device: str, size: int, steps: int) -> dict:
    from edgediff.runtime import Pipeline

    t0 = time.perf_counter()
    pipe = Pipeline.load(artifact, backend="onnxruntime", device=device)
    load_s = time.perf_counter() - t0
    pipe.txt2img("warm up", steps=2, width=size, height=size, scheduler="euler")
    result = pipe.txt2img("a photo of an astronaut riding a horse", steps=steps, width=size, height=size, scheduler="euler")
    t = result.timings.stages
    unet = t["unet"]
    return {
        "size": size, "steps": steps, "load_s": round(load_s, 2), "devices": pipe.describe(),
        "text_encoder_s": round(sum(t["text_encoder"]), 4),
        "unet_first_ms": round(unet[0] * 1e3, 2),
        "unet_median_ms": round(statistics.median(unet[1:]) * 1e3, 2),
        "unet_p90_ms": round(float(np.percentile(unet[1:], 90)) * 1e3, 2),
        "vae_decode_ms": round(sum(t["vae_decoder"]) * 1e3, 2),
        "unet_raw_ms": [round(x * 1e3, 2) for x in unet],
    }


def diffusers_latency(recipe: str, size: int, steps: int) -> dict:
    import torch
    import diffusers

    from edgediff.export.recipes import build_pipeline

    out = {}
    src = Path("/tmp/edgediff-gpu-check-src")
    if not (src / "model_index.json").exists():
        build_pipeline(recipe, src, seed=0)
    for dtype in (torch.float32, torch.float16):
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(src), torch_dtype=dtype).to("cuda")
        pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        times: list[float] = []

        def hook(module, args, output):
            torch.cuda.synchronize()
            times.append(time.perf_counter())

        pipe(prompt="warm up", num_inference_steps=2, height=size, width=size)
        h = pipe.unet.register_forward_hook(hook)
        pre = pipe.unet.register_forward_pre_hook(lambda m, a: (torch.cuda.synchronize(), times.append(time.perf_counter())) and None)
        pipe(prompt="a photo of an astronaut riding a horse", num_inference_steps=steps, height=size, width=size)
        h.remove()
        pre.remove()
        per_step = [(b - a) * 1e3 for a, b in zip(times[0::2], times[1::2])]
        out[str(dtype).replace("torch.", "")] = {
            "unet_first_ms": round(per_step[0], 2),
            "unet_median_ms": round(statistics.median(per_step[1:]), 2),
        }
        del pipe
        torch.cuda.empty_cache()
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tiny", type=Path)
    p.add_argument("--sd15", type=Path)
    p.add_argument("--device", default="cuda")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--json", type=Path, required=True)
    args = p.parse_args()
    import onnxruntime as ort

    report: dict = {"python": platform.python_version(), "onnxruntime": ort.__version__,
                    "providers": ort.get_available_providers()}
    try:
        import torch

        report["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
        report["torch"] = torch.__version__
    except ImportError:
        pass

    def save():
        args.json.write_text(json.dumps(report, indent=2))

    if args.tiny:
        report["parity"] = parity(args.tiny, args.device)
        save()
    if args.sd15:
        for size in (512, 256):
            report[f"edgediff_ort_{args.device}_fp32_{size}"] = latency(args.sd15, args.device, size, args.steps)
            save()
        try:
            report["diffusers_pytorch_512"] = diffusers_latency("sd15", 512, args.steps)
        except Exception as e:  # the baseline is optional: record why it did not run
            report["diffusers_pytorch_512"] = {"error": repr(e)}
        save()
    print(json.dumps({k: v for k, v in report.items()}, indent=1)[:6000])


if __name__ == "__main__":
    main()
