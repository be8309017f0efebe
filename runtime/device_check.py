"""The device check: does this device compute what the CPU computes?

Users of every torch-free runtime report black or blurred images on GPUs that draw right on the CPU (an fp16
VAE overflowing, a driver's kernel gone wrong). Before a pipeline first runs on a device other than the CPU,
``check`` runs one short generation on the CPU (2 steps at the model's size, DeepCache's shallow graph and the
VAE encoder included where the artifact has them), recording every component's inputs and outputs, then feeds
each component's recorded inputs to the same graph on the device and compares its outputs with the CPU's,
stage by stage: a wrong component is found as itself, not as a spoilt picture.

The measure is the signal-to-noise ratio of the device's output against the CPU's, in dB (10 log10 of the CPU
output's energy over the difference's), the worst over a component's calls and outputs. OpenVINO's bf16
execution against its f32 measured 32-52 dB per component on the embedded model (the UNet lowest) and
27.7-43.3 dB on the SD1.5 architecture (random weights; the check took a minute there); outputs turned to noise are below 5, a black or NaN image lower still. Below
``MIN_SNR_DB`` the component is demoted, each step checked again: to its fp32 variant on the device, then to
the CPU (at the precision asked for), with a warning saying which component and why.

The verdict is kept in the compile cache's folder (``device-checks/``), keyed by the artifact's files, the
device (and its name as the backend reports it), the backend and its version, the precisions: later loads
apply it without measuring. ``edgediff check --device ...`` measures again and replaces it.

On this machine (a CPU only) the tests run it with the CPU on both sides and an injected fault: ``wrap`` lets
a test corrupt one component's sessions on the "device" side.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .backends import BackendOptions, Session, available_devices, open_session
from .manifest import Manifest

MIN_SNR_DB = 20.0
CHECK_STEPS = 2
FOLDER = "device-checks"

Wrap = Callable[[str, str, Session], Session]  # (component, "device" | "cpu", session) -> the session to use


@dataclass
class ComponentVerdict:
    component: str
    device: str  # where it runs after the check
    precision: str  # the variant it runs after the check
    snr_db: float | None  # the device's SNR vs the CPU for the variant asked for (None: it runs on the CPU)
    action: str  # "kept", "fp32" (demoted to its fp32 variant on the device), "cpu" (demoted to the CPU)
    why: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"component": self.component, "device": self.device, "precision": self.precision,
                "snr_db": self.snr_db, "action": self.action, "why": self.why}


@dataclass
class CheckReport:
    backend: str
    verdicts: list[ComponentVerdict] = field(default_factory=list)
    from_cache: bool = False

    def placement(self) -> tuple[dict[str, str], dict[str, str]]:
        return ({v.component: v.device for v in self.verdicts}, {v.component: v.precision for v in self.verdicts})

    def demoted(self) -> list[ComponentVerdict]:
        return [v for v in self.verdicts if v.action != "kept"]


def snr_db(reference: np.ndarray, candidate: np.ndarray) -> float:
    """10 log10(|reference|^2 / |candidate - reference|^2); -inf for NaN/Inf or a shape mismatch."""
    if reference.shape != candidate.shape or not np.isfinite(candidate).all():
        return float("-inf")
    ref = reference.astype(np.float64)
    noise = float(np.sum((candidate.astype(np.float64) - ref) ** 2))
    signal = float(np.sum(ref**2))
    if noise == 0.0:
        return float("inf")
    return float(10.0 * np.log10(max(signal, 1e-30) / noise))


def record_reference(root: Path, manifest: Manifest, backend: str, precision: dict[str, str],
                     options: BackendOptions) -> dict[str, list[tuple[dict[str, np.ndarray], list[np.ndarray]]]]:
    """One short generation on the CPU (f32 execution), every component call's (inputs, outputs) recorded."""
    from .pipeline import Pipeline

    calls: dict[str, list[tuple[dict[str, np.ndarray], list[np.ndarray]]]] = {}
    reference = Pipeline.load(root, backend=backend, device="cpu", precision=precision,
                              ov_precision="f32", threads=options.threads, cache=options.cache_dir is not None,
                              cache_dir=options.cache_dir, check=False)

    def recording(component: str, session: Session) -> None:
        run = session.run

        def run_and_record(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
            outputs = run(feeds)
            calls.setdefault(component, []).append(({k: np.array(v) for k, v in feeds.items()}, outputs))
            return outputs

        session.run = run_and_record

    for component in manifest.components:  # every graph: DeepCache's shallow one and the VAE encoder too
        recording(component, reference.session(component))
    deepcache = manifest.shallow_denoiser is not None
    result = reference.txt2img("a red circle on a blue background", steps=CHECK_STEPS + deepcache, seed=0,
                               cache_interval=2 if deepcache else None)
    if "vae_encoder" in manifest.components:
        image = np.asarray(result.images[0], dtype=np.float32).transpose(2, 0, 1)[None] / 127.5 - 1.0
        reference.encode(image.astype(np.float32))
    return calls


def compare(session: Session, calls: list[tuple[dict[str, np.ndarray], list[np.ndarray]]]) -> float:
    """The worst SNR (dB) of ``session``'s outputs against the recorded ones, over the recorded calls."""
    worst = float("inf")
    for feeds, expected in calls:
        try:
            outputs = session.run(feeds)
        except Exception:  # a device that cannot run the graph at all fails the check
            return float("-inf")
        for want, got in zip(expected, outputs):
            worst = min(worst, snr_db(want, np.asarray(got)))
    return worst


def check(root: Path, manifest: Manifest, backend: str, devices: dict[str, str], precision: dict[str, str],
          options: BackendOptions, *, wrap: Wrap | None = None) -> CheckReport:
    """Measure every component placed off the CPU against the CPU, demoting the ones below ``MIN_SNR_DB``."""
    wrap = wrap or (lambda component, side, session: session)
    report = CheckReport(backend)
    off_cpu = {c: d for c, d in devices.items() if not is_the_cpu(backend, d) and c in manifest.components}
    needs_fp32 = sorted({c for c in off_cpu if precision.get(c, "fp32") != "fp32"})
    # a variant made for one device only (fp16-cuda) is measured against the CPU's fp32
    on_cpu = {c: p if runs_on_cpu(manifest, c, p) else "fp32" for c, p in precision.items()}
    recorded = record_reference(root, manifest, backend, on_cpu, options)
    recorded_fp32 = record_reference(root, manifest, backend, {c: "fp32" for c in precision}, options) \
        if needs_fp32 else recorded
    for component, device in devices.items():
        asked = precision.get(component, "fp32")
        if component not in off_cpu or component not in recorded:
            report.verdicts.append(ComponentVerdict(component, device, asked, None, "kept"))
            continue
        snr = _measure(root, manifest, backend, component, asked, device, options, recorded[component], wrap)
        if snr >= MIN_SNR_DB:
            report.verdicts.append(ComponentVerdict(component, device, asked, round(snr, 1), "kept"))
            continue
        why = f"{component} {asked} on {device}: {_words(snr)} vs the CPU (at least {MIN_SNR_DB:g} dB needed)"
        if asked != "fp32":
            snr32 = _measure(root, manifest, backend, component, "fp32", device, options, recorded_fp32[component],
                             wrap)
            if snr32 >= MIN_SNR_DB:
                report.verdicts.append(ComponentVerdict(component, device, "fp32", round(snr, 1), "fp32",
                                                        why + f"; fp32 on {device}: {_words(snr32)}"))
                continue
            why += f"; fp32 on {device}: {_words(snr32)}"
        report.verdicts.append(ComponentVerdict(component, "cpu", on_cpu[component], _finite(snr), "cpu", why))
    return report


def runs_on_cpu(manifest: Manifest, component: str, precision: str) -> bool:
    """False for a variant whose method names the devices it runs on, the CPU not among them (fp16-cuda)."""
    devices = manifest.variant(component, precision).only_devices
    return not devices or "cpu" in devices


def is_the_cpu(backend: str, device: str) -> bool:
    """The CPU itself, or OpenVINO's AUTO where the CPU is its only device: nothing to check."""
    if device == "cpu":
        return True
    return backend == "openvino" and device == "auto" and \
        [d.split(".")[0] for d in available_devices().get("openvino", {}).get("devices", {})] == ["CPU"]


def _measure(root: Path, manifest: Manifest, backend: str, component: str, precision: str, device: str,
             options: BackendOptions, calls, wrap: Wrap) -> float:
    try:
        session = open_session(root, component, manifest.variant(component, precision), backend, device, options)
    except Exception:  # a device that cannot compile the graph fails the check; the CPU then runs it
        return float("-inf")
    return compare(wrap(component, "device", session), calls)


def _words(snr: float) -> str:
    return "NaN/Inf or a failed run" if snr == float("-inf") else f"{snr:.1f} dB"


def _finite(snr: float) -> float | None:
    return round(snr, 1) if np.isfinite(snr) else None


# -- the verdict's cache ------------------------------------------------------------------------------------


def check_key(root: Path, manifest: Manifest, backend: str, devices: dict[str, str],
              precision: dict[str, str]) -> str:
    """What a verdict depends on: the artifact's graph files (path, size, time), the devices and what the
    backend calls them (the driver shows in OpenVINO's device names and versions), the backend's version,
    the precisions."""
    files = []
    for component in manifest.components:
        for variant in manifest.components[component].values():
            for rel in variant.files():
                path = root / rel
                if path.is_file():
                    st = path.stat()
                    files.append([rel, st.st_size, st.st_mtime_ns])
    value = [str(root.resolve()), files, backend, sorted(devices.items()), sorted(precision.items()),
             available_devices().get(backend, {})]
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:20]


