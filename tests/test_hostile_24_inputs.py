"""Issue 24's hostile inputs to prompts, LoRAs and embeddings: bounded time, one clear error line, whole words.

- prompts: reading is linear (nesting, whitespace runs, long words), and a prompt past ``MAX_CHARS`` is refused
  before it is read, by the API and the CLI;
- names a file controls (tensor keys, layer names, metadata) are cut in errors, so a LoRA with 100 KB names
  fails at once with one short line;
- a LoRA's ``.alpha`` and ``lora_adapter_metadata`` of any shape or type give a LoraError, never a traceback;
- an embedding's word matches whole words only (``ircl`` is not inside "circle").
"""

from __future__ import annotations

import json
import re
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


# -- files for cases 8, 15 and 20: a valid kohya LoRA on the embedded model, then damaged ---------------------

LAYER = "lora_unet_down_blocks_0_attentions_0_proj_in"  # the embedded UNet's [32, 32, 1, 1] proj_in
PEFT_LAYER = "unet.down_blocks.0.attentions.0.proj_in"


def kohya(path, extra=None, alpha=np.array(2.0, np.float32), metadata=None, name=LAYER):
    """One kohya update (rank 4) on a real layer of the embedded UNet, with ``extra`` tensors; ``alpha`` None: none."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    tensors = {f"{name}.lora_down.weight": rng.standard_normal((4, 32, 1, 1)).astype(np.float32),
               f"{name}.lora_up.weight": rng.standard_normal((32, 4, 1, 1)).astype(np.float32)}
    if alpha is not None:
        tensors[f"{name}.alpha"] = alpha
    save_file(tensors | (extra or {}), str(path), metadata=metadata)
    return path


def peft(path, metadata):
    """A diffusers/PEFT file (lora_A/lora_B) with ``lora_adapter_metadata``."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    save_file({f"{PEFT_LAYER}.lora_A.weight": rng.standard_normal((4, 32, 1, 1)).astype(np.float32),
               f"{PEFT_LAYER}.lora_B.weight": rng.standard_normal((32, 4, 1, 1)).astype(np.float32)}, str(path),
              metadata={"lora_adapter_metadata": metadata})
    return path


def lora_plan(path):
    """What Pipeline.load does with a LoRA before compiling anything: read, resolve, plan the merge."""
    from edgediff.models import default_model_path
    from edgediff.runtime import load_manifest
    from edgediff.runtime.lora import LoraSpec, plan

    root = default_model_path()
    manifest = load_manifest(root)
    return plan([LoraSpec(path)], root, manifest, {c: "fp32" for c in manifest.components})


# -- case 8: names a file controls are cut in errors --------------------------------------------------------

LONG = 100_000


def _unused_names(path):
    """Eight 100 KB tensor names that are no LoRA's (a newline and an escape code in them): listed as unused."""
    return kohya(path, {f"k{i}\n\x1b[31m" + "x" * LONG: np.zeros(2, np.float32) for i in range(8)})


def _unknown_layers(path):
    """Eight well-formed updates whose 100 KB layer names this UNet does not have."""
    from safetensors.numpy import save_file

    tensors = {}
    for i in range(8):
        name = f"lora_unet_{i}" + "y" * LONG
        tensors |= {f"{name}.lora_down.weight": np.zeros((2, 4), np.float32),
                    f"{name}.lora_up.weight": np.zeros((4, 2), np.float32)}
    save_file(tensors, str(path))
    return path


def _missing_up(path):
    from safetensors.numpy import save_file

    save_file({"z" * LONG + ".lora_down.weight": np.zeros((2, 4), np.float32)}, str(path))
    return path


def _bad_factors(path):
    from safetensors.numpy import save_file

    save_file({"w" * LONG + ".lora_down.weight": np.zeros((2, 4), np.float32),
               "w" * LONG + ".lora_up.weight": np.zeros((4, 3), np.float32)}, str(path))
    return path


def _wrong_shape(path):
    """A layer this UNet has, of another size: named in the error with its (long) kohya key."""
    from safetensors.numpy import save_file

    save_file({f"{LAYER}.lora_down.weight": np.zeros((2, 8, 1, 1), np.float32),
               f"{LAYER}.lora_up.weight": np.zeros((32, 2, 1, 1), np.float32)}, str(path))
    return path


def _dora_model_name(path):
    return peft(path, '{"' + "m" * LONG + '.use_dora": true}')


def _embedding_names(path):
    return kohya(path, None, alpha=None, name="e" * LONG)  # no single tensor: not an embedding, names listed


def _quoting_header(path):
    """A header the safetensors reader refuses, quoting its 100 KB dtype (with a newline) in its message."""
    header = json.dumps({"k": {"dtype": "\n\x1b[31m" + "d" * LONG, "shape": [1], "data_offsets": [0, 4]}}).encode()
    path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(4))
    return path


LONG_NAME_FILES = {"unused tensors": _unused_names, "unknown layers": _unknown_layers, "missing up": _missing_up,
                   "bad factors": _bad_factors, "wrong shape": _wrong_shape, "DoRA model name": _dora_model_name,
                   "header quoted": _quoting_header}


