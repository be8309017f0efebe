"""OpenVINO static shapes: what a process's first image costs, cold (empty compile cache) and warm, vs dynamic.

With static shapes the graphs compile at their first call for its exact shapes (cached per shape), so the
load is quick and the first UNet call pays the compile (cold) or the cache's import (warm). Each run is a
fresh process, 2 steps at the model's size; the step time itself is in ``unet_step_ratio.py``'s
``openvino:fp32:static`` row.

    python benchmarks/static_shapes_load.py /tmp/peers/sd15 --out benchmarks/results/static_shapes_sd15_cpu.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

RUN = r'''
import json, sys, time
from edgediff.runtime import Pipeline
root, cache, mode = sys.argv[1:4]
t0 = time.perf_counter()
pipe = Pipeline.load(root, backend="openvino", device="cpu", threads=2, static_shapes=mode == "static", cache_dir=cache)
load = time.perf_counter() - t0
t0 = time.perf_counter()
result = pipe.txt2img("a fox", steps=2, seed=0)
first = time.perf_counter() - t0
print(json.dumps({"mode": mode, "load_s": round(load, 2), "first_image_2_steps_s": round(first, 2),
                  "unet_calls_s": [round(x, 2) for x in result.timings.stages["unet"]],
                  "compile_cache": {c: d["compile_cache"] for c, d in pipe.describe().items()}}))
'''


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    from edgediff.bench import machine

    rows = []
    for mode in ("dynamic", "static"):
        with tempfile.TemporaryDirectory() as cache:
            for state in ("cold", "warm"):
                out = subprocess.run([sys.executable, "-c", RUN, str(args.artifact), cache, mode], capture_output=True,
                                     text=True, check=True)
                rows.append({"cache": state} | json.loads(out.stdout.strip().splitlines()[-1]))
                print(json.dumps(rows[-1]), flush=True)
    args.out.write_text(json.dumps({"machine": machine(), "artifact": str(args.artifact), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
