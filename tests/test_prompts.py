"""Prompts as people write them: weights, nesting, escapes, BREAK and prompts past 77 tokens.

The reference is A1111's algorithm reimplemented here, independently of ``edgediff.runtime.prompts``: its
regex tokenizer with separate stacks for round and square brackets, then transformers' CLIP tokenizer and
text encoder in torch per 75-token chunk, each weighted chunk rescaled to its original mean. Our images are
compared with diffusers' given the reference's embeddings (``prompt_embeds``), on tiny SD1 and SDXL models.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgediff.runtime.prompts import BREAK_MARKER, parse

# -- the reference parser (A1111's ``parse_prompt_attention``, as its wiki and code describe it) ---------------

RE_ATTENTION = re.compile(r"\\\(|\\\)|\\\[|\\]|\\\\|\\|\(|\[|:\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*\)|\)|]|[^\\()\[\]:]+|:")
RE_BREAK = re.compile(r"\s*\bBREAK\b\s*")


def reference_parse(text: str) -> list:
    res: list = []
    round_open, square_open = [], []

    def multiply(start, factor):
        for item in res[start:]:
            if item[0] is not BREAK_MARKER:
                item[1] *= factor

    for m in RE_ATTENTION.finditer(text):
        token, weight = m.group(0), m.group(1)
        if token.startswith("\\") and len(token) == 2:
            res.append([token[1:], 1.0])
        elif token == "\\":
            res.append(["\\", 1.0])
        elif token == "(":
            round_open.append(len(res))
        elif token == "[":
            square_open.append(len(res))
        elif weight is not None and round_open:
            multiply(round_open.pop(), float(weight))
        elif weight is not None:  # ":1.3)" with nothing open: literal text
            res.append([token, 1.0])
        elif token == ")" and round_open:
            multiply(round_open.pop(), 1.1)
        elif token == "]" and square_open:
            multiply(square_open.pop(), 1 / 1.1)
        else:
            for k, part in enumerate(RE_BREAK.split(token)):
                if k:
                    res.append([BREAK_MARKER, 1.0])
                res.append([part, 1.0])
    for start in round_open:
        multiply(start, 1.1)
    for start in square_open:
        multiply(start, 1 / 1.1)
    merged: list = []
    for text_, w in res:
        if text_ is BREAK_MARKER:
            merged.append(BREAK_MARKER)
        elif not text_:
            continue
        elif merged and merged[-1] is not BREAK_MARKER and abs(merged[-1][1] - w) < 1e-12:
            merged[-1] = (merged[-1][0] + text_, merged[-1][1])
        else:
            merged.append((text_, w))
    return merged


def _same(ours, ref) -> bool:
    if len(ours) != len(ref):
        return False
    for a, b in zip(ours, ref):
        if (a is BREAK_MARKER) != (b is BREAK_MARKER):
            return False
        if a is not BREAK_MARKER and (a[0] != b[0] or abs(a[1] - b[1]) > 1e-9):
            return False
    return True


@pytest.mark.fast
@pytest.mark.parametrize("prompt, expected", [
    ("a (red:1.5) [cat]", [("a ", 1.0), ("red", 1.5), (" ", 1.0), ("cat", 1 / 1.1)]),
    ("((nested)) x", [("nested", 1.21), (" x", 1.0)]),
    (r"\(literal\) \\ \[x\]", [(r"(literal) \ [x]", 1.0)]),
    ("open (word", [("open ", 1.0), ("word", 1.1)]),
    ("closed ) too ]", [("closed ) too ]", 1.0)]),
    ("(a:0.5) BREAK b", [("a", 0.5), BREAK_MARKER, ("b", 1.0)]),
    ("BREAKFAST and aBREAK", [("BREAKFAST and aBREAK", 1.0)]),
    ("(word:1.3", [("word:1.3", 1.1)]),
    ("(a [b) c]", [("a ", 1.1), ("b", 1.0), (" c", 1 / 1.1)]),
    ("((a([a", [("aa", 1.21)]),  # equal weights reached in another order (float rounding) stay one word
])
def test_syntax(prompt, expected):
    assert _same(parse(prompt), expected), parse(prompt)
    assert _same(reference_parse(prompt), expected), reference_parse(prompt)


@pytest.mark.fast
@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(list("ab ()[]:\\,.") + ["1.5", "0.7", " BREAK ", "BREAK", ":2)"]),
               max_size=30).map("".join))
def test_parser_matches_the_reference(prompt):
    assert _same(parse(prompt), reference_parse(prompt)), (prompt, parse(prompt), reference_parse(prompt))


@pytest.mark.fast
def test_a_huge_prompt_is_refused_with_its_size(embedded_copy):
    from edgediff.runtime import Pipeline

    pipe = Pipeline.load(embedded_copy, backend="onnxruntime", device="cpu")
    with pytest.raises(ValueError, match=r"at most 32 chunks of 75 tokens \(2,400 tokens\)"):
        pipe.txt2img("red circle " * 5_000, steps=1)


@pytest.mark.fast
def test_long_prompt_uses_every_chunk(embedded_copy):
    """Past 75 tokens nothing is dropped: what follows changes the image; BREAK starts a new chunk."""
    from edgediff.runtime import Pipeline

    pipe = Pipeline.load(embedded_copy, backend="onnxruntime", device="cpu")
    tok = pipe.tokenizer
    filler = "a red circle on a blue background, " * 11  # 88 tokens
    assert len(tok.chunks(filler).ids) == 2 and len(tok.chunks("a BREAK b").ids) == 2
    assert len(tok.chunks("BREAK a BREAK").ids) == 1
    run = dict(steps=3, seed=0)
    one = np.asarray(pipe.txt2img(filler, **run)[0])
    two = np.asarray(pipe.txt2img(filler + " a green square", **run)[0])
    assert not np.array_equal(one, two)
    weights = tok.chunks("a (red:1.4) circle").weights[0]
    assert sorted(set(np.round(weights, 3))) == [1.0, 1.4]


# -- the reference encoder, in torch -------------------------------------------------------------------------

torch_required = pytest.mark.skipif(__import__("importlib").util.find_spec("torch") is None, reason="needs torch")


def reference_embeddings(tokenizer, encoder, prompts: list[str], penultimate: bool, pooled: bool = False):
    """A1111's FrozenCLIPEmbedderWithCustomWords: chunks of 75 tokens, weighted, mean restored; shorter prompts
    padded with the empty prompt's chunk."""
    import torch

    def chunks(prompt):
        out = [[[], []]]
        for item in reference_parse(prompt):
            if item is BREAK_MARKER:
                if out[-1][0]:
                    out.append([[], []])
                continue
            for t in tokenizer(item[0], add_special_tokens=False).input_ids:
                if len(out[-1][0]) == 75:
                    out.append([[], []])
                out[-1][0].append(t)
                out[-1][1].append(item[1])
        if len(out) > 1 and not out[-1][0]:
            out.pop()
        return out

    def encode(tokens, multipliers):
        ids = [tokenizer.bos_token_id] + tokens + [tokenizer.eos_token_id]
        ids = ids + [tokenizer.pad_token_id] * (77 - len(ids))
        mult = torch.tensor([1.0] + multipliers + [1.0] * (76 - len(multipliers)))
        with torch.no_grad():
            out = encoder(torch.tensor([ids]), output_hidden_states=True)
        z = out.hidden_states[-2] if penultimate else out.last_hidden_state
        if (mult != 1).any():
            original, magnitude = z.mean(), z.abs().mean()
            z = z * mult.reshape(1, -1, 1)
            if original.abs() > 1e-4 * magnitude and z.mean().abs() > 1e-4 * magnitude:  # edgediff's floor
                z = z * (original / z.mean())
        return z, (out.text_embeds if pooled else None)

    per_prompt = [chunks(p) for p in prompts]
    count = max(len(c) for c in per_prompt)
    rows, pools = [], []
    for c in per_prompt:
        encoded = [encode(*chunk) for chunk in c] + [encode([], [])] * (count - len(c))
        rows.append(torch.cat([z for z, _ in encoded], dim=1))
        pools.append(encoded[0][1])
    return torch.cat(rows), (torch.cat(pools) if pooled else None)


