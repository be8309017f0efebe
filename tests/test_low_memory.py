"""Low-memory mode (``low_memory=True``, ``--low-memory``): one stage's graphs in memory at a time, the VAE in
tiles; the same image where nothing is tiled, and a lower peak, measured as the resident size of a fresh
process."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from edgediff.models import default_model_path
from edgediff.runtime import Pipeline
from edgediff.runtime.metrics import psnr

pytestmark = pytest.mark.fast
PROMPT = "a red circle on a blue background"

# The peak resident size of one generation in a fresh process, above the process's size once the libraries
# are imported (what they take is not the mode's doing), sampled every 5 ms.
PEAK = r"""
import json, sys, time
import onnxruntime, openvino
from edgediff.bench import PeakMemory
from edgediff.runtime import Pipeline
base = PeakMemory.resident()[0]
memory = PeakMemory().start()
root, backend, low, size = sys.argv[1], sys.argv[2], sys.argv[3] == "low", int(sys.argv[4])
pipe = Pipeline.load(root, backend=backend, device="cpu", low_memory=low, cache=False)
pipe.txt2img("a red circle", steps=2, width=size, height=size)
time.sleep(0.05)
print(json.dumps({"peak_mb": (memory.peak - base) / 2**20}))
"""


def peak_mb(backend: str, mode: str, size: int) -> float:
    out = subprocess.run([sys.executable, "-c", PEAK, str(default_model_path()), backend, mode, str(size)],
                         capture_output=True, text=True, timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_low_memory_lowers_the_peak():
    # OpenVINO at 512x512 on the embedded model: ~295 MB above the libraries by default, 150-210 in low memory
    # (ONNX Runtime: ~750 and ~590)
    default, low = peak_mb("openvino", "default", 512), peak_mb("openvino", "low", 512)
    print(f"peak above the libraries: default {default:.0f} MB, low memory {low:.0f} MB")
    assert low <= 0.75 * default


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_low_memory_draws_the_same_image_one_stage_at_a_time(backend):
    kw = dict(backend=backend, device="cpu", ov_precision="f32")
    low = Pipeline.load(**kw, low_memory=True)
    assert len(low.sessions) == 0  # nothing loaded before its stage
    stages = []
    result = low.txt2img(PROMPT, steps=3, seed=1, callback=lambda done, total: stages.append(list(low.sessions)))
    assert stages[0] == ["unet"]  # the text encoder was released when the UNet's stage began
    assert list(low.sessions) == ["vae_decoder"]
    plain = Pipeline.load(**kw).txt2img(PROMPT, steps=3, seed=1)
    assert psnr(np.asarray(result[0]), np.asarray(plain[0])) >= 60  # native size: no tile, the same image
    desc = low.describe()
    assert set(desc) == {"text_encoder", "unet", "vae_decoder"} and desc["unet"]["loaded"] == "per stage"
    # image inputs, DeepCache and a LoRA change: each opens what its stage needs
    img = low.img2img(PROMPT, result[0], steps=4, seed=2, cache_interval=2)
    assert np.asarray(img[0]).shape == np.asarray(result[0]).shape and "unet_shallow" in low.describe()


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_low_memory_is_safe_under_concurrent_calls(backend):
    """Four threads on one low-memory pipeline, each asking for another stage's graphs while the others run theirs:
    every image is the one its seed draws alone (a stage's release never pulls a session from under a call)."""
    import threading

    pipe = Pipeline.load(backend=backend, device="cpu", low_memory=True, cache=False)
    alone = {s: np.asarray(pipe.txt2img(PROMPT, steps=3, seed=s)[0]) for s in range(4)}
    together, errors = {}, []

    def run(seed: int) -> None:
        try:
            together[seed] = np.asarray(pipe.txt2img(PROMPT, steps=3, seed=seed)[0])
        except Exception as e:  # noqa: BLE001 - reported below, with the thread's seed
            errors.append(f"seed {seed}: {e!r:.300}")

    threads = [threading.Thread(target=run, args=(s,)) for s in alone]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert all(np.array_equal(together[s], alone[s]) for s in alone)


def test_low_memory_tiles_the_vae_above_the_native_size():
    pipe = Pipeline.load(backend="onnxruntime", device="cpu", low_memory=True)
    result = pipe.txt2img(PROMPT, steps=8, width=256, height=256)
    assert len(result.timings.stages["vae_decoder"]) == 9  # 128-pixel tiles, overlap 0.25
    whole = Pipeline.load(backend="onnxruntime", device="cpu", vae_tiling="off").txt2img(PROMPT, steps=8, width=256,
                                                                                         height=256)
    assert len(whole.timings.stages["vae_decoder"]) == 1
    # tiles see only their own pixels: the embedded model's small VAE lands at 27-30 dB (see test_vae_tiling)
    assert psnr(np.asarray(result[0]), np.asarray(whole[0])) >= 24
    with pytest.raises(ValueError, match="unknown vae_tiling 'sometimes'; valid: auto, on, off"):
        Pipeline.load(backend="onnxruntime", device="cpu", vae_tiling="sometimes")
