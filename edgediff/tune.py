"""``edgediff tune``: measure which work-saving settings keep an artifact's images, record the fastest as its
fast profile (``generate --fast``).

The savings, each a setting of ``generate``:

- ``vae="tiny"``: the artifact's tiny VAE (TAESD, ``export --tiny-vae``);
- ``cache_interval`` N: DeepCache, the full UNet every N steps, its shallow branch between;
- ``cfg_until`` F: classifier-free guidance for the first ``int(steps x F) + 1`` steps only;
- ``unet`` P: the UNet's reduced-precision variant P (``edgediff quantize``: int8-static, nncf-int8...) that runs
  on the backend. Being fastest within the bounds is the only way in: a variant that is not faster than fp32 on
  this machine is never the profile.

Full compute (the full VAE, every step in full, guidance at every step) draws the reference images. Every
candidate draws the same prompts (the quantize gate's, by default) and seeds at the model's recommended steps and guidance and is compared with
them: mean PSNR and SSIM (the quantize gate's measures and thresholds) and, on the embedded shapes model, the
attribute accuracy read back from the images (within 2 points of full compute). Speed is the median seconds
per image on this machine, measured in the same run.

Search: each saving alone at each of its levels, then every combination of the levels that kept the bounds
alone; the fastest combination within the bounds is the profile. A candidate outside the bounds is never
recorded as the profile; when nothing passes, the profile is full compute and says so.
"""

from __future__ import annotations

import itertools
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

# the quantize gate's prompt set and checks (numpy only, no onnx)
from edgediff.quantize.quantize import DEFAULT_PROMPTS, check_thresholds, check_writable
from edgediff.runtime import ArtifactError, Pipeline, PrecisionError, load_manifest
from edgediff.runtime.locking import folder_lock, lock_path
from edgediff.runtime.metrics import PSNR_CAP, psnr, ssim

# each saving's levels, mildest first
LEVELS: dict[str, tuple[Any, ...]] = {"vae": ("tiny",), "cache_interval": (2, 3, 4, 5), "cfg_until": (0.6, 0.4, 0.25),
                                      "unet": ()}  # unet: the artifact's reduced-precision UNet variants
# The embedded model: scenes drawn from its vocabulary, each image read back for its attributes. 48 scenes x the
# 2 seeds: one image is 1.04 points of accuracy, so the 2-point bound tolerates one image read otherwise.
SHAPES_SCENES = 48


@dataclass
class Bounds:
    """How far a fast profile may move from full compute (the quantize gate's image bounds, tighter accuracy)."""

    min_psnr: float = 20.0
    min_ssim: float = 0.70
    max_accuracy_drop: float = 0.02  # absolute, per attribute; the embedded shapes model only

    def __post_init__(self):
        check_thresholds(self.min_psnr, self.min_ssim, self.max_accuracy_drop)  # finite and in range (not NaN)


def applicable(pipe: Pipeline, steps: int, guidance: float) -> tuple[dict[str, tuple[Any, ...]], dict[str, str]]:
    """The savings this artifact and its recommended settings can use, and why the others cannot."""
    m, levels, skipped = pipe.manifest, {}, {}
    if "tiny" in m.components["vae_decoder"]:
        levels["vae"] = LEVELS["vae"]
    else:
        skipped["vae"] = "no tiny VAE (export --tiny-vae)"
    if m.shallow_denoiser is None:
        skipped["cache_interval"] = "no DeepCache graphs (exported without them)"
    elif steps < 2:
        skipped["cache_interval"] = f"{steps} step: nothing to cache between full steps"
    else:
        levels["cache_interval"] = tuple(n for n in LEVELS["cache_interval"] if n < steps)
    unet = m.denoiser.name
    variants = tuple(p for p, v in m.components[unet].items() if p != "fp32" and (not v.backends or pipe.backend in v.backends))
    if variants:
        levels["unet"] = variants
    else:
        skipped["unet"] = f"no reduced-precision {unet} that runs on {pipe.backend} (edgediff quantize)"
    if not pipe.family.guidance(guidance).enabled:  # a scale of 1 or below, or guidance distilled into the model
        skipped["cfg_until"] = f"guidance {guidance:g}: no classifier-free guidance to cut" + (
            f" ({pipe.family.title} takes it as a model input)" if guidance > 1.0 else "")
    else:
        levels["cfg_until"] = LEVELS["cfg_until"]
    return levels, skipped


class Measure:
    """Draws the prompt set with one configuration; compares it with full compute."""

    def __init__(self, root: Path, backend: str, threads: int | None, prompts: list[str], seeds: tuple[int, ...],
                 steps: int, guidance: float, scenes: list | None):
        self.root, self.backend, self.threads = root, backend, threads
        self.prompts, self.seeds, self.steps, self.guidance, self.scenes = prompts, seeds, steps, guidance, scenes
        self.unet = load_manifest(root).denoiser.name
        self.pipes: dict[str, Pipeline] = {}
        self.reference: list[np.ndarray] = []

    def pipe(self, vae: str, unet: str | None = None) -> Pipeline:
        key = f"{vae}:{unet}"
        if key not in self.pipes:
            precision = None if unet is None else {self.unet: unet}
            self.pipes[key] = Pipeline.load(self.root, backend=self.backend, device="cpu", threads=self.threads, vae=vae,
                                            precision=precision)
            self.pipes[key].txt2img("warm up", steps=2)
        return self.pipes[key]

    def __call__(self, config: dict[str, Any]) -> dict[str, Any]:
        pipe = self.pipe(config.get("vae", "full"), config.get("unet"))
        extra = {k: v for k, v in config.items() if k not in ("vae", "unet")}
        images, seconds = [], []
        for prompt in self.prompts:
            for seed in self.seeds:
                t0 = time.perf_counter()
                (image,) = pipe.txt2img(prompt, steps=self.steps, guidance=self.guidance, seed=seed, **extra)
                seconds.append(time.perf_counter() - t0)
                images.append(np.asarray(image))
        if not self.reference:
            self.reference = images
        row = {"settings": config, "seconds_per_image": round(statistics.median(seconds), 4),
               "psnr_db": round(float(np.mean([min(PSNR_CAP, psnr(a, b)) for a, b in zip(images, self.reference)])), 2),
               "ssim": round(float(np.mean([ssim(a, b) for a, b in zip(images, self.reference)])), 4)}
        if self.scenes is not None:
            from edgediff.models.shapes import evaluate

            scores = [evaluate.score(evaluate.classify(image), scene, True)
                      for image, scene in zip(images, [s for s in self.scenes for _ in self.seeds])]
            row["accuracy"] = {k: round(float(np.mean([s[k] for s in scores])), 4) for k in scores[0]}
        return row


