"""``edgediff bench``: per-stage latency of an artifact on one backend/device/precision, as flat JSON rows.

Timing wraps the sessions from outside the math (each ``Result.timings`` holds
every call's wall time): cold load (session creation or compilation, with
and without OpenVINO's compile cache), text encoder, each UNet call (first
vs the rest, median and p90), VAE decode, end to end, peak resident memory
and the artifact's disk size for the chosen variants. Each row also records
the machine and the execution provider / device actually used, so rows from
different machines compare.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import IO, Any

import numpy as np

from edgediff import __version__
from edgediff.runtime import Pipeline, load_manifest
from edgediff.runtime.manifest import disk_bytes
from edgediff.runtime.backends import available_devices

CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8",
             "neon", "asimd")


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    info: dict[str, Any] = {
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "cores": os.cpu_count(),
        "edgediff": __version__,
    }
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")), "")
        flags = set(next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines()
                          if line.startswith(("flags", "Features"))), []))
        info["cpu"] = model or platform.processor()
        info["cpu_flags"] = [f for f in CPU_FLAGS if f in flags]
        mem = next(line for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal"))
        info["ram_gb"] = round(int(mem.split()[1]) / 1024**2, 1)
    except (OSError, StopIteration):
        info["cpu"] = platform.processor()
    try:
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=10)
        info["gpu"] = gpu.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["gpu"] = None
    info["backends"] = {k: v.get("version") for k, v in available_devices().items()}
    return info


def _stats(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    return {"median": round(statistics.median(values), 5), "p90": round(float(np.percentile(values, 90)), 5)}


def run_bench(
    artifact: str | Path,
    *,
    backend: str = "auto",
    device: str = "auto",
    precision: str | None = None,
    width: int | None = None,
    height: int | None = None,
    steps: int = 20,
    runs: int = 3,
    warmup: int = 1,
    guidance: float = 7.5,
    scheduler: str | None = None,
    threads: int | None = None,
    ov_precision: str = "auto",
    cache_dir: str | None = None,
) -> list[dict[str, Any]]:
    """Benchmark one configuration (default size: the model's); returns one flat row per measured run."""
    for name, value, lo in (("runs", runs, 1), ("warmup", warmup, 0), ("steps", steps, 1)):
        if not isinstance(value, int) or value < lo:
            raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")
    root = Path(artifact)
    manifest = load_manifest(root)
    width = manifest.sample_size if width is None else width
    height = manifest.sample_size if height is None else height
    with tempfile.TemporaryDirectory() as tmp_cache:
        cache = cache_dir or tmp_cache
        kw = dict(backend=backend, device=device, precision=precision, threads=threads, ov_precision=ov_precision)
        t0 = time.perf_counter()
        pipe = Pipeline.load(root, cache_dir=cache, **kw)
        load_cold = time.perf_counter() - t0
        load_cached = None
        if pipe.backend == "openvino":
            del pipe
            t0 = time.perf_counter()
            pipe = Pipeline.load(root, cache_dir=cache, **kw)
            load_cached = time.perf_counter() - t0
        for _ in range(warmup):
            pipe.txt2img("warm up", steps=min(2, steps), width=width, height=height, guidance=guidance, scheduler=scheduler)
        desc = pipe.describe()
        disk = sum(disk_bytes(root / s.variant.file) for s in pipe.sessions.values())
        base = {
            "artifact": str(root), "family": manifest.family, "random_weights": manifest.random_weights,
            "backend": pipe.backend, "device": pipe.device,
            "execution": {c: d["device"] for c, d in desc.items()},
            "execution_precision": {c: d["execution_precision"] for c, d in desc.items()},
            "precision": {c: d["precision"] for c, d in desc.items()},
            "width": width, "height": height, "steps": steps, "guidance": guidance,
            "scheduler": scheduler or manifest.scheduler, "threads": threads,
            "load_s": round(load_cold, 3), "load_cached_s": None if load_cached is None else round(load_cached, 3),
            "disk_bytes": disk, "machine": machine(),
        }
        rows = []
        for run in range(runs):
            t0 = time.perf_counter()
            result = pipe.txt2img("a photo of an astronaut riding a horse on mars", steps=steps, width=width,
                                  height=height, guidance=guidance, scheduler=scheduler, seed=run)
            total = time.perf_counter() - t0
            t = result.timings.stages
            unet = t["unet"]
            rows.append(base | {
                "run": run,
                "end_to_end_s": round(total, 4),
                "text_encoder_s": round(sum(t["text_encoder"]) + sum(t.get("text_encoder_2", [])), 5),
                "unet_first_s": round(unet[0], 5),
                "unet_rest_median_s": _stats(unet[1:]).get("median", round(unet[0], 5)),
                "unet_rest_p90_s": _stats(unet[1:]).get("p90", round(unet[0], 5)),
                "unet_calls": len(unet),
                "vae_decode_s": round(sum(t["vae_decoder"]), 5),
                "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                "raw": {k: [round(x, 5) for x in v] for k, v in t.items()},
            })
        return rows


def write_rows(rows: list[dict[str, Any]], out: Path | IO[str]) -> None:
    """Append the rows as JSON lines to a path or an open text file."""
    if isinstance(out, (str, Path)):
        with open(out, "a") as f:
            write_rows(rows, f)
        return
    for row in rows:
        out.write(json.dumps(row) + "\n")


# what --compare reads of each row (all written by run_bench)
ROW_FIELDS = ("artifact", "backend", "device", "precision", "width", "height", "machine", "disk_bytes", "load_s",
              "text_encoder_s", "unet_first_s", "unet_rest_median_s", "vae_decode_s", "end_to_end_s", "peak_rss_mb")


def read_rows(paths: list[Path]) -> list[dict[str, Any]]:
    """Rows of ``edgediff bench --json`` files; a line that is not such a row is a ValueError naming it."""
    rows = []
    for path in paths:
        try:
            text = Path(path).read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, RecursionError) as e:
                raise ValueError(f"{path}:{n} is not a JSON row ({e})") from None
            missing = [f for f in ROW_FIELDS if not isinstance(row, dict) or f not in row]
            if missing:
                raise ValueError(f"{path}:{n} is not an edgediff bench row: it lacks {', '.join(missing)}")
            bad = [f for f in ROW_FIELDS[7:] if not isinstance(row[f], (int, float)) or isinstance(row[f], bool)]
            if bad or not isinstance(row["precision"], dict) or not isinstance(row["machine"], dict):
                raise ValueError(f"{path}:{n} has non-numeric {', '.join(bad) or 'precision/machine'} fields")
            rows.append(row)
    return rows


