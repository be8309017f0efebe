"""``edgediff quantize``: add fp16 / int8 / int8-static / int4 / fp16-cuda variants to an artifact, behind a quality gate.

Each method is ONNX Runtime's own tooling, not a hand-written converter:

- ``fp16``: ``onnxruntime.transformers.float16.convert_float_to_float16`` with
  the overflow-prone ops kept in fp32 (normalisations, softmax, resize, and the
  reductions around them) and fp32 inputs/outputs.
- ``int8``: ``quantize_dynamic``: int8 weights, activations quantized on the
  fly, for MatMul/Gemm (and Conv with ``conv=True``).
- ``int8-static``: ``quantize_static`` in QDQ format, calibrated on the UNet's
  real inputs recorded along denoising runs over a prompt set (CFG on):
  uint8 activations x int8 per-channel weights (x86's native int8 pair).
  Attention score MatMuls (both inputs activations), the first and the last
  convolution stay in float: quantized, the attention products made ONNX
  Runtime's step 1.6x slower and OpenVINO's only 1-5% faster
  (``benchmarks/results/unet_profile_sd15_cpu.md``).
- ``int8-static-attn``: the same with the attention products quantized too,
  every activation symmetric int8: the form OpenVINO's CPU plugin fuses into
  its int8 attention kernel (0.61x its bf16 step at 512x512 on a Zen 5, where
  int8-static is 0.73x; with uint8 activations there it fell off that kernel,
  3.5x slower). ONNX Runtime runs it, slowly (1.8x int8-static).
- ``int4``: ``MatMulNBitsQuantizer`` (block-wise int4 weights for MatMul).
- ``nncf-int8`` and ``nncf-hybrid`` (OpenVINO only, saved as OpenVINO IR): NNCF
  post-training quantization calibrated on the same recorded UNet inputs.
  ``nncf-int8`` quantizes weights and activations of every Conv/MatMul (model
  type TRANSFORMER: NNCF keeps the softmax/normalisation paths in float);
  ``nncf-hybrid`` is Optimum Intel's hybrid mode for diffusion UNets: int8
  weight-only for the linear layers, full int8 for convolutions and attention.
- ``ov-fp16`` (OpenVINO only, saved as OpenVINO IR): the same graph with fp16 weights, computed as before (f32,
  or bf16 where the CPU has it): half the weights' memory on OpenVINO (``convert_ov_fp16``).
- ``nncf-w8`` (OpenVINO only, saved as OpenVINO IR): NNCF's int8 weight compression (``compress_weights``,
  INT8_ASYM: every MatMul/embedding weight int8 with a per-channel scale and zero point, decompressed on the fly;
  activations stay f32/bf16), no calibration. A quarter of the fp32 weights' memory, for the encoders whose
  activations overflow fp16 (T5, Gemma2) as for the DiTs (``compress_nncf_w8``).
- ``fp16-cuda`` (ONNX Runtime on CUDA only): the UNet through ONNX Runtime's transformer optimizer for UNets
  (fused attention, GroupNorm, BiasSplitGelu, NHWC convolutions) and fp16, as its Stable Diffusion CUDA demo
  (``quantize/cuda_fp16.py``). Its gate runs on the CUDA GPU; without one it is refused unless ``force``,
  which adds it recorded as not measured.

Every candidate is measured before it is accepted: the final images of a
fixed prompt set and seeds, with only that component swapped, against the
fp32 artifact (PSNR, SSIM; on the embedded shapes model also the attribute
accuracy). Below the gate (or with any metric not finite) the variant is
refused (its file removed) unless ``force``. Accepted variants are recorded
in the manifest with their figures.

Writes hold the artifact's lock (``edgediff.runtime.locking``) from reading
the manifest to saving it, so concurrent runs queue and each keeps the
other's variants; candidates are written under unique temporary names.
The folders written are checked writable before any conversion, and the
gate's thresholds must be finite and in range (``check_thresholds``).
"""

from __future__ import annotations

import math
import numbers
import os
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgediff.export.onnx_io import save_onnx
from PIL import Image

from edgediff.runtime import ArtifactError, Pipeline, PrecisionError
from edgediff.runtime.cpu import has_vnni
from edgediff.runtime.locking import folder_lock
from edgediff.runtime.manifest import MODEL_SUFFIXES, Manifest, Variant, artifact_file, disk_bytes, load_manifest
from edgediff.runtime.images import from_pil, to_pil
from edgediff.runtime.metrics import PSNR_CAP, psnr, ssim
from edgediff.runtime.outputs import probe_writable

