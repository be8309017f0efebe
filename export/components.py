"""One export function per component, each with a declared contract.

Every contract names the graph's inputs and outputs, their dtypes and dynamic
axes, and builds sample inputs. ``export_component`` traces the wrapper with
PyTorch's ONNX exporter (opset 17), then runs the ONNX graph in ONNX Runtime
on the sample inputs and compares with PyTorch: the error goes into the
manifest, and over ``max_rel_err`` the export fails.

Why torch.onnx and not optimum's exporter: optimum-onnx pins
``transformers<4.58`` and ``optimum~=2.1``, which clash with the diffusers and
transformers this project pins; the four SD graphs are simple enough that
the exporter plus a parity check is less code than the shim.
"""

from __future__ import annotations

import gc
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from edgediff.runtime.manifest import TensorSpec, Variant, disk_bytes

from .deepcache import residual_kwargs
from .onnx_io import consolidate_external_data, save_onnx
from .weight_map import FILE as WEIGHT_MAP_FILE
from .weight_map import Fingerprints, unread_parameters, write_weight_map

OPSET = 17


class ExportError(RuntimeError):
    """An exported graph failed its parity check or could not be written."""


@dataclass
class Contract:
    name: str
    module: torch.nn.Module
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    sample: Callable[[], tuple[torch.Tensor, ...]]
    max_rel_err: float = 1e-3
    variant: str = "fp32"  # the manifest's variant name: fp32, or "tiny" for a tiny VAE's graphs
    # a VAE graph in other latent units than the checkpoint's VAE (a tiny VAE: its own scaling factor, 1.0)
    scaling_factor: float | None = None
    shift_factor: float = 0.0  # ... and its shift (taesd3's is SD3's 0.0609; TAESD's 0)

    @property
    def file(self) -> str:
        return f"{self.name}/model.onnx" if self.variant == "fp32" else f"{self.name}/model.{self.variant}.onnx"


class _TextEncoder(torch.nn.Module):
    def __init__(self, text_encoder):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids):
        return self.text_encoder(input_ids, return_dict=False)[0]


class _PenultimateTextEncoder(torch.nn.Module):
    """SDXL's conditioning: the penultimate layer's hidden states (and, for the second encoder, the pooled projection)."""

    def __init__(self, text_encoder, pooled: bool):
        super().__init__()
        self.text_encoder = text_encoder
        self.pooled = pooled

    def forward(self, input_ids):
        out = self.text_encoder(input_ids, output_hidden_states=True, return_dict=True)
        if self.pooled:
            return out.hidden_states[-2], out.text_embeds
        return out.hidden_states[-2]


class _UNet(torch.nn.Module):
    """The UNet; after the conditioning, ControlNet residuals where it was exported with ControlNets."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states, *residuals):
        return self.unet(sample, timestep, encoder_hidden_states, **residual_kwargs(residuals), return_dict=False)[0]


class _UNetXL(torch.nn.Module):
    """SDXL's UNet: ``text_time`` added conditioning (pooled text embedding and the six size/crop ids)."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids, *residuals):
        cond = {"text_embeds": text_embeds, "time_ids": time_ids}
        return self.unet(sample, timestep, encoder_hidden_states, added_cond_kwargs=cond,
                         **residual_kwargs(residuals), return_dict=False)[0]


class _VaeDecoder(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample):
        return self.vae.decode(latent_sample, return_dict=False)[0]


class _VaeEncoder(torch.nn.Module):
    """Outputs the latent distribution's raw moments (mean, logvar); the runtime samples."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, sample):
        h = self.vae.encoder(sample)
        return self.vae.quant_conv(h) if self.vae.quant_conv is not None else h


class _TinyVaeEncoder(torch.nn.Module):
    """A tiny VAE's (TAESD, diffusers' ``AutoencoderTiny``) encoder: deterministic latents, already scaled."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, sample):
        return self.vae.encode(sample, return_dict=False)[0]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def text_encoder_contract(text_encoder, max_length: int) -> Contract:
    hidden = text_encoder.config.hidden_size
    return Contract(
        "text_encoder",
        _TextEncoder(text_encoder),
        (TensorSpec("input_ids", "int64", ("batch", "sequence")),),
        (TensorSpec("last_hidden_state", "float32", ("batch", "sequence", hidden)),),
        _token_sample(text_encoder.config.vocab_size, max_length),
    )


