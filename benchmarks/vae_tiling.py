"""VAE tiling: the seams it leaves (embedded model) and the memory it saves (SD1.5 architecture).

1. Seams: the embedded model draws a 384x384 image (several shapes, 12 steps); its latents are decoded whole,
   in tiles with the default 0.25 overlap (blended) and in tiles without overlap (no blend: the seams as
   they are), on ONNX Runtime. PSNR of each against the whole decode, and a picture of the three with the
   blended tiling's difference amplified.
2. Memory and time (``--sd15``): one VAE decode in a fresh process, peak resident memory sampled from
   /proc/self/statm, at 1024x1024 whole and tiled and at 2048x2048 tiled (whole, the SD1.5 decoder's
   attention over 65,536 latents alone would take 17 GB per head-batch).

    python benchmarks/vae_tiling.py --out benchmarks/results/vae_tiling --sd15 /tmp/peers/sd15
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

DECODE = r"""
import json, sys, time
import numpy as np
import onnxruntime, openvino
from edgediff.bench import PeakMemory
from edgediff.runtime import Pipeline
root, backend, size, tiled = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "tiled"
pipe = Pipeline.load(root, backend=backend, device="cpu", threads=2, vae_tiling="on" if tiled else "off")
base = PeakMemory.resident()[0]
memory = PeakMemory().start()
latents = np.random.default_rng(0).standard_normal((1, 4, size // 8, size // 8)).astype(np.float32)
t0 = time.perf_counter()
pipe.decode(latents)
seconds = time.perf_counter() - t0
time.sleep(0.05)
print(json.dumps({"size": size, "tiled": tiled, "backend": backend, "decode_s": round(seconds, 2),
                  "peak_gb": round(memory.peak / 1e9, 2), "above_loaded_pipeline_gb": round((memory.peak - base) / 1e9, 2)}))
"""


def seams(out: Path) -> dict:
    from PIL import Image

    from edgediff.runtime import Pipeline
    from edgediff.runtime.metrics import psnr
    from edgediff.runtime.vae_tiling import Tiling, decode_tiled, tile_count

    pipe = Pipeline.load(backend="onnxruntime", device="cpu", vae_tiling="off")
    size, f = 384, pipe.manifest.vae_scale_factor
    result = pipe.txt2img("a large red circle and a small blue square on a yellow background", steps=12, seed=3,
                          width=size, height=size)
    latents = pipe.encode(np.asarray(result[0], dtype=np.float32).transpose(2, 0, 1)[None] / 127.5 - 1)
    scaling, shift = pipe.manifest.latent_units(pipe.sessions["vae_decoder"].variant)
    raw = (latents / np.float32(scaling) + np.float32(shift)).astype(np.float32)

    def decode(z):
        return pipe.sessions["vae_decoder"](latent_sample=z)["sample"]

    def to_uint8(a):
        return np.clip((a[0].transpose(1, 2, 0) + 1) * 127.5 + 0.5, 0, 255).astype(np.uint8)

    tile = pipe.manifest.sample_size
    whole = to_uint8(decode(raw))
    blended = to_uint8(decode_tiled(decode, raw, f, Tiling(tile, 0.25)))
    butted = to_uint8(decode_tiled(decode, raw, f, Tiling(tile, 0.0)))
    diff = np.clip(np.abs(blended.astype(np.int16) - whole.astype(np.int16)) * 8, 0, 255).astype(np.uint8)
    panel = np.concatenate([whole, blended, butted, diff], axis=1)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(panel).save(out.with_name(out.name + "_seams.png"))
    return {"image": f"{size}x{size}", "tile": tile, "tiles_blended": tile_count(size, size, f, Tiling(tile, 0.25)),
            "psnr_blended_db": round(psnr(blended, whole), 1), "psnr_no_overlap_db": round(psnr(butted, whole), 1),
            "picture": out.name + "_seams.png (whole | tiles, overlap 0.25 | tiles, no overlap | |blended - whole| x8)"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="results path without suffix")
    ap.add_argument("--sd15", type=Path, help="an SD1.5-architecture artifact for the memory runs")
    args = ap.parse_args()
    from edgediff.bench import machine

    record = {"machine": machine(), "seams_embedded_model": seams(args.out)}
    print(json.dumps(record["seams_embedded_model"]), flush=True)
    if args.sd15:
        runs = []
        for size, tiled in ((1024, False), (1024, True), (2048, True)):
            out = subprocess.run([sys.executable, "-c", DECODE, str(args.sd15), "openvino", str(size),
                                  "tiled" if tiled else "whole"], capture_output=True, text=True)
            row = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else \
                {"size": size, "tiled": tiled, "error": out.stderr.strip().splitlines()[-1][:300]}
            print(json.dumps(row), flush=True)
            runs.append(row)
        record["sd15_decode"] = runs
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.out}.json")


if __name__ == "__main__":
    main()