from . import cuda_fp16


PRECISIONS = ("fp16", "int8", "int8-static", "int8-static-attn", "int4", "nncf-int8", "nncf-hybrid", "fp16-cuda",
              "ov-fp16", "nncf-w8")
CUDA_PRECISIONS = ("fp16-cuda",)  # fused CUDA-only kernels (quantize/cuda_fp16.py): gated on ONNX Runtime's CUDA EP
NNCF_PRECISIONS = ("nncf-int8", "nncf-hybrid")  # OpenVINO IR variants made with NNCF
IR_PRECISIONS = NNCF_PRECISIONS + ("ov-fp16", "nncf-w8")  # saved as OpenVINO IR (.xml + .bin)
CALIBRATED = ("int8-static", "int8-static-attn") + NNCF_PRECISIONS  # need recorded UNet inputs
# the roles (edgediff.runtime.manifest.ROLES) each precision suits by default
DEFAULT_ROLES = {
    "fp16": ("text_encoder", "denoiser", "shallow_denoiser", "vae_decoder", "vae_encoder"),
    "int8": ("text_encoder", "denoiser", "shallow_denoiser"),
    "int8-static": ("denoiser",),
    "int8-static-attn": ("denoiser",),
    "int4": ("text_encoder", "denoiser", "shallow_denoiser"),
    "nncf-int8": ("denoiser",),
    "nncf-hybrid": ("denoiser",),
    "fp16-cuda": ("denoiser",),
    "ov-fp16": ("text_encoder", "denoiser", "shallow_denoiser"),
    "nncf-w8": ("text_encoder", "denoiser", "shallow_denoiser"),
}
# precisions that compute in fp16, which T5's and Gemma2's activations overflow (such text encoders are left out)
FP16_COMPUTE = ("fp16", "fp16-cuda")
# text encoder kinds whose activations overflow fp16, and the evidence, named in the refusal
FP16_OVERFLOWS = {"t5": "T5, whose activations overflow fp16 (inf in its gated feed-forward, then NaN; transformers "
                        "#9295)",
                  "gemma": "Gemma2, whose activations overflow fp16 (diffusers' Sana docs: the text encoder stays in "
                           "bf16 or fp32; Sana-Sprint run in fp16 gives grey images, openvino_notebooks #2957)"}
# Kept in fp32 by the fp16 conversion: where activations overflow fp16 or lose
# the precision normalisation needs (the VAE's group norms, attention softmax).
FP16_KEEP_FLOAT = ["Resize", "InstanceNormalization", "LayerNormalization", "GroupNormalization", "Softmax",
                   "ReduceMean", "Pow", "Sqrt", "Exp"]
DEFAULT_PROMPTS = (
    "a red circle on a blue background",
    "a small yellow star on a black background",
    "a large green square on a white background",
    "a photo of a mountain lake at sunrise",
)


class QualityGateError(RuntimeError):
    """A quantized variant measured below the quality gate and was not added."""


@dataclass
class Gate:
    """Thresholds a variant must meet against fp32 (documented in the README)."""

    min_psnr: float = 20.0  # dB, mean over the prompt set's images
    min_ssim: float = 0.70
    max_accuracy_drop: float = 0.10  # embedded shapes model only: attribute accuracy, absolute

    def __post_init__(self):
        check_thresholds(self.min_psnr, self.min_ssim, self.max_accuracy_drop)


def check_thresholds(min_psnr: float, min_ssim: float, max_accuracy_drop: float) -> None:
    """The gate's (and tune's bounds') thresholds are numbers a measurement can be compared with: PSNR 0 to
    ``PSNR_CAP`` dB (what identical images record), SSIM 0 to 1, an accuracy drop 0 to 1. NaN compares false
    with everything, so a NaN threshold would pass every candidate: ValueError naming the option."""
    for name, value, hi, unit in (("min_psnr", min_psnr, PSNR_CAP, " dB"), ("min_ssim", min_ssim, 1.0, ""),
                                  ("max_accuracy_drop", max_accuracy_drop, 1.0, "")):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value <= hi:
            raise ValueError(f"{name} (--{name.replace('_', '-')}) must be a finite number from 0 to {hi:g}{unit}, "
                             f"got {value!r:.40}")


