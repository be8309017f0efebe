"""The text-to-image pipeline: numpy + tokenizers + one backend, no PyTorch.

``Pipeline.load(path)`` opens an artifact folder; ``pipe.txt2img(prompt)`` runs::

    GenerationSettings --resolved (model defaults, sizes, limits)--> settings
    prompts --tokenizer--> ids --text encoder(s)--> conditioning (uncond, cond)   [families/, the manifest's]
    noise (one seeded stream per image) * init_noise_sigma --> latents           [rng.py]
    for each step: denoiser(scale_in(latents), t, conditioning) --guidance--> scheduler.step   [denoise.py]
    latents / scaling_factor --vae_decoder--> images --> Result                   [images.py, result.py]

Each stage is one call with numpy arrays in and out; diffusers'
``StableDiffusionPipeline`` does the same arithmetic in the same order, so
the same weights, seed (``rng="torch"``) and scheduler give the same image.
The pipeline keeps nothing of a call: one loaded pipeline serves several
threads, each call returning its own ``Result``.
"""

from __future__ import annotations

import dataclasses
import threading
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
from PIL import Image

from . import compile_cache
from . import control as controlnet
from . import device_check
from . import notes as call_notes
from .backends import BackendOptions, Session, open_session
from .low_memory import StageSessions
from .placement import describe_placement, resolve_placement
from .denoise import (ChunkSteps, DenoiserInputs, GenerationError, InpaintingUNetInputs, Job, KnownRegionBlend,
                      PrecisionError, Progress, StepObserver, denoise)
from .images import extend_canvas, load_image, load_mask, paste_unmasked, to_pil
from .limits import DEFAULT_MAX_BATCH, pixel_budget
from .load_options import VAE_TILING, LoadOptions
from .embeddings import plan as embedding_plan
from .embeddings import read_embedding
from .families import family_of
from .lora import LoraSpec, WeightPatch, combine
from .lora import plan as lora_plan
from .encoders import ENCODERS, TextEncoder
from .manifest import (DEEP_FEATURE, ArtifactError, Manifest, TextEncoderSpec, artifact_file, load_manifest,
                       read_manifest_json, residual_inputs)
from .result import Result, Timings
from .rng import ImageNoise
from .schedulers import make_scheduler
from .settings import GenerationSettings
from .text import PromptTokenizer
from .vae_tiling import Tiling, decode_tiled, encode_tiled, needs_tiling

__all__ = ["VAES", "GenerationError", "Pipeline", "PrecisionError", "choose_vae", "parse_precision"]

ProgressFunction = Callable[[int, int], "bool | None"]  # (steps done, steps in all) -> False to stop


def _plain(spec: Any) -> Any:
    """A LoadOptions mapping (read-only) as the dict the parsers take; anything else as it is."""
    return dict(spec) if isinstance(spec, Mapping) else spec


def parse_precision(spec: str | dict[str, str] | None, available: dict[str, dict[str, Any]]) -> dict[str, str]:
    """``"fp16"`` for every component that has that variant (the rest stay fp32, with a warning naming them),
    or ``"unet=int8,vae_decoder=fp16"`` per component (a named component must have it: ArtifactError on load)."""
    chosen = {c: "fp32" for c in available}
    if not spec:
        return chosen
    if isinstance(spec, str) and "=" not in spec:
        bare = spec.strip()
        having = [c for c in available if bare in available[c]]
        if not having:
            raise ArtifactError(f"no component has a {bare!r} variant; available: "
                                + "; ".join(f"{c}: {', '.join(v)}" for c, v in available.items()))
        missing = [c for c in available if c not in having]
        if missing:
            warnings.warn(f"{bare} applies to {', '.join(having)}; {', '.join(missing)} have no {bare} variant and "
                          "run at fp32", stacklevel=3)
        return chosen | {c: bare for c in having}
    pairs = dict(p.split("=", 1) for p in spec.split(",") if p.strip()) if isinstance(spec, str) else dict(spec)
    for comp, prec in pairs.items():
        comp = comp.strip()
        if comp not in available:
            raise ValueError(f"unknown component {comp!r:.40} in precision; this artifact has: {', '.join(available)}")
        chosen[comp] = prec.strip()
    return chosen


TILING_MODES = VAE_TILING
# vae_tiling="auto" tiles images of more pixels than this: an SD1.5 VAE decode of 1024x1024 in one piece takes
# 2.4 GB above the loaded pipeline (tiled: 0.75), and at 2048x2048 its attention over 65,536 latents alone would
# need 17 GB per matrix (benchmarks/results/vae_tiling.json)
AUTO_TILE_PIXELS = 1024 * 1024


def vae_tiling_mode(mode: str) -> str:
    if mode not in TILING_MODES:
        raise ValueError(f"unknown vae_tiling {mode!r:.40}; valid: {', '.join(TILING_MODES)}")
    return mode


VAES = ("full", "tiny")  # the artifact's own VAE, or its tiny one (TAESD: ``export --tiny-vae``)
TINY = "tiny"  # the variant name of a tiny VAE in vae_decoder / vae_encoder


def fast_profile(manifest: Manifest) -> dict[str, Any]:
    """The settings ``edgediff tune`` recorded for ``--fast``; an artifact without them says how to measure them."""
    if manifest.fast_profile is None:
        raise ArtifactError("this artifact has no tuned fast profile: run `edgediff tune ARTIFACT` once (it measures "
                            "the tiny VAE, DeepCache and the CFG cut-off against full compute and records the fastest "
                            "settings that keep the quality bounds), or name the savings yourself (--vae tiny, "
                            "--cache-interval N, --cfg-until F)")
    return dict(manifest.fast_profile["settings"])


