"""The torch-free tier's parity: our schedulers and the embedded model's images against references saved from
diffusers (``tests/reference/make_references.py`` regenerates them). Runs without torch: ``pytest -m fast``."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgediff.runtime import Pipeline
from edgediff.runtime.schedulers import schedulers_for

from edgediff.runtime.metrics import psnr

from .conftest import REPO
from .scheduler_harness import CONFIGS, ODD_SHAPE, relative_error, run_ours

pytestmark = pytest.mark.fast

REFS = REPO / "tests" / "reference"
SCHEDULERS = dict(np.load(REFS / "schedulers.npz"))
SHAPES = dict(np.load(REFS / "shapes_txt2img.npz"))
CASES = sorted({key.rsplit("|", 1)[0] for key in SCHEDULERS})
SEED = 1234
SHAPES_CASES = sorted(key for key in SHAPES if "|" not in key)


def test_every_scheduler_has_references():
    assert {case.split("|")[0] for case in CASES} == set(schedulers_for("epsilon"))  # the UNet schedulers
    assert len(CASES) >= 10 * 3 * 3


@pytest.mark.parametrize("case", CASES)
def test_scheduler_matches_saved_diffusers_run(case):
    name, config, steps, strength = case.split("|")
    ours = run_ours(name, CONFIGS[config], int(steps), SEED, ODD_SHAPE, None if strength == "None" else float(strength))
    np.testing.assert_allclose(ours.timesteps, SCHEDULERS[case + "|timesteps"], rtol=0, atol=1e-4)
    assert ours.init_noise_sigma == pytest.approx(float(SCHEDULERS[case + "|init_noise_sigma"]), rel=1e-6)
    err, scale = relative_error(ours.latents, SCHEDULERS[case + "|latents"])
    assert err / scale <= 1e-4, (err, scale)


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
@pytest.mark.parametrize("case", SHAPES_CASES)
def test_embedded_model_matches_saved_diffusers_images(backend, case, parity_log):
    c = json.loads(str(SHAPES[case + "|case"]))
    pipe = Pipeline.load(backend=backend, device="cpu", ov_precision="f32")
    result = pipe.txt2img(c["prompt"], c["negative"], steps=c["steps"], guidance=c["guidance"], seed=c["seeds"][0],
                          num_images=len(c["seeds"]), scheduler=c["scheduler"], rng="torch")
    assert result.seeds == tuple(c["seeds"])  # diffusers ran one generator per image, seeded likewise
    scores = [psnr(np.asarray(image), want) for image, want in zip(result, SHAPES[case])]
    parity_log(("shapes (saved)", backend, f"{c['scheduler']} {case}", min(scores)))
    assert min(scores) >= 40, scores
