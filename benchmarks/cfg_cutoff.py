"""Guidance only where it pays, on the embedded model: the time a CFG cut-off saves and what it costs.

    python benchmarks/cfg_cutoff.py [--scenes 48] [--backend onnxruntime] [--out benchmarks/results/cfg_cutoff_shapes.json]

For each ``cfg_until`` (None = guidance at every step), every scene of a fixed prompt subset at seed 0 and the
model's recommended settings: the median seconds per image, PSNR/SSIM against the same image with full
guidance, and the attribute accuracy read back from the image (the embedded model's evaluation).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from edgediff.bench import machine
from edgediff.models.shapes import dataset, evaluate
from edgediff.runtime import Pipeline
from edgediff.runtime.metrics import psnr, ssim

CUTOFFS = (None, 0.6, 0.4, 0.25, 0.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenes", type=int, default=48)
    ap.add_argument("--backend", default="onnxruntime")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/cfg_cutoff_shapes.json"))
    args = ap.parse_args()
    pipe = Pipeline.load(backend=args.backend, device="cpu", threads=args.threads)
    steps, guidance = pipe.manifest.settings()
    scenes = evaluate.prompt_set(args.scenes, seed=1)
    pipe.txt2img("warm up", steps=2)
    full: dict[str, np.ndarray] = {}
    rows = []
    for cutoff in CUTOFFS:
        seconds, scores, psnrs, ssims = [], [], [], []
        for scene in scenes:
            prompt = scene.plain_prompt(True)
            t0 = time.perf_counter()
            (image,) = pipe.txt2img(prompt, seed=0, cfg_until=cutoff, width=dataset.SIZE, height=dataset.SIZE)
            seconds.append(time.perf_counter() - t0)
            pixels = np.asarray(image)
            if cutoff is None:
                full[prompt] = pixels
            psnrs.append(min(100.0, psnr(pixels, full[prompt])))
            ssims.append(ssim(pixels, full[prompt]))
            scores.append(evaluate.score(evaluate.classify(pixels), scene, True))
        guided = steps if cutoff is None else int(steps * cutoff) + 1
        rows.append({
            "cfg_until": cutoff, "guided_steps": guided, "unet_rows": guided * 2 + (steps - guided),
            "seconds_per_image": round(statistics.median(seconds), 4),
            "psnr_db_vs_full": round(float(np.mean(psnrs)), 2), "ssim_vs_full": round(float(np.mean(ssims)), 4),
            "accuracy": {k: round(float(np.mean([s[k] for s in scores])), 3) for k in scores[0]},
        })
        print(json.dumps(rows[-1]), flush=True)
    base = rows[0]["seconds_per_image"]
    for row in rows:
        row["time_vs_full"] = round(row["seconds_per_image"] / base, 3)
    out = {"what": f"CFG cut-off on the embedded shapes model, {len(scenes)} scenes x seed 0, {steps} steps, "
                   f"guidance {guidance:g}, {pipe.manifest.scheduler}, {args.backend} CPU, {args.threads} threads",
           "machine": machine(), "rows": rows}
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