def _token_sample(vocab: int, max_length: int):
    def sample():
        ids = torch.randint(0, vocab - 2, (2, max_length), generator=_gen(0))
        ids[:, 0] = vocab - 2  # <|startoftext|>
        ids[:, -5:] = vocab - 1  # <|endoftext|> and padding
        return (ids,)

    return sample


def xl_text_encoder_contract(text_encoder, max_length: int, name: str, pooled: bool | None = None) -> Contract:
    """SDXL's text encoders: penultimate hidden states; the second one also its pooled projection (``pooled``:
    whether this one gives it, by default only text_encoder_2; SD3's two CLIPs both do)."""
    hidden = text_encoder.config.hidden_size
    pooled = name == "text_encoder_2" if pooled is None else pooled
    outputs = (TensorSpec("penultimate_hidden_state", "float32", ("batch", "sequence", hidden)),)
    if pooled:
        outputs += (TensorSpec("text_embeds", "float32", ("batch", text_encoder.config.projection_dim)),)
    return Contract(
        name,
        _PenultimateTextEncoder(text_encoder, pooled),
        (TensorSpec("input_ids", "int64", ("batch", "sequence")),),
        outputs,
        _token_sample(text_encoder.config.vocab_size, max_length),
    )


def unet_contract(unet, latent_size: int, deepcache_branch: int | None = None, residuals: list | None = None) -> Contract:
    """The UNet; with ``deepcache_branch`` it also outputs DeepCache's ``deep_feature`` for that branch
    (``edgediff.export.deepcache``), which ``shallow_unet_contract``'s graph takes between full steps. With
    ``residuals`` (``export.controlnet.residuals_of``) it takes ControlNet residuals after its conditioning."""
    residuals = residuals or []
    c = unet.config
    in_ch, out_ch, ctx = c.in_channels, c.out_channels, c.cross_attention_dim
    # An odd latent size makes diffusers forward each upsampler's output size
    # from the skip connection, so the traced graph accepts any size that the
    # VAE does (multiples of 8 pixels), not only multiples of 64.
    h, w = latent_size + 1, latent_size + 3

    xl = c.addition_embed_type == "text_time"
    if c.addition_embed_type not in (None, "text_time"):
        raise ExportError(f"UNet addition_embed_type {c.addition_embed_type!r} is not supported (SD 1.x/2.x: none, SDXL: text_time)")
    pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim if xl else 0

    def sample():
        g = _gen(1)
        args = (
            torch.randn(2, in_ch, h, w, generator=g),
            torch.tensor([981.0, 981.0]),
            torch.randn(2, 77, ctx, generator=g),
        )
        if xl:
            args += (torch.randn(2, pooled, generator=g), torch.tensor([[8.0 * h, 8.0 * w, 0, 0, 8.0 * h, 8.0 * w]] * 2))
        return args + tuple(torch.randn(2, r.channels, *r.size(h, w), generator=g) * 0.5 for r in residuals)

    inputs = (
        TensorSpec("sample", "float32", ("batch", in_ch, "height", "width")),
        TensorSpec("timestep", "float32", ("batch",)),
        TensorSpec("encoder_hidden_states", "float32", ("batch", "sequence", ctx)),
    )
    if xl:
        inputs += (TensorSpec("text_embeds", "float32", ("batch", pooled)), TensorSpec("time_ids", "float32", ("batch", 6)))
    inputs += tuple(r.spec() for r in residuals)
    outputs = (TensorSpec("out_sample", "float32", ("batch", out_ch, "height", "width")),)
    if deepcache_branch is None:
        return Contract("unet", _UNetXL(unet) if xl else _UNet(unet), inputs, outputs, sample)
    from .deepcache import DeepCacheFull

    return Contract("unet", DeepCacheFull(unet, deepcache_branch, len(residuals)), inputs,
                    outputs + (DEEP_FEATURE_SPEC,), sample)


