"""The artifact folder's contract: ``manifest.json``, versioned and validated on load.

One canonical name per component, used by export, quantize, runtime and bench::

    ARTIFACT/
      manifest.json
      tokenizer/tokenizer.json
      scheduler/scheduler_config.json
      text_encoder/model.onnx   unet/model.onnx   vae_decoder/model.onnx   vae_encoder/model.onnx
      tokenizer_2/tokenizer.json  text_encoder_2/model.onnx     (SDXL: its second text encoder)

Components are described by their **role** (format version 2): ``text_encoder``
(in order, each with its tokenizer and sizes), ``denoiser`` (one, with its
``kind``: ``unet`` now; transformers come with their flow-matching schedulers),
``shallow_denoiser`` (DeepCache's shallow branch, at most one: it takes the
``deep_feature`` the denoiser graph also outputs), ``vae_decoder``,
``vae_encoder``. A new kind of component (a ControlNet) is a new role here,
not a new branch elsewhere; a role this version does not know is refused with
the accepted list. A tiny VAE is a variant (``tiny``) of the VAE components,
with its own latent units (``Variant.scaling_factor``). ``fast_profile`` holds
what ``edgediff tune`` measured and chose for ``generate --fast``. Each component lists its variants
by precision (``fp32`` from export; ``fp16``, ``int8``... added later by
``edgediff quantize``), each with its file, size, input/output signature and
measured parity. Version-1 manifests (flat ``text``/``text_2``/``unet_in_channels``
fields) still load, into the same structures; saving writes version 2.
"""

from __future__ import annotations

import json
import math
import os
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import numpy as np

from .errors import EdgediffError
from .schedulers import SCHEDULER_NAMES, check_prediction

FORMAT_NAME = "edgediff-artifact"
FORMAT_VERSION = 2
MANIFEST_FILE = "manifest.json"
ROLES = ("text_encoder", "denoiser", "vae_decoder", "vae_encoder", "shallow_denoiser", "controlnet")
STEP_CACHE_METHODS = ("deepcache",)
DEEP_FEATURE = "deep_feature"  # the denoiser output a shallow denoiser takes (DeepCache)
# A ControlNet's outputs and the denoiser's matching inputs (an artifact exported with --controlnet): one residual
# per skip connection of the UNet's down path, numbered from conv_in, and one for the mid block. Their spatial
# dimensions are named "height/F" and "width/F": the latent size divided by F, rounded up (stride-2 convolutions).
DOWN_RESIDUAL = "down_block_residual_"
MID_RESIDUAL = "mid_block_residual"
CONTROL_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_-")
DENOISER_KINDS = ("unet", "transformer")  # SD/SDXL's UNet; a DiT (SD3's MMDiT) taking the same NCHW latents
MAX_TEXT_ENCODERS = 3  # SD: one; SDXL: two; SD3: three (CLIP-L, CLIP-G, T5; edgediff.runtime.families)
# what a text encoder is, which says how its prompts are tokenized (runtime/text.py, runtime/encoders.py)
TEXT_ENCODER_KINDS = ("clip", "t5", "gemma")
V1_COMPONENTS = ("text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder")  # version 1: closed names
V1_REQUIRED = ("text_encoder", "unet", "vae_decoder")
PREDICTION_TYPES = ("epsilon", "v_prediction", "flow", "trigflow")  # flow: rectified-flow velocity (SD3, Sana);
# trigflow: TrigFlow's consistency model (Sana-Sprint)
# Generation settings used when neither the caller nor the artifact's ``defaults`` name them.
DEFAULT_STEPS = 25
DEFAULT_GUIDANCE = 7.5
# A manifest is a few KB; a provenance blob may make it larger, never this large.
MAX_MANIFEST_BYTES = 64 * 2**20
DTYPES = ("float32", "float16", "bfloat16", "int64", "int32", "int8", "uint8", "bool")
MODEL_SUFFIXES = (".onnx", ".xml")  # ONNX graphs; OpenVINO IR (NNCF variants)
VAE_SCALE_FACTORS = (1, 2, 4, 8, 16, 32, 64)


