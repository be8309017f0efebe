"""The text-to-image pipeline: numpy + tokenizers + one backend, no PyTorch.

``Pipeline.load(path)`` opens an artifact folder; ``pipe.txt2img(prompt)`` runs::

    prompt --tokenizer--> ids --text_encoder--> embeddings (uncond, cond)
    noise (seeded rng) * init_noise_sigma --> latents
    for each step: unet(scale_in(latents), t, embeddings) --guidance--> scheduler.step
    latents / scaling_factor --vae_decoder--> image

Each stage is one call with numpy arrays in and out; diffusers'
``StableDiffusionPipeline`` does the same arithmetic in the same order, so
the same weights, seed (``rng="torch"``) and scheduler give the same image.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

from .backends import BackendOptions, Session, open_session, resolve
from .manifest import COMPONENTS, Manifest, load_manifest
from .rng import RNG_NAMES, make_rng
from .schedulers import SCHEDULER_NAMES, make_scheduler
from .text import PromptTokenizer


def parse_precision(spec: str | dict[str, str] | None, available: dict[str, Any]) -> dict[str, str]:
    """``"fp16"`` for every component, or ``"unet=int8,vae_decoder=fp16"`` per component."""
    chosen = {c: "fp32" for c in available}
    if not spec:
        return chosen
    if isinstance(spec, str):
        if "=" not in spec:
            return {c: spec for c in available}
        pairs = dict(p.split("=", 1) for p in spec.split(",") if p.strip())
    else:
        pairs = dict(spec)
    for comp, prec in pairs.items():
        comp = comp.strip()
        if comp not in COMPONENTS:
            raise ValueError(f"unknown component {comp!r} in precision; valid: {', '.join(COMPONENTS)}")
        chosen[comp] = prec.strip()
    return chosen


class Guidance:
    """Classifier-free guidance, chosen once: batched (uncond + cond in one UNet call) or none."""

    def __init__(self, scale: float):
        self.scale = scale
        self.enabled = scale > 1.0

    def embeddings(self, cond: np.ndarray, uncond: np.ndarray | None) -> np.ndarray:
        return np.concatenate([uncond, cond]) if self.enabled else cond

    def model_input(self, latents: np.ndarray) -> np.ndarray:
        return np.concatenate([latents, latents]) if self.enabled else latents

    def combine(self, out: np.ndarray) -> np.ndarray:
        if not self.enabled:
            return out
        uncond, cond = np.split(out, 2)
        return uncond + np.float32(self.scale) * (cond - uncond)


@dataclass
class Timings:
    """Raw per-call durations of one generation, stage by stage (seconds)."""

    stages: dict[str, list[float]] = field(default_factory=dict)

    def add(self, stage: str, seconds: float) -> None:
        self.stages.setdefault(stage, []).append(seconds)

    def summary(self) -> dict[str, float]:
        return {k: float(sum(v)) for k, v in self.stages.items()}


class PrecisionError(RuntimeError):
    """A reduced-precision component produced NaN/Inf or a flat image."""

    def __init__(self, component: str, precision: str, what: str):
        super().__init__(
            f"{component} at {precision} produced {what}; rerun with fallback=True (--fallback) to redo "
            f"{component} in fp32, or choose another precision for it"
        )
        self.component = component
        self.precision = precision


class Pipeline:
    def __init__(self, root: Path, manifest: Manifest, backend: str, device: str, options: BackendOptions,
                 precision: dict[str, str], fallback: bool = False):
        self.root = root
        self.manifest = manifest
        self.backend, self.device, self.options = backend, device, options
        self.fallback = fallback
        self.precision = precision
        self.sessions = {comp: self._open(comp, precision[comp]) for comp in ("text_encoder", "unet", "vae_decoder")}
        self.scheduler_config = json.loads((root / manifest.scheduler_file).read_text())
        self.tokenizer = PromptTokenizer(root / manifest.tokenizer_file, manifest.text_max_length, manifest.pad_token_id)
        self.last_timings = Timings()

    def _open(self, component: str, precision: str) -> Session:
        variant = self.manifest.variant(component, precision)
        return open_session(self.root, component, variant, self.backend, self.device, self.options)

    @classmethod
    def load(
        cls,
        path: str | Path | None = None,
        backend: str = "auto",
        device: str = "auto",
        *,
        precision: str | dict[str, str] | None = None,
        fallback: bool = False,
        threads: int | None = None,
        cache_dir: str | None = None,
        ov_precision: str = "auto",
        manifest: Manifest | None = None,
    ) -> Pipeline:
        """Open an artifact folder (default: the embedded model) on ``backend``/``device``.

        ``auto`` picks the fastest installed backend for the device. ``precision``
        picks variants (``"fp16"`` or ``"unet=int8,vae_decoder=fp16"``); with
        ``fallback`` a reduced-precision component that yields NaN/Inf or a flat
        image is rerun in fp32 with a warning instead of raising ``PrecisionError``.
        ``manifest`` overrides the folder's manifest (used to measure a candidate variant).
        """
        if path is None:
            from edgediff.models import default_model_path

            path = default_model_path()
        root = Path(path)
        manifest = manifest or load_manifest(root)
        backend, device = resolve(backend, device)
        options = BackendOptions(threads=threads, cache_dir=cache_dir, ov_precision=ov_precision)
        return cls(root, manifest, backend, device, options, parse_precision(precision, manifest.components), fallback)

    def session(self, component: str) -> Session:
        """The component's session, opened on first use (the VAE encoder only serves image inputs)."""
        if component not in self.sessions:
            self.sessions[component] = self._open(component, self.precision.get(component, "fp32"))
        return self.sessions[component]

    def encode(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """[-1, 1] NCHW float images -> the latent distribution's (mean, std), unscaled."""
        params = np.concatenate([self.session("vae_encoder")(sample=images[k : k + 1].astype(np.float32))["latent_parameters"]
                                 for k in range(len(images))])
        mean, logvar = np.split(params, 2, axis=1)
        self._guard("vae_encoder", mean)
        return mean, np.exp(0.5 * np.clip(logvar, -30.0, 20.0)).astype(np.float32)

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """Unscaled latents -> [-1, 1] NCHW float images, one at a time (the VAE's memory peak grows with batch)."""
        return np.concatenate([self.sessions["vae_decoder"](latent_sample=latents[k : k + 1])["sample"]
                               for k in range(len(latents))])

    def describe(self) -> dict[str, Any]:
        return {
            comp: {"precision": s.variant.precision, "backend": s.backend, "device": s.device,
                   "execution_precision": s.execution_precision, "load_s": round(s.load_seconds, 3)}
            for comp, s in self.sessions.items()
        }

    def encode_prompt(self, prompts: list[str]) -> np.ndarray:
        return self.sessions["text_encoder"](input_ids=self.tokenizer(prompts))["last_hidden_state"]

    def txt2img(self, *args, **kwargs) -> list[Image.Image]:
        """Generate images (see ``_txt2img``), guarding reduced-precision components."""
        while True:
            try:
                return self._txt2img(*args, **kwargs)
            except PrecisionError as e:
                if not self.fallback:
                    raise
                warnings.warn(f"{e.component} at {e.precision} failed ({e}); rerunning it in fp32", stacklevel=2)
                self.sessions[e.component] = self._open(e.component, "fp32")

    def _guard(self, component: str, array: np.ndarray, what: str = "NaN/Inf values") -> None:
        precision = self.sessions[component].variant.precision
        if precision != "fp32" and not np.isfinite(array).all():
            raise PrecisionError(component, precision, what)

    def _txt2img(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        *,
        steps: int = 25,
        guidance: float = 7.5,
        seed: int = 0,
        width: int | None = None,
        height: int | None = None,
        scheduler: str | None = None,
        num_images: int = 1,
        rng: str = "numpy",
        latents: np.ndarray | None = None,
        callback: Callable[[int, int], None] | None = None,
    ) -> list[Image.Image]:
        """Generate ``num_images`` images per prompt; ``latents`` overrides the seeded noise."""
        m = self.manifest
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negatives = _negatives(negative_prompt, len(prompts))
        width = m.sample_size if width is None else width
        height = m.sample_size if height is None else height
        scheduler = scheduler or m.scheduler
        _check_args(width, height, steps, guidance, num_images, scheduler, rng, seed, m.vae_scale_factor)
        batch = len(prompts) * num_images
        shape = (batch, m.latent_channels, height // m.vae_scale_factor, width // m.vae_scale_factor)
        if latents is not None and latents.shape != shape:
            raise ValueError(f"latents must have shape {shape} for this size and batch, got {latents.shape}")
        timings = self.last_timings = Timings()
        unet = self.sessions["unet"]
        unet.durations.clear()

        # 1. text embeddings, repeated per image like diffusers' num_images_per_prompt
        t0 = time.perf_counter()
        cfg = Guidance(guidance)
        cond = np.repeat(self.encode_prompt(prompts), num_images, axis=0)
        uncond = np.repeat(self.encode_prompt(negatives), num_images, axis=0) if cfg.enabled else None
        context = cfg.embeddings(cond, uncond)
        self._guard("text_encoder", context)
        timings.add("text_encoder", time.perf_counter() - t0)

        # 2. initial noise and the schedule
        sched = make_scheduler(scheduler, self.scheduler_config, steps)
        noise = make_rng(rng, seed)
        x = latents.astype(np.float32) if latents is not None else noise.randn(shape)
        x = (x * np.float32(sched.init_noise_sigma)).astype(np.float32)

        # 3. denoising loop
        for i, t in enumerate(sched.timesteps):
            x_in = sched.scale_model_input(cfg.model_input(x), i).astype(np.float32)
            timestep = np.full((x_in.shape[0],), t, dtype=np.float32)
            out = unet(sample=x_in, timestep=timestep, encoder_hidden_states=context)["out_sample"]
            x = sched.step(cfg.combine(out), i, x, noise).astype(np.float32)
            if callback:
                callback(i + 1, len(sched.timesteps))
        timings.stages["unet"] = list(unet.durations)
        self._guard("unet", x)

        # 4. decode
        t0 = time.perf_counter()
        images = self.decode(x / np.float32(m.scaling_factor) + np.float32(m.shift_factor))
        timings.add("vae_decoder", time.perf_counter() - t0)
        self._guard("vae_decoder", images)
        if self.sessions["vae_decoder"].variant.precision != "fp32" and float(images.std()) < 1e-3:
            raise PrecisionError("vae_decoder", self.sessions["vae_decoder"].variant.precision, "a flat (all one colour) image")
        return [to_pil(d) for d in images]


def from_pil(image: Image.Image) -> np.ndarray:
    """PIL -> [-1, 1] CHW float32, as diffusers' image processor does."""
    return (np.asarray(image.convert("RGB"), dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1.0).astype(np.float32)


def to_pil(image: np.ndarray) -> Image.Image:
    """[-1, 1] CHW float -> PIL, rounded like diffusers' ``numpy_to_pil``."""
    hwc = np.clip(image.transpose(1, 2, 0) / 2 + 0.5, 0, 1)
    return Image.fromarray((hwc * 255).round().astype(np.uint8))


def _negatives(negative: str | list[str] | None, n: int) -> list[str]:
    if negative is None:
        return [""] * n
    if isinstance(negative, str):
        return [negative] * n
    if len(negative) != n:
        raise ValueError(f"{len(negative)} negative prompts for {n} prompts; give one per prompt or a single string")
    return list(negative)


def _check_args(width, height, steps, guidance, num_images, scheduler, rng, seed, multiple) -> None:
    for name, value in (("width", width), ("height", height)):
        if not isinstance(value, int) or value <= 0 or value % multiple:
            raise ValueError(f"{name} must be a positive multiple of {multiple} pixels, got {value}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps}")
    if not guidance >= 0:
        raise ValueError(f"guidance must be >= 0 (<= 1 disables classifier-free guidance), got {guidance}")
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    if scheduler not in SCHEDULER_NAMES:
        raise ValueError(f"unknown scheduler {scheduler!r}; valid: {', '.join(SCHEDULER_NAMES)}")
    if rng not in RNG_NAMES:
        raise ValueError(f"unknown rng {rng!r}; valid: {', '.join(RNG_NAMES)}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