DEEP_FEATURE_SPEC = TensorSpec("deep_feature", "float32", ("batch", "feature_channels", "feature_height", "feature_width"))


def shallow_unet_contract(unet, latent_size: int, deepcache_branch: int) -> Contract:
    """DeepCache's shallow branch (Ma et al., CVPR 2024): the UNet's inputs and the full graph's ``deep_feature``
    in, ``out_sample`` out, recomputing only the layers nearest the image."""
    from .deepcache import DeepCacheFull, DeepCacheShallow

    full = unet_contract(unet, latent_size, deepcache_branch)

    def sample():
        args = full.sample()
        with torch.no_grad():
            _, feature = full.module(*args)
        return args + (feature,)

    return Contract("unet_shallow", DeepCacheShallow(unet, deepcache_branch), full.inputs + (DEEP_FEATURE_SPEC,),
                    full.outputs[:1], sample)


def vae_decoder_contract(vae, latent_size: int) -> Contract:
    ch = vae.config.latent_channels

    def sample():
        return (torch.randn(1, ch, latent_size, latent_size + 2, generator=_gen(2)),)

    return Contract(
        "vae_decoder",
        _VaeDecoder(vae),
        (TensorSpec("latent_sample", "float32", ("batch", ch, "latent_height", "latent_width")),),
        (TensorSpec("sample", "float32", ("batch", 3, "height", "width")),),
        sample,
    )


def tiny_vae_decoder_contract(vae, latent_size: int) -> Contract:
    """A tiny VAE's decoder as the ``tiny`` variant of vae_decoder: the same contract, in its own latent units."""
    contract = vae_decoder_contract(vae, latent_size)
    contract.variant, contract.scaling_factor = "tiny", float(vae.config.scaling_factor)
    contract.shift_factor = float(getattr(vae.config, "shift_factor", None) or 0.0)
    return contract


def tiny_vae_encoder_contract(vae, image_size: int) -> Contract:
    """A tiny VAE's encoder as the ``tiny`` variant of vae_encoder: images -> ``latents`` (no distribution)."""
    contract = vae_encoder_contract(vae, image_size)
    contract.module = _TinyVaeEncoder(vae)
    contract.outputs = (TensorSpec("latents", "float32", ("batch", vae.config.latent_channels, "latent_height",
                                                           "latent_width")),)
    contract.variant, contract.scaling_factor = "tiny", float(vae.config.scaling_factor)
    contract.shift_factor = float(getattr(vae.config, "shift_factor", None) or 0.0)
    return contract


def vae_encoder_contract(vae, image_size: int) -> Contract:
    ch = vae.config.latent_channels

    def sample():
        return (torch.rand(1, 3, image_size, image_size + 16, generator=_gen(3)) * 2 - 1,)

    return Contract(
        "vae_encoder",
        _VaeEncoder(vae),
        (TensorSpec("sample", "float32", ("batch", 3, "height", "width")),),
        (TensorSpec("latent_parameters", "float32", ("batch", 2 * ch, "latent_height", "latent_width")),),
        sample,
    )


def _dynamic_axes(specs: tuple[TensorSpec, ...]) -> dict[str, dict[int, str]]:
    return {t.name: {i: d for i, d in enumerate(t.shape) if isinstance(d, str)} for t in specs}