def check_defaults(defaults: dict[str, Any], where: str = "defaults") -> dict[str, Any]:
    """The model's recommended generation settings: ``steps`` (int >= 1) and ``guidance`` (number >= 0), both optional.

    SD-Turbo wants 1 step and no guidance, SDXL guidance 5, the embedded shapes
    model guidance 4: the artifact says so, and callers that name neither get them.
    """
    if not isinstance(defaults, dict):
        raise ArtifactError(f"{where} must be an object with steps and/or guidance, got {defaults!r:.80}")
    unknown = set(defaults) - {"steps", "guidance"}
    if unknown:
        raise ArtifactError(f"{where} has unknown keys {sorted(str(k)[:40] for k in unknown)}; accepted: steps, guidance")
    steps = defaults.get("steps")
    if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= 1000):
        raise ArtifactError(f"{where}.steps must be an integer >= 1 (at most 1000), got {steps!r:.40}")
    guidance = defaults.get("guidance")
    if guidance is not None and (not isinstance(guidance, (int, float)) or isinstance(guidance, bool)
                                 or not (math.isfinite(guidance) and guidance >= 0)):
        raise ArtifactError(f"{where}.guidance must be a finite number >= 0, got {guidance!r:.40}")
    return {k: v for k, v in (("steps", steps), ("guidance", None if guidance is None else float(guidance))) if v is not None}


FAST_SETTINGS = {"vae": ("full", "tiny"), "cache_interval": (1, 1000), "cfg_until": (0.0, 1.0),
                 "unet": ("a reduced-precision variant of the UNet",)}


def check_fast_profile(profile: Any, where: str = "fast_profile") -> dict[str, Any]:
    """The settings ``edgediff tune`` measured to keep the quality bounds (``generate --fast``), with its figures.

    ``settings`` may name ``vae`` (full/tiny), ``cache_interval`` (an int in [1, 1000]), ``cfg_until`` (in
    [0, 1]) and ``unet`` (the UNet variant, e.g. int8-static: only ever recorded where it measured faster than
    fp32); everything else in the profile is the record of how it was measured.
    """
    if not isinstance(profile, dict) or not isinstance(profile.get("settings"), dict):
        raise ArtifactError(f"{where} must be an object with a \"settings\" object, got {profile!r:.80}")
    settings = profile["settings"]
    unknown = set(settings) - set(FAST_SETTINGS)
    if unknown:
        raise ArtifactError(f"{where}.settings has unknown keys {sorted(str(k)[:40] for k in unknown)}; accepted: "
                            f"{', '.join(FAST_SETTINGS)}")
    for key, value in settings.items():
        accepted = FAST_SETTINGS[key]
        if key == "vae":
            ok = value in accepted
        elif key == "unet":
            ok = isinstance(value, str) and 0 < len(value) <= 40  # that the variant exists is checked at load
        elif key == "cache_interval":
            ok = isinstance(value, int) and not isinstance(value, bool) and accepted[0] <= value <= accepted[1]
        else:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and accepted[0] <= value <= accepted[1]
        if not ok:
            raise ArtifactError(f"{where}.settings.{key} must be {' or '.join(accepted) if key in ('vae', 'unet') else accepted}, "
                                f"got {value!r:.40}")
    return profile


class ArtifactError(EdgediffError, ValueError):
    """The artifact folder is missing, damaged, or of a format this version cannot read."""


def artifact_file(root: Path, rel: Any, where: str, suffixes: tuple[str, ...]) -> Path:
    """The file a manifest names, confined to the artifact folder ``root``.

    ``rel`` must be a relative path with forward slashes, no ``..``, ending in
    one of ``suffixes``, and must not leave ``root`` through a symlink (of the
    file or of a folder on its way). Checked before any backend, tokenizer or
    ``unlink`` sees the path. Existence is the caller's concern.
    """
    if not isinstance(rel, str) or not rel.strip():
        raise ArtifactError(f"{where}: a file path must be a non-empty string, got {rel!r:.120}")
    if len(rel) > 1024:
        raise ArtifactError(f"{where}: a file path of {len(rel):,} characters; an artifact's paths are at most 1024")
    posix, windows = PurePosixPath(rel), PureWindowsPath(rel)
    if posix.is_absolute() or windows.is_absolute() or windows.drive or "\\" in rel or "\0" in rel:
        raise ArtifactError(f"{where}: {rel!r:.120} is not a relative path inside the artifact folder "
                            "(paths are relative, with forward slashes, e.g. unet/model.onnx)")
    if ".." in posix.parts:
        raise ArtifactError(f"{where}: {rel!r:.120} leaves the artifact folder ('..' is not accepted)")
    if not rel.endswith(suffixes):
        raise ArtifactError(f"{where}: {rel!r:.120} must end in {' or '.join(suffixes)}")
    path = Path(root) / rel
    try:
        inside = path.resolve().is_relative_to(Path(root).resolve())
    except (OSError, RuntimeError) as e:  # a symlink loop, a name too long
        raise ArtifactError(f"{where}: {rel!r:.120} cannot be resolved ({e})") from None
    if not inside:
        raise ArtifactError(f"{where}: {rel!r:.120} resolves outside the artifact folder {root} (a symlink leaves it); "
                            "an artifact's files must lie inside it")
    return path