def choose_vae(vae: str, precision: dict[str, str], available: dict[str, dict[str, Any]]) -> dict[str, str]:
    """``vae="tiny"``: the tiny VAE's decoder, and its encoder where one was exported; ``"full"``: ``precision``."""
    if vae not in VAES:
        raise ValueError(f"unknown vae {vae!r:.40}; valid: {', '.join(VAES)}")
    if vae == "full":
        return precision
    if TINY not in available.get("vae_decoder", {}):
        raise ArtifactError("this artifact has no tiny VAE; add one with `edgediff export --tiny-vae PATH` (a diffusers "
                            "AutoencoderTiny folder, e.g. madebyollin/taesd for SD 1.x/2.x, taesdxl for SDXL, taesd3 "
                            "for SD3; for Sana, taesana's taesana_decoder.pth), or use vae='full' (--vae full)")
    return precision | {c: TINY for c in ("vae_decoder", "vae_encoder") if TINY in available.get(c, {})}


def without_t5(manifest: Manifest) -> Manifest:
    """``manifest`` without its T5 text encoder (the conditioner then puts zeros in T5's place, as diffusers does
    with ``text_encoder_3=None``); a ValueError for an artifact that has none."""
    dropped = {t.name for t in manifest.text_encoders if t.kind == "t5"}
    if not dropped:
        raise ValueError(f"t5=False (--no-t5): this {manifest.family} artifact has no T5 text encoder to leave out "
                         f"(its text encoders: {', '.join(t.name for t in manifest.text_encoders)})")
    return dataclasses.replace(
        manifest, text_encoders=tuple(t for t in manifest.text_encoders if t.name not in dropped),
        components={c: v for c, v in manifest.components.items() if c not in dropped},
        roles={c: r for c, r in manifest.roles.items() if c not in dropped})


