"""T5's encoder as a part (issue 25, section 1 item 2): the offline tokenizer, the export contract, and the
runtime's ``T5Encoder`` on both backends against transformers' ``T5TokenizerFast`` and ``T5EncoderModel``.

The fast tier (torch-free) checks the tokenizer's conventions, padding, truncation and its note, the refusal of
A1111 weights and BREAK, and what the encoder feeds its graph. The torch tier builds a tiny T5 encoder from a
config (DITS.md section 4's: d_model 32, 2 layers, 4 heads, gated-gelu as T5 v1.1), exports it with
``t5_encoder_contract`` and compares the runtime with PyTorch.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgediff.export.t5_tokenizer import build_t5_tokenizer
from edgediff.runtime.encoders import Encoded, T5Encoder, plain_text

from .test_runtime_lean import _run

LONG = "a large red circle on a blue background, " * 30  # about 270 tokens of the tiny vocabulary
PROMPTS = ["a red circle on a blue background", "", "an astronaut riding a horse on the moon, highly detailed, 4k",
           "zebra 日本 😀  many   spaces\tand\ttabs", "A Small HOUSE; 1990s film photograph!", LONG]


@pytest.fixture(scope="module")
def fast_tokenizer(tmp_path_factory) -> Path:
    """The tokenizer without transformers' sentinels: what the fast tier can build."""
    path = tmp_path_factory.mktemp("t5tok") / "tokenizer.json"
    build_t5_tokenizer().save(str(path))
    return path


# ---------------------------------------------------------------- fast tier: no torch, no transformers


@pytest.mark.fast
def test_the_tokenizer_has_t5s_conventions_and_is_the_same_every_build():
    tok = build_t5_tokenizer()
    assert [tok.token_to_id(t) for t in ("<pad>", "</s>", "<unk>")] == [0, 1, 2]
    assert tok.to_str() == build_t5_tokenizer().to_str()  # counted, not trained: deterministic
    e = tok.encode("a red circle 😀")
    assert e.tokens[:3] == ["▁a", "▁red", "▁circle"] and e.ids[-2:] == [2, 1]  # the emoji is <unk>, then </s>
    assert tok.encode("").ids == [1]


@pytest.mark.fast
def test_prompts_are_padded_and_cut_as_diffusers_does(fast_tokenizer):
    tok = build_t5_tokenizer()
    enc = T5Encoder("text_encoder_3", fast_tokenizer, 16)
    with pytest.warns(UserWarning, match="was cut to T5's 16 tokens") as caught:
        out = enc.encode(lambda component, **feeds: {"last_hidden_state": feeds["input_ids"][..., None] * 1.0},
                         PROMPTS)
    cut = [p for p in PROMPTS if len(tok.encode(p, add_special_tokens=False).ids) > 15]
    assert len(cut) == 2 and len(caught) == len(out.notes) == 2  # the zebra's and the long prompt
    ids, mask = out.hidden[..., 0].astype(np.int64), out.mask
    for row, prompt in enumerate(PROMPTS):
        tokens = tok.encode(prompt, add_special_tokens=False).ids
        kept = tokens[:15] + [1]  # diffusers' truncation keeps max_length - 1 tokens and </s>
        assert ids[row].tolist() == kept + [0] * (16 - len(kept)), prompt
        assert mask[row].tolist() == [1] * len(kept) + [0] * (16 - len(kept))
    assert ids[1].tolist() == [1] + [0] * 15  # the empty prompt: </s> alone
    assert out.notes[0].endswith("dropped: 'and tabs'")  # the note is text: no </s>, no <pad>
    assert out.notes[1].startswith("the prompt 'a large red circle on a blue background,'... was cut")
    assert out.notes[1].endswith(" ...")  # a long cut is itself cut in the note


@pytest.mark.fast
def test_a_prompt_that_fits_gives_no_note(fast_tokenizer):
    enc = T5Encoder("text_encoder_3", fast_tokenizer, 64)
    ids, mask, notes = enc.tokenize(PROMPTS[:5])
    assert notes == () and ids.shape == mask.shape == (5, 64) and ids.dtype == mask.dtype == np.int64


@pytest.mark.parametrize("prompt,what", [
    ("a (red:1.3) circle", "a weight of 1.3 on 'red'"),
    ("a (red) circle", "a weight of 1.1 on 'red'"),
    ("a [red] circle", "a weight of 0.909 on 'red'"),
    ("a red circle BREAK blue background", "BREAK"),
    ("photo (black and white", "a weight of 1.1 on 'black and white'"),  # an unclosed bracket weighs the rest
])
@pytest.mark.fast
def test_a1111_weights_and_break_are_refused_naming_what_was_found(fast_tokenizer, prompt, what):
    enc = T5Encoder("text_encoder_3", fast_tokenizer, 16)
    calls = []
    with pytest.raises(ValueError, match=rf"the prompt uses {what}, which T5 cannot apply: .* write the prompt "
                                         r"without them, and a bracket meant as text as \\\( \\\) \\\[ \\\]"):
        enc.encode(lambda component, **feeds: calls.append(feeds), ["a fine prompt", prompt])
    assert calls == []  # refused before the graph runs


