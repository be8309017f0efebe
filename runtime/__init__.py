"""The lean runtime: numpy + tokenizers + pillow + ONNX Runtime or OpenVINO. No PyTorch."""

from .backends import BackendError, available_devices
from .control import Control
from .denoise import StepObserver
from .errors import Cancelled, EdgediffError
from .load_options import LoadOptions
from .lora import LoraError, LoraSpec
from .manifest import ArtifactError, Manifest, load_manifest
from .outputs import save_result
from .pipeline import GenerationError, Pipeline, PrecisionError
from .result import Result
from .settings import GenerationSettings
from .schedulers import SCHEDULER_NAMES

__all__ = ["ArtifactError", "BackendError", "Cancelled", "Control", "EdgediffError", "GenerationError", "GenerationSettings", "LoadOptions", "LoraError", "LoraSpec",
           "Manifest", "Pipeline", "PrecisionError", "Result", "SCHEDULER_NAMES", "StepObserver", "available_devices", "load_manifest", "save_result"]