def failures(row: dict[str, Any], full: dict[str, Any], bounds: Bounds) -> list[str]:
    """Why ``row`` is outside the bounds (empty: within them)."""
    out = []
    if not row["psnr_db"] >= bounds.min_psnr:
        out.append(f"PSNR {row['psnr_db']:.1f} dB < {bounds.min_psnr:g}")
    if not row["ssim"] >= bounds.min_ssim:
        out.append(f"SSIM {row['ssim']:.3f} < {bounds.min_ssim:g}")
    for attr, value in row.get("accuracy", {}).items():
        drop = full["accuracy"][attr] - value
        if drop > bounds.max_accuracy_drop + 1e-9:
            out.append(f"{attr} accuracy -{drop * 100:.1f} points (at most {bounds.max_accuracy_drop * 100:g})")
    return out


def tune(root: str | Path, *, backend: str = "onnxruntime", threads: int | None = None,
         prompts: tuple[str, ...] | None = None, seeds: tuple[int, ...] = (0, 1), bounds: Bounds | None = None,
         progress: Callable[[str], Any] = lambda s: None) -> dict[str, Any]:
    """Measure the savings on ``root``, record the fastest configuration within ``bounds`` as its fast profile;
    returns the profile (also saved in the manifest)."""
    from edgediff.models import default_model_path

    root, bounds = Path(root), bounds or Bounds()
    if not prompts or not seeds:
        raise ValueError("tune needs at least one prompt and one seed: a profile measured on no image proves nothing")
    manifest = load_manifest(root)
    # the profile is saved into the manifest (under a lock beside the folder): checked before any measurement
    check_writable([root, lock_path(root).parent], "tune saves the fast profile in the artifact's manifest")
    steps, guidance = manifest.settings()
    scenes = None
    if root.resolve() == default_model_path().resolve() and prompts == DEFAULT_PROMPTS:
        from edgediff.models.shapes import evaluate

        scenes = evaluate.prompt_set(SHAPES_SCENES, seed=1)
        prompts = tuple(s.plain_prompt(True) for s in scenes)
    measure = Measure(root, backend, threads, list(prompts), tuple(seeds), steps, guidance, scenes)
    levels, skipped = applicable(measure.pipe("full"), steps, guidance)
    progress("full compute")
    full = measure({})
    rows = [full | {"within_bounds": True}]

    def trial(config: dict[str, Any]) -> dict[str, Any]:
        progress(", ".join(f"{k}={v}" for k, v in config.items()))
        try:
            row = measure(config)
        except (PrecisionError, ArtifactError) as e:  # e.g. a UNet variant that draws NaN: out, with its reason
            rows.append({"settings": config, "seconds_per_image": None, "psnr_db": 0.0, "ssim": 0.0,
                         "within_bounds": False, "outside": [str(e)[:300]]})
            return rows[-1]
        reasons = failures(row, full, bounds)
        rows.append(row | {"within_bounds": not reasons, **({"outside": reasons} if reasons else {})})
        return rows[-1]

    kept = {name: [v for v in values if trial({name: v})["within_bounds"]] for name, values in levels.items()}
    for combo in itertools.product(*[[None] + values for values in kept.values()]):
        config = {name: value for name, value in zip(kept, combo) if value is not None}
        if len(config) > 1:
            trial(config)
    best = min((r for r in rows if r["within_bounds"]), key=lambda r: r["seconds_per_image"])
    from edgediff.bench import machine

    profile = {
        "settings": best["settings"],
        "speedup": round(full["seconds_per_image"] / best["seconds_per_image"], 2),
        "seconds_per_image": best["seconds_per_image"], "full_seconds_per_image": full["seconds_per_image"],
        "quality": {k: best[k] for k in ("psnr_db", "ssim", "accuracy") if k in best},
        "full_accuracy": full.get("accuracy"),
        "bounds": {"min_psnr": bounds.min_psnr, "min_ssim": bounds.min_ssim,
                   **({"max_accuracy_drop": bounds.max_accuracy_drop} if scenes is not None else {})},
        "measured": {"images": len(measure.reference), "steps": steps, "guidance": guidance, "backend": backend,
                     "threads": threads, "machine": machine().get("cpu"), "at": time.strftime("%Y-%m-%d")},
        "skipped": skipped, "candidates": rows,
    }
    if not best["settings"]:
        profile["note"] = "no saving kept the bounds and ran faster: --fast runs at full compute"
    with folder_lock(root, progress):
        latest = load_manifest(root)  # under the lock: what another writer added meanwhile stays
        latest.fast_profile = profile
        try:
            latest.save(root)
        except OSError as e:  # checked writable at the start; a disk that filled meanwhile
            raise ArtifactError(f"cannot save {root / 'manifest.json'} ({e.strerror}); the fast profile was not "
                                "recorded") from None
    return profile
