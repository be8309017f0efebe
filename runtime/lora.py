"""LoRA files as people download them, merged into the artifact's weights at load time (no re-export).

A LoRA adds ``scale * alpha / rank * up @ down`` to a layer's weight. This module reads the file, names each
update's target as a diffusers parameter, and turns the whole set into one ``WeightPatch`` per graph, keyed
by the ONNX initializer the export's weight map (``edgediff.export.weight_map``) says holds that parameter;
the backends hand the patched weights to ONNX Runtime or OpenVINO before they compile the graph.

Formats (all ``.safetensors``; pickles are refused, they can run code):

- kohya / A1111 (``lora_unet_*``, ``lora_te_*``, SDXL's ``lora_te1_*`` / ``lora_te2_*``, with ``.alpha``):
  ``<name>.lora_down.weight`` / ``.lora_up.weight``; the name is a diffusers module path with ``_`` for ``.``
  (kohya trains SD 1.x/2.x on the diffusers UNet), or for SDXL the original (SGM) UNet's ``input_blocks`` /
  ``middle_block`` / ``output_blocks``, mapped as diffusers' ``_maybe_map_sgm_blocks_to_diffusers`` does.
  LoCon (LyCORIS) and LCM-LoRA are this format with convolution kernels (3x3 ``down``, 1x1 ``up``).
- diffusers / PEFT: ``unet.<path>.lora_A.weight`` / ``lora_B.weight``; the older ``<path>.lora.down.weight`` /
  ``lora.up.weight``, ``lora_linear_layer.down/up`` and attention-processor keys (``processor.to_q_lora.down``,
  diffusers before 0.24).

Every tensor of the file is used or the load fails naming the ones that were not (LoHa, LoKr, DoRA's
``dora_scale``, Tucker's ``lora_mid`` are other methods, refused by name): never a silent partial LoRA.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .errors import EdgediffError
from .manifest import ArtifactError, Manifest, artifact_file, read_manifest_json

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
MAX_ALPHA = 1e30  # a file's alpha, in size: scale x alpha / rank stays inside float32 (real ones: 1 to thousands)
MAX_LORA_BYTES = 8 * 2**30
SHOWN = 8  # keys or layers named in an error
SHOWN_CHARS = 160  # of each name a file controls, in an error (real ones are under 100; some are megabytes)

MODELS = ("unet", "text_encoder", "text_encoder_2")
KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                  "lora_te2_": "text_encoder_2"}
# (down suffix, up suffix) of one update, by format
PAIRS = ((".lora_down.weight", ".lora_up.weight"), (".lora_A.weight", ".lora_B.weight"),
         (".lora.down.weight", ".lora.up.weight"), (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"),
         ("_lora.down.weight", "_lora.up.weight"))
PROCESSOR = re.compile(r"(.*)\.processor\.(to_q|to_k|to_v|to_out)$")  # diffusers' attention-processor LoRAs


class LoraError(EdgediffError, ValueError):
    """A LoRA file that cannot be applied to this artifact: the message names the file and what is accepted."""


def shown(name: str, limit: int = SHOWN_CHARS) -> str:
    """A string a file controls (a tensor's or layer's name, a metadata key) as an error shows it: on one line
    (control characters escaped), cut after ``limit`` characters as prompts are, with its length when cut."""
    cut = name if len(name) <= limit else name[:limit]
    text = cut if cut.isprintable() else repr(cut)[1:-1]
    return text if cut is name else f"{text}... ({len(name):,} characters)"


def shown_list(names: list[str]) -> str:
    """The first ``SHOWN`` names, each cut, and how many more."""
    more = f" and {len(names) - SHOWN} more" if len(names) > SHOWN else ""
    return ", ".join(shown(n) for n in names[:SHOWN]) + more


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA to apply: its file and its strength (1.0 = as trained)."""

    path: Path
    scale: float = 1.0

    @classmethod
    def parse(cls, value: Any) -> LoraSpec:
        """``"file.safetensors"``, ``"file.safetensors:0.8"``, ``(file, 0.8)`` or a LoraSpec."""
        if isinstance(value, LoraSpec):
            return cls(Path(value.path), _scale(value.scale, value.path))
        if isinstance(value, (tuple, list)) and len(value) == 2:
            return cls(Path(value[0]), _scale(value[1], value[0]))
        if isinstance(value, (str, Path)):
            text = str(value)
            head, sep, tail = text.rpartition(":")
            if sep and head and not tail.startswith(("\\", "/")):  # not a Windows drive's colon
                try:
                    scale = float(tail)
                except ValueError:  # a colon in the file's name
                    return cls(Path(text), 1.0)
                return cls(Path(head), _scale(scale, head))
            return cls(Path(text), 1.0)
        raise LoraError(f"a LoRA is a file path, 'FILE:SCALE' or (file, scale); got {value!r:.80}")

    def record(self) -> dict[str, Any]:
        return {"file": str(self.path), "scale": self.scale}


