"""Text encoders as parts: prompts -> hidden states, composed by each family's conditioner.

A ``TextEncoder`` turns a batch of prompts into ``Encoded`` (hidden states, a pooled vector where the model
has one, the attention mask where the family needs it) through one exported graph. The family's
conditioner composes them: SD3 pads CLIP-L + CLIP-G to T5's width and appends T5's sequence, Flux takes T5's
sequence and CLIP's pooled vector (``docs/DESIGN-NEXT.md``, change 2).

``T5Encoder`` is the T5 (v1.1) encoder of SD3 and FLUX.1. It tokenizes as diffusers' pipelines do
(``tokenizer(prompt, padding="max_length", max_length=max_sequence_length, truncation=True)``: the tokens, ``</s>``,
``<pad>`` to ``max_length``; a longer prompt keeps its first ``max_length - 1`` tokens and a note names what was
cut) with the ``tokenizers`` library reading the artifact's ``tokenizer.json``, as transformers'
``T5TokenizerFast`` does. A1111's ``(word:1.3)`` weights and ``BREAK`` mean nothing to T5 (they are CLIP-chunk
operations), so a prompt using them is refused, not passed through as literal brackets; ``\\(`` writes a literal
bracket, as everywhere in edgediff (``edgediff.runtime.prompts``).

``GemmaEncoder`` is Gemma2's decoder, Sana's text encoder, read to its last hidden state with the attention mask.
It tokenizes as diffusers' Sana pipelines do (``tokenizer.padding_side = "right"``, ``tokenizer(prefix + prompt,
padding="max_length", max_length=..., truncation=True, add_special_tokens=True)``: ``<bos>``, the tokens,
``<pad>`` to ``max_length``), the length given per call, since Sana sizes it by the instruction prefix it puts
before each prompt (``count``), and feeds the graph a sequence of that length.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, Sequence

import numpy as np
from tokenizers import Tokenizer

from . import notes as call_notes
from .prompts import BREAK_MARKER, parse

# component, named inputs -> named outputs (conditioning.Call: the pipeline's timed, checked session call)
Call = Callable[..., dict[str, np.ndarray]]

EOS = "</s>"
BOS = "<bos>"  # Gemma's


@dataclass(frozen=True)
class Encoded:
    """A batch of prompts encoded: one row per prompt."""

    hidden: np.ndarray  # (prompts, sequence, width) float32
    pooled: np.ndarray | None = None  # (prompts, width) float32: a pooled projection (CLIP-G), else None
    mask: np.ndarray | None = None  # (prompts, sequence) int64: 1 for a token (</s> included), 0 for padding
    notes: tuple[str, ...] = ()  # what the caller should be told about this call (a prompt cut to max_length)


class TextEncoder(Protocol):
    component: str  # the graph it runs, as the manifest names it

    def encode(self, call: Call, prompts: Sequence[str]) -> Encoded:
        """Every prompt through the graph in one call."""
        ...


def plain_text(prompt: str, encoder: str) -> str:
    """``prompt`` as the text it means, for an encoder without A1111's weights and BREAK (escapes such as
    ``\\(`` read as the literal character); a ValueError where the prompt weights words or uses BREAK."""
    fragments = parse(prompt)
    for fragment in fragments:
        if fragment is BREAK_MARKER:
            what = "BREAK"
        elif fragment[1] != 1.0:
            what = f"a weight of {fragment[1]:.3g} on {fragment[0][:40]!r}"
        else:
            continue
        raise ValueError(f"the prompt uses {what}, which {encoder} cannot apply: (word:1.3)-style weights, (word), "
                         f"[word] and BREAK are A1111's syntax for CLIP text encoders; write the prompt without them, "
                         f"and a bracket meant as text as \\( \\) \\[ \\] (it starts {prompt[:60]!r})")
    return "".join(f[0] for f in fragments)


def padded_batch(tok: Tokenizer, texts: list[str], prompts: Sequence[str], length: int,
                 limit: str) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """``texts`` through ``tok`` (truncation and padding to ``length`` already set on it): ``input_ids`` and
    ``attention_mask``, (prompts, length) int64, and a note per prompt cut short, naming ``limit`` and what was
    dropped."""
    encodings = tok.encode_batch(texts)
    notes = []
    for prompt, e in zip(prompts, encodings):
        if e.overflowing:
            cut = tok.decode([i for o in e.overflowing for i, special in zip(o.ids, o.special_tokens_mask)
                              if not special])
            notes.append(f"the prompt {prompt[:40]!r}{'...' if len(prompt) > 40 else ''} was cut to {limit}; "
                         f"dropped: {cut[:200]!r}{' ...' if len(cut) > 200 else ''}")
    ids = np.array([e.ids for e in encodings], dtype=np.int64).reshape(len(prompts), length)
    mask = np.array([e.attention_mask for e in encodings], dtype=np.int64).reshape(ids.shape)
    return ids, mask, tuple(notes)


class T5Encoder:
    """T5's encoder: ``input_ids`` (and ``attention_mask`` where the graph takes it) of ``max_length`` tokens ->
    ``last_hidden_state``. ``Encoded.mask`` is the tokenizer's mask either way (SD3 and FLUX.1 run T5 without it,
    as diffusers does; PixArt and Chroma feed it)."""

    def __init__(self, component: str, tokenizer: Path, max_length: int, pad_token_id: int = 0, *,
                 mask_input: bool = False, output: str = "last_hidden_state"):
        if max_length < 2:
            raise ValueError(f"{component}: max_length must be at least 2 (a token and {EOS}), got {max_length}")
        self.component, self.max_length, self.mask_input, self.output = component, max_length, mask_input, output
        self._tok = Tokenizer.from_file(str(tokenizer))
        eos = self._tok.token_to_id(EOS)
        if eos is None or self._tok.encode("").ids != [eos]:
            raise ValueError(f"{tokenizer} is not a T5 tokenizer (it does not end every sequence with {EOS})")
        pad = self._tok.id_to_token(pad_token_id)
        if pad is None:
            raise ValueError(f"pad_token_id {pad_token_id} is outside the vocabulary of {tokenizer} "
                             f"({self._tok.get_vocab_size()} tokens)")
        # transformers' padding="max_length", truncation=True, max_length=max_length, on the same backend
        self._tok.enable_truncation(max_length)
        self._tok.enable_padding(length=max_length, pad_id=pad_token_id, pad_token=pad)

    def tokenize(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
        """``input_ids`` and ``attention_mask``, (prompts, max_length) int64, and a note per prompt cut short."""
        return padded_batch(self._tok, [plain_text(p, "T5") for p in prompts], prompts, self.max_length,
                            f"T5's {self.max_length} tokens (the model's max_sequence_length, as diffusers cuts it)")

    def encode(self, call: Call, prompts: Sequence[str]) -> Encoded:
        ids, mask, notes = self.tokenize(prompts)
        for note in notes:
            call_notes.add(note, stacklevel=3)
        feeds = {"input_ids": ids} | ({"attention_mask": mask} if self.mask_input else {})
        return Encoded(call(self.component, **feeds)[self.output], None, mask, notes)


class GemmaEncoder:
    """Gemma2's decoder (Gemma's tokenizer: byte-fallback BPE, ``<bos>`` first): ``input_ids`` and
    ``attention_mask`` of ``max_length`` tokens (or the call's) -> ``last_hidden_state``, the mask in ``Encoded``.
    An instruction ``prefix`` is put before each prompt as Sana's ``complex_human_instruction`` is; it is text, not
    a prompt: A1111's syntax is refused in the prompt only."""

    def __init__(self, component: str, tokenizer: Path, max_length: int, pad_token_id: int = 0):
        self.component, self.max_length = component, self._checked(max_length, component)
        self._tok = Tokenizer.from_file(str(tokenizer))
        bos = self._tok.token_to_id(BOS)
        if bos is None or self._tok.encode("").ids != [bos] or self._tok.encode("a").ids[:1] != [bos]:
            raise ValueError(f"{tokenizer} is not a Gemma tokenizer (it does not start every sequence with {BOS})")
        self._pad = self._tok.id_to_token(pad_token_id)
        if self._pad is None:
            raise ValueError(f"pad_token_id {pad_token_id} is outside the vocabulary of {tokenizer} "
                             f"({self._tok.get_vocab_size()} tokens)")
        self.pad_token_id = pad_token_id
        # the tokenizer's truncation and padding are state set per call (the prefixed prompt and the negative have
        # different lengths): one call at a time sets and uses them, whatever threads share this encoder
        self._lock = threading.Lock()

    @staticmethod
    def _checked(max_length: int, component: str) -> int:
        if max_length < 2:
            raise ValueError(f"{component}: max_length must be at least 2 ({BOS} and a token), got {max_length}")
        return max_length

    def count(self, text: str) -> int:
        """``len(tokenizer.encode(text))`` as transformers counts it: ``<bos>`` included, nothing cut or padded
        (Sana sizes its sequence by the instruction prefix's count)."""
        with self._lock:
            self._tok.no_truncation()
            self._tok.no_padding()
            return len(self._tok.encode(text).ids)

    def tokenize(self, prompts: Sequence[str], max_length: int | None = None,
                 prefix: str = "") -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
        """``input_ids`` and ``attention_mask``, (prompts, max_length) int64, of ``prefix + prompt`` each, and a
        note per prompt cut short."""
        length = self._checked(self.max_length if max_length is None else max_length, self.component)
        texts = [prefix + plain_text(p, "Gemma2") for p in prompts]
        # transformers' padding="max_length", truncation=True, padding_side="right", on the same backend
        with self._lock:
            self._tok.enable_truncation(length)
            self._tok.enable_padding(length=length, pad_id=self.pad_token_id, pad_token=self._pad, direction="right")
            return padded_batch(self._tok, texts, prompts, length, f"Gemma2's {length} tokens"
                                f"{' (its instruction prefix included)' if prefix else ''}, as diffusers cuts it")

    def encode(self, call: Call, prompts: Sequence[str], max_length: int | None = None, prefix: str = "") -> Encoded:
        ids, mask, notes = self.tokenize(prompts, max_length, prefix)
        for note in notes:
            call_notes.add(note, stacklevel=3)
        hidden = call(self.component, input_ids=ids, attention_mask=mask)["last_hidden_state"]
        return Encoded(hidden, None, mask, notes)


# the manifest's text-encoder kinds (manifest.TEXT_ENCODER_KINDS) read by a TextEncoder here, each made as
# cls(component, tokenizer.json, max_length, pad_token_id); "clip" is runtime.text's PromptTokenizer
ENCODERS: dict[str, type] = {"t5": T5Encoder, "gemma": GemmaEncoder}


__all__ = ["Call", "ENCODERS", "Encoded", "GemmaEncoder", "T5Encoder", "TextEncoder", "plain_text"]
