"""Reduced-precision variants with a quality gate (needs onnx and onnxruntime's quantization tools)."""

from .quantize import PRECISIONS, Gate, GateSettings, QualityGateError, quantize_artifact, remove_variant

__all__ = ["PRECISIONS", "Gate", "GateSettings", "QualityGateError", "quantize_artifact", "remove_variant"]
