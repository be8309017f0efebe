"""UNet step ratios between variants, measured interleaved: one call of each in turn, so drift hits all alike.

    python benchmarks/unet_step_ratio.py /tmp/sd15 --variants openvino:fp32,openvino:int8-static,\
openvino:int8-static-attn,onnxruntime:fp32,onnxruntime:int8-static --out benchmarks/results/unet_step_ratio_sd15_cpu

Timings on a shared 2-core machine move by 5-15% between minutes; runs of one variant after another carry that
drift into their ratio. Here every variant is compiled once in one process (the backends' default execution:
OpenVINO bf16 where the CPU has it), warmed up, then called round-robin ``--rounds`` times on the same random
CFG-batch inputs (``unet_profile.unet_feeds``); the medians and each one's ratio to the first variant go to
OUT.json and OUT.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from unet_profile import unet_feeds

from edgediff.bench import machine, machine_label
from edgediff.runtime.backends import BackendOptions, open_session
from edgediff.runtime import load_manifest


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("artifact", type=Path)
    p.add_argument("--variants", default="openvino:fp32,openvino:int8-static,openvino:int8-static-attn",
                   help="backend:precision[:static] of the UNet, comma-separated (static: OpenVINO compiled for the "
                        "exact shape); ratios are to the first")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, required=True, help="path stem: writes OUT.json and OUT.md")
    args = p.parse_args()

    manifest = load_manifest(args.artifact)
    unet = manifest.denoiser.name
    feeds = unet_feeds(manifest, args.size)
    sessions = {}
    for entry in args.variants.split(","):
        backend, precision, *flags = entry.split(":")
        print(f"loading {backend} {precision} {' '.join(flags)}...", flush=True)
        session = open_session(args.artifact, unet, manifest.variant(unet, precision), backend, "cpu",
                               BackendOptions(threads=args.threads, static_shapes="static" in flags or None))
        session(**feeds)  # warm-up: first-inference work is not a step
        sessions[entry] = session
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(args.rounds):
        for name, session in sessions.items():
            t0 = time.perf_counter()
            session(**feeds)
            times[name].append(time.perf_counter() - t0)
    first = next(iter(sessions))
    base = statistics.median(times[first])
    rows = [{"variant": name, "executes": sessions[name].execution_precision,
             "median_s": round(statistics.median(t), 6), "min_s": round(min(t), 6), "max_s": round(max(t), 6),
             "ratio_to_first": round(statistics.median(t) / base, 3), "raw_s": [round(x, 6) for x in t]}
            for name, t in times.items()]
    info = {"machine": machine(), "size": args.size, "threads": args.threads, "rounds": args.rounds, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps(info, indent=1) + "\n")
    lines = [f"# UNet step, variants interleaved call by call, on {machine_label(info['machine'])}", "",
             f"{args.size}x{args.size}, CFG batch 2, {args.threads} threads, {args.rounds} rounds after a warm-up; "
             f"ratios of medians to {first}.", "",
             "| variant | executes | median s | min-max s | vs " + first + " |", "|---|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['executes']} | {r['median_s']:.3f} | {r['min_s']:.2f}-{r['max_s']:.2f} "
              f"| {r['ratio_to_first']:.3f}x |" for r in rows]
    Path(f"{args.out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
