"""Upscaler speed per megapixel on this CPU, both backends against PyTorch, and the tiles' seams.

The published architectures with seeded random weights (``edgediff export-upscaler --random-weights``):
RealESRGAN_x4plus (RRDBNet, 16.7M parameters) and realesr-general-x4v3 (SRVGGNetCompact). A 384x384 input
upscaled x4 in tiles of at most 256 pixels (overlap 16: four of 200), median of ``--runs`` after a warm-up; seconds per megapixel of
input. Seams: the tiled output against one untiled call (random weights: the tiles' agreement, not a
picture's quality).

    python benchmarks/upscale_speed.py --work /tmp/upscalers --out benchmarks/results/upscale_speed_cpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
from PIL import Image

RECIPES = ("realesrgan-x4plus", "realesr-general-x4v3")
SIZE = 384


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="where the exported upscalers go")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import torch

    from edgediff.bench import machine
    from edgediff.export.upscaler import build, export_upscaler, random_checkpoint
    from edgediff.runtime.metrics import psnr
    from edgediff.runtime.upscale import Upscaler

    torch.set_num_threads(args.threads)
    image = Image.fromarray((np.random.default_rng(0).random((SIZE, SIZE, 3)) * 255).astype(np.uint8))
    megapixels = SIZE * SIZE / 1e6
    rows = []
    for recipe in RECIPES:
        folder = args.work / recipe
        if not (folder / "upscaler.json").is_file():
            export_upscaler(None, folder, recipe)
        net, arch, scale = build(random_checkpoint(recipe), Path(recipe))
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).transpose(2, 0, 1)[None] / 255)
        times = []
        with torch.no_grad():
            for _ in range(args.runs + 1):
                t0 = time.perf_counter()
                net(pixels)
                times.append(time.perf_counter() - t0)
        rows.append({"upscaler": recipe, "runtime": "pytorch (whole image)", "s_per_input_mp":
                     round(statistics.median(times[1:]) / megapixels, 2)})
        for backend in ("onnxruntime", "openvino"):
            up = Upscaler.load(folder, backend=backend, device="cpu", threads=args.threads)
            whole = up.upscale(image, tile=SIZE)
            times = []
            for _ in range(args.runs + 1):
                t0 = time.perf_counter()
                tiled = up.upscale(image)
                times.append(time.perf_counter() - t0)
            rows.append({"upscaler": recipe, "runtime": f"edgediff {backend} ({up.session.execution_precision})",
                         "s_per_input_mp": round(statistics.median(times[1:]) / megapixels, 2),
                         "tiled_vs_whole_db": round(psnr(np.asarray(tiled), np.asarray(whole)), 1)})
            print(json.dumps(rows[-1]), flush=True)
    args.out.write_text(json.dumps({"machine": machine(), "input": f"{SIZE}x{SIZE} x4, tiles of at most 256, overlap 16",
                                    "threads": args.threads, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