def check_writable(folders: list[Path], why: str) -> None:
    """Create and remove a file in each folder, before any work: the one check that holds for root, ACLs and
    read-only mounts alike (``os.access`` answers yes to root). ArtifactError naming the folder otherwise."""
    for folder in folders:
        try:
            probe_writable(folder)
        except OSError as e:
            raise ArtifactError(f"cannot write into {folder} ({e.strerror}): {why}; nothing was changed. Make it "
                                "writable, or copy the artifact to a folder you can write") from None



@dataclass
class GateSettings:
    prompts: tuple[str, ...] = DEFAULT_PROMPTS
    seeds: tuple[int, ...] = (0, 1)
    steps: int = 15
    guidance: float | None = None  # default: the model's recommended (manifest defaults)
    size: int | None = None  # default: the model's
    backend: str = "onnxruntime"
    threads: int | None = None
    evaluate_shapes: bool = False  # attribute accuracy (embedded model)
    images: dict[str, list[np.ndarray]] = field(default_factory=dict)  # fp32 references, filled lazily


def _variant_file(component: str, precision: str) -> str:
    return f"{component}/model.{precision}.{'xml' if precision in IR_PRECISIONS else 'onnx'}"


# ---------------------------------------------------------------------------
# the methods: fp32 ONNX file in, candidate ONNX file out


def convert_fp16(src: Path, dst: Path) -> dict[str, Any]:
    import onnx
    from onnx import numpy_helper
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    inferred = None
    if _big(src):  # past protobuf's 2 GB the converter's own shape inference cannot serialize the graph: run it
        # on the files (infer_shapes_path), then tell the converter not to (the graph keeps what it inferred)
        inferred = src.with_name(f"{src.stem}.shapes-{uuid.uuid4().hex[:8]}.onnx")
        onnx.shape_inference.infer_shapes_path(str(src), str(inferred))
    try:
        model = onnx.load(str(inferred or src), load_external_data=False)
        onnx.load_external_data_for_model(model, str(src.parent))
    finally:
        if inferred is not None:
            inferred.unlink(missing_ok=True)
    # Constants become initializers first: otherwise the converter, when its
    # shape inference fails, casts the Constant feeding each Resize's scales
    # to fp16 and the graph no longer loads (see shared FIELD-NOTES).
    keep = []
    for node in model.graph.node:
        if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
            tensor = numpy_helper.from_array(numpy_helper.to_array(node.attribute[0].t), node.output[0])
            model.graph.initializer.append(tensor)
        else:
            keep.append(node)
    del model.graph.node[:]
    model.graph.node.extend(keep)
    block = sorted(set(DEFAULT_OP_BLOCK_LIST) | set(FP16_KEEP_FLOAT))
    model = convert_float_to_float16(model, keep_io_types=True, op_block_list=block,
                                     disable_shape_infer=inferred is not None)
    save_onnx(model, dst)
    return {"tool": "onnxruntime.transformers.float16", "kept_float_ops": FP16_KEEP_FLOAT, "io": "fp32"}


def quantize_int8_dynamic(src: Path, dst: Path, conv: bool = False) -> dict[str, Any]:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    ops = ["MatMul", "Gemm"] + (["Conv"] if conv else [])
    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=ops, per_channel=True,
                     use_external_data_format=_big(src), extra_options={"MatMulConstBOnly": True})
    return {"tool": "onnxruntime.quantization.quantize_dynamic", "weights": "int8 per-channel",
            "activations": "dynamic uint8", "ops": ops}


def quantize_int4(src: Path, dst: Path, block_size: int = 32) -> dict[str, Any]:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    q = MatMulNBitsQuantizer(onnx.load(str(src)), block_size=block_size, is_symmetric=True)
    q.process()
    save_onnx(q.model.model, dst)
    return {"tool": "onnxruntime.quantization.matmul_nbits_quantizer", "weights": f"int4 blocks of {block_size}",
            "ops": ["MatMul"]}


