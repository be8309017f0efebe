"""Per-call notes: what one generation should tell its caller travels in its Result, not only as a process-wide
warning, and concurrent calls on one pipeline keep their own (the service's need)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from PIL import Image

from edgediff.runtime import Control, Pipeline

pytestmark = pytest.mark.fast
PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.load(backend="onnxruntime", device="cpu", cache=False)


def off_size_control() -> list[Control]:
    mask = np.zeros((80, 100), np.uint8)
    mask[20:60, 30:70] = 255
    return [Control("mask", Image.fromarray(mask).convert("RGB"))]


def test_a_resized_control_image_is_a_note_of_that_call(pipe):
    with pytest.warns(UserWarning, match="resized to the generation's 128x128"):  # still a warning, as before
        result = pipe.txt2img(PROMPT, steps=2, seed=0, controls=off_size_control())
    assert len(result.notes) == 1 and "control image for mask (in memory) is 100x80" in result.notes[0]
    assert pipe.txt2img(PROMPT, steps=2, seed=0).notes == ()  # the next call starts with none


def test_concurrent_calls_keep_their_own_notes(pipe):
    results: dict[str, list] = {"noted": [], "plain": []}

    def run(kind: str) -> None:
        for _ in range(3):
            controls = off_size_control() if kind == "noted" else []
            results[kind].append(pipe.txt2img(PROMPT, steps=2, seed=1, controls=controls).notes)

    threads = [threading.Thread(target=run, args=(k,)) for k in ("noted", "plain")]
    with pytest.warns(UserWarning):
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert [len(n) for n in results["noted"]] == [1, 1, 1]
    assert results["plain"] == [(), (), ()]