def regular_file(path: Path, what: str) -> Path:
    """``path`` must be an ordinary file (not a folder, FIFO or device: reading those hangs or never ends)."""
    try:
        mode = path.stat().st_mode
    except OSError:
        raise ArtifactError(f"{path} is missing ({what}); the artifact is incomplete") from None
    if not stat.S_ISREG(mode):
        raise ArtifactError(f"{path} ({what}) is not a regular file")
    return path


def disk_bytes(path: Path) -> int:
    """Bytes on disk of a model file with what it loads beside it: ``<name>.data`` (ONNX), ``.bin`` (OpenVINO IR)."""
    path = Path(path)
    extra = [Path(str(path) + ".data")] + ([path.with_suffix(".bin")] if path.suffix == ".xml" else [])
    return path.stat().st_size + sum(p.stat().st_size for p in extra if p.exists())


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: float32, float16, int64, int32
    shape: tuple[int | str, ...]  # ints are fixed, strings are named dynamic axes

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TensorSpec:
        if not isinstance(d, dict):
            raise ValueError(f"a tensor must be an object with name, dtype and shape, got {d!r:.80}")
        name, dtype, shape = d["name"], d["dtype"], d["shape"]
        if not isinstance(name, str) or not name:
            raise ValueError(f"tensor name must be a non-empty string, got {name!r:.80}")
        if dtype not in DTYPES:
            raise ValueError(f"{name}: dtype {dtype!r:.40} is not one of {', '.join(DTYPES)}")
        if not isinstance(shape, list) or len(shape) > 8 or not all(
                (isinstance(a, int) and not isinstance(a, bool) and 1 <= a <= 2**20) or (isinstance(a, str) and a)
                for a in shape):
            raise ValueError(f"{name}: shape must be a list of at most 8 axes, each a size in 1..2^20 or an axis "
                             f"name, got {shape!r:.80}")
        if is_residual(name):
            residual_factor(shape, name)  # a ControlNet residual's shape is what zero_residuals reads
        return cls(name, dtype, tuple(shape))


@dataclass(frozen=True)
class Variant:
    precision: str
    file: str  # relative to the artifact root
    bytes: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    quality: dict[str, Any] = field(default_factory=dict)  # parity / quality figures
    # backends that can run the file; empty = all (ONNX). OpenVINO IR variants
    # made with NNCF (``file`` ends in .xml, weights in the .bin beside it) say ("openvino",).
    backends: tuple[str, ...] = ()
    # A VAE graph that works in other latent units than the manifest's: a tiny VAE (TAESD) decodes and encodes
    # the scaled latents the denoiser sees, so its scaling factor is 1.0 and its shift 0. None: the manifest's.
    scaling_factor: float | None = None
    shift_factor: float | None = None
    # the map of this graph's initializers to its diffusers model's parameters (``edgediff.export.weight_map``),
    # relative to the root: what LoRA merging needs. None: exported before edgediff made it, or a quantized graph
    weights: str | None = None

    def to_json(self) -> dict[str, Any]:
        d = {
            "file": self.file,
            "bytes": self.bytes,
            "inputs": [t.to_json() for t in self.inputs],
            "outputs": [t.to_json() for t in self.outputs],
            "quality": self.quality,
        }
        if self.backends:
            d["backends"] = list(self.backends)
        if self.scaling_factor is not None:
            d["scaling_factor"], d["shift_factor"] = self.scaling_factor, self.shift_factor or 0.0
        if self.weights is not None:
            d["weights"] = self.weights
        return d

    @property
    def only_devices(self) -> tuple[str, ...]:
        """The devices this variant's method says it runs on (``fp16-cuda``: its fused kernels are CUDA's);
        empty: any device of its backends."""
        method = self.quality.get("method") if isinstance(self.quality, dict) else None
        devices = method.get("devices") if isinstance(method, dict) else None
        return tuple(str(d) for d in devices) if isinstance(devices, (list, tuple)) else ()

    def files(self) -> list[str]:
        """Every file the variant needs, relative to the root: an IR's .bin beside its .xml, an ONNX graph's
        external data ``<name>.data`` (listed whether or not the graph has one: callers check existence)."""
        if self.file.endswith(".xml"):
            return [self.file, str(PurePosixPath(self.file).with_suffix(".bin"))]
        return [self.file, self.file + ".data"]

    @classmethod
    def from_json(cls, precision: str, d: dict[str, Any]) -> Variant:
        if not isinstance(d, dict):
            raise ValueError(f"a variant must be an object, got {d!r:.80}")
        size = d["bytes"]
        if not isinstance(size, int) or isinstance(size, bool) or not 0 < size < 2**50:
            raise ValueError(f"bytes must be a positive integer, got {size!r:.40}")
        quality, backends = d.get("quality", {}), d.get("backends", [])
        if not isinstance(quality, dict):
            raise ValueError(f"quality must be an object, got {quality!r:.80}")
        if not isinstance(backends, list) or not all(b in ("onnxruntime", "openvino") for b in backends):
            raise ValueError(f"backends must be a list of onnxruntime/openvino, got {backends!r:.80}")
        for key in ("inputs", "outputs"):
            if not isinstance(d[key], list) or not d[key]:
                raise ValueError(f"{key} must be a non-empty list of tensors, got {d[key]!r:.80}")
        weights = d.get("weights")
        if weights is not None and not (isinstance(weights, str) and weights.endswith(".json")):
            raise ValueError(f"weights must be the path of a .json weight map, got {weights!r:.80}")
        scaling = {}
        if "scaling_factor" in d:
            scaling = {"scaling_factor": _ranged(d, "scaling_factor", float, 1e-6, 1e3),
                       "shift_factor": _ranged({"shift_factor": d.get("shift_factor") or 0.0}, "shift_factor", float,
                                               -1e3, 1e3)}
        return cls(
            precision,
            d["file"],
            size,
            tuple(TensorSpec.from_json(t) for t in d["inputs"]),
            tuple(TensorSpec.from_json(t) for t in d["outputs"]),
            dict(quality),
            tuple(backends),
            weights=weights,
            **scaling,
        )


