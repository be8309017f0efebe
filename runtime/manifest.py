"""The artifact folder's contract: ``manifest.json``, versioned and validated on load.

One canonical name per component, used by export, quantize, runtime and bench::

    ARTIFACT/
      manifest.json
      tokenizer/tokenizer.json
      scheduler/scheduler_config.json
      text_encoder/model.onnx   unet/model.onnx   vae_decoder/model.onnx   vae_encoder/model.onnx
      tokenizer_2/tokenizer.json  text_encoder_2/model.onnx     (SDXL: its second text encoder)

Each component lists its variants by precision (``fp32`` from export; ``fp16``,
``int8``... added later by ``edgediff quantize``), each with its file, size,
input/output signature and measured parity.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FORMAT_NAME = "edgediff-artifact"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
COMPONENTS = ("text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder")
REQUIRED_COMPONENTS = ("text_encoder", "unet", "vae_decoder")
PREDICTION_TYPES = ("epsilon", "v_prediction")
# Generation settings used when neither the caller nor the artifact's ``defaults`` name them.
DEFAULT_STEPS = 25
DEFAULT_GUIDANCE = 7.5


def check_defaults(defaults: dict[str, Any], where: str = "defaults") -> dict[str, Any]:
    """The model's recommended generation settings: ``steps`` (int >= 1) and ``guidance`` (number >= 0), both optional.

    SD-Turbo wants 1 step and no guidance, SDXL guidance 5, the embedded shapes
    model guidance 4: the artifact says so, and callers that name neither get them.
    """
    if not isinstance(defaults, dict):
        raise ArtifactError(f"{where} must be an object with steps and/or guidance, got {defaults!r}")
    unknown = set(defaults) - {"steps", "guidance"}
    if unknown:
        raise ArtifactError(f"{where} has unknown keys {sorted(unknown)}; accepted: steps, guidance")
    steps = defaults.get("steps")
    if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool) or steps < 1):
        raise ArtifactError(f"{where}.steps must be an integer >= 1, got {steps!r}")
    guidance = defaults.get("guidance")
    if guidance is not None and (not isinstance(guidance, (int, float)) or isinstance(guidance, bool) or not guidance >= 0):
        raise ArtifactError(f"{where}.guidance must be a number >= 0, got {guidance!r}")
    return {k: v for k, v in (("steps", steps), ("guidance", None if guidance is None else float(guidance))) if v is not None}


class ArtifactError(ValueError):
    """The artifact folder is missing, damaged, or of a format this version cannot read."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: float32, float16, int64, int32
    shape: tuple[int | str, ...]  # ints are fixed, strings are named dynamic axes

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TensorSpec:
        return cls(d["name"], d["dtype"], tuple(d["shape"]))


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
        return d

    def files(self) -> list[str]:
        """Every file the variant needs, relative to the root (an IR's .bin beside its .xml)."""
        return [self.file, str(Path(self.file).with_suffix(".bin"))] if self.file.endswith(".xml") else [self.file]

    @classmethod
    def from_json(cls, precision: str, d: dict[str, Any]) -> Variant:
        return cls(
            precision,
            d["file"],
            int(d["bytes"]),
            tuple(TensorSpec.from_json(t) for t in d["inputs"]),
            tuple(TensorSpec.from_json(t) for t in d["outputs"]),
            dict(d.get("quality", {})),
            tuple(d.get("backends", ())),
        )


@dataclass
class Manifest:
    family: str
    prediction_type: str
    sample_size: int  # default image side in pixels
    vae_scale_factor: int
    latent_channels: int
    unet_in_channels: int
    scaling_factor: float
    text_max_length: int
    text_hidden_size: int
    pad_token_id: int
    scheduler: str  # our name of the checkpoint's own scheduler
    components: dict[str, dict[str, Variant]]
    provenance: dict[str, Any] = field(default_factory=dict)
    random_weights: bool = False
    shift_factor: float = 0.0
    # SDXL: the second text encoder's tokenizer and sizes (keys as in ``text``),
    # and whether an absent negative prompt means zero embeddings
    text_2: dict[str, Any] | None = None
    force_zeros_for_empty_prompt: bool = False
    # the model's recommended steps / guidance (see check_defaults)
    defaults: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def settings(self, steps: int | None = None, guidance: float | None = None) -> tuple[int, float]:
        """The caller's steps and guidance where given, else the model's recommended ones, else 25 and 7.5."""
        return (self.defaults.get("steps", DEFAULT_STEPS) if steps is None else steps,
                self.defaults.get("guidance", DEFAULT_GUIDANCE) if guidance is None else guidance)

    @property
    def is_xl(self) -> bool:
        return self.text_2 is not None

    tokenizer_file = "tokenizer/tokenizer.json"
    scheduler_file = "scheduler/scheduler_config.json"

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
        return {
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "family": self.family,
            "prediction_type": self.prediction_type,
            "sample_size": self.sample_size,
            "vae_scale_factor": self.vae_scale_factor,
            "latent_channels": self.latent_channels,
            "unet_in_channels": self.unet_in_channels,
            "scaling_factor": self.scaling_factor,
            "shift_factor": self.shift_factor,
            "text": {
                "max_length": self.text_max_length,
                "hidden_size": self.text_hidden_size,
                "pad_token_id": self.pad_token_id,
                "tokenizer": self.tokenizer_file,
            },
            **({"text_2": self.text_2, "force_zeros_for_empty_prompt": self.force_zeros_for_empty_prompt}
               if self.text_2 is not None else {}),
            "scheduler": {"default": self.scheduler, "config": self.scheduler_file},
            **({"defaults": self.defaults} if self.defaults else {}),
            "random_weights": self.random_weights,
            "components": {
                name: {"variants": {p: v.to_json() for p, v in variants.items()}}
                for name, variants in self.components.items()
            },
            "provenance": self.provenance,
        }

    def save(self, root: Path) -> None:
        (Path(root) / MANIFEST_FILE).write_text(json.dumps(self.to_json(), indent=2) + "\n")


