"""What a ControlNet costs per step: SD1.5's architecture with random weights, a ControlNet of SD1.5's own
ControlNet architecture (``ControlNetModel.from_unet`` of the SD1.5 UNet, the published control-image
embedding widths 16/32/96/256), 512x512, guidance on (batch 2).

Exports the pair once (``edgediff export --controlnet``), then times 4-step generations without a control,
with one and with two (the same ControlNet twice), interleaved, ``--reps`` times each, on each backend;
reports the median seconds per step of the UNet and of the ControlNets (``Result.timings``).

    python benchmarks/controlnet_step.py --work /tmp/controlnet-sd15 --out benchmarks/results/controlnet_step_sd15_cpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path


def build(work: Path, source: Path | None) -> Path:
    artifact = work / "artifact"
    if (artifact / "manifest.json").is_file():
        return artifact
    from edgediff.export.recipes import build_controlnet, build_pipeline

    src = source or build_pipeline("sd15", work / "diffusers", seed=0)
    net = build_controlnet(src, work / "controlnet", seed=1, copy_unet=False)
    subprocess.run([sys.executable, "-m", "edgediff.cli", "export", str(src), str(artifact), "--no-deepcache",
                    f"--controlnet=canny={net}"], check=True)
    return artifact


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--source", type=Path, default=None, help="an sd15 random-weights diffusers folder already built")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--backends", default="openvino,onnxruntime")
    args = ap.parse_args()
    artifact = build(args.work, args.source)
    from PIL import Image

    from edgediff.bench import machine, machine_label
    from edgediff.runtime import Control, Pipeline

    control = Image.new("RGB", (512, 512))
    cases = {"none": [], "one": [Control("canny", control)], "two": [Control("canny", control)] * 2}
    rows = {}
    for backend in args.backends.split(","):
        pipe = Pipeline.load(artifact, backend=backend, device="cpu", threads=2)
        pipe.txt2img("warm up", steps=1, controls=cases["one"])
        times: dict[str, dict[str, list[float]]] = {c: {"unet": [], "controlnet": []} for c in cases}
        for _ in range(args.reps):
            for case, controls in cases.items():
                stages = pipe.txt2img("a photo", steps=args.steps, controls=controls).timings.stages
                times[case]["unet"] += stages["unet"]
                times[case]["controlnet"].append(sum(stages.get("controlnet_canny", [])) / args.steps)
        rows[backend] = {case: {k: round(statistics.median(v), 3) for k, v in t.items()} for case, t in times.items()}
        for case in cases:
            r = rows[backend][case]
            r["step_s"] = round(r["unet"] + r["controlnet"], 3)
            r["vs_none"] = round(r["step_s"] / rows[backend]["none"]["step_s"], 2)
        print(backend, json.dumps(rows[backend]))
    m = machine()
    record = {"machine": machine_label(m), "threads": 2, "size": 512, "batch": 2, "steps": args.steps,
              "reps": args.reps, "seconds_per_step": rows,
              "note": "median seconds per step; controlnet: the ControlNets' calls in a step, summed"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