def _scale(value: Any, path: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not -100 <= value <= 100:
        raise LoraError(f"LoRA {path}: the scale must be a finite number in [-100, 100] (1.0 = as trained), got "
                        f"{value!r:.40}")
    return float(value)


@dataclass
class Update:
    """One low-rank update from a file: its target (model and module path, once resolved) and its factors."""

    name: str  # as the file names the layer
    down: np.ndarray  # (rank, in[, kh, kw])
    up: np.ndarray  # (out, rank[, 1, 1])
    alpha: float | None
    model: str = ""
    module: str = ""

    def factors(self, scale: float) -> tuple[np.ndarray, np.ndarray]:
        """(``up x scale x alpha / rank``, ``down``) as float32 matrices: the update, flattened to (out, in x kh x
        kw) as the weight is, is their product."""
        rank = self.down.shape[0]
        factor = scale * (self.alpha / rank if self.alpha is not None else 1.0)
        up = self.up.reshape(self.up.shape[0], rank).astype(np.float32, copy=False) * np.float32(factor)
        return up, self.down.reshape(rank, -1).astype(np.float32, copy=False)

    def target_shape(self) -> tuple[int, ...]:
        return (self.up.shape[0],) + tuple(self.down.shape[1:])


def read_tensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """A LoRA or embedding file's tensors (float32) and its metadata, with errors that say what the file is and
    what is accepted."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise LoraError(f"{path}: a {path.suffix} file is a Python pickle, which can run code when read; edgediff "
                        "reads only .safetensors (convert it once with a trusted tool, e.g. "
                        "`safetensors.torch.save_file(torch.load(f), 'out.safetensors')`)")
    if not path.is_file():
        raise LoraError(f"{path}: no such file (a LoRA or embedding is a .safetensors file)")
    if path.stat().st_size > MAX_LORA_BYTES:
        raise LoraError(f"{path} is {path.stat().st_size / 2**30:.1f} GiB; a LoRA or embedding is at most "
                        f"{MAX_LORA_BYTES // 2**30} GiB: is it a whole checkpoint? (export that instead)")
    from safetensors import SafetensorError, safe_open
    from safetensors.numpy import load_file

    try:
        with safe_open(str(path), framework="np") as f:
            metadata = dict(f.metadata() or {})
        try:
            tensors = load_file(str(path))
        except TypeError as e:  # numpy has no bfloat16, in which many LoRAs are saved
            if "bfloat16" not in str(e):
                raise
            tensors = _read_with_bfloat16(path)
    except (SafetensorError, OSError, ValueError, TypeError, KeyError) as e:
        raise LoraError(f"{path} is not a readable .safetensors file ({shown(str(e), 200)}); LoRAs and embeddings "
                        "are read from .safetensors only") from None  # the message may quote the header: one line
    out = {}
    for key, a in tensors.items():
        if not np.issubdtype(a.dtype, np.floating) and a.dtype.name != "bfloat16":  # ml_dtypes' bfloat16
            raise LoraError(f"{path}: tensor {key!r:.120} is {a.dtype}, not floating point")
        a = a.astype(np.float32)
        if not np.isfinite(a).all():
            raise LoraError(f"{path}: tensor {key!r:.120} holds NaN or infinite values; the file is damaged")
        out[key] = a
    if not out:
        raise LoraError(f"{path} holds no tensors")
    return out, metadata


SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16}


def _read_with_bfloat16(path: Path) -> dict[str, np.ndarray]:
    """The safetensors layout read directly (an 8-byte header length, a JSON header of dtype, shape and byte
    offsets, then the data), for files with bfloat16 tensors: numpy has no such dtype, so they are widened to
    float32 by hand (bfloat16 is float32's upper half)."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        if not 0 < size < 100 * 2**20:
            raise ValueError(f"header of {size} bytes")
        header = json.loads(f.read(size))
        data = f.read()
    out = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if info["dtype"] not in SAFETENSORS_DTYPES:
            raise ValueError(f"tensor {key} is {info['dtype']}, not floating point")
        start, end = info["data_offsets"]
        a = np.frombuffer(data[start:end], dtype=SAFETENSORS_DTYPES[info["dtype"]]).reshape(info["shape"])
        out[key] = (a.astype(np.uint32) << 16).view(np.float32) if info["dtype"] == "BF16" else a
    return out


def read_updates(path: Path) -> list[Update]:
    """The file's low-rank updates, each with the layer name as the file spells it; every key is used, else
    LoraError naming the keys that are not part of a LoRA this module reads."""
    tensors, metadata = read_tensors(path)
    alphas = _peft_alphas(path, metadata)
    used: set[str] = set()
    updates = []
    for key in sorted(tensors):
        for down_suffix, up_suffix in PAIRS:
            if not key.endswith(down_suffix):
                continue
            name = key[: -len(down_suffix)]
            up_key = name + up_suffix
            if up_key not in tensors:
                raise LoraError(f"{path}: {shown(key)} has no {shown(up_key)} beside it; the file is incomplete")
            down, up = tensors[key], tensors[up_key]
            if down.ndim not in (2, 4) or up.ndim != down.ndim or up.shape[1] != down.shape[0] \
                    or (up.ndim == 4 and up.shape[2:] != (1, 1)):
                raise LoraError(f"{path}: {shown(name)}'s factors do not form a low-rank update (down "
                                f"{list(down.shape)}, up {list(up.shape)}; accepted: down (rank, in[, kh, kw]), up "
                                "(out, rank[, 1, 1]) with rank >= 1)")
            if down.shape[0] == 0:
                raise LoraError(f"{path}: {shown(name)} has rank 0 (down {list(down.shape)}): an empty update; the "
                                "file is damaged")
            alpha = alphas.get(name.partition(".")[0])
            if alpha is not None:
                alpha = alpha(down.shape[0])
            for alpha_key in (name + ".alpha", name.removesuffix(".lora") + ".alpha"):
                if alpha_key in tensors:
                    alpha = _alpha(path, alpha_key, tensors[alpha_key])
                    used.add(alpha_key)
            used.update((key, up_key))
            updates.append(Update(name, down, up, alpha))
    unused = sorted(set(tensors) - used)
    if unused:
        raise LoraError(f"{path}: {len(unused)} of its {len(tensors)} tensors are not part of a LoRA edgediff reads: "
                        f"{shown_list(unused)}. Accepted: kohya/A1111 (lora_down/lora_up/alpha, LoCon, LCM-LoRA) and "
                        "diffusers/PEFT (lora_A/lora_B, lora.down/lora.up, to_q_lora.down) LoRAs; LoHa, LoKr, DoRA and Tucker "
                        "(lora_mid) files are not supported")
    if not updates:
        raise LoraError(f"{path} holds no LoRA layers")
    return updates


def _alpha(path: Path, key: str, value: np.ndarray) -> float:
    """A kohya ``.alpha``: one number (read_tensors has checked it is floating point and finite)."""
    if value.size != 1:
        raise LoraError(f"{path}: {shown(key)} holds {value.size} values (shape {list(value.shape)}); an alpha is one "
                        "number (kohya writes a scalar)")
    alpha = float(value.reshape(-1)[0])
    if not abs(alpha) <= MAX_ALPHA:
        raise LoraError(f"{path}: {shown(key)} is {alpha:g}; accepted: at most {MAX_ALPHA:g} in size (alpha is "
                        "usually the rank or less)")
    return alpha


def _peft_alphas(path: Path, metadata: dict[str, str]) -> dict[str, Callable[[int], float]]:
    """Per model, rank -> alpha from the PEFT adapter config diffusers stores in the file's metadata
    (``lora_adapter_metadata``: ``unet.lora_alpha``, ``unet.r``...); without it, alpha = rank (scale 1)."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        config = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise LoraError(f"{path}: its lora_adapter_metadata is not the JSON diffusers writes ({shown(str(e))})") \
            from None
    if not isinstance(config, dict):
        raise LoraError(f"{path}: its lora_adapter_metadata is a JSON {type(config).__name__}, not the object "
                        "diffusers writes ({\"unet.lora_alpha\": 8, \"unet.r\": 8, ...})")
    out = {}
    for model in {key.partition(".")[0] for key in config}:
        if config.get(f"{model}.alpha_pattern") or config.get(f"{model}.use_dora"):
            raise LoraError(f"{path}: its {shown(model)} adapter uses "
                            + ("DoRA" if config.get(f"{model}.use_dora") else "per-module alphas (alpha_pattern)")
                            + ", which edgediff does not merge; accepted: plain LoRA (one lora_alpha per model)")
        lora_alpha = config.get(f"{model}.lora_alpha")
        if lora_alpha is None:
            continue
        if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, (int, float)) \
                or not abs(lora_alpha) <= MAX_ALPHA:  # NaN and Infinity too (Python's json reads them)
            raise LoraError(f"{path}: its lora_adapter_metadata gives {shown(model)}.lora_alpha = "
                            f"{shown(json.dumps(lora_alpha))}; accepted: a finite number at most {MAX_ALPHA:g} in "
                            "size (PEFT's lora_alpha, usually the rank or less)")
        rslora = bool(config.get(f"{model}.use_rslora"))
        # PEFT's scaling is lora_alpha / r (rsLoRA: / sqrt(r)); Update.factors divides alpha by the rank
        out[model] = (lambda r, a=float(lora_alpha), rs=rslora: a * math.sqrt(r) if rs else a)
    return out


# -- naming: the file's layer names -> diffusers module paths ---------------------------------------------------

SGM_WHOLE = {"time_embed_0": "time_embedding_linear_1", "time_embed_2": "time_embedding_linear_2",
             "label_emb_0_0": "add_embedding_linear_1", "label_emb_0_2": "add_embedding_linear_2",
             "input_blocks_0_0": "conv_in", "out_2": "conv_out"}
SGM_RESNET = {"in_layers_2": "conv1", "out_layers_3": "conv2", "emb_layers_1": "time_emb_proj",
              "skip_connection": "conv_shortcut", "op": "conv"}
SGM_INNER = ("resnets", "attentions", "upsamplers")


def sgm_to_diffusers(name: str, layers_per_block: int) -> str:
    """A kohya SDXL name in the original UNet's layout (``input_blocks_4_1_...``) -> the diffusers path, ``_``
    for ``.``: diffusers' ``_maybe_map_sgm_blocks_to_diffusers`` and ``_convert_unet_lora_key``, by token."""
    if name in SGM_WHOLE:
        return SGM_WHOLE[name]
    per = layers_per_block + 1
    m = re.fullmatch(r"input_blocks_(\d+)_(\d+)_(.+)", name)
    if m:
        i, inner, rest = int(m[1]), int(m[2]), m[3]
        if rest == "op":
            return f"down_blocks_{(i - 1) // per}_downsamplers_0_conv"
        return f"down_blocks_{(i - 1) // per}_{SGM_INNER[inner]}_{(i - 1) % per}_{SGM_RESNET.get(rest, rest)}"
    m = re.fullmatch(r"middle_block_(\d+)_(.+)", name)
    if m:
        part = {0: "resnets_0", 1: "attentions_0", 2: "resnets_1"}.get(int(m[1]))
        if part is not None:
            return f"mid_block_{part}_{SGM_RESNET.get(m[2], m[2])}"
    m = re.fullmatch(r"output_blocks_(\d+)_(\d+)_(.+)", name)
    if m:
        i, inner, rest = int(m[1]), int(m[2]), m[3]
        if inner < len(SGM_INNER):
            layer = i % per if inner < 2 else 0
            return f"up_blocks_{i // per}_{SGM_INNER[inner]}_{layer}_{SGM_RESNET.get(rest, rest)}"
    return name


def _without_text_model(path: str) -> str:
    """transformers 5's CLIPTextModel has no ``text_model.`` level (its CLIPTextModelWithProjection, SDXL's
    second encoder, still has); files made with older versions have it for both: compared without it."""
    return path.removeprefix("text_model.")


@dataclass
class WeightMap:
    """One graph's map (``<component>/weights.json``): diffusers parameter -> (initializer, layout, shape)."""

    component: str
    model: str
    weights: dict[str, tuple[str, str, tuple[int, ...]]]
    unread: frozenset[str]


def weight_maps(root: Path, manifest: Manifest, precision: dict[str, str]) -> dict[str, list[WeightMap]]:
    """The weight maps of the graphs this pipeline loads, by diffusers model."""
    maps: dict[str, list[WeightMap]] = {}
    for component, chosen in precision.items():
        if component not in manifest.components or chosen not in manifest.components[component]:
            continue
        fp32 = manifest.components[component].get("fp32")
        if fp32 is None or fp32.weights is None:
            continue
        path = artifact_file(root, fp32.weights, f"{component} weight map", (".json",))
        try:
            data = read_manifest_json(path)
            weights = {p: (str(v[0]), str(v[1]), tuple(int(d) for d in v[2])) for p, v in data["weights"].items()}
            unread = frozenset(data.get("unread", []))
            model = data["model"]
        except (ArtifactError, KeyError, TypeError, IndexError, AttributeError) as e:
            raise ArtifactError(f"{path} is not an edgediff weight map ({e}); re-export the artifact") from None
        maps.setdefault(model, []).append(WeightMap(component, model, weights, unread))
    return maps


def resolve(updates: list[Update], path: Path, maps: dict[str, list[WeightMap]], manifest: Manifest) -> None:
    """Fill each update's ``model`` and ``module`` from its file name; LoraError when a layer names a model or
    module this artifact does not have (a LoRA for another architecture)."""
    tables = {model: _lookup(graphs) for model, graphs in maps.items()}
    layers_per_block = _layers_per_block(maps.get("unet", []))
    unknown: list[str] = []
    for u in updates:
        model, module = _target(u.name, tables, layers_per_block)
        if model not in MODELS:
            unknown.append(u.name)
            continue
        if model not in maps:
            hint = " (an SDXL LoRA: it changes a second text encoder)" if model == "text_encoder_2" else ""
            raise LoraError(f"{path} changes {model}{hint}, which this {manifest.family} artifact does not have"
                            + ("" if manifest.components.get(model) is None else
                               " in a form LoRA can merge into (exported before edgediff recorded weight maps: "
                               "re-export it)"))
        if module is None:
            unknown.append(u.name)
            continue
        u.model, u.module = model, module
    if unknown:
        raise LoraError(f"{path}: {len(unknown)} of its {len(updates)} layers name modules this {manifest.family} "
                        f"artifact does not have: {shown_list(unknown)}. Was the LoRA made for another model (SD 1.x, "
                        "SD 2.x and SDXL LoRAs are not interchangeable)?")


def _lookup(graphs: list[WeightMap]) -> dict[str, str]:
    """Module path (and its kohya spelling, ``_`` for ``.``; a text encoder's also without ``text_model.``) ->
    module path, for every mapped or unread weight."""
    table = {}
    for g in graphs:
        for param in list(g.weights) + list(g.unread):
            module = param.removesuffix(".weight")
            for spelling in {module, _without_text_model(module)} if g.model != "unet" else {module}:
                table[spelling] = module
                table[spelling.replace(".", "_")] = module
    return table


def _target(name: str, tables: dict[str, dict[str, str]], layers_per_block: int) -> tuple[str, str | None]:
    """The (model, module path) a file's layer name targets; the module None when this artifact has none such."""
    for prefix, model in KOHYA_PREFIXES.items():
        if name.startswith(prefix):
            rest = name[len(prefix):]
            if model == "unet" and re.match(r"(input_blocks|middle_block|output_blocks|time_embed|label_emb|out_2)",
                                            rest):
                rest = sgm_to_diffusers(rest, layers_per_block)
            if model != "unet":
                rest = rest.removeprefix("text_model_")
            return model, tables.get(model, {}).get(rest)
    head, _, rest = name.partition(".")
    m = PROCESSOR.fullmatch(rest)
    if m:
        rest = f"{m[1]}.{m[2]}" + (".0" if m[2] == "to_out" else "")
    if head in MODELS and head != "unet":
        rest = _without_text_model(rest)
    return head, tables.get(head, {}).get(rest)


def _layers_per_block(graphs: list[WeightMap]) -> int:
    resnets = {p.split(".")[3] for g in graphs for p in g.weights if p.startswith("down_blocks.0.resnets.")}
    return max(len(resnets), 1)


# -- the patch: initializer -> its merged weight ----------------------------------------------------------------

@dataclass
class WeightPatch:
    """What one graph's weights become: initializer name -> base weight -> merged weight (same dtype)."""

    component: str
    changes: dict[str, Callable[[np.ndarray], np.ndarray]]
    identity: list[Any]  # what the compile cache keys the patched graph by: the LoRA files and scales

    def apply(self, name: str, base: np.ndarray) -> np.ndarray:
        return self.changes[name](base)


def plan(loras: list[LoraSpec], root: Path, manifest: Manifest, precision: dict[str, str]) -> dict[str, WeightPatch]:
    """Read and resolve every LoRA; the patch of each graph they change. Everything is checked here, before
    any graph is compiled: files, formats, targets and the chosen variants."""
    if not loras:
        return {}
    if manifest.denoiser.kind != "unet":  # its graphs carry no weight map to patch (LoRA key maps are UNet/CLIP's)
        raise LoraError(f"LoRAs are applied to UNet models (SD 1.x/2.x, SDXL); this {manifest.family} artifact's "
                        f"denoiser is a {manifest.denoiser.kind}, for which edgediff merges no LoRA yet: load it "
                        "without --lora")
    maps = weight_maps(root, manifest, precision)
    per_initializer: dict[tuple[str, str, str], list[tuple[Update, float]]] = {}  # (graph, initializer, layout)
    identity = []
    for spec in loras:
        updates = read_updates(spec.path)
        resolve(updates, spec.path, maps, manifest)
        identity.append(file_identity(spec.path) + [spec.scale])
        for u in updates:
            param = f"{u.module}.weight"
            targets = [(g.component, g.weights[param]) for g in maps[u.model] if param in g.weights]
            for component, (initializer, layout, shape) in targets:
                want = u.target_shape()
                if math.prod(want) != math.prod(shape) or want[0] != shape[0]:
                    raise LoraError(f"{spec.path}: layer {shown(u.name)} is {list(want)} but {u.model}'s {u.module} "
                                    f"weight is {list(shape)}: the LoRA was made for another model (SD 1.x, SD 2.x and "
                                    "SDXL LoRAs are not interchangeable)")
                per_initializer.setdefault((component, initializer, layout), []).append((u, spec.scale))
    changes: dict[str, dict[str, Callable[[np.ndarray], np.ndarray]]] = {}
    for (component, initializer, layout), items in per_initializer.items():
        changes.setdefault(component, {})[initializer] = _merger(items, layout)
    for component in changes:
        check_float(component, precision.get(component, "fp32"), "a LoRA")
    return {component: WeightPatch(component, merges, identity) for component, merges in changes.items()}


def check_float(component: str, chosen: str, what: str) -> None:
    if chosen == "fp16-cuda":  # ONNX Runtime's fusions packed Q, K and V into new weights: no map to merge into
        raise LoraError(f"{what} changes {component}, loaded here at fp16-cuda, whose attention weights ONNX "
                        "Runtime's optimizer packed together (no weight map reaches them). Load it at fp16 or fp32 "
                        f"(--precision {component}=fp16)")
    if chosen not in ("fp32", "fp16"):
        raise LoraError(
            f"{what} changes {component}, loaded here at {chosen}: LoRAs and embeddings merge into float weights, "
            f"and a {chosen} graph holds quantized ones calibrated for the base model. Load {component} at fp32 "
            f"(precision='{component}=fp32', --precision {component}=fp32) or fp16")


def file_identity(path: Path) -> list[Any]:
    """What the compile cache keys a patched graph by: the file's path, size and modification time."""
    stat = Path(path).stat()
    return [str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns]


def combine(*plans: dict[str, WeightPatch]) -> dict[str, WeightPatch]:
    """Several plans' patches (LoRAs, embeddings) as one patch per graph."""
    out: dict[str, WeightPatch] = {}
    for patches in plans:
        for component, patch in patches.items():
            if component in out:
                overlap = set(out[component].changes) & set(patch.changes)
                if overlap:
                    raise LoraError(f"two patches change {component}'s {sorted(overlap)[0]}")
                patch = WeightPatch(component, out[component].changes | patch.changes,
                                    out[component].identity + patch.identity)
            out[component] = patch
    return out


def _merger(items: list[tuple[Update, float]], layout: str):
    def merge(base: np.ndarray) -> np.ndarray:
        """The weight plus every update, summed in float32, in the weight's dtype. A transposed weight (a Linear
        folded into MatMul) gets ``down.T @ up.T``: the update already transposed, computed contiguous."""
        merged = None  # the updates' sum, then the weight added in: two passes over the weight's memory
        for u, scale in items:
            up, down = u.factors(scale)
            product = down.T @ up.T if layout == "transposed" else up @ down
            merged = product if merged is None else np.add(merged, product, out=merged)
        merged = merged.reshape(base.shape)
        np.add(merged, base, out=merged)
        return merged if base.dtype == np.float32 else merged.astype(base.dtype)

    return merge