def _require(d: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str = "") -> Any:
    if key not in d:
        raise ArtifactError(f"manifest.json{where} lacks the required key {key!r}")
    value = d[key]
    if not isinstance(value, kind) or (kind in (int, float) and isinstance(value, bool)):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ArtifactError(f"manifest.json{where}: {key!r} must be {names}, got {value!r}")
    return value


def load_manifest(root: str | Path) -> Manifest:
    """Read and validate ``root/manifest.json``; every referenced file must exist."""
    root = Path(root)
    if not root.is_dir():
        raise ArtifactError(f"{root} is not an artifact folder (no such directory); export one with `edgediff export`")
    path = root / MANIFEST_FILE
    if not path.is_file():
        raise ArtifactError(f"{path} is missing: {root} is not an edgediff artifact (or its export did not finish)")
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path} is not valid JSON ({e}); re-export the artifact") from e
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
        raise ArtifactError(f"{path}: prediction_type {prediction!r} is not one of {', '.join(PREDICTION_TYPES)}")
    text = _require(d, "text", dict)
    sched = _require(d, "scheduler", dict)
    comps = _require(d, "components", dict)
    missing = [c for c in REQUIRED_COMPONENTS if c not in comps]
    if missing:
        raise ArtifactError(f"{path} lists no {', '.join(missing)}; an artifact needs {', '.join(REQUIRED_COMPONENTS)}")
    components: dict[str, dict[str, Variant]] = {}
    for name, entry in comps.items():
        if name not in COMPONENTS:
            raise ArtifactError(f"{path}: unknown component {name!r}; known: {', '.join(COMPONENTS)}")
        variants = _require(entry, "variants", dict, f" components.{name}")
        try:
            components[name] = {p: Variant.from_json(p, v) for p, v in variants.items()}
        except (KeyError, TypeError, ValueError) as e:
            raise ArtifactError(f"{path}: components.{name} has a malformed variant ({e!r})") from e
        for v in components[name].values():
            for f in v.files():
                if not (root / f).is_file():
                    raise ArtifactError(f"{root / f} is missing ({name} {v.precision}); the artifact is incomplete")
    m = Manifest(
        family=_require(d, "family", str),
        prediction_type=prediction,
        sample_size=_require(d, "sample_size", int),
        vae_scale_factor=_require(d, "vae_scale_factor", int),
        latent_channels=_require(d, "latent_channels", int),
        unet_in_channels=_require(d, "unet_in_channels", int),
        scaling_factor=float(_require(d, "scaling_factor", (int, float))),
        shift_factor=float(d.get("shift_factor") or 0.0),
        text_max_length=_require(text, "max_length", int, " text"),
        text_hidden_size=_require(text, "hidden_size", int, " text"),
        pad_token_id=_require(text, "pad_token_id", int, " text"),
        scheduler=_require(sched, "default", str, " scheduler"),
        components=components,
        provenance=dict(d.get("provenance", {})),
        random_weights=bool(d.get("random_weights", False)),
        defaults=check_defaults(d.get("defaults", {}), f"{path}: defaults"),
        format_version=version,
    )
    if "text_2" in d or "text_encoder_2" in components:
        text_2 = _require(d, "text_2", dict)
        for key, kind in (("max_length", int), ("hidden_size", int), ("pad_token_id", int), ("tokenizer", str)):
            _require(text_2, key, kind, " text_2")
        if "text_encoder_2" not in components:
            raise ArtifactError(f"{path} has text_2 but lists no text_encoder_2 component")
        m.text_2 = dict(text_2)
        m.force_zeros_for_empty_prompt = bool(d.get("force_zeros_for_empty_prompt", False))
    for rel in (m.tokenizer_file, m.scheduler_file) + ((m.text_2["tokenizer"],) if m.text_2 else ()):
        if not (root / rel).is_file():
            raise ArtifactError(f"{root / rel} is missing; the artifact is incomplete")
    return m