@pytest.mark.fast
def test_escaped_brackets_and_a_weight_of_one_are_plain_text(fast_tokenizer):
    assert plain_text(r"a \(red\) circle \[x\]", "T5") == "a (red) circle [x]"
    assert plain_text("a (red:1.0) circle", "T5") == "a red circle"
    assert plain_text("a red) circle]", "T5") == "a red) circle]"  # nothing open: literal, as A1111 reads it
    enc = T5Encoder("text_encoder_3", fast_tokenizer, 16)
    ids, _, _ = enc.tokenize([r"a \(red\)"])
    expected = build_t5_tokenizer().encode("a (red)").ids
    assert ids[0].tolist() == expected + [0] * (16 - len(expected))


@pytest.mark.fast
def test_a_prompt_that_is_not_text_is_refused(fast_tokenizer):
    with pytest.raises(ValueError, match="lone surrogate"):
        T5Encoder("text_encoder_3", fast_tokenizer, 16).tokenize(["a red \udce9 circle"])


@pytest.mark.fast
def test_the_graph_gets_the_mask_only_where_it_takes_one(fast_tokenizer):
    seen = []

    def call(component, **feeds):
        seen.append((component, sorted(feeds)))
        return {"last_hidden_state": np.zeros((len(feeds["input_ids"]), 16, 4), np.float32)}

    for mask_input in (False, True):
        out = T5Encoder("text_encoder_2", fast_tokenizer, 16, mask_input=mask_input).encode(call, ["a", "b c"])
        assert isinstance(out, Encoded) and out.pooled is None and out.mask.sum(axis=1).tolist() == [2, 3]
    assert seen == [("text_encoder_2", ["input_ids"]), ("text_encoder_2", ["attention_mask", "input_ids"])]


@pytest.mark.fast
def test_tokenizers_that_are_not_t5s_are_refused(tmp_path, fast_tokenizer):
    from tokenizers import processors

    tok = build_t5_tokenizer()
    tok.post_processor = processors.TemplateProcessing(single="$A", special_tokens=[])
    tok.save(str(tmp_path / "no_eos.json"))
    with pytest.raises(ValueError, match="is not a T5 tokenizer"):
        T5Encoder("text_encoder_3", tmp_path / "no_eos.json", 16)
    with pytest.raises(ValueError, match="pad_token_id 5000 is outside the vocabulary"):
        T5Encoder("text_encoder_3", fast_tokenizer, 16, pad_token_id=5000)
    with pytest.raises(ValueError, match="max_length must be at least 2"):
        T5Encoder("text_encoder_3", fast_tokenizer, 1)


@pytest.mark.fast
def test_the_runtime_encoder_imports_no_torch(fast_tokenizer):
    r = _run(f"""
        import numpy as np
        from edgediff.runtime.encoders import T5Encoder
        from edgediff.export.t5_tokenizer import build_t5_tokenizer
        build_t5_tokenizer()
        T5Encoder("t5", {str(fast_tokenizer)!r}, 8).tokenize(["a red circle"])
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
        print("heavy:", heavy)
        """)
    assert r.returncode == 0, r.stderr
    assert "heavy: []" in r.stdout


# ---------------------------------------------------------------- torch tier: export and parity


