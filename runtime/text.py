"""Prompt -> token ids in 77-token chunks, with each token's weight, by the artifact's ``tokenizer.json``.

One chunk is diffusers' ``tokenizer(prompt, padding="max_length", max_length=77)``: ``<|startoftext|>``, up
to 75 tokens, ``<|endoftext|>``, padding. A longer prompt, or one with ``BREAK``, becomes several chunks, and
``(word:1.3)``-style weights give each token its factor (``edgediff.runtime.prompts``); nothing is truncated.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import AddedToken, Tokenizer

from .prompts import BREAK_MARKER, CHUNK, MAX_CHUNKS, parse

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
WORD_CHAR = re.compile(r"\w")  # a letter, digit or underscore: what a whole word may not touch
MAX_WEIGHT = float(np.finfo(np.float32).max)  # a token's weight, stored as float32


@dataclass(frozen=True)
class Chunks:
    """One prompt's chunks: ``ids`` (chunks, 77) int64 and each token's weight (chunks, 77) float32."""

    ids: np.ndarray
    weights: np.ndarray

    @property
    def weighted(self) -> bool:
        return bool((self.weights != 1.0).any())


class PromptTokenizer:
    def __init__(self, path: Path, max_length: int, pad_token_id: int):
        self._tok = Tokenizer.from_file(str(path))
        self._tok.no_padding()
        self._tok.no_truncation()
        self.max_length = max_length
        self.pad_token_id = pad_token_id
        self._expand: dict[int, list[int]] = {}  # a textual-inversion word's first token -> all its tokens
        self.bos = self._tok.token_to_id(BOS)
        self.eos = self._tok.token_to_id(EOS)
        if self.bos is None or self.eos is None:
            raise ValueError(f"{path} is not a CLIP tokenizer (no {BOS} / {EOS} tokens)")
        if pad_token_id >= self._tok.get_vocab_size():
            raise ValueError(f"pad_token_id {pad_token_id} is outside the vocabulary of {path} "
                             f"({self._tok.get_vocab_size()} tokens)")

    def add_word(self, word: str, count: int, source: Path) -> list[int]:
        """A textual-inversion word as ``count`` new tokens (``word``, ``word_1``...: diffusers' names); the
        ids they got, in order. Written once in a prompt, the word stands for all of them. A word with a letter,
        digit or ``_`` at an end matches whole words only (``ircl`` is not found in "circle"); one delimited by
        other characters at both ends (``<cat-toy>``) matches wherever it is written, as in diffusers."""
        names = [word] + [f"{word}_{k}" for k in range(1, count)]
        taken = [n for n in names if self._tok.token_to_id(n) is not None]
        if taken:
            raise ValueError(f"{source}: the embedding's word {taken[0]!r:.80} is already a token of the tokenizer (a "
                             "word of its vocabulary, or another embedding's); rename the file or its token")
        start = self._tok.get_vocab_size(with_added_tokens=True)
        self._tok.add_tokens([AddedToken(n, single_word=bool(WORD_CHAR.match(n[0]) or WORD_CHAR.match(n[-1])))
                              for n in names])
        ids = [self._tok.token_to_id(n) for n in names]
        if ids != list(range(start, start + count)):
            raise ValueError(f"{source}: the tokenizer numbered the new tokens {ids}, not {start}..{start + count - 1}")
        self._expand[ids[0]] = ids
        return ids

    @property
    def chunk_tokens(self) -> int:
        return min(CHUNK, self.max_length - 2)

    def chunks(self, prompt: str) -> Chunks:
        """``prompt``'s chunks: 75 tokens each (a ``BREAK`` ends one early), at least one."""
        groups: list[tuple[list[int], list[float]]] = [([], [])]
        for fragment in parse(prompt):
            if fragment is BREAK_MARKER:
                if groups[-1][0]:
                    groups.append(([], []))
                continue
            text, weight = fragment
            if not abs(weight) <= MAX_WEIGHT:  # NaN too
                raise ValueError(f"the prompt's brackets and weights multiply to {weight:.3g} for {text[:40]!r}, more than "
                                 "the encoder's float32 holds; nest fewer brackets or give a smaller (word:WEIGHT) (A1111's "
                                 f"weights are mostly 0.5 to 1.5; the prompt starts {prompt[:60]!r})")
            for token in (t for first in self._tok.encode(text, add_special_tokens=False).ids
                          for t in self._expand.get(first, (first,))):
                if len(groups[-1][0]) == self.chunk_tokens:
                    groups.append(([], []))
                groups[-1][0].append(token)
                groups[-1][1].append(weight)
        if len(groups) > 1 and not groups[-1][0]:
            groups.pop()  # a BREAK at the end
        if len(groups) > MAX_CHUNKS:
            raise ValueError(f"the prompt is {sum(len(g[0]) for g in groups):,} tokens long: at most {MAX_CHUNKS} "
                             f"chunks of {self.chunk_tokens} tokens ({MAX_CHUNKS * self.chunk_tokens:,} tokens) are "
                             f"encoded; shorten it (it starts {prompt[:60]!r})")
        ids = np.full((len(groups), self.max_length), self.pad_token_id, dtype=np.int64)
        weights = np.ones((len(groups), self.max_length), dtype=np.float32)
        for row, (tokens, factors) in enumerate(groups):
            ids[row, : len(tokens) + 2] = [self.bos, *tokens, self.eos]
            weights[row, 1 : len(tokens) + 1] = factors
        return Chunks(ids, weights)

    def truncated(self, text: str) -> tuple[np.ndarray, str]:
        """``text`` read literally (no weights, no BREAK: the caller has checked it) as one sequence of
        ``max_length`` ids, cut as transformers' ``tokenizer(text, padding="max_length", truncation=True)`` cuts
        it: ``<|startoftext|>``, the first ``max_length - 2`` tokens, ``<|endoftext|>``, padding. Returns the ids
        and the text that was cut ("" when nothing was)."""
        tokens = self._tok.encode(text, add_special_tokens=False).ids
        keep = self.max_length - 2
        ids = np.full(self.max_length, self.pad_token_id, dtype=np.int64)
        ids[: min(len(tokens), keep) + 2] = [self.bos, *tokens[:keep], self.eos]
        # BPE's end-of-word marks read as spaces, whether or not the file has CLIP's decoder
        cut = self._tok.decode(tokens[keep:]).replace("</w>", " ").strip() if len(tokens) > keep else ""
        return ids, " ".join(cut.split())