def cached_report(folder: Path, key: str) -> CheckReport | None:
    path = folder / f"{key}.json"
    try:
        record = json.loads(path.read_text())
        verdicts = [ComponentVerdict(**v) for v in record["verdicts"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return CheckReport(record["backend"], verdicts, from_cache=True)


def save_report(folder: Path, key: str, report: CheckReport) -> None:
    """Written whole or not at all (a temporary file renamed into place); a cache that cannot be written only
    means the next load checks again."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=folder, suffix=".partial", delete=False) as f:
            json.dump({"backend": report.backend, "verdicts": [v.to_json() for v in report.verdicts]}, f, indent=1)
        os.replace(f.name, folder / f"{key}.json")
    except OSError as e:
        warnings.warn(f"the device check's verdict cannot be kept in {folder} ({e.strerror or e}); the next load "
                      "checks again", stacklevel=3)


def placement_for(root: Path, manifest: Manifest, backend: str, devices: dict[str, str], precision: dict[str, str],
                  options: BackendOptions, *, refresh: bool = False,
                  wrap: Wrap | None = None) -> tuple[dict[str, str], dict[str, str]]:
    """The devices and precisions to run with after the check (measured once, then read from its cache);
    every demotion is said as a warning."""
    folder = None if options.cache_dir is None else options.cache_dir / FOLDER  # no cache: measured each load
    key = check_key(root, manifest, backend, devices, precision)
    report = None if refresh or folder is None else cached_report(folder, key)
    if report is None:
        report = check(root, manifest, backend, devices, precision, options, wrap=wrap)
        if folder is not None:
            save_report(folder, key, report)
    for v in report.demoted():
        target = f"its fp32 variant on {v.device}" if v.action == "fp32" else f"the CPU ({v.precision})"
        warnings.warn(f"device check: {v.why}; running {v.component} on {target} instead"
                      + (" (a verdict kept from an earlier check; `edgediff check` measures again)"
                         if report.from_cache else ""), stacklevel=3)
    new_devices, new_precision = report.placement()
    return devices | new_devices, precision | new_precision
