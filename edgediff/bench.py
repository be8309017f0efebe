"""``edgediff bench``: per-stage latency of an artifact on one backend/device/precision, as flat JSON rows.

Timing wraps the sessions from outside the math (each ``Result.timings`` holds
every call's wall time): load with an empty compile cache (cold) and again
with the cache it filled (warm: what every later process gets), text encoder, each UNet call (first
vs the rest, median and p90), VAE decode, end to end, peak resident memory
and the artifact's disk size for the chosen variants. Each row also records
the machine and the execution provider / device actually used, so rows from
different machines compare.
"""

from __future__ import annotations

import json
import math
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
from edgediff.runtime.cpu import cpu

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
    model, flags = cpu()
    info["cpu"] = model
    if flags:
        info["cpu_flags"] = [f for f in CPU_FLAGS if f in flags]
    try:
        mem = next(line for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal"))
        info["ram_gb"] = round(int(mem.split()[1]) / 1024**2, 1)
    except (OSError, StopIteration):
        pass
    try:
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=10)
        info["gpu"] = gpu.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["gpu"] = None
    info["backends"] = {k: v.get("version") for k, v in available_devices().items()}
    return info


class PeakMemory:
    """The process's resident memory sampled every 5 ms on a thread (Linux: /proc/self/statm): its peak, the
    file-backed (memory-mapped) part at the peak, and the peak per ``stage`` (set it as the work moves on).
    ``ru_maxrss`` gives the peak alone; this says where it happened and what it was made of."""

    def __init__(self, interval: float = 0.005):
        import threading

        self.interval, self.stage = interval, "start"
        self.peak = self.peak_file = 0
        self.peak_stage = self.stage
        self.by_stage: dict[str, int] = {}
        self._thread = threading.Thread(target=self._sample, daemon=True)

    @staticmethod
    def resident() -> tuple[int, int]:
        """(resident bytes, of them file-backed / shared)."""
        with open("/proc/self/statm") as f:
            _, resident, shared = (int(v) for v in f.read().split()[:3])
        page = os.sysconf("SC_PAGE_SIZE")
        return resident * page, shared * page

    def start(self) -> PeakMemory:
        self._thread.start()
        return self

    def _sample(self) -> None:
        while True:
            rss, shared = self.resident()
            self.by_stage[self.stage] = max(self.by_stage.get(self.stage, 0), rss)
            if rss > self.peak:
                self.peak, self.peak_file, self.peak_stage = rss, shared, self.stage
            time.sleep(self.interval)


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
    cache: bool = True,
    cache_dir: str | None = None,
    vae: str = "full",
    cache_interval: int | None = None,
    cfg_until: float | None = None,
    low_memory: bool = False,
    static_shapes: bool | None = None,
    vae_tiling: str = "auto",
) -> list[dict[str, Any]]:
    """Benchmark one configuration (default size: the model's); returns one flat row per measured run.

    ``load_s`` is the first load, into the compile cache ``cache_dir`` (default: a new temporary folder: cold),
    ``load_cached_s`` the load after it from the cache it filled (warm; None with ``cache=False``), whose
    pipeline runs the measured images.

    ``vae``, ``cache_interval`` and ``cfg_until`` are the savings of ``generate`` (tiny VAE, DeepCache, CFG
    cut-off); each row records them, and the shallow UNet's calls apart from the full ones. ``low_memory``,
    ``static_shapes`` and ``vae_tiling`` are ``Pipeline.load``'s; ``device`` may place each component
    (``text_encoder=cpu,unet=gpu``). ``peak_rss_mb`` is the process's peak resident memory so far (its loads
    included): run one configuration per process to compare peaks."""
    for name, value, lo in (("runs", runs, 1), ("warmup", warmup, 0), ("steps", steps, 1)):
        if not isinstance(value, int) or value < lo:
            raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")
    root = Path(artifact)
    manifest = load_manifest(root)
    width = manifest.sample_size if width is None else width
    height = manifest.sample_size if height is None else height
    with tempfile.TemporaryDirectory() as tmp_cache:
        kw = dict(backend=backend, device=device, precision=precision, vae=vae, threads=threads,
                  ov_precision=ov_precision, cache=cache, cache_dir=cache_dir or tmp_cache, low_memory=low_memory,
                  static_shapes=static_shapes, vae_tiling=vae_tiling)
        savings = dict(cache_interval=cache_interval, cfg_until=cfg_until)
        t0 = time.perf_counter()
        pipe = Pipeline.load(root, **kw)
        load_cold = time.perf_counter() - t0
        load_cached = None
        if cache:  # the runs below use the pipeline loaded from the filled cache: a later process's first image
            del pipe
            t0 = time.perf_counter()
            pipe = Pipeline.load(root, **kw)
            load_cached = time.perf_counter() - t0
        for _ in range(warmup):
            pipe.txt2img("warm up", steps=min(2, steps), width=width, height=height, guidance=guidance, scheduler=scheduler,
                         **savings)
        desc = pipe.describe()
        disk = sum(disk_bytes(root / manifest.variant(c, d["precision"]).file) for c, d in desc.items())
        base = {
            "artifact": str(root), "family": manifest.family, "random_weights": manifest.random_weights,
            "denoiser": manifest.denoiser.name,
            "backend": pipe.backend, "device": pipe.device, "devices": dict(pipe.devices),
            "low_memory": low_memory, "static_shapes": static_shapes, "vae_tiling": vae_tiling,
            "execution": {c: d["device"] for c, d in desc.items()},
            "execution_precision": {c: d["execution_precision"] for c, d in desc.items()},
            "compile_cache": {c: d["compile_cache"] for c, d in desc.items()},
            "precision": {c: d["precision"] for c, d in desc.items()},
            "width": width, "height": height, "steps": steps, "guidance": guidance,
            "scheduler": scheduler or manifest.scheduler, "threads": threads,
            "savings": {"vae": vae, **savings},
            "load_s": round(load_cold, 3), "load_cached_s": None if load_cached is None else round(load_cached, 3),
            "disk_bytes": disk, "machine": machine(),
        }
        rows = []
        for run in range(runs):
            t0 = time.perf_counter()
            result = pipe.txt2img("a photo of an astronaut riding a horse on mars", steps=steps, width=width,
                                  height=height, guidance=guidance, scheduler=scheduler, seed=run, **savings)
            total = time.perf_counter() - t0
            t = result.timings.stages
            unet = t[manifest.denoiser.name]  # the UNet, or a DiT's transformer: the "unet_*" fields time either
            rows.append(base | {
                "run": run,
                "end_to_end_s": round(total, 4),
                "text_encoder_s": round(sum(sum(t.get(e.name, [])) for e in manifest.text_encoders), 5),
                "unet_first_s": round(unet[0], 5),
                "unet_rest_median_s": _stats(unet[1:]).get("median", round(unet[0], 5)),
                "unet_rest_p90_s": _stats(unet[1:]).get("p90", round(unet[0], 5)),
                "unet_calls": len(unet),
                "unet_shallow_median_s": _stats(t.get("unet_shallow", [])).get("median"),
                "unet_shallow_calls": len(t.get("unet_shallow", [])),
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


def machine_label(machine: dict[str, Any]) -> str:
    """The CPU and its vector extensions, as rows record them: "AMD EPYC (avx2, fma, avx512_bf16)"."""
    flags = machine.get("cpu_flags")
    flags = [str(f) for f in flags] if isinstance(flags, list) else []  # a hand-edited row may hold anything
    return f"{machine.get('cpu', '?')}" + (f" ({', '.join(flags)})" if flags else "")


def label(row: dict[str, Any]) -> str:
    prec = sorted({str(v) for v in row["precision"].values()})
    savings = row.get("savings") if isinstance(row.get("savings"), dict) else {}
    saved = "".join(f" {k}={v}" for k, v in savings.items() if v not in (None, "full", 1))
    saved += " low-memory" * bool(row.get("low_memory")) + " static" * bool(row.get("static_shapes"))
    return (f"{Path(str(row['artifact'])).name} {row['backend']}/{row['device']} {'+'.join(prec)}{saved} "
            f"{row['width']}x{row['height']} on {str(row['machine'].get('cpu', '?'))[:24]}")


STAGES = ("load_s", "text_encoder_s", "unet_first_s", "unet_rest_median_s", "vae_decode_s", "end_to_end_s", "peak_rss_mb")


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Median of each stage per configuration, in first-seen order."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(label(row), []).append(row)
    out = []
    for name, group in groups.items():
        out.append({"config": name, "runs": len(group), "disk_gb": round(group[0]["disk_bytes"] / 1e9, 3),
                    "machine": machine_label(group[0]["machine"])}
                   | {s: statistics.median(r[s] for r in group) for s in STAGES})
    return out


def ratio(value: float, base: float) -> str:
    """``value / base`` as "1.23x"; "-" where that is no number (a base of 0, as a hand-edited row may hold)."""
    try:
        r = value / base
    except ZeroDivisionError:
        return "-"
    return f"{r:.2f}x" if math.isfinite(r) else "-"


def chart(summary: list[dict[str, Any]], path: Path):
    """Per configuration, the generation's stages as stacked bars (text encoder, UNet, VAE decode) and the load
    time as its own bar, the machine in the title; saved as a PNG. Needs matplotlib (``edgediff[chart]``);
    returns the figure."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("--chart draws with matplotlib: pip install 'edgediff[chart]'") from None
    colors = {"load": "#9e9e9e", "text encoder": "#5aa0dc", "unet": "#e6783c", "vae decode": "#5ab46e"}
    fig, ax = plt.subplots(figsize=(11, 1.2 + 0.9 * len(summary)))
    longest = max(max(s["end_to_end_s"], s["load_s"]) for s in summary) or 1.0
    for i, s in enumerate(summary):
        y = -2.2 * i
        left = 0.0
        unet = max(s["end_to_end_s"] - s["text_encoder_s"] - s["vae_decode_s"], 0.0)
        for name, value in (("text encoder", s["text_encoder_s"]), ("unet", unet), ("vae decode", s["vae_decode_s"])):
            ax.barh(y, value, left=left, color=colors[name], label=name if i == 0 else None)
            left += value
        ax.text(left + 0.01 * longest, y, f"{s['end_to_end_s']:.2f} s", va="center")
        ax.barh(y - 0.9, s["load_s"], height=0.5, color=colors["load"], label="load" if i == 0 else None)
        ax.text(s["load_s"] + 0.01 * longest, y - 0.9, f"load {s['load_s']:.2f} s", va="center", fontsize=8)
    ax.set_yticks([-2.2 * i for i in range(len(summary))], [s["config"] for s in summary])
    ax.set_xlim(0, longest * 1.18)  # room for the last value's label
    ax.set_xlabel("seconds (median of the runs)")
    machines = sorted({s["machine"] for s in summary})
    ax.set_title("edgediff bench on " + "; ".join(machines))
    ax.legend(loc="lower right", fontsize=8)
    fig.savefig(path, bbox_inches="tight", dpi=100)
    plt.close(fig)
    return fig
