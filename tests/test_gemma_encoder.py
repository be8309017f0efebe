"""Gemma2's decoder as a text-encoder part (issue 25: Sana): the offline Gemma tokenizer, the export contract, and
the runtime's ``GemmaEncoder`` against transformers' ``GemmaTokenizer`` and ``Gemma2Model``.

The fast tier (torch-free) checks the tokenizer's conventions (specials, byte fallback, ``<bos>`` first), padding,
truncation, the instruction prefix, ``count`` and the refusals. The transformers tier compares the runtime's ids
with the reference tokenizer's, as diffusers' ``SanaPipeline`` calls it. The torch tier builds a tiny Gemma2Model
from a config, exports it with ``gemma_encoder_contract`` (traced at one length) and compares the runtime with
PyTorch at two other lengths, padding rows included.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgediff.export.gemma_tokenizer import BYTES, build_gemma_tokenizer
from edgediff.runtime.encoders import ENCODERS, Encoded, GemmaEncoder, T5Encoder

from .test_runtime_lean import _run

LONG = "a large red circle on a blue background, " * 30  # about 270 tokens of the tiny vocabulary
PROMPTS = ["a red circle on a blue background", "", "an astronaut riding a horse on the moon, highly detailed, 4k",
           "zebra 日本 😀  many   spaces\tand\ttabs", "A Small HOUSE; 1990s film photograph! Ünïcödé ß", LONG,
           " leading and trailing spaces ", "émoji 👩‍🚀 🇯🇵 and <0x41> written out"]
# the shape of Sana's complex_human_instruction: lines joined by "\n", the prompt written straight after
PREFIX = "Given a user prompt, describe it in detail:\n- keep the colours (red, blue)\nUser Prompt: "


@pytest.fixture(scope="module")
def fast_tokenizer(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gemmatok") / "tokenizer.json"
    build_gemma_tokenizer().save(str(path))
    return path


def _unpadded(prompt: str, prefix: str = "") -> list[int]:
    return build_gemma_tokenizer().encode(prefix + prompt).ids


# ---------------------------------------------------------------- fast tier: no torch, no transformers


@pytest.mark.fast
def test_the_tokenizer_has_gemmas_conventions_and_is_the_same_every_build():
    tok = build_gemma_tokenizer()
    assert [tok.token_to_id(t) for t in ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>")] == [0, 1, 2, 3, 4]
    assert [tok.token_to_id(b) for b in BYTES] == list(range(5, 261))  # <0x00>..<0xFF>
    assert tok.to_str() == build_gemma_tokenizer().to_str()  # counted, not trained: deterministic
    e = tok.encode("a red circle 😀")
    # byte fallback: the emoji is its UTF-8 bytes, not <unk>
    assert e.tokens == ["<bos>", "a", "▁red", "▁circle", "▁", "<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]
    assert tok.encode("").ids == [2] and tok.encode("a").ids[0] == 2
    for prompt in PROMPTS:
        assert 3 not in tok.encode(prompt).ids  # never <unk>: bytes
        assert tok.decode(tok.encode(prompt).ids) == prompt  # spaces, tabs and bytes come back as they were


@pytest.mark.fast
def test_prompts_are_padded_right_and_cut_as_sanas_pipeline_does(fast_tokenizer):
    enc = GemmaEncoder("text_encoder", fast_tokenizer, 16)
    with pytest.warns(UserWarning, match="was cut to Gemma2's 16 tokens") as caught:
        out = enc.encode(lambda component, **feeds: {"last_hidden_state": feeds["input_ids"][..., None] * 1.0},
                         PROMPTS)
    ids, mask = out.hidden[..., 0].astype(np.int64), out.mask
    cut = 0
    for row, prompt in enumerate(PROMPTS):
        tokens = _unpadded(prompt)
        kept = tokens[:16]  # <bos> and the first 15 tokens
        cut += len(tokens) > 16
        assert ids[row].tolist() == kept + [0] * (16 - len(kept)), prompt
        assert mask[row].tolist() == [1] * len(kept) + [0] * (16 - len(kept))
    assert ids[1].tolist() == [2] + [0] * 15  # the empty prompt: <bos> alone
    assert cut == len(caught) == len(out.notes) >= 3
    assert any(n.startswith("the prompt 'a large red circle on a blue background,'... was cut") for n in out.notes)
    assert any(n.endswith(" ...") for n in out.notes)  # a long cut is itself cut in the note
    assert "<pad>" not in "".join(out.notes) and "<bos>" not in "".join(out.notes)  # the notes are text


@pytest.mark.fast
def test_the_prefix_goes_before_each_prompt_and_the_length_is_the_calls(fast_tokenizer):
    enc = GemmaEncoder("text_encoder", fast_tokenizer, 16)
    n = enc.count(PREFIX)
    assert n == len(_unpadded("", PREFIX)) > 20  # <bos> counted, nothing padded or cut
    length = n + 16 - 2  # Sana's max_length_all
    ids, mask, notes = enc.tokenize(PROMPTS[:3], length, PREFIX)
    assert ids.shape == mask.shape == (3, length) and ids.dtype == mask.dtype == np.int64 and notes == ()
    for row, prompt in enumerate(PROMPTS[:3]):
        expected = _unpadded(prompt, PREFIX)  # tokenized as one string: merges may cross the join
        assert ids[row].tolist() == expected + [0] * (length - len(expected))
    assert enc.tokenize(["a"])[0].shape == (1, 16)  # the encoder's own length stays the default
    with pytest.warns(UserWarning, match=r"was cut to Gemma2's 50 tokens \(its instruction prefix included\)"):
        enc.encode(lambda component, **feeds: {"last_hidden_state": np.zeros(1)}, [LONG], 50, PREFIX)
    # A1111's syntax is refused in the prompt, never in the prefix (Sana's instruction has brackets of its own)
    with pytest.raises(ValueError, match=r"the prompt uses a weight of 1.1 on 'red', which Gemma2 cannot apply"):
        enc.tokenize(["a (red) circle"], length, PREFIX)
    expected = _unpadded("a (red)", "(x) ")
    assert enc.tokenize([r"a \(red\)"], None, "(x) ")[0][0].tolist() == expected + [0] * (16 - len(expected))


@pytest.mark.fast
def test_the_graph_gets_ids_and_the_mask(fast_tokenizer):
    seen = []

    def call(component, **feeds):
        seen.append((component, sorted(feeds), feeds["input_ids"].shape))
        return {"last_hidden_state": np.zeros((*feeds["input_ids"].shape, 4), np.float32)}

    out = GemmaEncoder("text_encoder", fast_tokenizer, 16).encode(call, ["a", "b c"], 9)
    assert isinstance(out, Encoded) and out.pooled is None and out.mask.sum(axis=1).tolist() == [2, 3]
    assert out.hidden.shape == (2, 9, 4) and seen == [("text_encoder", ["attention_mask", "input_ids"], (2, 9))]
    assert ENCODERS == {"t5": T5Encoder, "gemma": GemmaEncoder}


@pytest.mark.fast
def test_tokenizers_that_are_not_gemmas_are_refused(tmp_path, fast_tokenizer):
    from tokenizers import processors

    from edgediff.export.t5_tokenizer import build_t5_tokenizer

    build_t5_tokenizer().save(str(tmp_path / "t5.json"))
    with pytest.raises(ValueError, match=r"t5.json is not a Gemma tokenizer \(it does not start every sequence with "
                                         r"<bos>\)"):
        GemmaEncoder("text_encoder", tmp_path / "t5.json", 16)
    tok = build_gemma_tokenizer()
    tok.post_processor = processors.TemplateProcessing(single="$A <eos>", special_tokens=[("<eos>", 1)])
    tok.save(str(tmp_path / "no_bos.json"))
    with pytest.raises(ValueError, match="no_bos.json is not a Gemma tokenizer"):
        GemmaEncoder("text_encoder", tmp_path / "no_bos.json", 16)
    with pytest.raises(ValueError, match="pad_token_id 5000 is outside the vocabulary"):
        GemmaEncoder("text_encoder", fast_tokenizer, 16, pad_token_id=5000)
    with pytest.raises(ValueError, match=r"text_encoder: max_length must be at least 2 \(<bos> and a token\), got 1"):
        GemmaEncoder("text_encoder", fast_tokenizer, 1)
    with pytest.raises(ValueError, match="max_length must be at least 2"):
        GemmaEncoder("text_encoder", fast_tokenizer, 16).tokenize(["a"], 0)
    with pytest.raises(ValueError, match="lone surrogate"):
        GemmaEncoder("text_encoder", fast_tokenizer, 16).tokenize(["a red \udce9 circle"])


@pytest.mark.fast
def test_the_runtime_encoder_imports_no_torch(fast_tokenizer):
    r = _run(f"""
        from edgediff.runtime.encoders import GemmaEncoder
        from edgediff.export.gemma_tokenizer import build_gemma_tokenizer
        build_gemma_tokenizer()
        enc = GemmaEncoder("text_encoder", {str(fast_tokenizer)!r}, 8)
        enc.tokenize(["a red circle"], enc.count("prefix ") + 6, "prefix ")
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
        print("heavy:", heavy)
        """)
    assert r.returncode == 0, r.stderr
    assert "heavy: []" in r.stdout


# ---------------------------------------------------------------- transformers tier: the reference tokenizer


@pytest.fixture(scope="module")
def reference_tokenizer(tmp_path_factory):
    """The saved GemmaTokenizer, loaded back as diffusers loads a pipeline's (``from_pretrained``: transformers 5
    rebuilds Gemma's pipeline around the file's vocabulary and merges), padding on the right as Sana sets it."""
    transformers = pytest.importorskip("transformers")
    from edgediff.export.gemma_tokenizer import build_gemma_tokenizer_fast

    root = tmp_path_factory.mktemp("tiny-gemma-tok")
    build_gemma_tokenizer_fast(root / "tokenizer", model_max_length=300)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(root / "tokenizer"))
    assert type(tokenizer).__name__ == "GemmaTokenizer"
    tokenizer.padding_side = "right"
    return root / "tokenizer", tokenizer


def test_the_runtime_tokenizes_as_transformers_gemma_tokenizer(reference_tokenizer):
    folder, tokenizer = reference_tokenizer
    enc = GemmaEncoder("text_encoder", folder / "tokenizer.json", 300)
    for prefix in ("", PREFIX):
        n = enc.count(prefix)
        assert n == len(tokenizer.encode(prefix))  # what Sana sizes its max_length with
        for max_length in (8, 32, n + 300 - 2):
            ids, mask, notes = enc.tokenize(PROMPTS, max_length, prefix)
            ref = tokenizer([prefix + p for p in PROMPTS], padding="max_length", max_length=max_length,
                            truncation=True, add_special_tokens=True, return_tensors="np")
            np.testing.assert_array_equal(ids, ref.input_ids)
            np.testing.assert_array_equal(mask, ref.attention_mask)
            assert len(notes) == sum(len(tokenizer(prefix + p).input_ids) > max_length for p in PROMPTS)
    assert len(notes) == 0 and len(enc.tokenize(PROMPTS, 8)[2]) >= 5  # the long one fits at Sana's length
    # the comparison can fail: the same prompts through T5's conventions (</s> last, no <bos>) are other ids
    ref = tokenizer(PROMPTS[0], padding="max_length", max_length=16, return_tensors="np").input_ids
    assert ref[0, 0] == 2 and ref[0, -1] == 0
    assert not np.array_equal(enc.tokenize(PROMPTS[:1], 16, " ")[0], ref)  # one space more is another sequence


# ---------------------------------------------------------------- torch tier: export and parity


@pytest.fixture(scope="module")
def tiny_gemma(reference_tokenizer, tmp_path_factory):
    """A tiny Gemma2Model over the reference tokenizer's vocabulary, exported with ``gemma_encoder_contract`` at
    max_length 24 (traced at 27). Its sliding window (6) is shorter than the sequences, so the sliding layer's mask
    is checked too (Gemma2-2B's 4,096 is longer than any of Sana's)."""
    torch = pytest.importorskip("torch")
    from transformers import Gemma2Config, Gemma2Model

    from edgediff.export.components import export_component
    from edgediff.export.gemma import gemma_encoder_contract

    folder, tokenizer = reference_tokenizer
    torch.manual_seed(0)
    config = Gemma2Config(head_dim=16, hidden_size=8, intermediate_size=64, num_attention_heads=2,
                          num_hidden_layers=2, num_key_value_heads=2, vocab_size=len(tokenizer), sliding_window=6,
                          attn_implementation="eager")
    model = Gemma2Model(config).eval()
    assert config.layer_types == ["sliding_attention", "full_attention"]
    root = tmp_path_factory.mktemp("tiny-gemma")
    contract = gemma_encoder_contract(model, 24)
    traced = contract.sample()[0].shape[1]
    variant = export_component(contract, root)
    return root, folder, tokenizer, model, variant, traced


def _session(root, variant, backend):
    from edgediff.runtime.backends import BackendOptions, installed_backends, open_session

    if backend not in installed_backends():
        pytest.skip(f"{backend} is not installed")
    component = variant.file.split("/")[0]
    session = open_session(root, component, variant, backend, "cpu", BackendOptions(threads=1, ov_precision="f32"))
    return lambda name, **feeds: (name == component or pytest.fail(name)) and session(**feeds)


def _reference(model, tokenizer, texts, max_length):
    import torch

    batch = tokenizer(texts, padding="max_length", max_length=max_length, truncation=True, add_special_tokens=True,
                      return_tensors="pt")
    with torch.no_grad():
        return model(batch.input_ids, attention_mask=batch.attention_mask)[0].numpy(), batch


def test_the_contract_declares_a_dynamic_sequence_and_passes_the_gate(tiny_gemma):
    root, _, _, _, variant, traced = tiny_gemma
    assert traced == 27  # not 24, nor the lengths the runtime calls it with below
    assert [(t.name, t.dtype, t.shape) for t in variant.inputs] == [("input_ids", "int64", ("batch", "sequence")),
                                                                   ("attention_mask", "int64", ("batch", "sequence"))]
    assert [(t.name, t.dtype, t.shape) for t in variant.outputs] == [("last_hidden_state", "float32",
                                                                      ("batch", "sequence", 8))]
    assert variant.precision == "fp32" and variant.quality["parity_vs_torch"]["max_rel_err"] < 1e-5
    assert (root / variant.file).is_file()


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_the_runtime_encoder_equals_transformers_at_two_lengths(tiny_gemma, backend):
    root, folder, tokenizer, model, variant, _ = tiny_gemma
    call = _session(root, variant, backend)
    encoder = GemmaEncoder("text_encoder", folder / "tokenizer.json", 24)
    prefixed = encoder.count(PREFIX) + 24 - 2  # Sana's prompt length behind its instruction
    for prefix, length in (("", 24), (PREFIX, prefixed)):
        with pytest.warns(UserWarning, match=f"was cut to Gemma2's {length} tokens"):  # LONG
            out = encoder.encode(call, PROMPTS, None if not prefix else length, prefix)
        reference, batch = _reference(model, tokenizer, [prefix + p for p in PROMPTS], length)
        assert out.hidden.dtype == np.float32 and out.hidden.shape == reference.shape == (len(PROMPTS), length, 8)
        np.testing.assert_array_equal(out.mask, batch.attention_mask.numpy())
        assert 0 < out.mask[1].sum() < length  # padded rows among them (the empty prompt: <bos> alone)
        err = float(np.abs(out.hidden - reference).max()) / float(np.abs(reference).max())
        assert err < 1e-5, (length, err)
        # the comparison can fail: other prompts (each shifted by one) are far from these
        other, _ = _reference(model, tokenizer, [prefix + p for p in PROMPTS[1:] + PROMPTS[:1]], length)
        assert float(np.abs(out.hidden - other).max()) / float(np.abs(reference).max()) > 1000 * max(err, 1e-7)


def test_the_graph_reads_the_mask(tiny_gemma):
    # causal: the tokens never see the padding after them, but the padding's own rows see it where the mask
    # lets them; so the mask is an input of the graph, not the sample's baked in, if the padded rows change
    root, _, tokenizer, model, variant, _ = tiny_gemma
    import torch

    call = _session(root, variant, "onnxruntime")
    batch = tokenizer(["a red circle"], padding="max_length", max_length=20, return_tensors="np")
    ids, mask = batch.input_ids, batch.attention_mask
    used = int(mask.sum())
    masked = call("text_encoder", input_ids=ids, attention_mask=mask)["last_hidden_state"]
    ones = call("text_encoder", input_ids=ids, attention_mask=np.ones_like(mask))["last_hidden_state"]
    np.testing.assert_allclose(masked[:, :used], ones[:, :used], atol=1e-5)
    assert float(np.abs(masked[:, used:] - ones[:, used:]).max()) > 1e-2
    with torch.no_grad():
        ref = model(torch.from_numpy(ids), attention_mask=torch.ones(ids.shape, dtype=torch.int64))[0].numpy()
    np.testing.assert_allclose(ones, ref, atol=1e-5)  # all ones: transformers' unmasked result


def test_the_contract_refuses_what_is_not_gemmas_decoder():
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from edgediff.export.components import ExportError
    from edgediff.export.gemma import gemma_encoder_contract

    config = transformers.Gemma2Config(head_dim=8, hidden_size=8, intermediate_size=16, num_attention_heads=2,
                                       num_hidden_layers=1, num_key_value_heads=2, vocab_size=64)
    with pytest.raises(ExportError, match=r"expected Gemma2's decoder alone \(a Gemma2Model, or a GemmaModel\), got "
                                          r"Gemma2ForCausalLM \(its .model is the decoder\)"):
        gemma_encoder_contract(transformers.Gemma2ForCausalLM(config), 16)
    t5 = transformers.T5EncoderModel(transformers.T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=16, num_layers=1,
                                                           num_heads=2))
    with pytest.raises(ExportError, match="got T5EncoderModel"):
        gemma_encoder_contract(t5, 16)
    with pytest.raises(ExportError, match="max_length must be at least 2"):
        gemma_encoder_contract(transformers.Gemma2Model(config), 1)
    config.use_bidirectional_attention = True
    with pytest.raises(ExportError, match="use_bidirectional_attention"):
        gemma_encoder_contract(transformers.Gemma2Model(config), 16)


@pytest.mark.fast
def test_threads_tokenizing_at_different_lengths_do_not_mix(fast_tokenizer):
    """Sana tokenizes the prefixed prompt and the negative at two lengths, through one encoder shared by a
    pipeline's concurrent calls: each call gets its own length's ids, whatever the others set meanwhile."""
    import threading

    enc = GemmaEncoder("text_encoder", fast_tokenizer, 16)
    alone = {n: enc.tokenize(["a red circle on a blue background"], n, "prefix ")[0] for n in (9, 40)}
    errors, wrong = [], []

    def run(n: int) -> None:
        for _ in range(200):
            try:
                ids = enc.tokenize(["a red circle on a blue background"], n, "prefix ")[0]
                if not np.array_equal(ids, alone[n]):
                    wrong.append(n)
            except Exception as e:  # noqa: BLE001 - a reshape to the other call's length
                errors.append(repr(e)[:200])
            enc.count("prefix ")

    threads = [threading.Thread(target=run, args=(n,)) for n in (9, 40, 9, 40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and wrong == []