@dataclass(frozen=True)
class TextEncoderSpec:
    """A text encoder component and the tokenizer that feeds it."""

    name: str  # the component
    tokenizer: str  # tokenizer.json, relative to the artifact root
    max_length: int
    hidden_size: int
    pad_token_id: int
    kind: str = "clip"  # TEXT_ENCODER_KINDS; a manifest without it (before T5) has CLIP encoders only

    def to_json(self) -> dict[str, Any]:
        return {"role": "text_encoder", "kind": self.kind, "tokenizer": self.tokenizer, "max_length": self.max_length,
                "hidden_size": self.hidden_size, "pad_token_id": self.pad_token_id}


@dataclass(frozen=True)
class DenoiserSpec:
    """The denoiser component: its kind and how many latent channels it takes (9 = an inpainting UNet)."""

    name: str
    kind: str  # "unet"
    in_channels: int

    def to_json(self) -> dict[str, Any]:
        return {"role": "denoiser", "kind": self.kind, "in_channels": self.in_channels}


@dataclass(frozen=True)
class ShallowDenoiserSpec:
    """DeepCache's (Ma et al., CVPR 2024) shallow branch: run between full denoiser steps, it takes the
    ``deep_feature`` the full denoiser graph also outputs and recomputes only the layers nearest the image."""

    name: str
    method: str  # "deepcache"
    branch: int  # DeepCache's cache_branch_id: block * 3 + layer, counted from the output end

    def to_json(self) -> dict[str, Any]:
        return {"role": "shallow_denoiser", "method": self.method, "branch": self.branch}


def is_residual(name: str) -> bool:
    return name.startswith(DOWN_RESIDUAL) or name == MID_RESIDUAL


def residual_inputs(specs: tuple[TensorSpec, ...]) -> list[TensorSpec]:
    """The denoiser inputs that take ControlNet residuals (none: exported without ControlNets)."""
    return [t for t in specs if is_residual(t.name)]


def residual_factor(shape: Any, name: str) -> int:
    """F of a residual's shape [batch, channels, "height/F", "width/F"] (F a power of two); ValueError otherwise."""
    if isinstance(shape, (list, tuple)) and len(shape) == 4 and isinstance(shape[1], int) \
            and isinstance(shape[2], str) and isinstance(shape[3], str):
        height, _, f = shape[2].partition("/")
        if height == "height" and f.isdigit() and 0 < int(f) <= 2**10 and not int(f) & (int(f) - 1) \
                and shape[3] == f"width/{f}":
            return int(f)
    raise ValueError(f"{name}: a ControlNet residual's shape must be [batch, channels, \"height/F\", \"width/F\"] "
                     f"with F a power of two, got {shape!r:.80}")


