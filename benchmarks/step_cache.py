"""Step caching on the embedded model: DeepCache (shipped) against TaylorSeer-style output forecasting (not shipped).

    python benchmarks/step_cache.py [--scenes 48] [--intervals 2,3,4,5] [--out benchmarks/results/step_cache_shapes.json]

Both run the full UNet every N steps. Between full steps DeepCache (Ma et al., CVPR 2024) runs the exported
shallow branch on the cached deep feature (``generate --cache-interval N``); the forecast (after TaylorSeer,
Liu et al. 2025, arXiv 2503.06923, here on the UNet's output in numpy, as an edge runtime could do without a
second graph) runs no UNet at all and extrapolates the output from the finite differences of the last full
outputs (order 1: linear, order 2: quadratic). For each method and N, every scene of a fixed subset at seed 0
and the model's recommended settings: UNet calls, median seconds per image, PSNR/SSIM against full compute, and
the attribute accuracy read back from the image. The forecast lives here only; the README says which was kept.
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


class Forecast:
    """TaylorSeer-style forecasting of the UNet output: computed every ``interval`` calls, between them a Taylor
    expansion in the step offset from finite differences of the last full outputs (Liu et al. 2025, eq. 7)."""

    def __init__(self, session, interval: int, order: int):
        self.session, self.run, self.interval, self.order = session, session.run, interval, order
        self.reset()

    def reset(self) -> None:
        self.calls, self.history = 0, []

    def __call__(self, feeds):
        step, self.calls = self.calls, self.calls + 1
        offset = step % self.interval
        if offset == 0:
            outputs = self.run(feeds)
            self.history = (self.history + [outputs[0]])[-(self.order + 1):]
            return outputs
        h, n = self.history, self.interval
        forecast = h[-1].copy()
        if len(h) >= 2:  # first difference per step
            forecast += offset * (h[-1] - h[-2]) / n
        if self.order >= 2 and len(h) >= 3:  # second difference per step squared
            forecast += offset ** 2 / 2 * (h[-1] - 2 * h[-2] + h[-3]) / n ** 2
        return [forecast.astype(np.float32)] + [np.zeros(1, np.float32)] * (len(self.session.variant.outputs) - 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenes", type=int, default=48)
    ap.add_argument("--intervals", default="2,3,4,5")
    ap.add_argument("--backend", default="onnxruntime")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/step_cache_shapes.json"))
    args = ap.parse_args()
    pipe = Pipeline.load(backend=args.backend, device="cpu", threads=args.threads)
    steps, guidance = pipe.manifest.settings()
    scenes = evaluate.prompt_set(args.scenes, seed=1)
    pipe.txt2img("warm up", steps=2, cache_interval=2)
    session = pipe.sessions[pipe.manifest.denoiser.name]
    configs = [("full compute", None, None)]
    for n in (int(x) for x in args.intervals.split(",")):
        configs += [("deepcache", n, None), ("forecast order 1", n, 1), ("forecast order 2", n, 2)]
    full: dict[str, np.ndarray] = {}
    rows = []
    for method, interval, order in configs:
        forecast = Forecast(session, interval, order) if order else None
        seconds, scores, psnrs, ssims, calls = [], [], [], [], {}
        try:
            if forecast:
                session.run = forecast
            for scene in scenes:
                prompt = scene.plain_prompt(True)
                if forecast:
                    forecast.reset()
                t0 = time.perf_counter()
                result = pipe.txt2img(prompt, seed=0, width=dataset.SIZE, height=dataset.SIZE,
                                      cache_interval=interval if method == "deepcache" else None)
                seconds.append(time.perf_counter() - t0)
                calls = {k: len(v) for k, v in result.timings.stages.items() if k.startswith("unet")}
                pixels = np.asarray(result[0])
                full.setdefault(prompt, pixels)
                psnrs.append(min(100.0, psnr(pixels, full[prompt])))
                ssims.append(ssim(pixels, full[prompt]))
                scores.append(evaluate.score(evaluate.classify(pixels), scene, True))
        finally:
            session.run = forecast.run if forecast else session.run
        if forecast:  # the wrapper counts calls it answered itself as UNet calls; report the real ones
            calls = {"unet": len(range(0, steps, interval)), "forecast": steps - len(range(0, steps, interval))}
        rows.append({"method": method, "interval": interval, "calls": calls,
                     "seconds_per_image": round(statistics.median(seconds), 4),
                     "psnr_db_vs_full": round(float(np.mean(psnrs)), 2), "ssim_vs_full": round(float(np.mean(ssims)), 4),
                     "accuracy": {k: round(float(np.mean([s[k] for s in scores])), 3) for k in scores[0]}})
        print(json.dumps(rows[-1]), flush=True)
    base = rows[0]["seconds_per_image"]
    for row in rows:
        row["time_vs_full"] = round(row["seconds_per_image"] / base, 3)
    out = {"what": f"step caching on the embedded shapes model, {len(scenes)} scenes x seed 0, {steps} steps, guidance "
                   f"{guidance:g}, {pipe.manifest.scheduler}, {args.backend} CPU, {args.threads} threads",
           "machine": machine(), "rows": rows}
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