def quantize_int8_static(src: Path, dst: Path, calibration: list[dict[str, np.ndarray]],
                         quantize_attention: bool = False) -> dict[str, Any]:
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

    model = onnx.load(str(src), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    consts = {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    convs = [n.name for n in model.graph.node if n.op_type == "Conv"]
    # attention scores (Q K^T) and their product with V: both inputs are activations
    attention = [n.name for n in model.graph.node
                 if n.op_type == "MatMul" and not any(i in inits or i in consts for i in n.input)]
    exclude = sorted(set(convs[:1] + convs[-1:] + ([] if quantize_attention else attention)))

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._it = iter(calibration)

        def get_next(self):
            return next(self._it, None)

    # uint8 activations (asymmetric) x int8 weights: the pair x86's int8 kernels multiply natively (VNNI's
    # vpdpbusd, AVX2's vpmaddubsw). Symmetric int8 activations cost ONNX Runtime a conversion per product: its
    # step was 1.29x slower at 512x512 on a Zen 5 with VNNI (benchmarks/results/unet_profile_sd15_cpu.md).
    # Without VNNI, AVX2's vpmaddubsw adds pairs of products in int16 and can saturate: ONNX Runtime's guide
    # then asks for 7-bit weights (reduce_range).
    # With the attention products quantized (quantize_attention) every activation is symmetric int8 instead: what
    # OpenVINO's int8 attention kernel takes (with uint8 ones it fell back to a path 3.5x slower).
    vnni = has_vnni()
    activations = QuantType.QInt8 if quantize_attention else QuantType.QUInt8
    quantize_static(
        str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, op_types_to_quantize=["Conv", "MatMul", "Gemm"],
        activation_type=activations, weight_type=QuantType.QInt8, per_channel=True, reduce_range=not vnni,
        nodes_to_exclude=exclude, calibrate_method=CalibrationMethod.MinMax, use_external_data_format=_big(src),
        calibration_providers=["CPUExecutionProvider"],
        extra_options={"ActivationSymmetric": quantize_attention, "CalibMovingAverage": True},
    )
    return {"tool": "onnxruntime.quantization.quantize_static", "format": "QDQ",
            "weights": "int8 per-channel" + ("" if vnni else ", 7-bit (reduce_range: no VNNI here)"),
            "activations": ("int8 symmetric" if quantize_attention else "uint8 asymmetric") + ", MinMax with moving average",
            "calibration_samples": len(calibration),
            "kept_float": {"first_and_last_conv": convs[:1] + convs[-1:],
                           "attention_matmuls": 0 if quantize_attention else len(attention),
                           "ops_not_quantized": "Softmax, normalisations, activations (only Conv/MatMul/Gemm are)"}}


def convert_ov_fp16(src: Path, dst: Path) -> dict[str, Any]:
    """The graph as OpenVINO IR with fp16 weights (``save_model(compress_to_fp16=True)``; OpenVINO computes in
    f32 or bf16 as before). It halves what the weights hold in memory on OpenVINO's CPU plugin: the IR's .bin is
    memory-mapped and read as fp16, where an fp32 ONNX graph keeps its fp32 weights mapped beside the bf16 copy
    the plugin makes (SD1.5 UNet after its first step: 3.9 GB resident against 5.8;
    benchmarks/results/memory_sd15_cpu.md). An ONNX fp16 graph does not do it: OpenVINO's ONNX reader holds the
    whole file and widens its weights to fp32 (5.8 GB)."""
    import openvino as ov

    ov.save_model(ov.convert_model(str(src)), str(dst), compress_to_fp16=True)
    return {"tool": f"openvino {ov.__version__} save_model(compress_to_fp16=True)", "format": "OpenVINO IR",
            "backends": ["openvino"], "weights": "fp16", "compute": "as the device chooses (f32, or bf16)"}


def compress_nncf_w8(src: Path, dst: Path) -> dict[str, Any]:
    """The graph as OpenVINO IR with NNCF's int8 weight compression (INT8_ASYM, every weight of a MatMul or an
    embedding), activations as the device computes them (f32 or bf16): no calibration, and nothing an fp16
    activation could overflow."""
    import nncf
    import openvino as ov

    model = nncf.compress_weights(ov.convert_model(str(src)), mode=nncf.CompressWeightsMode.INT8_ASYM)
    ov.save_model(model, str(dst), compress_to_fp16=False)
    return {"tool": f"nncf {nncf.__version__} compress_weights(INT8_ASYM)", "format": "OpenVINO IR",
            "backends": ["openvino"], "weights": "int8 (asymmetric, per output channel)",
            "compute": "as the device chooses (f32, or bf16)"}


def quantize_nncf(src: Path, dst: Path, calibration: list[dict[str, np.ndarray]], hybrid: bool) -> dict[str, Any]:
    """NNCF post-training quantization of an ONNX graph into OpenVINO IR (``dst`` .xml + .bin)."""
    import nncf
    import openvino as ov
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters

    model = ov.Core().read_model(str(src))
    dataset = nncf.Dataset(calibration)
    common = dict(model_type=nncf.ModelType.TRANSFORMER, subset_size=len(calibration))
    if hybrid:
        # Optimum Intel's hybrid mode: linear layers (MatMul with a constant
        # operand) int8 weight-only; convolutions and the attention MatMuls
        # quantized fully (weights and activations) on the calibration data.
        linear = [op.get_friendly_name() for op in model.get_ops() if op.get_type_name() == "MatMul"
                  and any(op.input_value(i).get_node().get_type_name() == "Constant" for i in (0, 1))]
        model = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM,
                                      ignored_scope=nncf.IgnoredScope(types=["Convolution"]))
        model = nncf.quantize(model, dataset, ignored_scope=nncf.IgnoredScope(names=linear),
                              advanced_parameters=AdvancedQuantizationParameters(smooth_quant_alpha=-1), **common)
        method = {"weights": "int8 asymmetric weight-only for linear layers", "activations":
                  "int8 for convolutions and attention", "linear_layers_weight_only": len(linear)}
    else:
        model = nncf.quantize(model, dataset, **common)
        method = {"weights": "int8", "activations": "int8 (every Conv/MatMul NNCF's TRANSFORMER scheme quantizes)"}
    ov.save_model(model, str(dst), compress_to_fp16=False)
    return {"tool": f"nncf {nncf.__version__} ({'hybrid: compress_weights + quantize' if hybrid else 'quantize'})",
            "format": "OpenVINO IR", "backends": ["openvino"], "calibration_samples": len(calibration)} | method


def _big(path: Path) -> bool:
    return Path(str(path) + ".data").exists() or Path(path).stat().st_size > 1_800_000_000


# ---------------------------------------------------------------------------
# calibration and measurement through the runtime itself


def record_unet_inputs(pipe: Pipeline, settings: GateSettings, max_samples: int = 64) -> list[dict[str, np.ndarray]]:
    """The UNet's actual feeds along real denoising runs (CFG on), evenly subsampled."""
    recorded: list[dict[str, np.ndarray]] = []
    session = pipe.sessions[pipe.manifest.denoiser.name]
    run = session.run

    def recording(feeds):
        recorded.append({k: v.copy() for k, v in feeds.items()})
        return run(feeds)

    session.run = recording
    try:
        for prompt in settings.prompts:
            for seed in settings.seeds:
                pipe.txt2img(prompt, steps=settings.steps, guidance=settings.guidance, seed=seed,
                             width=settings.size, height=settings.size)
    finally:
        session.run = run
    keep = np.linspace(0, len(recorded) - 1, min(max_samples, len(recorded))).round().astype(int)
    return [recorded[i] for i in sorted(set(keep.tolist()))]


def _generate(pipe: Pipeline, settings: GateSettings) -> list[np.ndarray]:
    return [
        np.asarray(pipe.txt2img(p, steps=settings.steps, guidance=settings.guidance, seed=s,
                                width=settings.size, height=settings.size)[0])
        for p in settings.prompts
        for s in settings.seeds
    ]


def measure(root: Path, manifest: Manifest, component: str, precision: str, settings: GateSettings) -> dict[str, Any]:
    """Images with ``component`` at ``precision`` (the rest fp32) against the fp32 images."""
    variant = manifest.variant(component, precision)
    backend = variant.backends[0] if variant.backends and settings.backend not in variant.backends else settings.backend
    device = "cuda" if precision in CUDA_PRECISIONS else "cpu"
    load = dict(backend=backend, device=device, threads=settings.threads, ov_precision="f32")
    ref_key = f"fp32:{backend}:{device}"  # the reference comes from the same backend and device as the candidate
    if ref_key not in settings.images:
        settings.images[ref_key] = _generate(Pipeline.load(root, manifest=manifest, **load), settings)
    t0 = time.perf_counter()
    pipe = Pipeline.load(root, manifest=manifest, precision={component: precision}, **load)
    if component == "vae_encoder":
        # txt2img does not use the encoder: compare encode -> decode round trips of the reference images
        fp32 = Pipeline.load(root, manifest=manifest, **load)
        refs = settings.images[ref_key]
        batch = np.stack([from_pil(Image.fromarray(r)) for r in refs])
        images = [np.asarray(to_pil(d)) for d in pipe.decode(pipe.encode(batch))]
        settings.images["vae_roundtrip"] = [np.asarray(to_pil(d)) for d in fp32.decode(fp32.encode(batch))]
        ref_images = settings.images["vae_roundtrip"]
    else:
        images = _generate(pipe, settings)
        ref_images = settings.images[ref_key]
    result: dict[str, Any] = {
        "vs": "fp32",
        "psnr_db": round(min(PSNR_CAP, float(np.mean([psnr(a, b) for a, b in zip(images, ref_images)]))), 2),
        "ssim": round(float(np.mean([ssim(a, b) for a, b in zip(images, ref_images)])), 4),
        "images": len(images),
        "steps": settings.steps,
        "guidance": manifest.settings(guidance=settings.guidance)[1],
        "backend": backend,
        "generate_seconds": round(time.perf_counter() - t0, 2),
    }
    if settings.evaluate_shapes and component != "vae_encoder":
        from edgediff.models.shapes import evaluate

        scenes = evaluate.prompt_set(16, seed=1)
        base = Pipeline.load(root, manifest=manifest, **load)
        ref = evaluate.evaluate(base, scenes, (0,), steps=settings.steps)["all"]
        got = evaluate.evaluate(pipe, scenes, (0,), steps=settings.steps)["all"]
        result["accuracy"] = got
        result["accuracy_fp32"] = ref
    return result


def passes(quality: dict[str, Any], gate: Gate) -> list[str]:
    """Reasons the variant fails the gate (empty when it passes); a metric that is not finite fails it."""
    failures = [f"{name} is {quality[name]} (not a finite number)" for name in ("psnr_db", "ssim")
                if not math.isfinite(quality[name])]
    if quality["psnr_db"] < gate.min_psnr:
        failures.append(f"PSNR {quality['psnr_db']:.1f} dB < {gate.min_psnr} dB")
    if quality["ssim"] < gate.min_ssim:
        failures.append(f"SSIM {quality['ssim']:.3f} < {gate.min_ssim}")
    if "accuracy" in quality:
        for attr in ("color", "background", "shape"):
            drop = quality["accuracy_fp32"][attr] - quality["accuracy"][attr]
            if drop > gate.max_accuracy_drop:
                failures.append(f"{attr} accuracy dropped {drop:.0%} (limit {gate.max_accuracy_drop:.0%})")
    return failures


# ---------------------------------------------------------------------------


def quantize_artifact(
    root: str | Path,
    precision: str,
    components: tuple[str, ...] | None = None,
    *,
    force: bool = False,
    gate: Gate | None = None,
    settings: GateSettings | None = None,
    conv: bool = False,
    progress: Callable[[str], Any] = lambda s: None,
) -> dict[str, dict[str, Any]]:
    """Add ``precision`` variants of ``components`` to the artifact; returns each one's quality figures.

    Raises ``QualityGateError`` (after adding the components that passed) when
    a variant measures below ``gate`` and ``force`` is not set.
    """
    root = Path(root)
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    gate = gate or Gate()
    settings = settings or GateSettings()
    if not settings.prompts or not settings.seeds:
        raise ValueError("the quality gate needs at least one prompt and one seed (--prompts, --seeds >= 1): "
                         "a variant measured on no image would pass unmeasured")
    load_manifest(root)  # a damaged artifact fails before waiting for the lock
    with folder_lock(root, progress):
        return _quantize(root, precision, components, force, gate, settings, conv, progress)


def _quantize(root: Path, precision: str, components: tuple[str, ...] | None, force: bool, gate: Gate,
              settings: GateSettings, conv: bool, progress: Callable[[str], Any]) -> dict[str, dict[str, Any]]:
    manifest = load_manifest(root)  # under the lock: it has every variant added before ours
    overflows = {t.name: FP16_OVERFLOWS[t.kind] for t in manifest.text_encoders if t.kind in FP16_OVERFLOWS}
    named = components is not None
    components = components or tuple(c for c in manifest.components if manifest.roles[c] in DEFAULT_ROLES[precision]
                                      and not (precision in FP16_COMPUTE and c in overflows))
    for comp in components:
        if comp not in manifest.components:
            raise ValueError(f"the artifact has no {comp}; it has: {', '.join(manifest.components)}")
        if named and precision in FP16_COMPUTE and comp in overflows:  # a gate on a few prompts could pass it
            raise ValueError(f"{comp} is {overflows[comp]}: it is not offered in {precision}; int8, int4 or ov-fp16 "
                             "(fp16 weights, f32/bf16 compute) keep its activations wide")
        if precision in CALIBRATED and comp != manifest.denoiser.name:
            raise ValueError(f"{precision} is calibrated on the UNet's inputs: use --components {manifest.denoiser.name}")
    if precision in IR_PRECISIONS:
        import importlib.util

        uses_nncf = precision in NNCF_PRECISIONS or precision == "nncf-w8"
        missing = [m for m in ("nncf", "openvino")[not uses_nncf:] if importlib.util.find_spec(m) is None]
        if missing:
            raise ValueError(f"{precision} needs {' and '.join(missing)}: pip install 'edgediff[openvino,quantize]'")
    unmeasured = None  # why the gate cannot run here (then only --force adds the variant, recorded as not measured)
    if precision in CUDA_PRECISIONS and not cuda_fp16.cuda_available():
        unmeasured = ("its fused fp16 kernels run only on ONNX Runtime's CUDA execution provider, and this machine has "
                      "no working one: the quality gate cannot run here")
        if not force:
            raise ValueError(f"{precision}: {unmeasured}. Run it where onnxruntime-gpu sees a CUDA GPU, or pass "
                             "--force to add it unmeasured")
    folders = [root] + sorted({(root / _variant_file(c, precision)).parent for c in components})
    check_writable(folders, f"quantize writes the {precision} variants and the manifest there")
    _remove_partials(root)
    settings.size = settings.size or manifest.sample_size
    results: dict[str, dict[str, Any]] = {}
    refused: list[str] = []
    for comp in components:
        src = artifact_file(root, manifest.variant(comp, "fp32").file, f"{comp} fp32", MODEL_SUFFIXES)
        dst = artifact_file(root, _variant_file(comp, precision), f"{comp} {precision}", MODEL_SUFFIXES)
        partial = dst.with_name(f"{dst.stem}{PARTIAL}{uuid.uuid4().hex[:12]}{dst.suffix}")
        progress(f"{comp}: converting to {precision}")
        try:
            try:
                method = _convert(root, manifest, src, partial, precision, settings, conv, progress)
            except (ArtifactError, MemoryError):
                raise
            except Exception as e:  # onnx, onnxruntime and nncf raise their own types (ValidationError, Fail...)
                first = str(e).strip().splitlines()[0][:400] if str(e).strip() else type(e).__name__
                raise ArtifactError(f"{comp}: the {precision} conversion of {src} failed ({type(e).__name__}: "
                                    f"{first})") from e
            candidate = replace(manifest.variant(comp, "fp32"), precision=precision, file=partial.relative_to(root).as_posix(),
                                bytes=disk_bytes(partial), quality={}, backends=tuple(method.get("backends", ())))
            trial = _with_variant(manifest, comp, candidate)
            progress(f"{comp} {precision}: measuring against fp32")
            try:
                if unmeasured:
                    quality, failures = {"vs": "fp32", "method": method}, [unmeasured]
                else:
                    quality = measure(root, trial, comp, precision, settings) | {"method": method}
                    failures = passes(quality, gate)
            except PrecisionError as e:  # NaN/Inf or a flat image: the worst quality there is
                quality = {"vs": "fp32", "psnr_db": 0.0, "ssim": 0.0, "error": str(e), "method": method}
                failures = [f"it produced {e.args[0].split(' produced ')[1].split(';')[0]}"]
            quality["gate"] = {"min_psnr": gate.min_psnr, "min_ssim": gate.min_ssim, "passed": not failures,
                               "forced": bool(failures and force)}
            if unmeasured:
                quality["gate"] |= {"passed": None, "not_measured": unmeasured}
            if failures and not force:
                refused.append(f"{comp} {precision}: " + "; ".join(failures))
                results[comp] = quality
                continue
            new = [f for f in (dst, Path(str(dst) + ".data"), dst.with_suffix(".bin")) if not f.exists()]
            _move(partial, dst)
            final = replace(candidate, file=dst.relative_to(root).as_posix(), bytes=disk_bytes(dst),
                            quality=quality | {"size_ratio_vs_fp32": round(disk_bytes(dst) / manifest.variant(comp).bytes, 3)})
            try:
                _with_variant(manifest, comp, final).save(root)
            except OSError as e:  # the manifest could not be written: the variant's files go, no orphan stays
                for f in new:
                    f.unlink(missing_ok=True)
                raise ArtifactError(f"cannot save {root / 'manifest.json'} ({e.strerror}); {comp} {precision} was "
                                    "not added") from None
            manifest = _with_variant(manifest, comp, final)
            results[comp] = final.quality
        finally:
            for leftover in (partial, Path(str(partial) + ".data"), partial.with_suffix(".bin")):
                if leftover.exists():
                    leftover.unlink()
    if refused:
        raise QualityGateError(
            "refused (below the quality gate; --force adds them anyway): " + " | ".join(refused)
        )
    return results


PARTIAL = ".partial-"  # in a candidate's file name: model.int8.partial-<unique>.onnx


def _convert(root: Path, manifest: Manifest, src: Path, partial: Path, precision: str, settings: GateSettings,
             conv: bool, progress: Callable[[str], Any]) -> dict[str, Any]:
    """Write the ``precision`` candidate of ``src`` to ``partial``; returns the method's description."""
    if precision == "fp16":
        return convert_fp16(src, partial)
    if precision == "int8":
        return quantize_int8_dynamic(src, partial, conv=conv)
    if precision == "int4":
        return quantize_int4(src, partial)
    if precision == "ov-fp16":
        return convert_ov_fp16(src, partial)
    if precision == "nncf-w8":
        return compress_nncf_w8(src, partial)
    if precision == "fp16-cuda":
        return cuda_fp16.convert_cuda_fp16(src, partial)
    progress("unet: recording calibration inputs along denoising runs")
    fp32 = Pipeline.load(root, manifest=manifest, backend="onnxruntime", device="cpu", threads=settings.threads)
    calibration = record_unet_inputs(fp32, settings)
    del fp32
    if precision in ("int8-static", "int8-static-attn"):
        return quantize_int8_static(src, partial, calibration, quantize_attention=precision == "int8-static-attn")
    return quantize_nncf(src, partial, calibration, hybrid=precision == "nncf-hybrid")


def _remove_partials(root: Path) -> None:
    """Candidates left by a run that was killed (we hold the lock: no run is writing them now)."""
    for comp_dir in (p for p in root.iterdir() if p.is_dir() and not p.is_symlink()):
        for leftover in comp_dir.glob(f"model.*{PARTIAL}*"):
            if leftover.is_file() or leftover.is_symlink():
                leftover.unlink()


def _move(partial: Path, dst: Path) -> None:
    """Rename the candidate (and its external data, renamed inside the graph) into place.

    A symlink already at ``dst`` is replaced, never written through.
    """
    for old in (dst, Path(str(dst) + ".data"), dst.with_suffix(".bin")):
        if old.is_symlink():
            old.unlink()
    if partial.suffix == ".xml":  # OpenVINO IR: the .xml finds its weights by name, <stem>.bin
        os.replace(partial.with_suffix(".bin"), dst.with_suffix(".bin"))
        os.replace(partial, dst)
        return
    data = Path(str(partial) + ".data")
    if not data.exists():
        os.replace(partial, dst)
        return
    import onnx

    model = onnx.load(str(partial))
    save_onnx(model, dst)
    partial.unlink()
    data.unlink()


def _with_variant(manifest: Manifest, component: str, variant: Variant) -> Manifest:
    comps = {c: dict(v) for c, v in manifest.components.items()}
    comps[component][variant.precision] = variant
    return replace(manifest, components=comps)


def remove_variant(root: str | Path, component: str, precision: str) -> None:
    """Drop a variant (never fp32) from the artifact and its manifest; only files inside the artifact are deleted,
    and never one that another variant, component or the manifest still names (a variant whose ``file`` is the
    fp32 graph's loses its entry, not the graph)."""
    if precision == "fp32":
        raise ValueError("the fp32 originals stay")
    root = Path(root)
    with folder_lock(root):
        manifest = load_manifest(root)  # checks every path it names
        variant = manifest.variant(component, precision)
        files = [artifact_file(root, f, f"{component} {precision}", (".onnx", ".xml", ".bin", ".data"))
                 for f in variant.files()]  # checked again right before anything is deleted
        comps = {c: dict(v) for c, v in manifest.components.items()}
        del comps[component][precision]
        kept = replace(manifest, components=comps)
        in_use = {(root / f).resolve() for f in _named_files(kept)}
        kept.save(root)
        for f in files:
            if (f.exists() or f.is_symlink()) and f.resolve() not in in_use:
                f.unlink()


def _named_files(manifest: Manifest) -> list[str]:
    """Every file ``manifest`` names, relative to the artifact: the variants' (with external data, IR weights and
    weight maps), the tokenizers, the scheduler config and the manifest itself."""
    named = ["manifest.json", manifest.scheduler_file] + [t.tokenizer for t in manifest.text_encoders]
    for variants in manifest.components.values():
        for v in variants.values():
            named += v.files() + ([v.weights] if v.weights else [])
    return named