@pytest.mark.parametrize("case", list(LONG_NAME_FILES))
def test_long_names_in_a_lora_are_cut_in_the_error(tmp_path, case):
    from edgediff.runtime import LoraError

    path = LONG_NAME_FILES[case](tmp_path / "long.safetensors")
    t0 = time.perf_counter()
    with pytest.raises(LoraError) as error:
        lora_plan(path)
    assert time.perf_counter() - t0 < 5
    message = str(error.value)
    assert len(message) < 3_000 and "\n" not in message and "\x1b" not in message, message[:300]
    assert str(path) in message
    if case != "wrong shape":  # its name is the real layer's, short
        assert re.search(r"\.\.\. \(100,\d{3} characters\)", message), message[:300]


@pytest.mark.parametrize("option, case", [("--lora", "unused tensors"), ("--lora", "unknown layers"),
                                          ("--embedding", "embedding names"), ("--embedding", "header quoted")])
def test_cli_fails_at_once_on_a_file_with_long_names(tmp_path, option, case):
    """The CLI printed 800 KB of names through its console: still printing after 120 s. Now one short line."""
    make = {**LONG_NAME_FILES, "embedding names": _embedding_names}[case]
    path = make(tmp_path / "long.safetensors")
    out = tmp_path / "o.png"
    t0 = time.perf_counter()
    result = cli("generate", "a red circle", option, str(path), "-o", str(out), timeout=60)
    assert time.perf_counter() - t0 < 30
    assert result.returncode == 2, result.stderr[-500:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}"), result.stderr[:500]
    assert len(lines[0]) < 3_000 and "characters)" in lines[0] and "\x1b[31m" not in result.stderr
    assert not out.exists()


def test_shown_cuts_and_escapes():
    from edgediff.runtime.lora import shown

    assert shown("lora_unet_x") == "lora_unet_x"
    assert shown("a\nb") == "a\\nb"
    assert shown("q" * 200) == "q" * 160 + "... (200 characters)" and shown("q" * 160) == "q" * 160


# -- case 15: an alpha or adapter metadata of any shape or type is a LoraError ------------------------------

ALPHAS = {
    "no value": (np.zeros(0, np.float32), r"long.safetensors: lora_unet_\w+\.alpha holds 0 values \(shape \[0\]\); "
                                          r"an alpha is one number"),
    "three values": (np.ones(3, np.float32), r"\.alpha holds 3 values \(shape \[3\]\)"),
    "NaN": (np.array(np.nan, np.float32), r"tensor '\w+\.alpha' holds NaN or infinite values"),
    "infinite": (np.array([np.inf], np.float32), r"tensor '\w+\.alpha' holds NaN or infinite values"),
    "integer": (np.array(4, np.int32), r"tensor '\w+\.alpha' is int32, not floating point"),
    "huge": (np.array(3e38, np.float32), r"\.alpha is 3e\+38; accepted: at most 1e\+30 in size"),
}


@pytest.mark.parametrize("case", list(ALPHAS))
def test_a_bad_alpha_is_refused_by_name(tmp_path, case):
    from edgediff.runtime import LoraError

    value, message = ALPHAS[case]
    with pytest.raises(LoraError, match=message):
        lora_plan(kohya(tmp_path / "long.safetensors", alpha=value))


def test_alphas_of_one_value_in_any_shape_are_read(tmp_path):
    from edgediff.runtime.lora import read_updates

    for shape in ((), (1,), (1, 1)):
        path = kohya(tmp_path / "ok.safetensors", alpha=np.full(shape, 3.0, np.float32))
        assert [u.alpha for u in read_updates(path)] == [3.0]
        assert lora_plan(path)
    path = kohya(tmp_path / "ok.safetensors", alpha=None)
    assert [u.alpha for u in read_updates(path)] == [None]


def test_rank_zero_is_refused(tmp_path):
    from safetensors.numpy import save_file

    from edgediff.runtime import LoraError

    save_file({f"{LAYER}.lora_down.weight": np.zeros((0, 32, 1, 1), np.float32),
               f"{LAYER}.lora_up.weight": np.zeros((32, 0, 1, 1), np.float32),
               f"{LAYER}.alpha": np.array(1.0, np.float32)}, str(tmp_path / "r0.safetensors"))
    with pytest.raises(LoraError, match=r"r0.safetensors: lora_unet_\w+ has rank 0"):
        lora_plan(tmp_path / "r0.safetensors")  # a ZeroDivisionError before