def label(row: dict[str, Any]) -> str:
    prec = sorted({str(v) for v in row["precision"].values()})
    return (f"{Path(row['artifact']).name} {row['backend']}/{row['device']} {'+'.join(prec)} "
            f"{row['width']}x{row['height']} on {str(row['machine'].get('cpu', '?'))[:24]}")


STAGES = ("load_s", "text_encoder_s", "unet_first_s", "unet_rest_median_s", "vae_decode_s", "end_to_end_s", "peak_rss_mb")


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Median of each stage per configuration, in first-seen order."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(label(row), []).append(row)
    out = []
    for name, group in groups.items():
        out.append({"config": name, "runs": len(group), "disk_gb": round(group[0]["disk_bytes"] / 1e9, 3)}
                   | {s: statistics.median(r[s] for r in group) for s in STAGES})
    return out


def chart(summary: list[dict[str, Any]], path: Path) -> None:
    """Per-stage stacked horizontal bars (load, text encoder, UNet steps, VAE) per configuration, as a PNG."""
    from PIL import Image, ImageDraw

    colors = {"text encoder": (90, 160, 220), "unet": (230, 120, 60), "vae decode": (90, 180, 110)}
    width, row_h, left = 1000, 34, 420
    img = Image.new("RGB", (width, 50 + row_h * len(summary)), "white")
    d = ImageDraw.Draw(img)
    longest = max(s["end_to_end_s"] for s in summary) or 1.0
    scale = (width - left - 20) / longest
    for i, s in enumerate(summary):
        y = 30 + i * row_h
        d.text((8, y + 8), s["config"][:60], fill="black")
        x = left
        unet_total = max(s["end_to_end_s"] - s["text_encoder_s"] - s["vae_decode_s"], 0.0)
        for name, value in (("text encoder", s["text_encoder_s"]), ("unet", unet_total), ("vae decode", s["vae_decode_s"])):
            d.rectangle([x, y, x + value * scale, y + row_h - 8], fill=colors[name])
            x += value * scale
        d.text((x + 4, y + 8), f"{s['end_to_end_s']:.2f} s", fill="black")
    for k, (name, color) in enumerate(colors.items()):
        d.rectangle([left + k * 150, 8, left + k * 150 + 12, 20], fill=color)
        d.text((left + k * 150 + 16, 8), name, fill="black")
    img.save(path)