class Pipeline:
    def __init__(self, root: Path, manifest: Manifest, backend: str, devices: dict[str, str], options: BackendOptions,
                 precision: dict[str, str], fallback: bool = False, *, max_pixels: int | None = None,
                 max_batch: int = DEFAULT_MAX_BATCH, fast: dict[str, Any] | None = None, loras: list[Any] = (),
                 embeddings: list[str | Path] = (), low_memory: bool = False, tiling: str = "auto"):
        self.root = root
        self.load_options: LoadOptions | None = None  # what open() was given (None: built directly)
        self.fast = fast or {}  # the fast profile's per-call savings, used where a call names none
        self.manifest = manifest
        self.backend, self.devices, self.options = backend, devices, options
        self.device = describe_placement(devices)  # in words: one device, or component=device pairs
        self.low_memory = low_memory
        self.tiling = vae_tiling_mode(tiling)
        self.fallback = fallback
        self.precision = precision
        self.max_pixels = pixel_budget(manifest.sample_size) if max_pixels is None else max_pixels
        self.max_batch = max_batch
        self._lock = threading.Lock()  # guards the sessions dict: lazy opens and fallbacks
        # the small files first: a broken tokenizer or scheduler config fails before any graph is compiled
        self.scheduler_config = self._scheduler_config()
        self.family = family_of(manifest)
        tokenizers = [self._tokenizer(t) for t in manifest.text_encoders]
        self.tokenizer = tokenizers[0]
        self.conditioning = self.family.conditioner(manifest, tokenizers)
        if embeddings and not getattr(self.conditioning, "takes_embeddings", True):
            raise ValueError(f"textual-inversion embeddings are not applied to {self.family.title} models: its "
                             "prompts are read as diffusers reads them (no added words); load it without embeddings")
        # every embedding and LoRA read and checked against the artifact before any graph is compiled
        self.embeddings = [read_embedding(Path(p), manifest) for p in embeddings]
        self._embedding_patches = embedding_plan(self.embeddings, dict(zip(self.conditioning.components, tokenizers)),
                                                 root, manifest, precision)
        self.loras = [LoraSpec.parse(x) for x in loras]
        self.patches = combine(lora_plan(self.loras, root, manifest, precision), self._embedding_patches)
        for comp, prec in precision.items():  # a variant for other devices fails before anything compiles
            self._require_device(comp, prec)
        self.opened: dict[str, dict[str, Any]] = {}  # describe()'s record of each component opened so far
        if low_memory:  # each stage's graphs loaded when it starts, released when another starts
            self.sessions = StageSessions(lambda c: self._open(c, self.precision.get(c, "fp32")), manifest.roles,
                                          on_release=lambda c, s: self.opened.__setitem__(c, _record(s)))
        else:
            self.sessions = {comp: self._open(comp, precision[comp])
                             for comp in self.conditioning.components + (manifest.denoiser.name, "vae_decoder")}

    @classmethod
    def load(
        cls,
        path: str | Path | None = None,
        backend: str = "auto",
        device: str | dict[str, str] = "auto",
        *,
        precision: str | dict[str, str] | None = None,
        vae: str | None = None,
        fast: bool = False,
        fallback: bool = False,
        threads: int | None = None,
        cache: bool = True,
        cache_dir: str | Path | None = None,
        ov_precision: str = "auto",
        manifest: Manifest | None = None,
        max_pixels: int | None = None,
        max_batch: int = DEFAULT_MAX_BATCH,
        loras: list[Any] = (),
        embeddings: list[str | Path] = (),
        static_shapes: bool | None = None,
        low_memory: bool = False,
        vae_tiling: str = "auto",
        cuda_graph: bool = False,
        dml_adapter: int = 0,
        check: bool = True,
        t5: bool = True,
    ) -> Pipeline:
        """Open an artifact folder (default: the embedded model) on ``backend``/``device``.

        ``auto`` picks the fastest installed backend for the device. ``precision``
        picks variants (``"fp16"`` for every component that has it, or
        ``"unet=int8,vae_decoder=fp16"``); ``vae="tiny"`` decodes (and encodes) with the
        artifact's tiny VAE (TAESD, ``export --tiny-vae``; default ``"full"``); ``fast`` uses the
        settings ``edgediff tune`` measured and recorded (its VAE unless ``vae`` is given, its UNet variant unless
        ``precision`` is given, its DeepCache interval and CFG cut-off where a call names none); with ``fallback`` a reduced-precision
        component that yields NaN/Inf or a flat image is rerun in fp32 with a
        warning instead of raising ``PrecisionError``. ``manifest`` overrides the
        folder's manifest (used to measure a candidate variant). ``max_pixels``
        raises the per-image pixel budget; ``max_batch`` caps the images per UNet
        call (see ``edgediff.runtime.limits``). Each graph's compiled form is kept in the compile cache
        (``edgediff.runtime.compile_cache``: ``cache_dir``, else ``$EDGEDIFF_CACHE_DIR``, else
        ``~/.cache/edgediff``) so the next load of the same files skips the backend's optimization;
        ``cache=False`` loads without it. ``loras``: LoRA files merged into the weights before the graphs are
        compiled (``"file.safetensors"``, ``"file.safetensors:0.8"`` or ``(file, 0.8)``; ``edgediff.runtime.lora``).
        ``embeddings``: textual-inversion files whose words prompts can then use (``edgediff.runtime.embeddings``).

        ``device``: one device for every component, or one per component (``"text_encoder=cpu,unet=gpu"`` or a
        dict; ``edgediff.runtime.placement``). ``static_shapes``: OpenVINO graphs compiled for each call's exact
        shapes (None: on NPU only, which needs them; there the UNet runs batch 1, the guidance as two calls).
        ``low_memory``: each stage's graphs loaded for it and released after, the VAE in tiles. ``vae_tiling``: ``auto`` (tiles for images of more than 1024x1024 pixels, and in
        low memory for any past the model's native size), ``on`` (past the native size), ``off``
        (``edgediff.runtime.vae_tiling``). ``cuda_graph``: ONNX Runtime CUDA captures a
        CUDA graph per shape (with IO binding, on by default on CUDA). ``dml_adapter``: DirectML's GPU index.
        ``check``: on a device other than the CPU, compare it with the CPU once (``edgediff.runtime.device_check``,
        cached per device, artifact and runtime version) and run any component that differs on the CPU instead.
        ``t5=False``: an SD3 artifact's T5 encoder is neither loaded nor run; zeros stand in its place, as in
        diffusers with ``text_encoder_3=None`` (the same images as an artifact exported with ``--no-t5``).
        """
        options = LoadOptions(backend=backend, device=device, precision=precision, vae=vae, fast=fast,
                              fallback=fallback, threads=threads, cache=cache, cache_dir=cache_dir,
                              ov_precision=ov_precision, max_pixels=max_pixels, max_batch=max_batch, loras=loras,
                              embeddings=embeddings, static_shapes=static_shapes, low_memory=low_memory,
                              vae_tiling=vae_tiling, cuda_graph=cuda_graph, dml_adapter=dml_adapter, check=check, t5=t5)
        return cls.open(path, options, manifest=manifest)

    @classmethod
    def open(cls, path: str | Path | None = None, options: LoadOptions = LoadOptions(), *,
             manifest: Manifest | None = None) -> Pipeline:
        """Open an artifact folder (default: the embedded model) as ``options`` say (``LoadOptions``: what
        ``load``'s keyword arguments set); the pipeline keeps them as ``load_options``."""
        if not isinstance(options, LoadOptions):
            raise ValueError(f"options must be a LoadOptions, got {type(options).__name__}")
        o = options
        if path is None:
            from edgediff.models import default_model_path

            path = default_model_path()
        root = Path(path)
        manifest = manifest or load_manifest(root)
        if not o.t5:
            manifest = without_t5(manifest)
        backend, devices = resolve_placement(o.backend, _plain(o.device), manifest.roles)
        cache_root = (Path(o.cache_dir) if o.cache_dir else compile_cache.default_root()) if o.cache else None
        backend_options = BackendOptions(threads=o.threads, cache_dir=cache_root, ov_precision=o.ov_precision,
                                         static_shapes=o.static_shapes, cuda_graph=o.cuda_graph,
                                         dml_adapter=o.dml_adapter)
        profile = fast_profile(manifest) if o.fast else {}
        profile_vae = profile.pop("vae", "full")
        vae = profile_vae if o.vae is None else o.vae
        chosen = parse_precision(_plain(o.precision), manifest.components)
        profile_unet = profile.pop("unet", None)
        if profile_unet is not None and not o.precision:  # precisions named by the caller win
            manifest.variant(manifest.denoiser.name, profile_unet)  # the profile's variant must still be there
            chosen = chosen | {manifest.denoiser.name: profile_unet}
        chosen = choose_vae(vae, chosen, manifest.components)
        if o.check and not all(device_check.is_the_cpu(backend, d) for d in devices.values()):
            devices, chosen = device_check.placement_for(root, manifest, backend, devices, chosen, backend_options)
        pipe = cls(root, manifest, backend, devices, backend_options, chosen, o.fallback, max_pixels=o.max_pixels,
                   max_batch=o.max_batch, fast=profile, loras=list(o.loras), embeddings=list(o.embeddings),
                   low_memory=o.low_memory, tiling=o.vae_tiling)
        pipe.load_options = o
        return pipe

    def set_loras(self, loras: list[Any]) -> None:
        """Apply these LoRAs instead of the current ones (``[]``: none). Only the graphs whose weights change are
        compiled again; the others stay as they are. Everything is checked first: a bad file changes nothing."""
        specs = [LoraSpec.parse(x) for x in loras]
        patches = combine(lora_plan(specs, self.root, self.manifest, self.precision), self._embedding_patches)
        if self.load_options is not None:  # what the pipeline says it was opened with follows its LoRAs
            self.load_options = dataclasses.replace(self.load_options, loras=tuple(loras))
        with self._lock:
            if self.low_memory:  # nothing stays loaded between stages: the next stage opens with the new weights
                self.sessions.release()
                self.loras, self.patches = specs, patches
                return
            changed = [c for c in self.sessions
                       if _identity(patches.get(c)) != _identity(self.patches.get(c))]
            reopened = {c: open_session(self.root, c, self.sessions[c].variant, self.backend, self.devices[c],
                                        self.options, patches.get(c)) for c in changed}
            self.sessions.update(reopened)  # calls already running keep their snapshot of the old sessions
            self.loras, self.patches = specs, patches

    # -- loading -----------------------------------------------------------------------

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

    def _tokenizer(self, spec: TextEncoderSpec) -> PromptTokenizer | TextEncoder:
        """The text encoder's tokenizer, by its kind: CLIP's 77-token chunks, or an encoder of ``ENCODERS`` (T5,
        Gemma2) padding to its max_length."""
        path = artifact_file(self.root, spec.tokenizer, "tokenizer", (".json",))
        try:
            if spec.kind in ENCODERS:
                return ENCODERS[spec.kind](spec.name, path, spec.max_length, spec.pad_token_id)
            return PromptTokenizer(path, spec.max_length, spec.pad_token_id)
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
        session = open_session(self.root, component, variant, self.backend, self.devices[component], self.options,
                               self.patches.get(component))
        self.opened[component] = _record(session)
        return session

    def _require_device(self, component: str, precision: str) -> None:
        """A variant made for some devices only (fp16-cuda) refuses the others, naming them."""
        variant = self.manifest.variant(component, precision)
        only = variant.only_devices
        if only and self.devices[component] not in only:
            raise ValueError(f"{component} {precision} ({variant.file}) runs only on {', '.join(only)} (its fused "
                             f"kernels), not on {self.devices[component]}: pass device='{only[0]}' (--device "
                             f"{component}={only[0]}) or pick another precision; it has: "
                             f"{', '.join(self.manifest.components[component])}")

    def session(self, component: str) -> Session:
        """The component's session, opened on first use (the VAE encoder only serves image inputs)."""
        with self._lock:
            if component not in self.sessions:
                if self.low_memory:  # opened by its stage, when it runs
                    return self.sessions[component]
                self.sessions[component] = self._open(component, self.precision.get(component, "fp32"))
            return self.sessions[component]

    def _variant_of(self, component: str):
        """The variant ``component`` runs: its session's, or in low-memory mode (nothing loaded before its stage)
        the one it will open."""
        if component in self.sessions:
            return self.sessions[component].variant
        return self.manifest.variant(component, self.precision.get(component, "fp32"))

    def _snapshot(self):
        """The sessions a call runs with: a copy (a fallback elsewhere does not change this call's), or in
        low-memory mode the stage-by-stage loader itself."""
        return self.sessions if self.low_memory else dict(self.sessions)

    def _check_step_cache(self) -> None:
        """DeepCache needs the shallow graph and a denoiser variant that outputs the feature it takes."""
        m = self.manifest
        if m.shallow_denoiser is None and m.denoiser.kind != "unet":
            raise ArtifactError(f"DeepCache (cache_interval, --cache-interval) caches a UNet's deep features; this "
                                f"artifact's denoiser is a {m.denoiser.kind}: run every step in full")
        if m.shallow_denoiser is None:
            raise ArtifactError("this artifact has no DeepCache graphs (it was exported before edgediff made them, "
                                "or with --no-deepcache); re-export it to use cache_interval (--cache-interval)")
        variant = self._variant_of(m.denoiser.name)
        if DEEP_FEATURE not in [o.name for o in variant.outputs]:
            raise ArtifactError(f"{m.denoiser.name} {variant.precision} ({variant.file}) gives no {DEEP_FEATURE} for "
                                "DeepCache (it was made from a graph without it); re-quantize it, or use fp32")
        if self.low_memory:
            self._variant_of(m.shallow_denoiser.name)
        else:
            self.session(m.shallow_denoiser.name)

    def describe(self) -> dict[str, Any]:
        """Per component opened so far: its precision, backend, the device asked for and the one executing it
        (they differ only where a backend chose: OpenVINO's AUTO), its load time and compile-cache use."""
        live = dict(self.sessions.items())
        return {comp: (_record(live[comp]) if comp in live else record)
                | ({"loaded": "per stage"} if self.low_memory else {})
                for comp, record in dict(self.opened).items()}

    # -- the public tasks --------------------------------------------------------------

    def txt2img(self, prompt: str | list[str], negative_prompt: str | list[str] | None = None, *,
                steps: int | None = None, guidance: float | None = None, seed: int = 0, width: int | None = None,
                height: int | None = None, scheduler: str | None = None, num_images: int = 1, rng: str = "numpy",
                cfg_until: float | None = None, cache_interval: int | None = None,
                latents: np.ndarray | None = None, controls: list[controlnet.Control] = (),
                callback: ProgressFunction | None = None) -> Result:
        """Generate ``num_images`` images per prompt from noise; ``latents`` overrides the seeded noise.

        ``steps`` and ``guidance`` default to the artifact's recommended ones
        (else 25 and 7.5), the size to the model's, the scheduler to the
        checkpoint's. Image ``k`` is seeded ``seed + k``. ``rng="torch"``
        reproduces diffusers' images for a seed. ``cfg_until`` stops the guidance after that fraction of
        the steps (the rest run at half the UNet batch); ``cache_interval`` N runs the full UNet every N steps and
        DeepCache's shallow branch between. ``controls``: ``Control`` objects, each a ControlNet of the artifact
        with its image (``edgediff.runtime.control``; several are summed).
        """
        settings = GenerationSettings(prompt, negative_prompt, steps, guidance, seed, width, height, scheduler,
                                      num_images, rng, cfg_until=cfg_until,
                                      cache_interval=cache_interval)
        return self.generate(settings, latents=latents, controls=controls, callback=callback)

    def img2img(self, prompt: str | list[str], image: Image.Image | str | Path,
                negative_prompt: str | list[str] | None = None, *, strength: float = 0.6, steps: int | None = None,
                guidance: float | None = None, seed: int = 0, width: int | None = None, height: int | None = None,
                scheduler: str | None = None, num_images: int = 1, rng: str = "numpy",
                cfg_until: float | None = None, cache_interval: int | None = None,
                controls: list[controlnet.Control] = (), callback: ProgressFunction | None = None) -> Result:
        """Redraw ``image`` after noising it to ``strength`` (0 < strength <= 1) of the schedule."""
        settings = GenerationSettings(prompt, negative_prompt, steps, guidance, seed, width, height, scheduler,
                                      num_images, rng, strength, cfg_until, cache_interval)
        return self.generate(settings, image=image, controls=controls, callback=callback)

    def inpaint(self, prompt: str | list[str], image: Image.Image | str | Path, mask: Image.Image | str | Path,
                negative_prompt: str | list[str] | None = None, *, strength: float = 1.0, mask_blur: float = 0.0,
                keep_unmasked: bool = False, steps: int | None = None, guidance: float | None = None, seed: int = 0,
                width: int | None = None, height: int | None = None, scheduler: str | None = None,
                num_images: int = 1, rng: str = "numpy", cfg_until: float | None = None,
                cache_interval: int | None = None, controls: list[controlnet.Control] = (),
                callback: ProgressFunction | None = None) -> Result:
        """Repaint the white part of ``mask`` in ``image``.

        A 9-channel inpainting UNet is conditioned on the mask and the masked
        image; an ordinary UNet gets the known region blended back at every
        step. ``keep_unmasked`` pastes the original pixels back outside the
        mask (feathered by ``mask_blur`` pixels).
        """
        settings = GenerationSettings(prompt, negative_prompt, steps, guidance, seed, width, height, scheduler,
                                      num_images, rng, strength, cfg_until, cache_interval)
        return self.generate(settings, image=image, mask=mask, mask_blur=mask_blur, keep_unmasked=keep_unmasked,
                             controls=controls, callback=callback)

    def hires_fix(self, result: Result, scale: float = 2.0, strength: float = 0.5, *, upscaler: Any = None,
                  steps: int | None = None, callback: ProgressFunction | None = None) -> Result:
        """A1111's hires fix: each image of ``result`` (a txt2img at the model's size) enlarged ``scale`` times
        (by ``upscaler``, an ``edgediff.runtime.upscale.Upscaler``, or Lanczos), then redrawn at that size with
        img2img at ``strength``, with the same prompt, seed and settings (the VAE tiled where the size needs it).
        The sizes are rounded to multiples of the VAE's factor."""
        from .upscale import Upscaler, lanczos

        if not (isinstance(scale, (int, float)) and not isinstance(scale, bool) and 1.0 < scale <= 4.0):
            raise ValueError(f"the hires scale must be a number in (1, 4], got {scale!r:.40}")
        if upscaler is not None and not isinstance(upscaler, Upscaler):
            raise ValueError(f"upscaler must be an Upscaler (edgediff.runtime.upscale), got {type(upscaler).__name__}")
        s, f = result.settings, self.manifest.vae_scale_factor
        images, timings = [], Timings()
        for k, first in enumerate(result.images):
            width, height = (max(f, round(v * scale / f) * f) for v in first.size)
            big = upscaler.upscale(first) if upscaler is not None else lanczos(first, scale)
            big = big.resize((width, height), Image.LANCZOS) if big.size != (width, height) else big
            prompt, negative = s.rows()[k]
            redo = GenerationSettings(prompt, negative or None, steps or s.steps, s.guidance, s.seeds[k], width, height,
                                      s.scheduler, 1, s.rng, strength, s.cfg_until, s.cache_interval)
            second = self.generate(redo, image=big, callback=callback)
            images += second.images
            for stage, values in second.timings.stages.items():
                timings.stages.setdefault(stage, []).extend(values)
        hires = {"scale": scale, "strength": strength, "first_pass": f"{s.width}x{s.height}",
                 "upscaler": f"{upscaler.architecture} x{upscaler.scale} ({upscaler.root})" if upscaler else "Lanczos"}
        return dataclasses.replace(second, images=tuple(images), task=f"{result.task}+hires", timings=timings,
                                   settings=dataclasses.replace(second.settings, seed=s.seed, prompts=s.prompts,
                                                                negative_prompts=s.negative_prompts,
                                                                images_per_prompt=s.images_per_prompt),
                                   inputs=result.inputs | {"hires": hires})

    def outpaint(self, prompt: str | list[str], image: Image.Image | str | Path, extend: dict[str, int],
                 negative_prompt: str | list[str] | None = None, *, fill: str = "edge", mask_blur: float = 0.0,
                 keep_unmasked: bool = True, steps: int | None = None, guidance: float | None = None, seed: int = 0,
                 scheduler: str | None = None, num_images: int = 1, rng: str = "numpy",
                 cfg_until: float | None = None, cache_interval: int | None = None,
                 callback: ProgressFunction | None = None) -> Result:
        """Extend the canvas by ``extend`` pixels per side (left/right/top/bottom) and paint the new area."""
        settings = GenerationSettings(prompt, negative_prompt, steps, guidance, seed, None, None, scheduler,
                                      num_images, rng, 1.0, cfg_until, cache_interval)
        return self.generate(settings, image=image, extend=extend, fill=fill, mask_blur=mask_blur,
                             keep_unmasked=keep_unmasked, callback=callback)

    def generate(self, settings: GenerationSettings, *, image: Image.Image | str | Path | None = None,
                 mask: Image.Image | str | Path | None = None, extend: dict[str, int] | None = None,
                 fill: str = "edge", mask_blur: float = 0.0, keep_unmasked: bool = False,
                 latents: np.ndarray | None = None, controls: list[controlnet.Control] = (),
                 callback: ProgressFunction | None = None, observer: StepObserver | None = None) -> Result:
        """Run ``settings``: txt2img, or with ``image`` img2img, with ``mask`` inpainting, with ``extend``
        outpainting, steered by ``controls`` (ControlNets) in any of them. Everything is checked before any
        model runs; at most ``max_batch`` images go through the UNet at once (image ``k`` is the same whatever
        batch it is in). ``callback(done, total)`` is told of each step; ``observer`` (a ``StepObserver``) also
        sees the latents; either returning False stops the call between two steps (``Cancelled``)."""
        with call_notes.collecting() as notes:  # this call's own, whatever other threads' calls say
            result = self._generate(settings, image=image, mask=mask, extend=extend, fill=fill, mask_blur=mask_blur,
                                    keep_unmasked=keep_unmasked, latents=latents, controls=controls,
                                    callback=callback, observer=observer)
        return dataclasses.replace(result, notes=tuple(notes))

    def _generate(self, settings: GenerationSettings, *, image, mask, extend, fill, mask_blur, keep_unmasked, latents,
                  controls, callback, observer) -> Result:
        task = "outpaint" if extend is not None else "inpaint" if mask is not None else "img2img" if image is not None \
            else "txt2img"
        if task not in self.family.tasks and not (task == "outpaint" and "inpaint" in self.family.tasks):
            raise ValueError(f"{task}: a {self.family.title} artifact does {', '.join(self.family.tasks)} only in "
                             "edgediff (as diffusers' pipelines for it do)")
        settings = dataclasses.replace(settings, **{k: v for k, v in self.fast.items() if getattr(settings, k) is None})
        if image is None and (mask is not None or settings.strength is not None):
            raise ValueError("a mask and a strength need an input image")
        if mask is not None and extend is not None:
            raise ValueError("a mask (inpainting) and extend (outpainting) exclude each other; give one")
        if latents is not None and task != "txt2img":
            raise ValueError(f"latents replace txt2img's starting noise; {task} starts from the input image instead")
        if callback is not None and not callable(callback):
            raise ValueError(f"callback must be a function (done, total), got {type(callback).__name__}")
        if observer is not None and not callable(getattr(observer, "on_step", None)):
            raise ValueError(f"observer must have a method on_step(done, total, latents), got {type(observer).__name__}")
        if callback is not None and observer is not None:
            raise ValueError("give a callback or an observer, not both (an observer's on_step sees the steps too)")
        observer = Progress(callback) if callback is not None else observer
        if not (isinstance(mask_blur, (int, float)) and not isinstance(mask_blur, bool) and 0 <= mask_blur <= 1000):
            raise ValueError(f"mask_blur must be a number of pixels in [0, 1000], got {mask_blur!r:.40}")
        m = self.manifest
        inputs: dict[str, Any] = {}
        pixels = binary = None
        for name, value in (("image", image), ("mask", mask)):
            if value is not None:
                inputs[name] = str(value) if isinstance(value, (str, Path)) else "(in memory)"
        if task == "outpaint":
            image, mask = extend_canvas(image, extend, fill, m.vae_scale_factor, self.max_pixels)
            inputs.update(extend=extend, fill=fill)
        if image is not None:
            pixels = load_image(image, settings.width, settings.height, m.vae_scale_factor, self.max_pixels)[None]
        if mask is not None:
            binary = load_mask(mask, pixels.shape[-1], pixels.shape[-2])
            inputs.update(mask_blur=mask_blur, keep_unmasked=keep_unmasked)
        if task in ("txt2img", "img2img") and m.denoiser.in_channels != m.latent_channels:
            raise ValueError(
                f"this artifact's UNet is an inpainting UNet ({m.denoiser.in_channels} input channels): {task} needs "
                "an ordinary checkpoint; use inpaint() / --mask (or outpaint / --extend) with this one")
        strength = settings.strength if settings.strength is not None else {"img2img": 0.6}.get(task, 1.0)
        size = None if pixels is None else (pixels.shape[-1], pixels.shape[-2])
        settings = dataclasses.replace(settings, strength=None if task == "txt2img" else strength)
        settings = settings.resolved(m, self.max_pixels, size)
        if latents is not None and (not isinstance(latents, np.ndarray) or latents.shape != self._latent_shape(settings)):
            raise ValueError(f"latents must have shape {self._latent_shape(settings)} for this size and batch, "
                             f"got {getattr(latents, 'shape', type(latents).__name__)}")
        if pixels is not None:  # an artifact without the encoder fails here, before anything runs
            self._variant_of("vae_encoder") if self.low_memory else self.session("vae_encoder")
        if settings.cache_interval not in (None, 1):
            self._check_step_cache()
        prepared = self._prepare_controls(list(controls), settings)

        timings = Timings()
        images: list[Image.Image] = []
        starts = range(0, settings.batch, self.max_batch)
        for k, start in enumerate(starts):
            chunk = settings.images(start, min(self.max_batch, settings.batch - start))
            progress = None if observer is None else ChunkSteps(observer, k, len(starts))
            chunk_latents = None if latents is None else latents[start : start + chunk.batch]
            images += self._with_fallback(lambda sessions: self._run(
                task, chunk, sessions, progress, timings, latents=chunk_latents, pixels=pixels, binary=binary,
                mask_blur=mask_blur, keep_unmasked=keep_unmasked, controls=prepared))
        if self.embeddings:
            inputs["embeddings"] = {e.name: str(e.path) for e in self.embeddings}
        if prepared:
            inputs["controls"] = [p.control.record() for p in prepared]
        return Result(tuple(images), settings, task, timings, self.describe(), str(self.root), inputs,
                      tuple(spec.record() for spec in self.loras))

    # -- one chunk, task by task, each top to bottom -------------------------------------

    def _run(self, task: str, settings: GenerationSettings, sessions: dict[str, Session], observer: StepObserver | None,
             timings: Timings, *, latents, pixels, binary, mask_blur, keep_unmasked, controls) -> list[Image.Image]:
        shallow = self.manifest.shallow_denoiser
        job = Job(settings, sessions, ImageNoise(settings.rng, settings.seeds), self.family.guidance(settings.guidance),
                  observer, denoiser=self.manifest.denoiser.name, shallow_denoiser=shallow and shallow.name,
                  controls=controls)
        conditioning = self.conditioning(job.call, settings, job.cfg) | job.cfg.inputs(settings.batch)
        sched = self._make_scheduler(settings.scheduler, settings.steps)
        if task == "txt2img":
            images = self._txt2img(job, sched, conditioning, latents)
        elif task == "img2img":
            images = self._img2img(job, sched, conditioning, pixels)
        else:
            images = self._inpaint(job, sched, conditioning, pixels, binary)
            if keep_unmasked:
                original = to_pil(pixels[0])
                images = [paste_unmasked(image, original, binary, mask_blur) for image in images]
        for stage, values in job.timings.stages.items():  # only a chunk that succeeded counts
            timings.stages.setdefault(stage, []).extend(values)
        return images

    def _txt2img(self, job: Job, sched, conditioning: dict[str, np.ndarray], latents: np.ndarray | None):
        shape = self._latent_shape(job.settings)
        x = latents.astype(np.float32) if latents is not None else job.noise.randn(shape)
        x = (x * np.float32(sched.init_noise_sigma)).astype(np.float32)
        x = self._denoise(job, sched, x, 0, DenoiserInputs(conditioning, job.cfg))
        return self._decode(job, x)

    def _img2img(self, job: Job, sched, conditioning: dict[str, np.ndarray], pixels: np.ndarray):
        start = self.family.start_index(job.settings.steps, job.settings.strength, sched.order)
        # diffusers' order of random draws: the VAE's latent sample, then the noise
        init = self._encode_sample(job, pixels)
        x = sched.add_noise(init, job.noise.randn(init.shape), start).astype(np.float32)
        x = self._denoise(job, sched, x, start, DenoiserInputs(conditioning, job.cfg))
        return self._decode(job, x)

    def _inpaint(self, job: Job, sched, conditioning: dict[str, np.ndarray], pixels: np.ndarray, binary: np.ndarray):
        m, s = self.manifest, job.settings
        start = self.family.start_index(s.steps, s.strength, sched.order)
        full = s.strength >= 1.0
        dedicated = m.denoiser.in_channels == m.latent_channels * 2 + 1

        # 1. latents: pure noise at strength 1, else the image noised to the start step
        image_latents = None
        if not dedicated or not full:
            image_latents = self._encode_sample(job, pixels)
        noise = job.noise.randn(self._latent_shape(s))
        if full:
            x = (noise * np.float32(sched.init_noise_sigma)).astype(np.float32)
        else:
            x = sched.add_noise(image_latents, noise, start).astype(np.float32)

        # 2. the mask at latent size (nearest, like F.interpolate) and the masked image's latents
        f = m.vae_scale_factor
        small = np.repeat(binary[None, None, ::f, ::f], s.batch, axis=0).astype(np.float32)
        masked = self._encode_sample(job, pixels * (binary[None, None] < 0.5))
        if dedicated:
            inputs = InpaintingUNetInputs(conditioning, job.cfg,
                                          job.cfg.model_input(np.concatenate([small, masked], axis=1)))
        else:
            inputs = KnownRegionBlend(conditioning, job.cfg, small, image_latents, noise)
        x = self._denoise(job, sched, x, start, inputs)
        return self._decode(job, x)

    # -- the stages they share ---------------------------------------------------------

    def _denoise(self, job: Job, sched, x: np.ndarray, start: int, inputs: DenoiserInputs) -> np.ndarray:
        """The denoising loop; with controls the UNet also gets the ControlNets' residuals."""
        if job.controls:
            residuals = residual_inputs(job.sessions[job.denoiser].variant.inputs)
            inputs = controlnet.ControlledInputs(inputs, job, residuals, job.controls, start, len(sched.timesteps))
        return denoise(job, sched, x, start, inputs)

    def _prepare_controls(self, controls: list[controlnet.Control], settings: GenerationSettings):
        """The control images checked, read and sized; their ControlNets opened (before any model runs)."""
        if not controls:
            return []
        prepared = controlnet.prepare(controls, self.manifest, settings.width, settings.height)
        if settings.cache_interval not in (None, 1):
            raise ValueError("DeepCache (cache_interval) skips the UNet layers a ControlNet steers; with controls "
                             "run every step in full (cache_interval 1 / no --cache-interval)")
        variant = self._variant_of(self.manifest.denoiser.name)
        if not residual_inputs(variant.inputs):
            raise ArtifactError(f"{self.manifest.denoiser.name} {variant.precision} ({variant.file}) takes no ControlNet "
                                "residuals (made from a graph without them); use its fp32 variant or re-quantize it")
        for p in prepared:
            self._variant_of(p.component) if self.low_memory else self.session(p.component)
        return prepared

    def _latent_shape(self, settings: GenerationSettings) -> tuple[int, int, int, int]:
        m = self.manifest
        return (settings.batch, m.latent_channels, settings.height // m.vae_scale_factor,
                settings.width // m.vae_scale_factor)

    def _encode_sample(self, job: Job, pixels: np.ndarray) -> np.ndarray:
        """The denoiser's (scaled) latents of ``pixels``, one row per image: the VAE's latent distribution sampled
        with each image's own stream (diffusers' ``latent_dist.sample`` with one generator per image); a tiny
        VAE's encoder is deterministic and draws nothing, as in diffusers."""
        mean, std = self._encode(job, pixels)
        batch = job.settings.batch
        latents = np.repeat(mean, batch, axis=0)
        if std is not None:
            latents = latents + np.repeat(std, batch, axis=0) * job.noise.randn(latents.shape)
        return self._scaled(job, latents)

    def _scaled(self, job: Job, latents: np.ndarray) -> np.ndarray:
        """The encoder's latents in the denoiser's units."""
        scaling, shift = self._units(job, "vae_encoder")
        return ((latents - np.float32(shift)) * np.float32(scaling)).astype(np.float32)

    def _encode(self, job: Job, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """[-1, 1] NCHW float images -> the latent distribution's (mean, std) in the encoder's own units; a tiny
        VAE's encoder gives its latents, with no spread (std None)."""
        tiny = "latents" in [o.name for o in job.sessions["vae_encoder"].variant.outputs]
        key = "latents" if tiny else "latent_parameters"
        tiling = self._tiling(images.shape[2], images.shape[3])

        def encode(x: np.ndarray) -> np.ndarray:
            return job.call("vae_encoder", sample=x)[key]

        f = self.manifest.vae_scale_factor
        outputs = [encode(x) if tiling is None else encode_tiled(encode, x, f, tiling)
                   for x in (images[k : k + 1].astype(np.float32) for k in range(len(images)))]
        if tiny:
            return np.concatenate(outputs), None
        mean, logvar = np.split(np.concatenate(outputs), 2, axis=1)
        return mean, np.exp(0.5 * np.clip(logvar, -30.0, 20.0)).astype(np.float32)

    def _units(self, job: Job, component: str) -> tuple[float, float]:
        return self.manifest.latent_units(job.sessions[component].variant)

    def _decode(self, job: Job, x: np.ndarray) -> list[Image.Image]:
        """Scaled latents -> images, one at a time (the VAE's memory peak grows with batch)."""
        images = self._decode_arrays(job, x)
        precision = job.sessions["vae_decoder"].variant.precision
        if precision != "fp32" and float(images.std()) < 1e-3:
            raise PrecisionError("vae_decoder", precision, "a flat (all one colour) image")
        return [to_pil(d) for d in images]

    def encode(self, images: np.ndarray) -> np.ndarray:
        """[-1, 1] NCHW float images -> the denoiser's (scaled) latents: the mean of the VAE's latent distribution,
        or a tiny VAE's latents, whichever encoder is loaded."""
        self.session("vae_encoder")
        job = self._bare_job()
        return self._scaled(job, self._encode(job, images)[0])

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """The denoiser's (scaled) latents -> [-1, 1] NCHW float images, with whichever decoder is loaded."""
        return self._decode_arrays(self._bare_job(), latents)

    def _decode_arrays(self, job: Job, x: np.ndarray) -> np.ndarray:
        scaling, shift = self._units(job, "vae_decoder")
        latents = (x / np.float32(scaling) + np.float32(shift)).astype(np.float32)
        f = self.manifest.vae_scale_factor
        tiling = self._tiling(latents.shape[2] * f, latents.shape[3] * f)

        def decode(z: np.ndarray) -> np.ndarray:
            return job.call("vae_decoder", latent_sample=z)["sample"]

        return np.concatenate([decode(z) if tiling is None else decode_tiled(decode, z, f, tiling)
                               for z in (latents[k : k + 1] for k in range(len(latents)))])

    def _tiling(self, height: int, width: int) -> Tiling | None:
        """The VAE's tiles for an image of this size, or None to run it whole: ``vae_tiling="on"`` (and low-memory
        mode) tile whatever is larger than the model's native size, ``"auto"`` only images of more than
        ``AUTO_TILE_PIXELS``, ``"off"`` never."""
        if self.tiling == "off" or (self.tiling == "auto" and not self.low_memory and height * width <= AUTO_TILE_PIXELS):
            return None
        f = self.manifest.vae_scale_factor
        tiling = Tiling.for_model(self.manifest.sample_size, f)
        return tiling if needs_tiling(height, width, tiling) else None

    def _bare_job(self) -> Job:
        return Job(None, self._snapshot(), None, self.family.guidance(0.0))

    def _with_fallback(self, attempt: Callable[[dict[str, Session]], list[Image.Image]]) -> list[Image.Image]:
        """Run ``attempt`` on a snapshot of the sessions; with ``fallback``, a reduced-precision component that
        failed is replaced by its fp32 variant (for this and later calls) and the attempt rerun."""
        while True:
            sessions = self._snapshot()
            try:
                return attempt(sessions)
            except PrecisionError as e:
                if not self.fallback:
                    raise
                call_notes.add(f"{e.component} at {e.precision} failed ({e}); rerunning it in fp32", stacklevel=4)
                with self._lock:
                    self.precision = self.precision | {e.component: "fp32"}
                    if self.sessions[e.component].variant.precision == e.precision:
                        self.sessions[e.component] = self._open(e.component, "fp32")


def _record(s: Session) -> dict[str, Any]:
    return {"precision": s.variant.precision, "backend": s.backend, "device": s.device,
            "requested_device": s.requested_device, "execution_precision": s.execution_precision,
            "load_s": round(s.load_seconds, 3), "compile_cache": s.compile_cache}


def _identity(patch: WeightPatch | None) -> list[Any] | None:
    return None if patch is None else patch.identity

