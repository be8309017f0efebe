"""A step observer sees each denoising step with its latents and can stop the call between two steps; every
error edgediff raises on purpose shares one base (edgediff.runtime.errors)."""

from __future__ import annotations

import numpy as np
import pytest

from edgediff.runtime import (ArtifactError, BackendError, Cancelled, EdgediffError, GenerationError,
                              GenerationSettings, LoraError, Pipeline)
from edgediff.runtime.images import to_pil
from edgediff.runtime.upscale import UpscalerError

pytestmark = pytest.mark.fast


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.load(backend="onnxruntime", device="cpu")


class Recorder:
    def __init__(self, stop_after: int | None = None):
        self.steps: list[tuple[int, int, np.ndarray]] = []
        self.stop_after = stop_after

    def on_step(self, done, total, latents):
        self.steps.append((done, total, latents.copy()))
        return None if self.stop_after is None or done < self.stop_after else False


def test_the_observer_sees_every_step_and_the_latents_the_decoder_gets(pipe):
    recorder = Recorder()
    result = pipe.generate(GenerationSettings("a red circle", steps=4, seed=3), observer=recorder)
    assert [(d, t) for d, t, _ in recorder.steps] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    latents = [x for _, _, x in recorder.steps]
    assert latents[0].shape == (1, pipe.manifest.latent_channels, 16, 16)
    assert not np.array_equal(latents[0], latents[-1])
    # the last step's latents are what was decoded: decoding them again gives the same picture
    np.testing.assert_array_equal(np.asarray(to_pil(pipe.decode(latents[-1])[0])), np.asarray(result.images[0]))


def test_steps_count_over_the_whole_call_when_it_runs_in_chunks(embedded_copy):
    pipe = Pipeline.load(embedded_copy, backend="onnxruntime", device="cpu", max_batch=1)
    recorder = Recorder()
    pipe.generate(GenerationSettings("a red circle", steps=2, images_per_prompt=3), observer=recorder)
    assert [(d, t) for d, t, _ in recorder.steps] == [(1, 6), (2, 6), (3, 6), (4, 6), (5, 6), (6, 6)]


def test_returning_false_stops_the_call_between_steps(pipe):
    recorder = Recorder(stop_after=2)
    with pytest.raises(Cancelled, match="after step 2 of 5; nothing was returned"):
        pipe.generate(GenerationSettings("a red circle", steps=5), observer=recorder)
    assert len(recorder.steps) == 2  # no step ran after the observer said stop
    # the pipeline is unharmed: the next call runs to the end
    assert len(pipe.txt2img("a red circle", steps=2).images) == 1


def test_a_progress_callback_may_stop_the_call_too(pipe):
    seen = []
    with pytest.raises(Cancelled):
        pipe.txt2img("a red circle", steps=4, callback=lambda done, total: seen.append(done) or done < 3)
    assert seen == [1, 2, 3]


def test_an_observer_without_on_step_or_beside_a_callback_is_refused(pipe):
    with pytest.raises(ValueError, match=r"observer must have a method on_step\(done, total, latents\)"):
        pipe.generate(GenerationSettings("a red circle", steps=2), observer=print)
    with pytest.raises(ValueError, match="a callback or an observer, not both"):
        pipe.generate(GenerationSettings("a red circle", steps=2), callback=lambda d, t: None, observer=Recorder())


@pytest.mark.parametrize("kind,builtin", [(ArtifactError, ValueError), (LoraError, ValueError),
                                          (UpscalerError, ValueError), (BackendError, RuntimeError),
                                          (GenerationError, RuntimeError), (Cancelled, Exception)])
def test_every_error_kind_is_an_edgediff_error_and_still_its_builtin(kind, builtin):
    assert issubclass(kind, EdgediffError) and issubclass(kind, builtin)