def _check_context(pipe, encoders, reference: np.ndarray) -> None:
    """Our text conditioning of WEIGHTED equals the reference's, and differs from the unweighted prompt's by far
    more than that (the images of tiny models hardly depend on text, so this is where weights show)."""
    from edgediff.runtime.conditioning import encode_prompts

    def call(component, **inputs):
        return pipe.sessions[component](**inputs)

    def context(prompt):
        specs = [(c, tok, out) for (c, out), tok in zip(encoders, [pipe.conditioning.tokenizer] +
                 ([pipe.conditioning.tokenizer_2] if len(encoders) == 2 else []))]
        return np.concatenate(encode_prompts(call, specs, [prompt])[0], axis=-1)

    ours, plain = context(WEIGHTED), context(re.sub(r"[()\[\]]|:\d(\.\d)?", "", WEIGHTED))
    assert ours.shape == reference.shape
    error = float(np.abs(ours - reference).max())
    assert error < 1e-3 * float(np.abs(reference).max())
    assert float(np.abs(plain - reference).max()) > 100 * error, "the weights must change the conditioning"


WEIGHTED = ("a (red circle:3.5) on a [[blue]] background, (((sharp))), " + "clean edges, plain studio light, " * 12
            + "BREAK a small (green:0.2) square")
NEGATIVE = "blurry, (noise:1.2)"


