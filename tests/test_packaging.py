"""The wheel carries the runtime, the CLI, export, quantize, the bench harness and the embedded model with its
evaluation; the training script and the one-off peer/GPU/report scripts stay in the repository."""

from __future__ import annotations

import pytest

import subprocess
import sys
import zipfile

from .conftest import REPO

pytestmark = pytest.mark.fast



def test_wheel_contents(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                        str(tmp_path), str(REPO)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = tmp_path.glob("edgediff-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for present in ("edgediff/__init__.py", "edgediff/cli.py", "edgediff/bench.py", "edgediff/runtime/pipeline.py",
                    "edgediff/runtime/compile_cache.py", "edgediff/runtime/schedulers/euler.py", "edgediff/export/exporter.py",
                    "edgediff/quantize/quantize.py", "edgediff/models/shapes/evaluate.py",
                    "edgediff/models/shapes/dataset.py", "edgediff/models/shapes/evaluation.json",
                    "edgediff/models/shapes/artifact/manifest.json", "edgediff/models/shapes/artifact/unet/model.onnx",
                    "edgediff/models/shapes/artifact/unet/weights.json", "edgediff/models/shapes/loras/diamond.safetensors",
                    "edgediff/runtime/lora.py", "edgediff/runtime/prompts.py", "edgediff/runtime/embeddings.py",
                    "edgediff/models/shapes/upscaler/upscaler.onnx", "edgediff/models/shapes/upscaler/upscaler.json",
                    "edgediff/runtime/upscale.py", "edgediff/runtime/vae_tiling.py", "edgediff/export/upscaler.py"):
        assert present in names, present
    modules = {n for n in names if n.endswith(".py")}
    for absent in ("train.py", "train_lora.py", "train_upscaler.py", "lora_load.py", "peers.py", "gpu_check.py", "quant_speed.py", "quantize_report.py", "floor.py",
                   "unet_profile.py", "unet_step_ratio.py"):
        assert not any(m.endswith("/" + absent) for m in modules), absent
    assert not any(n.startswith(("edgediff/benchmarks/", "tests/", "cli/")) for n in names)
    assert not any("/diffusers/" in n for n in names)  # the embedded model's PyTorch weights stay in the repository