METADATA = {
    "a JSON list": ('["unet.lora_alpha", 8]', r"its lora_adapter_metadata is a JSON list, not the object diffusers "
                                              r"writes"),
    "a JSON string": ('"unet.lora_alpha"', r"is a JSON str, not the object"),
    "a JSON number": ("8", r"is a JSON int, not the object"),
    "not JSON": ("{unet: 8", r"its lora_adapter_metadata is not the JSON diffusers writes \(Expecting"),
    "deeply nested": ("[" * 100_000 + "]" * 100_000, r"lora_adapter_metadata is not the JSON diffusers writes"),
    "NaN alpha": ('{"unet.lora_alpha": NaN}', r"gives unet.lora_alpha = NaN; accepted: a finite number"),
    "infinite alpha": ('{"unet.lora_alpha": -Infinity}', r"gives unet.lora_alpha = -Infinity"),
    "huge alpha": ('{"unet.lora_alpha": 1' + "0" * 400 + "}", r"gives unet.lora_alpha = 1000000000000000000000+"
                                                               r"\.\.\. \(401 characters\)"),
    "text alpha": ('{"unet.lora_alpha": "8"}', r"gives unet.lora_alpha = \"8\"; accepted: a finite number"),
    "boolean alpha": ('{"unet.lora_alpha": true}', r"gives unet.lora_alpha = true"),
}


@pytest.mark.parametrize("case", list(METADATA))
def test_bad_adapter_metadata_is_refused_by_name(tmp_path, case):
    from edgediff.runtime import LoraError

    metadata, message = METADATA[case]
    with pytest.raises(LoraError, match=message):
        lora_plan(peft(tmp_path / "p.safetensors", metadata))


def test_good_adapter_metadata_sets_alpha(tmp_path):
    from edgediff.runtime.lora import read_updates

    assert [u.alpha for u in read_updates(peft(tmp_path / "p.safetensors", '{"unet.lora_alpha": 8, "unet.r": 4}'))] \
        == [8.0]
    assert [u.alpha for u in read_updates(peft(tmp_path / "n.safetensors", '{"unet.lora_alpha": null}'))] == [None]
    assert lora_plan(tmp_path / "p.safetensors")


def test_cli_names_an_empty_alpha_in_one_line(tmp_path):
    path = kohya(tmp_path / "a.safetensors", alpha=np.zeros(0, np.float32))
    result = cli("generate", "a red circle", "--lora", str(path), "-o", str(tmp_path / "o.png"), timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-500:]
    assert result.stderr.strip() == f"error: {path}: {LAYER}.alpha holds 0 values (shape [0]); an alpha is one " \
                                    "number (kohya writes a scalar)"
    assert not (tmp_path / "o.png").exists()


# -- case 20: an embedding's word is matched as a whole word ------------------------------------------------

def _embedding(path, word, vectors=1):
    from safetensors.numpy import save_file

    save_file({word: np.random.default_rng(3).standard_normal((vectors, 48)).astype(np.float32) * 3}, str(path))
    return path


@pytest.fixture
def with_words(tmp_path):
    from edgediff.runtime import Pipeline

    files = [_embedding(tmp_path / "a.safetensors", "ircl"), _embedding(tmp_path / "b.safetensors", "<cat-toy>", 2)]
    load = dict(backend="onnxruntime", device="cpu", cache=False)
    return Pipeline.load(embeddings=files, **load), Pipeline.load(**load)


def _ids(pipe, prompt):
    tok = pipe.tokenizer
    return [int(i) for i in tok.chunks(prompt).ids[0] if i not in (tok.bos, tok.eos, tok.pad_token_id)]


@pytest.mark.parametrize("prompt", ["a red circle", "circles", "ircle", "circl", "ircl_2", "2ircl", "éircl",
                                    "a red (circle:1.2)"])
def test_an_embedding_word_is_not_found_inside_other_words(with_words, prompt):
    ours, base = with_words
    assert _ids(ours, prompt) == _ids(base, prompt)  # was 'c <ircl> e' for "a red circle"


@pytest.mark.parametrize("prompt, count", [("ircl", 1), ("a ircl circle", 1), ("IRCL, ircl.", 2), ("(ircl:1.2)", 1),
                                           ("c(ircl)e", 1), ("ircl-ircl", 2), ("x<cat-toy>s", 2), ("<cat-toy>", 2),
                                           ("a<cat-toy><cat-toy>", 4)])
def test_an_embedding_word_is_found_as_a_word(with_words, prompt, count):
    ours, _ = with_words
    assert sum(i >= 49408 for i in _ids(ours, prompt)) == count


def test_an_embedding_word_inside_a_word_leaves_the_image_alone(with_words):
    ours, base = with_words
    run = dict(steps=2, seed=1)
    np.testing.assert_array_equal(np.asarray(ours.txt2img("a red circle", **run)[0]),
                                  np.asarray(base.txt2img("a red circle", **run)[0]))
    assert not np.array_equal(np.asarray(ours.txt2img("a red ircl", **run)[0]),
                              np.asarray(base.txt2img("a red ircl", **run)[0]))


def test_a_prompt_that_is_not_text_is_refused_by_the_api():
    from edgediff.runtime import Pipeline

    pipe = Pipeline.load(backend="onnxruntime", device="cpu")
    with pytest.raises(ValueError, match=r"the prompt is not valid text: character 2 is U\+DCFF, a lone surrogate"):
        pipe.txt2img("a \udcff circle", steps=1, width=16, height=16)  # a TypeError from the tokenizer before