@torch_required
@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_weighted_long_prompt_matches_reference_sd1(tiny_sd1, backend, parity_log):
    import diffusers
    import torch

    from edgediff.runtime import Pipeline
    from edgediff.runtime.metrics import psnr

    src, artifact = tiny_sd1
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(src), safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    cond, _ = reference_embeddings(pipe.tokenizer, pipe.text_encoder, [WEIGHTED], penultimate=False)
    uncond, _ = reference_embeddings(pipe.tokenizer, pipe.text_encoder, [NEGATIVE], penultimate=False)
    assert cond.shape[1] == 3 * 77  # two chunks and a BREAK
    uncond = torch.cat([uncond] + [reference_embeddings(pipe.tokenizer, pipe.text_encoder, [""], False)[0]] *
                       ((cond.shape[1] - uncond.shape[1]) // 77), dim=1)
    run = dict(num_inference_steps=6, guidance_scale=6.0, width=64, height=48)
    ref = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, output_type="np",
               generator=torch.Generator().manual_seed(2), **run).images[0]
    ref = (ref * 255).round().astype(np.uint8)
    ours = Pipeline.load(artifact, backend=backend, device="cpu", ov_precision="f32")
    got = np.asarray(ours.txt2img(WEIGHTED, NEGATIVE, steps=6, guidance=6.0, width=64, height=48, seed=2,
                                  rng="torch")[0])
    _check_context(ours, [("text_encoder", "last_hidden_state")], cond.numpy())
    score = psnr(got, ref)
    parity_log(("prompt weights+chunks sd1", backend, "default", score))
    assert score >= 40


@torch_required
@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_weighted_long_prompt_matches_reference_sdxl(tiny_sdxl, backend, parity_log):
    import diffusers
    import torch

    from edgediff.runtime import Pipeline
    from edgediff.runtime.metrics import psnr

    src, artifact = tiny_sdxl
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(str(src))
    pipe.set_progress_bar_config(disable=True)

    def both(prompt):
        first, _ = reference_embeddings(pipe.tokenizer, pipe.text_encoder, [prompt], penultimate=True)
        second, pooled = reference_embeddings(pipe.tokenizer_2, pipe.text_encoder_2, [prompt], penultimate=True,
                                              pooled=True)
        return torch.cat([first, second], dim=-1), pooled

    cond, pooled = both(WEIGHTED)
    uncond, uncond_pooled = both(NEGATIVE)
    empty, _ = both("")
    uncond = torch.cat([uncond] + [empty] * ((cond.shape[1] - uncond.shape[1]) // 77), dim=1)
    run = dict(num_inference_steps=5, guidance_scale=5.0, width=64, height=64)
    ref = pipe(prompt_embeds=cond, pooled_prompt_embeds=pooled, negative_prompt_embeds=uncond,
               negative_pooled_prompt_embeds=uncond_pooled, output_type="np",
               generator=torch.Generator().manual_seed(4), **run).images[0]
    ref = (ref * 255).round().astype(np.uint8)
    ours = Pipeline.load(artifact, backend=backend, device="cpu", ov_precision="f32")
    got = np.asarray(ours.txt2img(WEIGHTED, NEGATIVE, steps=5, guidance=5.0, width=64, height=64, seed=4,
                                  rng="torch")[0])
    _check_context(ours, [("text_encoder", "penultimate_hidden_state"), ("text_encoder_2", "penultimate_hidden_state")],
                   cond.numpy())
    score = psnr(got, ref)
    parity_log(("prompt weights+chunks sdxl", backend, "default", score))
    assert score >= 40
