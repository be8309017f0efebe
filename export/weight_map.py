"""Which ONNX initializer holds which diffusers parameter: the map LoRA merging needs at load time.

PyTorch's ONNX exporter keeps a parameter's name when the graph reads it as is (a Conv's kernel, a Gemm with
``transB``, an Embedding's table) but folds ``x @ W.T`` into a MatMul on an anonymous transposed constant
(``onnx::MatMul_2838``). Names alone therefore cannot say where a Linear's weight went, and a scope-name
heuristic could be fooled by a wrapper; values can. Before the module is released, every Linear, Conv2d and
Embedding weight is fingerprinted (a hash of its bytes, and of its transpose for a Linear); each initializer
of the written graph is hashed the same way, and a match records ``parameter -> (initializer, layout, shape)``
(the parameter's own shape, so that a LoRA of other widths is refused before anything is compiled):

- ``as_is``: the initializer is the parameter (conv kernels, Gemm weights, embedding tables);
- ``transposed``: it is the parameter's transpose (a Linear folded into MatMul).

Weights that two parameters share the bytes of (an exporter may deduplicate them) are left out: merging a
LoRA into one would change the other. The map is written beside the graph as ``weights.json`` and named by
the manifest's variant (``Variant.weights``); ``edgediff.runtime.lora`` reads it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT = "edgediff-weight-map"
FILE = "weights.json"
AS_IS, TRANSPOSED = "as_is", "transposed"
LAYOUTS = (AS_IS, TRANSPOSED)
# the layers LoRA, LoCon and textual inversion change
MAPPED_LAYERS = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Embedding)

Fingerprints = dict[str, list[tuple[str, str, list[int]]]]  # hash -> [(parameter, layout, its diffusers shape)]


def _digest(raw: bytes, shape: tuple[int, ...]) -> str:
    h = hashlib.blake2b(repr(tuple(shape)).encode(), digest_size=16)
    h.update(raw)
    return h.hexdigest()


def fingerprints(model: torch.nn.Module) -> Fingerprints:
    """Each mapped layer's weight of ``model`` by the hash of its float32 bytes (a Linear's also transposed)."""
    prints: Fingerprints = {}
    for name, module in model.named_modules():
        if not isinstance(module, MAPPED_LAYERS) or getattr(module, "weight", None) is None:
            continue
        weight = module.weight.detach().to(torch.float32)
        param = f"{name}.weight"
        forms = [(weight, AS_IS)] + ([(weight.t(), TRANSPOSED)] if isinstance(module, torch.nn.Linear) else [])
        for tensor, layout in forms:
            a = tensor.contiguous().numpy()
            prints.setdefault(_digest(a.tobytes(), a.shape), []).append((param, layout, list(weight.shape)))
    return prints


def _initializer_bytes(tensor, folder: Path) -> tuple[bytes, tuple[int, ...]] | None:
    """A float32 initializer's raw bytes (inline or in its external data file), else None."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    if tensor.data_type != onnx.TensorProto.FLOAT:
        return None
    shape = tuple(int(d) for d in tensor.dims)
    if uses_external_data(tensor):
        info = ExternalDataInfo(tensor)
        with open(folder / info.location, "rb") as f:
            f.seek(info.offset or 0)
            raw = f.read(info.length) if info.length else f.read()
    elif tensor.raw_data:
        raw = tensor.raw_data
    else:
        raw = np.asarray(tensor.float_data, dtype=np.float32).tobytes()
    return raw, shape


def unread_parameters(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> list[str]:
    """The mapped layers' weights that ``module``'s outputs do not depend on (autograd on one sample).

    SDXL's first text encoder gives its penultimate layer, so its last layer is computed and dropped: the
    exporter prunes it and a LoRA's change to it changes nothing, in diffusers as here."""
    names = [n for n, m in module.named_modules() if isinstance(m, MAPPED_LAYERS) and getattr(m, "weight", None) is not None]
    params = [module.get_submodule(n).weight for n in names]
    with torch.enable_grad():
        outputs = module(*args)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        total = sum(o.float().sum() for o in outputs)
        grads = torch.autograd.grad(total, params, allow_unused=True)
    return [n for n, g in zip(names, grads) if g is None]


def write_weight_map(graph: Path, model_name: str, prints: Fingerprints, unread: list[str] = (),
                     prefix: str = "") -> dict[str, Any]:
    """Match ``graph``'s initializers to the fingerprinted parameters; write ``weights.json`` beside it.

    ``unread``: parameters (as named from the contract's module; ``prefix`` is the wrapper's path to the
    diffusers model) that the graph's outputs do not depend on, recorded so that a LoRA touching them is
    accepted as the no-op it is. Returns figures for the manifest: parameters mapped, unread, and those left
    out otherwise (not found as an initializer, or sharing their bytes with another parameter)."""
    import onnx

    graph = Path(graph)
    model = onnx.load(str(graph), load_external_data=False)
    weights: dict[str, list[str]] = {}
    for tensor in model.graph.initializer:
        found = _initializer_bytes(tensor, graph.parent)
        if found is None:
            continue
        matches = prints.get(_digest(*found), [])
        if len(matches) == 1:
            param, layout, shape = matches[0]
            weights[param] = [tensor.name, layout, shape]
    every = {p for matches in prints.values() for p, *_ in matches}
    shared = {p for matches in prints.values() if len(matches) > 1 for p, *_ in matches}
    unread_weights = sorted({f"{n[len(prefix):]}.weight" for n in unread if n.startswith(prefix)} - set(weights))
    record = {"format": FORMAT, "model": model_name, "graph": graph.name, "weights": dict(sorted(weights.items())),
              "unread": unread_weights}
    (graph.parent / FILE).write_text(json.dumps(record, indent=0) + "\n")
    return {"mapped": len(weights), "unread": len(unread_weights),
            "unmapped": len(every - set(weights) - set(unread_weights)), "shared": len(shared)}
