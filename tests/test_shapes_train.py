"""The shapes training script: runs end to end (a few steps), writes a diffusers folder our exporter takes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from edgediff.runtime import load_manifest  # noqa: E402

from .conftest import REPO, load_script, run_cli  # noqa: E402

TRAIN = "models/shapes/training/train.py"  # in the repository, not in the wheel (it needs torch)
train = load_script(TRAIN)


def test_schedule_has_zero_terminal_snr():
    sched = diffusers.DDPMScheduler(**{k: v for k, v in train.SCHEDULER.items() if k != "timestep_spacing"})
    acp = sched.alphas_cumprod
    assert float(acp[-1]) == 0.0  # the last timestep is pure noise: colours must come from the prompt
    assert float(acp[0]) > 0.99 and bool((acp[1:] < acp[:-1]).all())
    assert train.SCHEDULER["prediction_type"] == "v_prediction"  # epsilon cannot be learned at SNR 0


def test_a_short_run_writes_an_exportable_model(tmp_path):
    out = tmp_path / "shapes"
    cmd = [sys.executable, str(REPO / TRAIN), "--out", str(out), "--images", "64",
           "--vae-steps", "2", "--unet-steps", "5", "--stop-at-step", "3", "--batch", "4", "--text-layers", "1",
           "--threads", "1", "--fp16-weights"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    info = json.loads((out / "training.json").read_text())
    assert info["unet_steps"] == 5 and info["unet_steps_run"] == 3  # --stop-at-step replays a cut-short run
    assert info["text"]["num_hidden_layers"] == 1 and info["weights"] == "fp16"
    assert info["unet"]["attention_head_dim"] == list(train.UNET["attention_head_dim"])
    sched = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert sched["rescale_betas_zero_snr"] is True and sched["timestep_spacing"] == "trailing"

    artifact = tmp_path / "artifact"
    r = run_cli("export", str(out), str(artifact), "--default-steps", "20", "--default-guidance", "4")
    assert r.exit_code == 0, r.output
    m = load_manifest(artifact)
    assert m.prediction_type == "v_prediction" and m.sample_size == 128 and m.scheduler == "dpmpp_2m"
