"""Prompt -> token ids with the artifact's ``tokenizer.json`` (the ``tokenizers`` library).

Matches diffusers' ``tokenizer(prompt, padding="max_length", max_length=77,
truncation=True)``: ``<|startoftext|>``, up to 75 tokens, ``<|endoftext|>``, then
padding. A longer prompt is truncated with a warning naming what was dropped.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
SHOWN_TOKENS = 20  # of a truncated prompt's dropped part, in the warning


class PromptTokenizer:
    def __init__(self, path: Path, max_length: int, pad_token_id: int):
        self._tok = Tokenizer.from_file(str(path))
        self._tok.no_padding()
        self._tok.no_truncation()
        self.max_length = max_length
        self.pad_token_id = pad_token_id
        self.bos = self._tok.token_to_id(BOS)
        self.eos = self._tok.token_to_id(EOS)
        if self.bos is None or self.eos is None:
            raise ValueError(f"{path} is not a CLIP tokenizer (no {BOS} / {EOS} tokens)")
        if pad_token_id >= self._tok.get_vocab_size():
            raise ValueError(f"pad_token_id {pad_token_id} is outside the vocabulary of {path} "
                             f"({self._tok.get_vocab_size()} tokens)")

    def __call__(self, prompts: list[str]) -> np.ndarray:
        rows = []
        room = self.max_length - 2
        for prompt in prompts:
            ids = self._tok.encode(prompt, add_special_tokens=False).ids
            if len(ids) > room:
                dropped = ids[room:]
                # CLIP's word-end marker, where the tokenizer.json has no decoder to turn it into spaces
                shown = self._tok.decode(dropped[:SHOWN_TOKENS]).replace("</w>", " ").strip()
                more = f" and {len(dropped) - SHOWN_TOKENS} more tokens" if len(dropped) > SHOWN_TOKENS else ""
                warnings.warn(
                    f"the prompt is longer than the text encoder's {self.max_length} tokens; "
                    f"{len(dropped)} tokens were truncated: {shown!r}{more}",
                    stacklevel=3,
                )
                ids = ids[:room]
            ids = [self.bos, *ids, self.eos]
            rows.append(ids + [self.pad_token_id] * (self.max_length - len(ids)))
        return np.asarray(rows, dtype=np.int64)