def zero_residuals(specs: list[TensorSpec], sample_shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    """Zeros for these residual inputs beside a ``sample`` of this shape (the UNet's own output, exactly): dims
    "height/F" are the latent size divided by F, rounded up."""
    batch, height, width = sample_shape[0], sample_shape[-2], sample_shape[-1]
    out = {}
    for t in specs:
        f = residual_factor(t.shape, t.name)
        out[t.name] = np.zeros((batch, t.shape[1], -(-height // f), -(-width // f)), np.float32)
    return out


@dataclass(frozen=True)
class ControlNetSpec:
    """A ControlNet (Zhang et al. 2023) component: the name a control image is given for (``--control NAME=IMAGE``),
    the channels of its control image, and where it was exported from."""

    name: str  # the component
    control: str
    conditioning_channels: int
    source: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"role": "controlnet", "control": self.control, "conditioning_channels": self.conditioning_channels,
                "source": self.source}


def check_control_name(name: Any, where: str = "a ControlNet's name") -> str:
    """1-40 lowercase letters, digits, '_' or '-', starting with a letter or digit."""
    if not (isinstance(name, str) and 1 <= len(name) <= 40 and set(name) <= CONTROL_NAME_CHARS and name[0].isalnum()):
        raise ArtifactError(f"{where} must be 1-40 lowercase letters, digits, '_' or '-' (starting with a letter or "
                            f"digit), got {name!r:.60}")
    return name


@dataclass
class Manifest:
    family: str
    prediction_type: str
    sample_size: int  # default image side in pixels
    vae_scale_factor: int
    latent_channels: int
    scaling_factor: float
    scheduler: str  # our name of the checkpoint's own scheduler
    components: dict[str, dict[str, Variant]]  # name -> precision -> variant
    roles: dict[str, str]  # name -> role (ROLES)
    text_encoders: tuple[TextEncoderSpec, ...]  # in conditioning order
    denoiser: DenoiserSpec
    provenance: dict[str, Any] = field(default_factory=dict)
    random_weights: bool = False
    shift_factor: float = 0.0
    # SDXL: whether an absent negative prompt means zero embeddings
    force_zeros_for_empty_prompt: bool = False
    # the model's recommended steps / guidance (see check_defaults)
    defaults: dict[str, Any] = field(default_factory=dict)
    shallow_denoiser: ShallowDenoiserSpec | None = None  # DeepCache's shallow graph, where exported
    fast_profile: dict[str, Any] | None = None  # what `edgediff tune` measured and chose (check_fast_profile)
    controlnets: tuple[ControlNetSpec, ...] = ()  # exported with --controlnet; the denoiser then takes residuals
    format_version: int = FORMAT_VERSION

    scheduler_file = "scheduler/scheduler_config.json"

    def settings(self, steps: int | None = None, guidance: float | None = None) -> tuple[int, float]:
        """The caller's steps and guidance where given, else the model's recommended ones, else 25 and 7.5."""
        return (self.defaults.get("steps", DEFAULT_STEPS) if steps is None else steps,
                self.defaults.get("guidance", DEFAULT_GUIDANCE) if guidance is None else guidance)

    def latent_units(self, variant: Variant) -> tuple[float, float]:
        """(scaling, shift) between the denoiser's latents and ``variant``'s VAE graph (``z / scaling + shift`` goes
        in the decoder): the variant's own (a tiny VAE works on the scaled latents: 1.0, 0.0), else the manifest's."""
        if variant.scaling_factor is not None:
            return variant.scaling_factor, variant.shift_factor or 0.0
        return self.scaling_factor, self.shift_factor

    def variant(self, component: str, precision: str = "fp32") -> Variant:
        if component not in self.components:
            raise ArtifactError(f"the artifact has no {component}; it has: {', '.join(self.components)}")
        variants = self.components[component]
        if precision not in variants:
            raise ArtifactError(
                f"{component} has no {precision!r} variant; available: {', '.join(variants)}"
            )
        return variants[precision]

    def to_json(self) -> dict[str, Any]:
        """Format version 2, whatever version was read."""
        specs = {t.name: t.to_json() for t in self.text_encoders} | {self.denoiser.name: self.denoiser.to_json()}
        if self.shallow_denoiser is not None:
            specs[self.shallow_denoiser.name] = self.shallow_denoiser.to_json()
        specs |= {c.name: c.to_json() for c in self.controlnets}
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "family": self.family,
            "prediction_type": self.prediction_type,
            "sample_size": self.sample_size,
            "vae_scale_factor": self.vae_scale_factor,
            "latent_channels": self.latent_channels,
            "scaling_factor": self.scaling_factor,
            "shift_factor": self.shift_factor,
            "force_zeros_for_empty_prompt": self.force_zeros_for_empty_prompt,
            "scheduler": {"default": self.scheduler, "config": self.scheduler_file},
            **({"defaults": self.defaults} if self.defaults else {}),
            **({"fast_profile": self.fast_profile} if self.fast_profile is not None else {}),
            "random_weights": self.random_weights,
            "components": {
                name: specs.get(name, {"role": self.roles[name]}) | {"variants": {p: v.to_json() for p, v in variants.items()}}
                for name, variants in self.components.items()
            },
            "provenance": self.provenance,
        }

    def save(self, root: Path) -> None:
        """Write ``root/manifest.json`` atomically: a unique temporary file renamed over it (readers never see half)."""
        root = Path(root)
        fd, tmp = tempfile.mkstemp(prefix=f".{MANIFEST_FILE}.", suffix=".tmp", dir=root)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(self.to_json(), indent=2) + "\n")
            os.chmod(tmp, 0o666 & ~current_umask())
            os.replace(tmp, root / MANIFEST_FILE)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


def current_umask() -> int:
    """The process's umask (files we create with mkstemp/mkdtemp get 0600/0700; we widen them to what the user set)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _require(d: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str = "") -> Any:
    if key not in d:
        raise ArtifactError(f"manifest.json{where} lacks the required key {key!r}")
    value = d[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in kinds):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ArtifactError(f"manifest.json{where}: {key!r} must be {names}, got {value!r:.80}")
    return value


def _ranged(d: dict[str, Any], key: str, kind: type, lo: float, hi: float, where: str = "") -> Any:
    """A required number within [lo, hi] (finite; NaN and Infinity, which JSON readers accept, are refused)."""
    value = _require(d, key, (int, float) if kind is float else kind, where)
    if not (math.isfinite(value) and lo <= value <= hi):
        raise ArtifactError(f"manifest.json{where}: {key!r} must be in [{lo:g}, {hi:g}], got {value!r}")
    return float(value) if kind is float else value


def read_manifest_json(path: Path) -> Any:
    """``manifest.json`` as parsed JSON; too large, not UTF-8, not JSON or nested too deeply is an ArtifactError."""
    try:
        size = path.stat().st_size
        if size > MAX_MANIFEST_BYTES:
            raise ArtifactError(f"{path} is {size / 2**20:.0f} MiB; a manifest is at most "
                                f"{MAX_MANIFEST_BYTES // 2**20} MiB (is this an edgediff artifact?)")
        return json.loads(path.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path} is not valid JSON ({e}); re-export the artifact") from e
    except RecursionError:
        raise ArtifactError(f"{path} is nested too deeply to be a manifest; re-export the artifact") from None
    except OSError as e:
        raise ArtifactError(f"cannot read {path}: {e.strerror}") from e


def is_artifact(folder: Path) -> bool:
    """Whether ``folder`` holds an edgediff ``manifest.json`` (whatever its state otherwise)."""
    path = Path(folder) / MANIFEST_FILE
    if not path.is_file():
        return False
    try:
        d = read_manifest_json(path)
    except ArtifactError:
        return False
    return isinstance(d, dict) and d.get("format") == FORMAT_NAME


def load_manifest(root: str | Path) -> Manifest:
    """Read and validate ``root/manifest.json``.

    Every field is type- and range-checked; every file it names must lie inside
    ``root`` (no absolute paths, no ``..``, no symlink out), be a regular file
    and have the byte size the manifest recorded. All failures are ArtifactError.
    """
    root = Path(root)
    try:
        root.stat()
    except FileNotFoundError:
        pass
    except OSError as e:  # a name too long, a symlink loop, a folder that cannot be read
        raise ArtifactError(f"{str(root)[:200]} cannot be read as an artifact folder ({e.strerror})") from None
    if root.is_file():
        raise ArtifactError(f"{root} is a file, not an artifact folder; --model takes the folder `edgediff export` wrote")
    if not root.is_dir():
        raise ArtifactError(f"{root} is not an artifact folder (no such directory); export one with `edgediff export`")
    path = root / MANIFEST_FILE
    if not path.is_file():
        raise ArtifactError(f"{path} is missing: {root} is not an edgediff artifact (or its export did not finish)")
    artifact_file(root, MANIFEST_FILE, "manifest", (".json",))
    d = read_manifest_json(path)
    if not isinstance(d, dict) or d.get("format") != FORMAT_NAME:
        raise ArtifactError(f"{path} is not an edgediff manifest (expected \"format\": \"{FORMAT_NAME}\")")
    version = _require(d, "format_version", int)
    if version > FORMAT_VERSION:
        raise ArtifactError(
            f"{path} has format_version {version}, newer than this edgediff reads ({FORMAT_VERSION}); "
            "upgrade edgediff"
        )
    if version < 1:
        raise ArtifactError(f"{path} has an invalid format_version {version}")
    prediction = _require(d, "prediction_type", str)
    if prediction not in PREDICTION_TYPES:
        raise ArtifactError(f"{path}: prediction_type {prediction!r:.80} is not one of {', '.join(PREDICTION_TYPES)}")
    sched = _require(d, "scheduler", dict)
    comps = _require(d, "components", dict)
    components: dict[str, dict[str, Variant]] = {}
    for name, entry in comps.items():
        if not isinstance(entry, dict):
            raise ArtifactError(f"{path}: components.{name} must be an object with \"variants\", got {entry!r:.80}")
        variants = _require(entry, "variants", dict, f" components.{name}")
        try:
            components[name] = {p: Variant.from_json(p, v) for p, v in variants.items()}
        except (KeyError, TypeError, ValueError) as e:
            raise ArtifactError(f"{path}: components.{name} has a malformed variant ({e})") from e
        if "fp32" not in components[name]:
            raise ArtifactError(f"{path}: components.{name} has no fp32 variant (export writes one; variants "
                                "are added beside it)")
    sample_size = _ranged(d, "sample_size", int, 8, 16384)
    vae_scale_factor = _require(d, "vae_scale_factor", int)
    if vae_scale_factor not in VAE_SCALE_FACTORS or sample_size % vae_scale_factor:
        raise ArtifactError(f"manifest.json: 'vae_scale_factor' must be one of {VAE_SCALE_FACTORS} dividing "
                            f"sample_size {sample_size}, got {vae_scale_factor!r}")
    latent_channels = _ranged(d, "latent_channels", int, 1, 256)
    roles, text_encoders, denoiser, shallow, controlnets = (_roles_v1 if version == 1 else _roles_v2)(d, comps, path)
    if denoiser.in_channels not in (latent_channels, 2 * latent_channels + 1):
        raise ArtifactError(f"manifest.json: the denoiser's input channels must be latent_channels ({latent_channels}, "
                            f"an ordinary UNet) or {2 * latent_channels + 1} (an inpainting UNet), got {denoiser.in_channels!r}")
    scheduler = _require(sched, "default", str, " scheduler")
    if scheduler not in SCHEDULER_NAMES:
        raise ArtifactError(f"manifest.json scheduler: default {scheduler!r:.80} is not one of {', '.join(SCHEDULER_NAMES)}")
    try:
        check_prediction(scheduler, prediction)
    except ValueError as e:
        raise ArtifactError(f"manifest.json scheduler: default: {e}") from None
    provenance = d.get("provenance", {})
    if not isinstance(provenance, dict):
        raise ArtifactError(f"manifest.json: 'provenance' must be an object, got {type(provenance).__name__}")
    for name, variants in components.items():
        for v in variants.values():
            _check_variant_files(root, name, v)
    for spec in text_encoders:
        regular_file(artifact_file(root, spec.tokenizer, f"manifest.json {spec.name} tokenizer", (".json",)), "tokenizer")
    regular_file(artifact_file(root, Manifest.scheduler_file, "manifest.json scheduler config", (".json",)),
                 "scheduler config")
    return Manifest(
        family=_require(d, "family", str),
        prediction_type=prediction,
        sample_size=sample_size,
        vae_scale_factor=vae_scale_factor,
        latent_channels=latent_channels,
        scaling_factor=_ranged(d, "scaling_factor", float, 1e-6, 1e3),
        shift_factor=_ranged({"shift_factor": d.get("shift_factor") or 0.0}, "shift_factor", float, -1e3, 1e3),
        scheduler=scheduler,
        components=components,
        roles=roles,
        text_encoders=text_encoders,
        denoiser=denoiser,
        shallow_denoiser=shallow,
        controlnets=controlnets,
        provenance=dict(provenance),
        random_weights=_require({"random_weights": d.get("random_weights", False)}, "random_weights", bool),
        force_zeros_for_empty_prompt=_require(
            {"force_zeros_for_empty_prompt": d.get("force_zeros_for_empty_prompt", False)},
            "force_zeros_for_empty_prompt", bool),
        defaults=check_defaults(d.get("defaults", {}), f"{path}: defaults"),
        fast_profile=None if d.get("fast_profile") is None else check_fast_profile(d["fast_profile"],
                                                                                   f"{path}: fast_profile"),
        format_version=version,
    )


def _text_spec(name: str, d: dict[str, Any], where: str) -> TextEncoderSpec:
    tokenizer = _require(d, "tokenizer", str, where)
    kind = _require({"kind": d.get("kind", "clip")}, "kind", str, where)
    if kind not in TEXT_ENCODER_KINDS:
        raise ArtifactError(f"manifest.json{where} is a {kind!r:.40} text encoder; this edgediff runs: "
                            f"{', '.join(TEXT_ENCODER_KINDS)}")
    return TextEncoderSpec(name, tokenizer, _ranged(d, "max_length", int, 3, 4096, where),
                           _ranged(d, "hidden_size", int, 1, 65536, where),
                           _ranged(d, "pad_token_id", int, 0, 10**7, where), kind)


def _roles_v2(d: dict[str, Any], comps: dict[str, Any], path: Path):
    """Version 2: every component names its role; the text encoders in the order they appear."""
    roles, text_encoders, denoisers, shallow, controlnets = {}, [], [], [], []
    for name, entry in comps.items():
        where = f" components.{name}"
        role = _require(entry, "role", str, where)
        if role not in ROLES:
            raise ArtifactError(f"{path}: components.{name} has the role {role!r:.40}, which this edgediff does not "
                                f"know; accepted: {', '.join(ROLES)}")
        if role in ("vae_decoder", "vae_encoder") and name != role:
            raise ArtifactError(f"{path}: the {role} component must be named {role!r} (one canonical name per "
                                f"component), got {name!r:.40}")
        roles[name] = role
        if role == "text_encoder":
            text_encoders.append(_text_spec(name, entry, where))
        elif role == "denoiser":
            kind = _require(entry, "kind", str, where)
            if kind not in DENOISER_KINDS:
                raise ArtifactError(f"{path}: components.{name} is a {kind!r:.40} denoiser; this edgediff runs: "
                                    f"{', '.join(DENOISER_KINDS)}")
            denoisers.append(DenoiserSpec(name, kind, _ranged(entry, "in_channels", int, 1, 1024, where)))
        elif role == "shallow_denoiser":
            method = _require(entry, "method", str, where)
            if method not in STEP_CACHE_METHODS:
                raise ArtifactError(f"{path}: components.{name} is a {method!r:.40} shallow denoiser; this edgediff "
                                    f"runs: {', '.join(STEP_CACHE_METHODS)}")
            shallow.append(ShallowDenoiserSpec(name, method, _ranged(entry, "branch", int, 0, 1000, where)))
        elif role == "controlnet":
            control = check_control_name(entry.get("control"), f"{path}: components.{name}.control")
            if any(c.control == control for c in controlnets):
                raise ArtifactError(f"{path}: two ControlNets are named {control!r}")
            controlnets.append(ControlNetSpec(name, control, _ranged(entry, "conditioning_channels", int, 1, 64, where),
                                              str(entry.get("source", ""))[:1000]))
    counts = {role: list(roles.values()).count(role) for role in ROLES}
    if counts["denoiser"] != 1 or counts["vae_decoder"] != 1 or counts["vae_encoder"] > 1 \
            or counts["shallow_denoiser"] > 1 or not 1 <= counts["text_encoder"] <= MAX_TEXT_ENCODERS:
        raise ArtifactError(f"{path}: an artifact has one denoiser, one vae_decoder, at most one vae_encoder, at most "
                            f"one shallow_denoiser and 1 to {MAX_TEXT_ENCODERS} text encoders; this one has {counts}")
    return roles, tuple(text_encoders), denoisers[0], shallow[0] if shallow else None, tuple(controlnets)


def _roles_v1(d: dict[str, Any], comps: dict[str, Any], path: Path):
    """Version 1: closed component names, the text encoders' sizes in ``text`` / ``text_2``."""
    missing = [c for c in V1_REQUIRED if c not in comps]
    if missing:
        raise ArtifactError(f"{path} lists no {', '.join(missing)}; an artifact needs {', '.join(V1_REQUIRED)}")
    unknown = [c for c in comps if c not in V1_COMPONENTS]
    if unknown:
        raise ArtifactError(f"{path}: unknown component {unknown[0]!r:.80}; known: {', '.join(V1_COMPONENTS)}")
    text_encoders = [_text_spec("text_encoder", dict(_require(d, "text", dict), tokenizer="tokenizer/tokenizer.json"),
                                " text")]
    if "text_2" in d or "text_encoder_2" in comps:
        if "text_encoder_2" not in comps:
            raise ArtifactError(f"{path} has text_2 but lists no text_encoder_2 component")
        text_encoders.append(_text_spec("text_encoder_2", _require(d, "text_2", dict), " text_2"))
    roles = {name: {"unet": "denoiser", "text_encoder_2": "text_encoder"}.get(name, name) for name in comps}
    return roles, tuple(text_encoders), DenoiserSpec("unet", "unet", _require(d, "unet_in_channels", int)), None, ()


def _check_variant_files(root: Path, component: str, v: Variant) -> None:
    """Each file of the variant inside the artifact, regular, and together of the recorded size."""
    where = f"manifest.json components.{component}.variants.{v.precision}"
    main = regular_file(artifact_file(root, v.file, f"{where}.file", MODEL_SUFFIXES), f"{component} {v.precision}")
    for extra in v.files()[1:]:
        path = artifact_file(root, extra, f"{where} (beside {v.file})", (".bin", ".data"))
        if path.exists() or path.is_symlink() or extra.endswith(".bin"):
            regular_file(path, f"{component} {v.precision}")
    actual = disk_bytes(main)
    if actual != v.bytes:
        raise ArtifactError(f"{main} ({component} {v.precision}) is {actual} bytes on disk but the manifest recorded "
                            f"{v.bytes}: the file was truncated or replaced; re-export (or re-quantize) it")
