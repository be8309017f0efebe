"""Prompts as people write them: attention weights and ``BREAK``, as A1111's web UI reads them.

Syntax (A1111's, which ComfyUI, Forge and most prompt collections use):

- ``(words)`` multiplies their attention by 1.1, ``[words]`` divides it by 1.1, ``(words:1.3)`` sets a factor;
  brackets nest and their factors multiply: ``((a))`` is 1.21.
- ``\\(``, ``\\)``, ``\\[``, ``\\]``, ``\\\\`` are the literal characters.
- Unbalanced brackets are read as A1111 reads them, never refused: a ``)`` or ``]`` with nothing open is a
  literal character; a bracket left open weighs everything after it (``(word`` is ``(word)``).
- ``BREAK`` (capitals, a word of its own) ends the current 75-token chunk: what follows starts a new one.

A prompt becomes chunks of 75 tokens (plus start and end tokens: the encoder's 77), each encoded alone and
concatenated along the sequence, as A1111 and compel do, so a prompt is never truncated; long prompts are
split at 75 tokens (A1111's "go back to the last comma" option is not applied). A weighted chunk's hidden
states are scaled token by token and then rescaled to their original mean (A1111's
``FrozenCLIPEmbedderWithCustomWords``), so weights shift attention without changing the overall scale. This
parser is written from that documented behaviour; tests/test_prompts.py checks it against a reference.
"""

from __future__ import annotations

import math
import re

ROUND, SQUARE = 1.1, 1 / 1.1  # (x) and [x]
ESCAPABLE = "()[]\\"
WEIGHT = re.compile(r":\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*\)")  # ":1.3)" closing a round bracket
BREAK = re.compile(r"\s*\bBREAK\b\s*")
CHUNK = 75  # tokens of one chunk, between its start and end tokens
MAX_CHUNKS = 32  # a prompt of 2,400 tokens; more is refused (every chunk is a text-encoder pass and UNet context)


class BreakMarker:
    """Where ``BREAK`` starts a new chunk."""

    def __repr__(self) -> str:
        return "BREAK"


BREAK_MARKER = BreakMarker()
Fragment = tuple[str, float]


def parse(prompt: str) -> list[Fragment | BreakMarker]:
    """``prompt`` -> its text fragments with their weights, in order, and BREAK markers between them.

    >>> parse("a (red:1.5) [cat]")
    [('a ', 1.0), ('red', 1.5), (' ', 1.0), ('cat', 0.9090909090909091)]
    """
    chars: list[list] = []  # [character or BREAK_MARKER, weight]
    opened = {"(": [], "[": []}  # where each open bracket began, in ``chars``

    def weigh(start: int, factor: float) -> None:
        for item in chars[start:]:
            item[1] *= factor

    i = 0
    while i < len(prompt):
        c = prompt[i]
        if c == "\\" and i + 1 < len(prompt) and prompt[i + 1] in ESCAPABLE:
            chars.append([prompt[i + 1], 1.0])
            i += 2
            continue
        if c in "([":
            opened[c].append(len(chars))
        elif c == ":" and opened["("] and (m := WEIGHT.match(prompt, i)):
            weigh(opened["("].pop(), float(m[1]))
            i = m.end()
            continue
        elif c == ")" and opened["("]:
            weigh(opened["("].pop(), ROUND)
        elif c == "]" and opened["["]:
            weigh(opened["["].pop(), SQUARE)
        elif (c == "B" or c.isspace()) and (m := BREAK.match(prompt, i)):  # \b: a word of its own
            chars.append([BREAK_MARKER, 1.0])
            i = m.end()
            continue
        else:
            chars.append([c, 1.0])
        i += 1
    for start in opened["("]:
        weigh(start, ROUND)
    for start in opened["["]:
        weigh(start, SQUARE)
    return _runs(chars)


def _runs(chars: list[list]) -> list[Fragment | BreakMarker]:
    """Neighbouring characters of equal weight joined into fragments. Equal to float rounding: the same brackets
    applied in another order (``((a([a``: 1.1 x 1.1 against 1.1 x 1.1 x 1.1 / 1.1) must not split a word."""
    out: list = []
    for c, weight in chars:
        if c is BREAK_MARKER:
            out.append(BREAK_MARKER)
        elif out and out[-1] is not BREAK_MARKER and math.isclose(out[-1][1], weight, rel_tol=1e-9):
            out[-1] = (out[-1][0] + c, weight)
        else:
            out.append((c, weight))
    return out


def is_plain(fragments: list[Fragment | BreakMarker]) -> bool:
    """No weights and no BREAK: the prompt means exactly its text."""
    return all(f is not BREAK_MARKER and f[1] == 1.0 for f in fragments)