def export_component(contract: Contract, out_dir: Path, progress: Callable[[str], Any] = lambda s: None,
                     release: Callable[[], None] | None = None,
                     weight_prints: tuple[str, Fingerprints] | None = None) -> Variant:
    """Export ``contract`` to ``out_dir/<contract.file>``, check parity, return its manifest entry.

    ``release`` drops the caller's references to the PyTorch module once it
    has been traced and run, so the parity check's ONNX Runtime session does
    not sit beside it in memory (an SDXL UNet is 10 GB in fp32).
    ``weight_prints``: (diffusers model name, its ``weight_map.fingerprints``), taken before the module is
    released; the graph's weight map is written beside it (``edgediff.export.weight_map``).
    """
    import onnx

    path = out_dir / contract.file
    path.parent.mkdir(parents=True, exist_ok=True)
    # traced in a folder of its own: the tracer writes a big graph's weights as loose files beside it, and a
    # component folder may already hold another variant's graph
    staging = path.parent / f".{path.name}.tracing"
    staging.mkdir()
    traced = staging / path.name
    args = contract.sample()
    contract_inputs = contract.inputs
    # inference mode, wrapper included: torch.onnx.export puts each module back in the mode it found it in, and a
    # wrapper made in training mode would run the reference below with dropout on (T5's encoder has dropout)
    contract.module.eval()
    progress(f"tracing {contract.name}")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on Python control flow it baked in
        torch.onnx.export(
            contract.module,
            args,
            str(traced),
            dynamo=False,
            opset_version=OPSET,
            input_names=[t.name for t in contract.inputs],
            output_names=[t.name for t in contract.outputs],
            dynamic_axes=_dynamic_axes(contract.inputs + contract.outputs),
            do_constant_folding=True,
        )
        reference = contract.module(*args)
    references = reference if isinstance(reference, tuple) else (reference,)
    # a text encoder's weights its outputs never read (SDXL's first: its last layer), for the LoRA weight map
    unread = unread_parameters(contract.module, args) if weight_prints and contract.name.startswith("text_") else []
    if release is not None:
        contract.module = None
        release()
        gc.collect()
    # Re-save in one layout: a single file below the protobuf limit, else one
    # external data file beside it (gathered tensor by tensor: no second copy in memory).
    if any(f != traced for f in staging.iterdir()):
        consolidate_external_data(traced)
        for f in (traced, Path(str(traced) + ".data")):
            f.replace(path.parent / f.name)
        size = disk_bytes(path)
    else:
        model = onnx.load(str(traced))
        size = save_onnx(model, path)
        del model
    shutil.rmtree(staging)
    gc.collect()
    progress(f"checking {contract.name} against PyTorch")
    # the tracer drops inputs the graph never reads (SDXL's shallow DeepCache branch has no cross-attention, so
    # no encoder_hidden_states): the manifest lists the graph's own, and callers feed only those
    taken = {i.name for i in onnx.load(str(path), load_external_data=False).graph.input}
    contract.inputs = tuple(t for t in contract.inputs if t.name in taken)
    args = tuple(a for t, a in zip(contract_inputs, args) if t.name in taken)
    quality = check_parity(path, contract, args, [r.numpy() for r in references])
    weights = None
    if weight_prints is not None:
        progress(f"mapping {contract.name}'s weights to {weight_prints[0]}'s parameters")
        quality["weight_map"] = write_weight_map(path, *weight_prints, unread=unread, prefix="text_encoder.")
        weights = f"{contract.name}/{WEIGHT_MAP_FILE}"
    return Variant(contract.variant, contract.file, size, contract.inputs, contract.outputs, quality,
                   scaling_factor=contract.scaling_factor, shift_factor=None if contract.scaling_factor is None else contract.shift_factor,
                   weights=weights)


def check_parity(path: Path, contract: Contract, args, references: list[np.ndarray]) -> dict[str, Any]:
    """Run the ONNX graph on the sample inputs; every output must match PyTorch's (the first is reported)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = os.cpu_count() or 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    feeds = {t.name: a.numpy() for t, a in zip(contract.inputs, args)}
    outs = sess.run([t.name for t in contract.outputs], feeds)
    del sess
    figures = []
    for spec, out, reference in zip(contract.outputs, outs, references):
        if out.shape != reference.shape:
            raise ExportError(f"{contract.name}: ONNX output {spec.name} shape {out.shape} differs from PyTorch {reference.shape}")
        err = float(np.abs(out - reference).max())
        scale = float(np.abs(reference).max()) or 1.0
        rel = err / scale
        if not np.isfinite(err) or rel > contract.max_rel_err:
            raise ExportError(
                f"{contract.name}: ONNX output {spec.name} differs from PyTorch by {err:.3g} (relative {rel:.3g}, "
                f"limit {contract.max_rel_err:g}); the export is wrong, refusing to write it"
            )
        figures.append({"max_abs_err": err, "max_rel_err": rel, "shape": list(reference.shape)})
    return {"parity_vs_torch": figures[0] | ({"outputs": figures} if len(figures) > 1 else {})}