@pytest.fixture(scope="module")
def tiny_t5(tmp_path_factory):
    """The reference tokenizer (saved: the runtime reads its tokenizer.json) and a tiny T5 encoder, exported
    with and without the attention mask."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers import T5Config, T5EncoderModel

    from edgediff.export.components import export_component
    from edgediff.export.t5 import t5_encoder_contract
    from edgediff.export.t5_tokenizer import build_t5_tokenizer_fast

    root = tmp_path_factory.mktemp("tiny-t5")
    tokenizer = build_t5_tokenizer_fast(root / "tokenizer_3")
    torch.manual_seed(0)
    config = T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", pad_token_id=0,
                      eos_token_id=1, decoder_start_token_id=0)
    model = T5EncoderModel(config).eval()
    variants = {
        mask: export_component(t5_encoder_contract(model, 32, name=name, attention_mask=mask), root)
        for mask, name in ((False, "text_encoder_3"), (True, "text_encoder_2"))
    }
    return root, tokenizer, model, variants


def _session(root, variant, backend):
    from edgediff.runtime.backends import BackendOptions, installed_backends, open_session

    if backend not in installed_backends():
        pytest.skip(f"{backend} is not installed")
    component = variant.file.split("/")[0]
    session = open_session(root, component, variant, backend, "cpu", BackendOptions(threads=1, ov_precision="f32"))
    return lambda name, **feeds: (name == component or pytest.fail(name)) and session(**feeds)


def _reference(model, tokenizer, prompts, max_length, mask):
    import torch

    batch = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    with torch.no_grad():
        out = model(batch.input_ids, attention_mask=batch.attention_mask if mask else None)[0]
    return out.numpy(), batch


def test_the_contract_declares_t5s_graph_and_passes_the_gate(tiny_t5):
    root, _, _, variants = tiny_t5
    plain, masked = variants[False], variants[True]
    assert [(t.name, t.dtype, t.shape) for t in plain.inputs] == [("input_ids", "int64", ("batch", 32))]
    assert [(t.name, t.dtype, t.shape) for t in masked.inputs] == [("input_ids", "int64", ("batch", 32)),
                                                                  ("attention_mask", "int64", ("batch", 32))]
    for v in (plain, masked):
        assert [(t.name, t.dtype, t.shape) for t in v.outputs] == [("last_hidden_state", "float32", ("batch", 32, 32))]
        assert v.precision == "fp32" and v.quality["parity_vs_torch"]["max_abs_err"] < 1e-4
        assert (root / v.file).is_file()


def test_the_runtime_reads_the_references_tokenizer_json_to_the_same_ids(tiny_t5):
    root, tokenizer, _, _ = tiny_t5
    saved = json.loads((root / "tokenizer_3" / "tokenizer.json").read_text())
    assert sum(t["content"].startswith("<extra_id_") for t in saved["added_tokens"]) == 100  # T5's sentinels
    for max_length in (8, 32, 256):
        enc = T5Encoder("text_encoder_3", root / "tokenizer_3" / "tokenizer.json", max_length)
        ids, mask, notes = enc.tokenize(PROMPTS)
        ref = tokenizer(PROMPTS, padding="max_length", max_length=max_length, truncation=True, return_tensors="np")
        np.testing.assert_array_equal(ids, ref.input_ids)
        np.testing.assert_array_equal(mask, ref.attention_mask)
        assert len(notes) == sum(len(tokenizer(p).input_ids) > max_length for p in PROMPTS) >= 1


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
@pytest.mark.parametrize("mask", [False, True], ids=["ids", "ids+mask"])
def test_the_runtime_encoder_equals_transformers(tiny_t5, backend, mask):
    root, tokenizer, model, variants = tiny_t5
    variant = variants[mask]
    call = _session(root, variant, backend)
    encoder = T5Encoder(variant.file.split("/")[0], root / "tokenizer_3" / "tokenizer.json", 32, mask_input=mask)
    with pytest.warns(UserWarning, match="was cut to T5's 32 tokens"):  # LONG
        out = encoder.encode(call, PROMPTS)
    reference, batch = _reference(model, tokenizer, PROMPTS, 32, mask)
    assert out.hidden.dtype == np.float32 and out.hidden.shape == reference.shape == (len(PROMPTS), 32, 32)
    np.testing.assert_array_equal(out.mask, batch.attention_mask.numpy())
    err = float(np.abs(out.hidden - reference).max())
    assert err < 1e-4, err
    # the comparison can fail: other prompts (each shifted by one) are far from these
    other, _ = _reference(model, tokenizer, PROMPTS[1:] + PROMPTS[:1], 32, mask)
    assert float(np.abs(out.hidden - other).max()) > 1000 * max(err, 1e-6)


def test_the_mask_graph_reads_the_mask(tiny_t5):
    # the mask is an input of the graph, not the sample's mask baked in: a padded row changes with it
    root, tokenizer, model, variants = tiny_t5
    call = _session(root, variants[True], "onnxruntime")
    ids = tokenizer(["a red circle"], padding="max_length", max_length=32, return_tensors="np").input_ids
    with_mask = call("text_encoder_2", input_ids=ids, attention_mask=(ids != 0).astype(np.int64))["last_hidden_state"]
    ones = call("text_encoder_2", input_ids=ids, attention_mask=np.ones_like(ids))["last_hidden_state"]
    unmasked = _session(root, variants[False], "onnxruntime")("text_encoder_3", input_ids=ids)["last_hidden_state"]
    assert float(np.abs(with_mask - ones).max()) > 1e-2
    np.testing.assert_allclose(ones, unmasked, atol=1e-5)  # all ones: as if there were no mask


def test_the_contract_refuses_what_is_not_t5s_encoder():
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from edgediff.export.components import ExportError
    from edgediff.export.t5 import t5_encoder_contract

    config = transformers.T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=16, num_layers=1, num_heads=2)
    with pytest.raises(ExportError, match=r"expected a T5EncoderModel \(T5's encoder alone\), got T5ForConditional"):
        t5_encoder_contract(transformers.T5ForConditionalGeneration(config), 16)
    with pytest.raises(ExportError, match="max_length must be at least 2"):
        t5_encoder_contract(transformers.T5EncoderModel(config), 1)
