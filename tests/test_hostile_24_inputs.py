"""Issue 24's hostile inputs to prompts, LoRAs and embeddings: bounded time, one clear error line, whole words.

- prompts: reading is linear (nesting, whitespace runs, long words), and a prompt past ``MAX_CHARS`` is refused
  before it is read, by the API and the CLI;
- names a file controls (tensor keys, layer names, metadata) are cut in errors, so a LoRA with 100 KB names
  fails at once with one short line;
- a LoRA's ``.alpha`` and ``lora_adapter_metadata`` of any shape or type give a LoraError, never a traceback;
- an embedding's word matches whole words only (``ircl`` is not inside "circle").
"""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest

from edgediff.runtime.prompts import BREAK_MARKER, MAX_CHARS, parse

pytestmark = pytest.mark.fast


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """The CLI in its own process, as a user's shell runs it; a hang fails the test (TimeoutExpired)."""
    return subprocess.run([sys.executable, "-c", "from edgediff.cli import main; main()", *args],
                          capture_output=True, text=True, timeout=timeout)


# -- case 7: the prompt parser is linear, and a character cap comes first ------------------------------------

NEAR_CAP = MAX_CHARS - 10
HOSTILE_PROMPTS = {  # each just under the cap; the quadratic parser took minutes on several of them
    "nested": "(a" * (NEAR_CAP // 2),
    "nested then closed": "(a" * (NEAR_CAP // 4) + ")" * (NEAR_CAP // 4),
    "crossed brackets": "(a[b" * (NEAR_CAP // 8) + ")]" * (NEAR_CAP // 8),
    "nested weights": "(" * (NEAR_CAP // 7) + "a:1.5)" * (NEAR_CAP // 7),
    "whitespace": " " * NEAR_CAP,
    "whitespace and B": (" " * 50 + "B") * (NEAR_CAP // 51),
    "one long word": "a" * NEAR_CAP,
    "BREAKs": " BREAK" * (NEAR_CAP // 6),
    "a long weight": "(a:" + "9" * (NEAR_CAP - 5) + ")",
}


@pytest.mark.parametrize("name", list(HOSTILE_PROMPTS))
def test_a_prompt_near_the_cap_is_read_in_bounded_time(name):
    prompt = HOSTILE_PROMPTS[name]
    assert len(prompt) <= MAX_CHARS
    t0 = time.perf_counter()
    fragments = parse(prompt)
    elapsed = time.perf_counter() - t0
    assert elapsed < 1.0, f"{name}: {elapsed:.2f} s for {len(prompt):,} characters"
    text = "".join(f[0] for f in fragments if f is not BREAK_MARKER)
    assert len(text) <= len(prompt) and (name == "BREAKs") == (BREAK_MARKER in fragments)


def test_reading_time_grows_linearly():
    """Ten times the nesting takes about ten times as long (it took a hundred times before)."""
    def best(prompt):
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            parse(prompt)
            times.append(time.perf_counter() - t0)
        return min(times)

    small, large = best("(a" * 4_000), best("(a" * 40_000)
    assert large < 30 * small, (small, large)


def test_the_weights_past_a1111s_exact_depth_stay_right():
    """Deeper than ``EXACT`` open brackets the weight comes from sums of logs: still 1.1 ** depth."""
    fragments = parse("(" * 60 + "a" + ")" * 20 + "b [c] (d:0.5)")
    weights = {f[0]: f[1] for f in fragments}
    assert weights["a"] == pytest.approx(1.1**60, rel=1e-12)
    assert weights["b "] == pytest.approx(1.1**40, rel=1e-12)
    assert weights["c"] == pytest.approx(1.1**39, rel=1e-12)
    assert weights["d"] == pytest.approx(1.1**40 * 0.5, rel=1e-12)
    assert parse("(" * 40 + "a:0)")[0] == ("a", 0.0)


def test_a_prompt_past_the_cap_is_refused_before_it_is_read():
    prompt = "(a" * 65_000  # 130 KB: 70 s in the quadratic parser before the token cap refused it
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"^the prompt is 130,000 characters long: at most 96,000 are read"):
        parse(prompt)
    assert time.perf_counter() - t0 < 0.5


def test_a_megabyte_prompt_through_the_api_is_refused_at_once():
    from edgediff.runtime import Pipeline

    pipe = Pipeline.load(backend="onnxruntime", device="cpu")
    for prompt, negative in (("red circle " * 100_000, None), ("a red circle", "(" * 1_000_000)):
        t0 = time.perf_counter()
        with pytest.raises(ValueError, match=r"characters long: at most 96,000 are read"):
            pipe.txt2img(prompt, negative, steps=1, width=16, height=16)
        assert time.perf_counter() - t0 < 2  # 17 s before


def test_weights_past_float32_are_refused_by_name():
    from edgediff.runtime import Pipeline

    pipe = Pipeline.load(backend="onnxruntime", device="cpu")
    with pytest.raises(ValueError, match=r"multiply to inf for 'a', more than the encoder's float32 holds"):
        pipe.tokenizer.chunks("(a:" + "9" * 400 + ")")
    with pytest.raises(ValueError, match=r"more than the encoder's float32 holds"):
        pipe.tokenizer.chunks("(" * 1_000 + "a")
    assert pipe.tokenizer.chunks("(" * 100 + "a").weights.max() == pytest.approx(1.1**100, rel=1e-6)


def test_cli_refuses_the_130kb_nested_prompt_in_seconds(tmp_path):
    out = tmp_path / "o.png"
    t0 = time.perf_counter()
    result = cli("generate", "(a" * 65_000, "-o", str(out), "--steps", "1", timeout=60)
    assert time.perf_counter() - t0 < 30  # 70 s before, most of it parsing
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: the prompt is 130,000 characters long: at most 96,000")
    assert "Traceback" not in result.stderr and not out.exists()
