"""Prompts as people write them: attention weights and ``BREAK``, as A1111's web UI reads them.

Syntax (A1111's, which ComfyUI, Forge and most prompt collections use):

- ``(words)`` multiplies their attention by 1.1, ``[words]`` divides it by 1.1, ``(words:1.3)`` sets a factor;
  brackets nest and their factors multiply: ``((a))`` is 1.21.
- ``\\(``, ``\\)``, ``\\[``, ``\\]``, ``\\\\`` are the literal characters.
- Unbalanced brackets are read as A1111 reads them, never refused: a ``)`` or ``]`` with nothing open is a
  literal character; a bracket left open weighs everything after it (``(word`` is ``(word)``).
- ``BREAK`` (capitals, a word of its own) ends the current 75-token chunk: what follows starts a new one.
- A prompt longer than ``MAX_CHARS`` (96,000 characters: 40 per token of the 2,400-token cap) is refused
  before it is read; reading is linear in the length (nesting, whitespace and long words included).

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
SPACES = re.compile(r"\s*")
BREAK = re.compile(r"\bBREAK\b\s*")  # after the whitespace before it
CHUNK = 75  # tokens of one chunk, between its start and end tokens
MAX_CHUNKS = 32  # a prompt of 2,400 tokens; more is refused (every chunk is a text-encoder pass and UNet context)
MAX_CHARS = 40 * MAX_CHUNKS * CHUNK  # 96,000 characters: refused before parsing, far past any prompt of 2,400 tokens
EXACT = 32  # open brackets up to which a weight is multiplied out as A1111 does (deeper: from sums of logs)


class BreakMarker:
    """Where ``BREAK`` starts a new chunk."""

    def __repr__(self) -> str:
        return "BREAK"


BREAK_MARKER = BreakMarker()
Fragment = tuple[str, float]


def parse(prompt: str) -> list[Fragment | BreakMarker]:
    """``prompt`` -> its text fragments with their weights, in order, and BREAK markers between them. Linear in
    the prompt's length (brackets record spans, weighed in one sweep); ValueError past ``MAX_CHARS`` and for text
    that is not UTF-8 (lone surrogates: bytes Python kept as escapes).

    >>> parse("a (red:1.5) [cat]")
    [('a ', 1.0), ('red', 1.5), (' ', 1.0), ('cat', 0.9090909090909091)]
    """
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate: bytes that were not UTF-8, kept by Python as escapes
        raise ValueError(f"the prompt is not valid text: character {e.start} is U+{ord(prompt[e.start]):04X}, a lone "
                         f"surrogate (bytes that were not UTF-8?); prompts are UTF-8 text (it starts "
                         f"{prompt[:60]!r})") from None
    if len(prompt) > MAX_CHARS:
        raise ValueError(f"the prompt is {len(prompt):,} characters long: at most {MAX_CHARS:,} are read (a prompt "
                         f"of {MAX_CHUNKS * CHUNK:,} tokens is far shorter); shorten it (it starts {prompt[:60]!r})")
    chars: list = []  # characters and BREAK markers, in order
    opened: dict[str, list[int]] = {"(": [], "[": []}  # where each open bracket began, in ``chars``
    spans: list[tuple[int, int, float]] = []  # (start, end, factor) of each bracket, in the order they close

    i = 0
    while i < len(prompt):
        c = prompt[i]
        if c == "\\" and i + 1 < len(prompt) and prompt[i + 1] in ESCAPABLE:
            chars.append(prompt[i + 1])
            i += 2
            continue
        if c in "([":
            opened[c].append(len(chars))
        elif c == ":" and opened["("] and (m := WEIGHT.match(prompt, i)):
            spans.append((opened["("].pop(), len(chars), float(m[1])))
            i = m.end()
            continue
        elif c == ")" and opened["("]:
            spans.append((opened["("].pop(), len(chars), ROUND))
        elif c == "]" and opened["["]:
            spans.append((opened["["].pop(), len(chars), SQUARE))
        elif c.isspace() or c == "B":  # BREAK, a word of its own, with the whitespace around it
            end = SPACES.match(prompt, i).end()  # the whole run, read once
            m = BREAK.match(prompt, end)
            if m:
                chars.append(BREAK_MARKER)
                i = m.end()
            else:
                chars.extend(prompt[i:max(end, i + 1)])
                i = max(end, i + 1)
            continue
        else:
            chars.append(c)
        i += 1
    spans += [(start, len(chars), ROUND) for start in opened["("]]
    spans += [(start, len(chars), SQUARE) for start in opened["["]]
    return _runs(chars, spans)


def _runs(chars: list, spans: list[tuple[int, int, float]]) -> list[Fragment | BreakMarker]:
    """Neighbouring characters of equal weight joined into fragments, in one sweep over the span ends.

    A character's weight is the product of the factors of the spans over it, multiplied in the order the
    brackets closed, as A1111 does (the same float rounding) while at most ``EXACT`` spans are open; deeper,
    it comes from running sums (log of the magnitudes, counts of zeros, infinities and negatives). Weights
    equal to float rounding join: the same brackets applied in another order (``((a([a``: 1.1 x 1.1 against
    1.1 x 1.1 x 1.1 / 1.1) must not split a word."""
    starts: dict[int, list[int]] = {}
    ends: dict[int, list[int]] = {}
    for index, (start, end, _) in enumerate(spans):
        if start < end:  # an empty bracket weighs nothing
            starts.setdefault(start, []).append(index)
            ends.setdefault(end, []).append(index)
    active: dict[int, float] = {}  # open span -> its factor
    totals = [0.0, 0, 0, 0]  # sum of log|factor|, zeros, infinities, negatives over ``active``
    out: list = []
    text: list[str] = []
    weight = 1.0

    def flush() -> None:
        if text:
            out.append(("".join(text), weight))
            text.clear()

    for position, c in enumerate(chars):
        if position in starts or position in ends:
            for index in ends.get(position, ()):
                _count(totals, active.pop(index), -1)
            for index in starts.get(position, ()):
                active[index] = spans[index][2]
                _count(totals, spans[index][2], 1)
            if not active:
                totals[0] = 0.0  # no rounding left over
            new = _product(active, totals)
            if not (math.isclose(new, weight, rel_tol=1e-9) or (math.isnan(new) and math.isnan(weight))):
                flush()
                weight = new
        if c is BREAK_MARKER:
            flush()
            out.append(BREAK_MARKER)
        else:
            text.append(c)
    flush()
    return out


def _count(totals: list, factor: float, sign: int) -> None:
    if factor == 0:
        totals[1] += sign
    elif math.isinf(factor):
        totals[2] += sign
    else:
        totals[0] += sign * math.log(abs(factor))
    totals[3] += sign * (factor < 0)


def _product(active: dict[int, float], totals: list) -> float:
    if len(active) <= EXACT:
        weight = 1.0
        for index in sorted(active):
            weight *= active[index]
        return weight
    log, zeros, infinities, negatives = totals
    if zeros and infinities:
        return math.nan
    try:
        magnitude = 0.0 if zeros else math.inf if infinities else math.exp(log)
    except OverflowError:
        magnitude = math.inf
    return -magnitude if negatives % 2 else magnitude


def is_plain(fragments: list[Fragment | BreakMarker]) -> bool:
    """No weights and no BREAK: the prompt means exactly its text."""
    return all(f is not BREAK_MARKER and f[1] == 1.0 for f in fragments)
