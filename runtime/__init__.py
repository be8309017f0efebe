"""The lean runtime: numpy + tokenizers + pillow + ONNX Runtime or OpenVINO. No PyTorch."""

from .backends import BackendError, available_devices
from .manifest import ArtifactError, Manifest, load_manifest
from .pipeline import GenerationError, Pipeline, PrecisionError
from .schedulers import SCHEDULER_NAMES

__all__ = ["ArtifactError", "BackendError", "GenerationError", "Manifest", "Pipeline", "PrecisionError", "SCHEDULER_NAMES", "available_devices", "load_manifest"]
