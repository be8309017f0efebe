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
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

from .backends import BackendOptions, Session, open_session, resolve
from .limits import DEFAULT_MAX_BATCH, MAX_INPUT_PIXELS, MAX_STEPS, MAX_TOTAL_PIXELS, check_pixels, pixel_budget
from .manifest import COMPONENTS, ArtifactError, Manifest, artifact_file, load_manifest, read_manifest_json
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
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow is caught, with its step, by the NaN/Inf guard
            return uncond + np.float32(self.scale) * (cond - uncond)


@dataclass
class Timings:
    """Raw per-call durations of one generation, stage by stage (seconds)."""

    stages: dict[str, list[float]] = field(default_factory=dict)

    def add(self, stage: str, seconds: float) -> None:
        self.stages.setdefault(stage, []).append(seconds)


class GenerationError(RuntimeError):
    """A stage produced NaN/Inf values: the settings or the weights overflow."""


class PrecisionError(GenerationError):
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
                 precision: dict[str, str], fallback: bool = False, *, max_pixels: int | None = None,
                 max_batch: int = DEFAULT_MAX_BATCH):
        self.root = root
        self.manifest = manifest
        self.backend, self.device, self.options = backend, device, options
        self.fallback = fallback
        self.precision = precision
        self.max_pixels = pixel_budget(manifest.sample_size) if max_pixels is None else max_pixels
        self.max_batch = max_batch
        # the small files first: a broken tokenizer or scheduler config fails before any graph is compiled
        self.scheduler_config = self._scheduler_config()
        self.tokenizer = self._tokenizer(manifest.tokenizer_file, manifest.text_max_length, manifest.pad_token_id)
        self.tokenizer_2 = None
        if manifest.is_xl:
            t2 = manifest.text_2
            self.tokenizer_2 = self._tokenizer(t2["tokenizer"], t2["max_length"], t2["pad_token_id"])
        text = ("text_encoder", "text_encoder_2") if manifest.is_xl else ("text_encoder",)
        self.sessions = {comp: self._open(comp, precision[comp]) for comp in text + ("unet", "vae_decoder")}
        self.last_timings = Timings()

    def _scheduler_config(self) -> dict[str, Any]:
        """The checkpoint's scheduler_config.json, checked by building its scheduler once."""
        path = artifact_file(self.root, self.manifest.scheduler_file, "scheduler config", (".json",))
        config = read_manifest_json(path)
        if not isinstance(config, dict):
            raise ArtifactError(f"{path} must hold a JSON object (diffusers' scheduler_config.json)")
        self._make_scheduler(self.manifest.scheduler, 2, config, path)
        return config

    def _make_scheduler(self, name: str, steps: int, config: dict[str, Any] | None = None, path: Path | None = None):
        try:
            return make_scheduler(name, self.scheduler_config if config is None else config, steps)
        except (KeyError, TypeError, ValueError, ArithmeticError, IndexError) as e:
            where = path or self.root / self.manifest.scheduler_file
            raise ArtifactError(f"{where} does not configure the {name} scheduler ({type(e).__name__}: {e}); "
                                "re-export the artifact or choose another --scheduler") from e

    def _tokenizer(self, rel: str, max_length: int, pad_token_id: int) -> PromptTokenizer:
        path = artifact_file(self.root, rel, "tokenizer", (".json",))
        try:
            return PromptTokenizer(path, max_length, pad_token_id)
        except MemoryError:
            raise
        except Exception as e:  # the tokenizers library raises its own Exception type with serde's message
            raise ArtifactError(f"{path} is not a usable tokenizer.json ({str(e)[:300]}); re-export the artifact") from e

    def _open(self, component: str, precision: str) -> Session:
        variant = self.manifest.variant(component, precision)
        if variant.backends and self.backend not in variant.backends:
            raise ValueError(
                f"{component} {precision} ({variant.file}) runs only on {', '.join(variant.backends)}, not on "
                f"{self.backend}: pass backend='{variant.backends[0]}' (--backend {variant.backends[0]}) or pick "
                f"another precision for {component}; it has: {', '.join(self.manifest.components[component])}"
            )
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
        max_pixels: int | None = None,
        max_batch: int = DEFAULT_MAX_BATCH,
    ) -> Pipeline:
        """Open an artifact folder (default: the embedded model) on ``backend``/``device``.

        ``auto`` picks the fastest installed backend for the device. ``precision``
        picks variants (``"fp16"`` or ``"unet=int8,vae_decoder=fp16"``); with
        ``fallback`` a reduced-precision component that yields NaN/Inf or a flat
        image is rerun in fp32 with a warning instead of raising ``PrecisionError``.
        ``manifest`` overrides the folder's manifest (used to measure a candidate variant).
        ``max_pixels`` raises the per-image pixel budget; ``max_batch`` caps the
        images per UNet call (see ``edgediff.runtime.limits``).
        """
        for name, value in (("max_pixels", max_pixels), ("max_batch", max_batch)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r:.40}")
        if path is None:
            from edgediff.models import default_model_path

            path = default_model_path()
        root = Path(path)
        manifest = manifest or load_manifest(root)
        backend, device = resolve(backend, device)
        options = BackendOptions(threads=threads, cache_dir=cache_dir, ov_precision=ov_precision)
        return cls(root, manifest, backend, device, options, parse_precision(precision, manifest.components), fallback,
                   max_pixels=max_pixels, max_batch=max_batch)

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

    def encode_prompt(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray | None]:
        """Prompts -> (the UNet's encoder_hidden_states, SDXL's pooled text embedding or None)."""
        if not self.manifest.is_xl:
            return self.sessions["text_encoder"](input_ids=self.tokenizer(prompts))["last_hidden_state"], None
        # SDXL: both encoders' penultimate layers side by side; the pooled projection of the second
        first = self.sessions["text_encoder"](input_ids=self.tokenizer(prompts))["penultimate_hidden_state"]
        second = self.sessions["text_encoder_2"](input_ids=self.tokenizer_2(prompts))
        self._guard("text_encoder_2", second["text_embeds"])
        return np.concatenate([first, second["penultimate_hidden_state"]], axis=-1), second["text_embeds"]

    def _fallback(self, task: Callable[..., list[Image.Image]], *args, **kwargs) -> list[Image.Image]:
        """Run ``task``; with ``fallback``, redo it with a failing reduced-precision component in fp32."""
        while True:
            try:
                return task(*args, **kwargs)
            except PrecisionError as e:
                if not self.fallback:
                    raise
                warnings.warn(f"{e.component} at {e.precision} failed ({e}); rerunning it in fp32", stacklevel=3)
                self.sessions[e.component] = self._open(e.component, "fp32")

    def _guard(self, component: str, array: np.ndarray, where: str = "") -> None:
        """NaN/Inf out of a stage is an error at every precision: never an all-black image with exit 0."""
        if np.isfinite(array).all():
            return
        precision = self.sessions[component].variant.precision
        if precision != "fp32":
            raise PrecisionError(component, precision, "NaN/Inf values")
        raise GenerationError(
            f"{component} produced NaN/Inf values{where} at fp32: the settings overflow (a very large guidance "
            "scale?) or the weights are broken; nothing was written"
        )

    def txt2img(self, prompt: str | list[str], negative_prompt: str | list[str] | None = None, *,
                latents: np.ndarray | None = None, **kwargs) -> list[Image.Image]:
        """Generate ``num_images`` images per prompt from noise; ``latents`` overrides the seeded noise.

        Keyword arguments (all tasks): steps, guidance (both default to the
        artifact's recommended ones, else 25 and 7.5), seed, width, height,
        scheduler, num_images, rng (``numpy`` or ``torch``), callback(done, total).
        """
        return self._batched(self._txt2img, prompt, negative_prompt, latents=latents, **kwargs)

    def img2img(self, prompt: str | list[str], image: Image.Image, negative_prompt: str | list[str] | None = None, *,
                strength: float = 0.6, **kwargs) -> list[Image.Image]:
        """Redraw ``image`` after noising it to ``strength`` (0 < strength <= 1) of the schedule."""
        return self._batched(self._img2img, prompt, negative_prompt, image, strength=strength, **kwargs)

    def inpaint(self, prompt: str | list[str], image: Image.Image, mask: Image.Image,
                negative_prompt: str | list[str] | None = None, *, strength: float = 1.0, mask_blur: float = 0.0,
                keep_unmasked: bool = False, **kwargs) -> list[Image.Image]:
        """Repaint the white part of ``mask`` in ``image``.

        A 9-channel inpainting UNet is conditioned on the mask and the masked
        image; an ordinary UNet gets the known region blended back at every
        step. ``keep_unmasked`` pastes the original pixels back outside the
        mask (feathered by ``mask_blur`` pixels).
        """
        return self._batched(self._inpaint, prompt, negative_prompt, image, mask, strength=strength,
                             mask_blur=mask_blur, keep_unmasked=keep_unmasked, **kwargs)

    def outpaint(self, prompt: str | list[str], image: Image.Image, extend: dict[str, int],
                 negative_prompt: str | list[str] | None = None, *, fill: str = "edge", **kwargs) -> list[Image.Image]:
        """Extend the canvas by ``extend`` pixels per side (left/right/top/bottom) and paint the new area."""
        canvas, mask = extend_canvas(image, extend, fill, self.manifest.vae_scale_factor, self.max_pixels)
        kwargs.setdefault("keep_unmasked", True)
        return self.inpaint(prompt, canvas, mask, negative_prompt, strength=1.0, **kwargs)

    def _batched(self, task: Callable[..., list[Image.Image]], prompt, negative_prompt, *args,
                 num_images: int = 1, seed: int = 0, latents: np.ndarray | None = None,
                 callback: Callable[[int, int], None] | None = None, **kw) -> list[Image.Image]:
        """Run ``task`` on at most ``max_batch`` images per UNet call.

        A batch within the limit runs as one (diffusers' arithmetic, one random
        stream). A larger one runs in chunks; the chunk starting at image ``r``
        is seeded with ``seed + r``, so memory stays bounded whatever ``num_images``.
        """
        prompts = _prompts(prompt)
        negatives = None if negative_prompt is None else _negatives(negative_prompt, len(prompts))
        _check_int("num_images", num_images, 1)
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**64:
            raise ValueError(f"seed must be a non-negative integer below 2**64, got {seed!r:.40}")
        if callback is not None and not callable(callback):
            raise ValueError(f"callback must be a function (done, total), got {type(callback).__name__}")
        total = len(prompts) * num_images
        width, height = kw.get("width") or self.manifest.sample_size, kw.get("height") or self.manifest.sample_size
        if isinstance(width, int) and isinstance(height, int):
            check_pixels(width, height, self.max_pixels)  # before the total: one huge image is a size problem
        if isinstance(width, int) and isinstance(height, int) and total * width * height > MAX_TOTAL_PIXELS:
            raise ValueError(f"{total} images of {width}x{height} exceed {MAX_TOTAL_PIXELS:,} pixels in one call "
                             "(they are all held in memory); ask for fewer and call again with another seed")
        if seed + total - 1 >= 2**64:
            raise ValueError("seed + images must stay below 2**64 (each chunk is seeded with seed + its first image)")
        if latents is not None and (not isinstance(latents, np.ndarray) or latents.ndim != 4 or len(latents) != total):
            raise ValueError(f"latents must be a 4-D numpy array with one row per image ({total}), "
                             f"got {getattr(latents, 'shape', type(latents).__name__)}")
        if total <= self.max_batch:
            return self._fallback(task, prompts, negatives, *args, num_images=num_images, seed=seed, latents=latents,
                                  callback=callback, **kw)
        rows = [(p, None if negatives is None else n) for p, n in zip(prompts, negatives or prompts) for _ in range(num_images)]
        starts = range(0, total, self.max_batch)
        images: list[Image.Image] = []
        for k, r in enumerate(starts):
            chunk = rows[r : r + self.max_batch]

            def progress(done: int, steps: int, k: int = k) -> None:
                callback(k * steps + done, len(starts) * steps)

            images += self._fallback(task, [p for p, _ in chunk], None if negatives is None else [n for _, n in chunk],
                                     *args, num_images=1, seed=seed + r,
                                     latents=None if latents is None else latents[r : r + len(chunk)],
                                     callback=progress if callback else None, **kw)
        return images

    # -- the tasks, each top to bottom -------------------------------------------------

    def _txt2img(self, prompt, negative_prompt, *, latents=None, **kw) -> list[Image.Image]:
        self._require_plain_unet("txt2img")
        job = self._job(prompt, negative_prompt, **kw)
        sched = self._make_scheduler(job.scheduler, job.steps)
        x = latents.astype(np.float32) if latents is not None else job.noise.randn(job.shape)
        if x.shape != job.shape:
            raise ValueError(f"latents must have shape {job.shape} for this size and batch, got {x.shape}")
        x = (x * np.float32(sched.init_noise_sigma)).astype(np.float32)
        x = self._denoise(job, sched, x, start=0)
        return self._decode(x)

    def _img2img(self, prompt, negative_prompt, image, *, strength, latents=None, width=None, height=None, **kw):
        _check_strength(strength)
        _check_no_latents(latents, "img2img")
        self._require_plain_unet("img2img")
        pixels = self._load_image(image, width, height)
        job = self._job(prompt, negative_prompt, width=pixels.shape[-1], height=pixels.shape[-2], **kw)
        sched = self._make_scheduler(job.scheduler, job.steps)
        start = start_index(job.steps, strength, sched.order)
        # diffusers' order of random draws: the VAE's latent sample, then the noise
        init = self._encode_sample(pixels, job) * np.float32(self.manifest.scaling_factor)
        x = sched.add_noise(init, job.noise.randn(init.shape), start).astype(np.float32)
        x = self._denoise(job, sched, x, start)
        return self._decode(x)

    def _inpaint(self, prompt, negative_prompt, image, mask, *, strength, mask_blur, keep_unmasked,
                 latents=None, width=None, height=None, **kw):
        _check_strength(strength)
        _check_no_latents(latents, "inpainting")
        if not (isinstance(mask_blur, (int, float)) and not isinstance(mask_blur, bool) and 0 <= mask_blur <= 1000):
            raise ValueError(f"mask_blur must be a number of pixels in [0, 1000], got {mask_blur!r:.40}")
        m = self.manifest
        pixels = self._load_image(image, width, height)
        h, w = pixels.shape[-2:]
        binary = load_mask(mask, w, h)
        job = self._job(prompt, negative_prompt, width=w, height=h, **kw)
        sched = self._make_scheduler(job.scheduler, job.steps)
        start = start_index(job.steps, strength, sched.order)
        full = strength >= 1.0
        dedicated = m.unet_in_channels == m.latent_channels * 2 + 1

        # 1. latents: pure noise at strength 1, else the image noised to the start step
        image_latents = None
        if not dedicated or not full:
            image_latents = self._encode_sample(pixels, job) * np.float32(m.scaling_factor)
        noise = job.noise.randn(job.shape)
        if full:
            x = (noise * np.float32(sched.init_noise_sigma)).astype(np.float32)
        else:
            x = sched.add_noise(image_latents, noise, start).astype(np.float32)

        # 2. the mask at latent size (nearest, like F.interpolate) and the masked image's latents
        f = m.vae_scale_factor
        small = np.repeat(binary[None, None, ::f, ::f], job.batch, axis=0).astype(np.float32)
        masked = self._encode_sample(pixels * (binary[None, None] < 0.5), job) * np.float32(m.scaling_factor)
        if dedicated:
            extra = job.cfg.model_input(np.concatenate([small, masked], axis=1))
            x = self._denoise(job, sched, x, start, extra=extra)
        else:
            x = self._denoise(job, sched, x, start, blend=(small, image_latents, noise))
        images = self._decode(x)
        if keep_unmasked:
            images = [paste_unmasked(img, image_pil, binary, mask_blur) for img, image_pil in
                      zip(images, [to_pil(pixels[0])] * len(images))]
        return images

    # -- the stages they share ------------------------------------------------------------

    def _require_plain_unet(self, task: str) -> None:
        m = self.manifest
        if m.unet_in_channels != m.latent_channels:
            raise ValueError(
                f"this artifact's UNet is an inpainting UNet ({m.unet_in_channels} input channels): {task} needs "
                "an ordinary checkpoint; use inpaint() / --mask (or outpaint / --extend) with this one"
            )

    def _job(self, prompt, negative_prompt, *, steps: int | None = None, guidance: float | None = None, seed: int = 0,
             width: int | None = None, height: int | None = None, scheduler: str | None = None,
             num_images: int = 1, rng: str = "numpy", callback: Callable[[int, int], None] | None = None) -> "_Job":
        """Check every argument, then encode the prompts: what every task starts with."""
        m = self.manifest
        prompts = _prompts(prompt)
        negatives = _negatives(negative_prompt, len(prompts))
        width = m.sample_size if width is None else width
        height = m.sample_size if height is None else height
        scheduler = m.scheduler if scheduler is None else scheduler
        steps, guidance = m.settings(steps, guidance)
        _check_args(width, height, steps, guidance, num_images, scheduler, rng, seed, m.vae_scale_factor)
        check_pixels(width, height, self.max_pixels)
        batch = len(prompts) * num_images
        self.last_timings = Timings()
        t0 = time.perf_counter()
        cfg = Guidance(guidance)
        cond, pooled = self.encode_prompt(prompts)
        uncond = uncond_pooled = None
        if cfg.enabled:
            if m.force_zeros_for_empty_prompt and negative_prompt is None:  # SDXL: no negative prompt = zeros
                uncond, uncond_pooled = np.zeros_like(cond), np.zeros_like(pooled)
            else:
                uncond, uncond_pooled = self.encode_prompt(negatives)

        def repeat(a: np.ndarray | None) -> np.ndarray | None:  # one row per image
            return None if a is None else np.repeat(a, num_images, axis=0)

        context = cfg.embeddings(repeat(cond), repeat(uncond))
        self._guard("text_encoder", context)
        extra = {}
        if m.is_xl:
            # SDXL's micro-conditioning: original size, crop top-left, target size (no crop, same size)
            time_ids = np.array([height, width, 0, 0, height, width], dtype=np.float32)
            extra = {"text_embeds": cfg.embeddings(repeat(pooled), repeat(uncond_pooled)),
                     "time_ids": np.tile(time_ids, (len(context), 1))}
        self.last_timings.add("text_encoder", time.perf_counter() - t0)
        shape = (batch, m.latent_channels, height // m.vae_scale_factor, width // m.vae_scale_factor)
        return _Job(batch, shape, steps, scheduler, cfg, context, make_rng(rng, seed), num_images, callback, extra)

    def _denoise(self, job: "_Job", sched, x: np.ndarray, start: int, *, extra: np.ndarray | None = None,
                 blend: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> np.ndarray:
        """The denoising loop from UNet call ``start``.

        ``extra``: channels appended to the UNet input (a 9-channel inpainting
        UNet's mask and masked-image latents). ``blend``: (mask, known latents,
        noise) for an ordinary UNet: the known region, noised to the next
        step's level, replaces the sample outside the mask after every step.
        """
        unet = self.sessions["unet"]
        unet.durations.clear()
        total = len(sched.timesteps)
        for i in range(start, total):
            x_in = sched.scale_model_input(job.cfg.model_input(x), i).astype(np.float32)
            if extra is not None:
                x_in = np.concatenate([x_in, extra], axis=1)
            timestep = np.full((x_in.shape[0],), sched.timesteps[i], dtype=np.float32)
            out = unet(sample=x_in, timestep=timestep, encoder_hidden_states=job.context, **job.unet_extra)["out_sample"]
            x = sched.step(job.cfg.combine(out), i, x, job.noise).astype(np.float32)
            if blend is not None:
                mask, known, noise = blend
                if i < total - 1:
                    known = sched.add_noise(known, noise, i + 1)
                x = ((1 - mask) * known + mask * x).astype(np.float32)
            self._guard("unet", x, f" at step {i + 1} of {total} (guidance {job.cfg.scale:g})")
            if job.callback:
                job.callback(i + 1 - start, total - start)
        self.last_timings.stages["unet"] = list(unet.durations)
        return x

    def _decode(self, x: np.ndarray) -> list[Image.Image]:
        m = self.manifest
        t0 = time.perf_counter()
        images = self.decode(x / np.float32(m.scaling_factor) + np.float32(m.shift_factor))
        self.last_timings.add("vae_decoder", time.perf_counter() - t0)
        self._guard("vae_decoder", images)
        if self.sessions["vae_decoder"].variant.precision != "fp32" and float(images.std()) < 1e-3:
            raise PrecisionError("vae_decoder", self.sessions["vae_decoder"].variant.precision, "a flat (all one colour) image")
        return [to_pil(d) for d in images]

    def _encode_sample(self, pixels: np.ndarray, job: "_Job") -> np.ndarray:
        """Sample the VAE's latent distribution with the job's random stream (diffusers' ``latent_dist.sample``)."""
        t0 = time.perf_counter()
        mean, std = self.encode(pixels)
        self.last_timings.add("vae_encoder", time.perf_counter() - t0)
        latents = (mean + std * job.noise.randn(mean.shape)).astype(np.float32)
        return np.repeat(latents, job.batch // len(latents), axis=0) if job.batch > len(latents) else latents

    def _load_image(self, image: Image.Image | str | Path, width: int | None, height: int | None) -> np.ndarray:
        return load_image(image, width, height, self.manifest.vae_scale_factor, self.max_pixels)[None]


@dataclass
class _Job:
    """What one generation carries from stage to stage."""

    batch: int
    shape: tuple[int, int, int, int]
    steps: int
    scheduler: str
    cfg: Guidance
    context: np.ndarray
    noise: Any
    num_images: int
    callback: Callable[[int, int], None] | None
    unet_extra: dict[str, np.ndarray] = field(default_factory=dict)  # SDXL: text_embeds, time_ids


def start_index(steps: int, strength: float, order: int) -> int:
    """First UNet call of an image-to-image run (diffusers' ``get_timesteps``), at least one step."""
    init = min(max(int(steps * strength), 1), steps)
    return (steps - init) * order


def open_image(image: Image.Image | str | Path, what: str = "image") -> Image.Image:
    """A PIL image from a path (or as given), decoded only after its header says it is not too large."""
    if isinstance(image, Image.Image):
        size = image.size
    elif isinstance(image, (str, Path)):
        try:
            opened = Image.open(image)  # reads the header only
        except MemoryError:
            raise
        except Exception as e:  # PIL raises OSError, SyntaxError, DecompressionBombError... per format
            raise ValueError(f"cannot read {what} {image} as an image ({_first_line(e)}); accepted: a file in a "
                             "format PIL opens (PNG, JPEG, WebP...)") from None
        size = opened.size
    else:
        raise ValueError(f"{what} must be a PIL image or a file path, got {type(image).__name__}")
    if size[0] * size[1] > MAX_INPUT_PIXELS:
        raise ValueError(f"{what} {'' if isinstance(image, Image.Image) else str(image) + ' '}is {size[0]}x{size[1]} = "
                         f"{size[0] * size[1]:,} pixels; input images are read up to {MAX_INPUT_PIXELS:,} pixels: "
                         "downscale it first")
    if isinstance(image, Image.Image):
        return image
    try:
        opened.load()
    except MemoryError:
        raise
    except Exception as e:
        raise ValueError(f"cannot read {what} {image} as an image ({_first_line(e)}); it is damaged or truncated") from None
    return opened


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


def load_image(image: Image.Image | str | Path, width: int | None, height: int | None, multiple: int,
               max_pixels: int | None = None) -> np.ndarray:
    """An input image as [-1, 1] CHW float32, like diffusers' ``VaeImageProcessor.preprocess``.

    Any mode PIL opens; resized (Lanczos) to ``width`` x ``height`` when given,
    else to its own size rounded down to a multiple of ``multiple``; the
    result must fit ``max_pixels``.
    """
    image = open_image(image)
    for name, value in (("width", width), ("height", height)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0 or value % multiple):
            raise ValueError(f"{name} must be a positive multiple of {multiple} pixels, got {value!r:.40}")
    if (width is None and image.width < multiple) or (height is None and image.height < multiple):
        raise ValueError(f"the input image is {image.width}x{image.height} pixels; it must be at least "
                         f"{multiple}x{multiple} (its size is rounded down to a multiple of {multiple}), "
                         "or give --width/--height to resize it")
    w = width if width is not None else image.width - image.width % multiple
    h = height if height is not None else image.height - image.height % multiple
    if max_pixels is not None:
        check_pixels(w, h, max_pixels, "the input image, resized,")
    image = image.convert("RGB")
    if (w, h) != image.size:
        image = image.resize((w, h), Image.LANCZOS)
    return from_pil(image)


def load_mask(mask: Image.Image | str | Path, width: int, height: int) -> np.ndarray:
    """A mask (white = repaint) as a binary float32 HxW array at the image's size."""
    mask = open_image(mask, "mask")
    if mask.size != (width, height):
        raise ValueError(
            f"mask size {mask.width}x{mask.height} differs from the image's {width}x{height}; "
            "give a mask of the same size (white = repaint, black = keep)"
        )
    gray = np.asarray(mask.convert("L"), dtype=np.float32) / 255.0
    return (gray >= 0.5).astype(np.float32)


FILL_MODES = ("edge", "reflect", "mean", "noise")
SIDES = ("left", "right", "top", "bottom")


def extend_canvas(image: Image.Image | str | Path, extend: dict[str, int], fill: str = "edge",
                  multiple: int = 8, max_pixels: int | None = None) -> tuple[Image.Image, Image.Image]:
    """The image on a larger canvas and the mask of the new area (white).

    The new area starts as ``edge`` (border pixels repeated outwards),
    ``reflect`` (mirrored), ``mean`` (the image's mean colour) or ``noise``
    (uniform random colours, seeded): the fill only seeds the noised start,
    so it matters little at strength 1.
    """
    if not isinstance(fill, str) or fill not in FILL_MODES:
        raise ValueError(f"unknown fill {fill!r:.40}; valid: {', '.join(FILL_MODES)}")
    if not isinstance(extend, dict):
        raise ValueError(f"extend must be a dict of side -> pixels, e.g. {{'left': 128}}; got {extend!r:.80}")
    unknown = [str(k)[:40] for k in extend if k not in SIDES]
    if unknown:
        raise ValueError(f"unknown side(s) {sorted(unknown)}; valid: {', '.join(SIDES)}")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 and v % multiple == 0 for v in extend.values()) \
            or not any(extend.values()):
        raise ValueError(f"extend each side by a non-negative multiple of {multiple} pixels (at least one > 0), got {extend}")
    image = open_image(image)
    width = image.width + extend.get("left", 0) + extend.get("right", 0)
    height = image.height + extend.get("top", 0) + extend.get("bottom", 0)
    if max_pixels is not None:
        check_pixels(width, height, max_pixels, "the extended canvas")
    rgb = np.asarray(image.convert("RGB"))
    pads = ((extend.get("top", 0), extend.get("bottom", 0)), (extend.get("left", 0), extend.get("right", 0)), (0, 0))
    if fill in ("edge", "reflect"):
        canvas = np.pad(rgb, pads, mode="edge" if fill == "edge" else "reflect")
    else:
        canvas = np.pad(rgb, pads, mode="constant")
        new = np.pad(np.zeros(rgb.shape[:2], bool), pads[:2], constant_values=True)
        if fill == "mean":
            canvas[new] = rgb.reshape(-1, 3).mean(0).round().astype(np.uint8)
        else:
            canvas[new] = np.random.default_rng(0).integers(0, 256, (int(new.sum()), 3), dtype=np.uint8)
    mask = np.pad(np.zeros(rgb.shape[:2], np.uint8), pads[:2], constant_values=255)
    return Image.fromarray(canvas), Image.fromarray(mask)


def paste_unmasked(generated: Image.Image, original: Image.Image, binary: np.ndarray, blur: float) -> Image.Image:
    """Original pixels outside the mask, generated ones inside, feathered over ``blur`` pixels."""
    from PIL import ImageFilter

    alpha = Image.fromarray((binary * 255).astype(np.uint8))
    if blur > 0:
        alpha = alpha.filter(ImageFilter.GaussianBlur(blur))
    return Image.composite(generated, original, alpha)


def _check_strength(strength: float) -> None:
    if not isinstance(strength, (int, float)) or isinstance(strength, bool) or not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1], got {strength!r:.40}")


def _check_no_latents(latents, task: str) -> None:
    if latents is not None:
        raise ValueError(f"latents replace txt2img's starting noise; {task} starts from the input image instead")


def _check_int(name: str, value, lo: int, hi: int | None = None) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < lo or (hi is not None and value > hi):
        bound = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{name} must be an integer {bound}, got {value!r:.40}")


def _prompts(prompt: str | list[str]) -> list[str]:
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    raise ValueError(f"prompt must be a string or a non-empty list of strings, got {prompt!r:.80}")


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
    if not isinstance(negative, (list, tuple)) or not all(isinstance(p, str) for p in negative):
        raise ValueError(f"negative_prompt must be a string, a list of strings or None, got {negative!r:.80}")
    if len(negative) != n:
        raise ValueError(f"{len(negative)} negative prompts for {n} prompts; give one per prompt or a single string")
    return list(negative)


def _check_args(width, height, steps, guidance, num_images, scheduler, rng, seed, multiple) -> None:
    for name, value in (("width", width), ("height", height)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0 or value % multiple:
            raise ValueError(f"{name} must be a positive multiple of {multiple} pixels, got {value!r:.40}")
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"steps must be an integer >= 1 (at most {MAX_STEPS}), got {steps!r:.40}")
    if not isinstance(guidance, (int, float)) or isinstance(guidance, bool) or not (math.isfinite(guidance) and guidance >= 0):
        raise ValueError(f"guidance must be a finite number >= 0 (<= 1 disables classifier-free guidance), "
                         f"got {guidance!r:.40}")
    _check_int("num_images", num_images, 1)
    if not isinstance(scheduler, str) or scheduler not in SCHEDULER_NAMES:
        raise ValueError(f"unknown scheduler {scheduler!r:.40}; valid: {', '.join(SCHEDULER_NAMES)}")
    if not isinstance(rng, str) or rng not in RNG_NAMES:
        raise ValueError(f"unknown rng {rng!r:.40}; valid: {', '.join(RNG_NAMES)}")
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**64:
        raise ValueError(f"seed must be a non-negative integer below 2**64, got {seed!r:.40}")
