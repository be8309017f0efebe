"""Shared fixtures: tiny Stable Diffusion checkpoints built from configs, exported with our own CLI."""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import pytest

from edgediff.export.recipes import PNDM_SD1

warnings.filterwarnings("ignore", module="torch.onnx")


def pytest_configure(config):
    # the compile cache (edgediff.runtime.compile_cache) of the whole run in one fresh folder, never the
    # user's ~/.cache; tests of the cache itself give their own folders
    import os
    import tempfile

    config._edgediff_cache = os.environ["EDGEDIFF_CACHE_DIR"] = tempfile.mkdtemp(prefix="edgediff-test-cache-")


def pytest_unconfigure(config):
    import shutil

    if getattr(config, "_edgediff_cache", None):
        shutil.rmtree(config._edgediff_cache, ignore_errors=True)
    # the tracer's notes on Python control flow it baked in; named only where torch is installed (the fast
    # tier runs without it)
    if importlib.util.find_spec("torch") is not None:
        config.addinivalue_line("filterwarnings", "ignore::torch.jit.TracerWarning")


# Stable Diffusion 1.5's scheduler_config.json as diffusers saves it; the scheduler tests vary it.
SD15_SCHEDULER_CONFIG = {"_class_name": "PNDMScheduler", **PNDM_SD1, "prediction_type": "epsilon",
                         "timestep_spacing": "leading", "trained_betas": None}


REPO = Path(__file__).resolve().parents[1]


def load_script(relative: str):
    """A script of the repository that is not in the wheel (benchmarks/, models/shapes/training/), as a module."""
    import importlib.util
    import sys

    path = REPO / relative
    spec = importlib.util.spec_from_file_location(f"edgediff_script_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and pickling look modules up by name
    spec.loader.exec_module(module)
    return module


def run_cli(*args: str):
    from typer.testing import CliRunner

    from edgediff.cli import app

    return CliRunner().invoke(app, list(args), catch_exceptions=False)


@pytest.fixture
def embedded_copy(tmp_path) -> Path:
    """A private copy of the embedded model's artifact, free to damage: no export, no torch (the fast tier's)."""
    import shutil

    from edgediff.models import default_model_path

    dst = tmp_path / "artifact"
    shutil.copytree(default_model_path(), dst)
    return dst


def _build_and_export(tmp_path_factory, recipe: str) -> tuple[Path, Path]:
    pytest.importorskip("torch")  # skipped, not failed, where the export extra is not installed
    from edgediff.export.recipes import build_pipeline

    root = tmp_path_factory.mktemp(recipe)
    src = build_pipeline(recipe, root / "diffusers", seed=0)
    result = run_cli("export", str(src), str(root / "artifact"))
    assert result.exit_code == 0, result.output
    return src, root / "artifact"


@pytest.fixture(scope="session")
def tiny_sd1(tmp_path_factory) -> tuple[Path, Path]:
    """(diffusers folder, artifact folder) of an SD1-style epsilon model."""
    return _build_and_export(tmp_path_factory, "tiny-sd1")


@pytest.fixture(scope="session")
def tiny_sd2v(tmp_path_factory) -> tuple[Path, Path]:
    """(diffusers folder, artifact folder) of an SD2-style v-prediction model."""
    return _build_and_export(tmp_path_factory, "tiny-sd2-v")


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> tuple[Path, Path]:
    """(diffusers folder, artifact folder) of an SDXL-style model (two text encoders, text_time conditioning)."""
    return _build_and_export(tmp_path_factory, "tiny-sdxl")


@pytest.fixture(scope="session")
def tiny_sd3(tmp_path_factory) -> tuple[Path, Path]:
    """(diffusers folder, artifact folder) of an SD3.5-style flow model (CLIP-L, CLIP-G, T5, MMDiT, 16-channel VAE)."""
    return _build_and_export(tmp_path_factory, "tiny-sd3")


@pytest.fixture(scope="session")
def tiny_sana(tmp_path_factory) -> tuple[Path, Path]:
    """(diffusers folder, artifact folder) of a Sana model (Gemma2, the linear-attention DiT, a DC-AE)."""
    return _build_and_export(tmp_path_factory, "tiny-sana")


@pytest.fixture(scope="session")
def tiny_sana_sprint(tmp_path_factory) -> tuple[Path, Path]:
    """(diffusers folder, artifact folder) of a Sana-Sprint model (guidance-distilled, SCM)."""
    return _build_and_export(tmp_path_factory, "tiny-sana-sprint")


def diffusers_images(pipe, seed: int | list[int], **args):
    """A diffusers pipeline's images as uint8 arrays, seeded as edgediff's ``rng="torch"`` draws: one generator for
    the call, or one per image for a list of seeds."""
    import numpy as np
    import torch

    generator = [torch.Generator().manual_seed(s) for s in seed] if isinstance(seed, list) else \
        torch.Generator().manual_seed(seed)
    return (pipe(**args, output_type="np", generator=generator).images * 255).round().astype(np.uint8)


def edgediff_images(artifact, backend: str = "onnxruntime", **args):
    """edgediff's txt2img images as uint8 arrays (f32 on OpenVINO, as the parity tests pin it)."""
    import numpy as np

    from edgediff.runtime import Pipeline

    pipe = Pipeline.load(artifact, backend=backend, device="cpu", ov_precision="f32")
    return np.stack([np.asarray(im) for im in pipe.txt2img(**args)])


_PARITY: list[tuple] = []


@pytest.fixture
def parity_log():
    """Record (model, backend, scheduler, PSNR) rows; printed at the end of the run."""
    return _PARITY.append


def pytest_terminal_summary(terminalreporter):
    if _PARITY:
        terminalreporter.write_line("txt2img PSNR vs diffusers (dB):")
        for model, backend, scheduler, score in sorted(_PARITY):
            terminalreporter.write_line(f"  {model:12s} {backend:12s} {scheduler:16s} {score:6.1f}")
