"""A small T5 tokenizer built offline: SentencePiece's Unigram model through ``tokenizers``, T5's conventions.

T5's tokenizer (``google/t5-v1_1-xxl``, SD3's ``tokenizer_3``, Flux's ``tokenizer_2``) is a SentencePiece
Unigram model of 32,000 pieces with ``<pad>`` = 0, ``</s>`` = 1, ``<unk>`` = 2, no byte fallback (an unknown
character is ``<unk>``), ``</s>`` appended to every sequence and 100 ``<extra_id_N>`` sentinels after the
vocabulary. The tiny SD3/Flux test models of diffusers read ``hf-internal-testing/tiny-random-t5`` from the hub;
this builds an equivalent one here, as ``export/clip_tokenizer.py`` builds CLIP's: a Unigram model whose pieces
and scores are counted in a small fixed corpus (the same ``tokenizer.json`` every time), the pre-tokenizer and decoder
transformers' ``T5Tokenizer`` gives the real one (whitespace split, ``Metaspace`` with ``▁``), NFKC for
SentencePiece's ``nmt_nfkc`` character map, and the ``$A </s>`` post-processor.

``build_t5_tokenizer`` needs only ``tokenizers`` (the runtime's dependency, so torch-free tests can use it);
``build_t5_tokenizer_fast`` wraps it as transformers' ``T5TokenizerFast`` (the reference, which adds the
sentinels) and saves it, so the runtime reads the very ``tokenizer.json`` the reference tokenizes with. For
tests and random-weight recipes; real checkpoints bring their own tokenizer.
"""

from __future__ import annotations

import math
from pathlib import Path

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"  # ids 0, 1, 2, as in every T5 vocabulary
WORDS, PIECES = 120, 120  # whole words and pieces inside words kept from the corpus (characters come on top)
EXTRA_IDS = 100  # T5's <extra_id_0>..<extra_id_99>, added by T5TokenizerFast as in the real tokenizer

COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black", "pink", "brown", "grey", "cyan")
SHAPES = ("circle", "square", "triangle", "star", "cross", "ring", "heart", "diamond")
SENTENCES = (
    "a photo of a cat sitting on the mat",
    "an astronaut riding a horse on the moon, highly detailed, 4k, trending on artstation",
    "the quick brown fox jumps over the lazy dog.",
    "a watercolor painting of a lighthouse by the sea at sunset",
    "portrait of an old man with a beard, studio lighting, 85mm",
    "a bowl of fruit: apples, pears and grapes (still life)",
    "cinematic shot of a city street in the rain at night, neon signs",
    "A small house in the mountains, snow, pine trees; 1990s film photograph!",
)


def corpus() -> list[str]:
    """The fixed training text: the shapes model's scenes (colour, shape, background) and common prompt words."""
    scenes = [f"a {size} {colour} {shape} on a {background} background"
              for size in ("small", "large") for colour in COLOURS for shape in SHAPES
              for background in COLOURS if background != colour]
    return scenes + list(SENTENCES) * 20


def unigram_vocab(text: list[str] | None = None, words: int = WORDS, pieces: int = PIECES) -> list[tuple[str, float]]:
    """SentencePiece-style pieces with log-probability scores, counted in ``text`` (``corpus()``): T5's three
    specials, the ``words`` most frequent whole words (``▁red``), the ``pieces`` most frequent 2-4 character
    pieces inside words (``ing``, ``▁ci``) and every character seen, bare and after ``▁``, so any text of those
    characters segments; others are ``<unk>``. Counted, not trained: the same vocabulary on every run (the
    Unigram trainer's result varies between runs)."""
    from collections import Counter

    counts: Counter[str] = Counter()
    for line in text or corpus():
        counts.update("▁" + w for w in line.split())
    found: Counter[str] = Counter()  # pieces of 2-4 characters inside words
    chars: Counter[str] = Counter()
    for word, n in counts.items():
        for size in (2, 3, 4):
            for i in range(len(word) - size + 1):
                found[word[i:i + size]] += n
        for c in word.lstrip("▁"):
            chars[c] += n
            chars["▁" + c] += n
    chars["▁"] = sum(counts.values())
    chosen = dict(counts.most_common(words))
    inner = [(p, n) for p, n in found.most_common() if p not in chosen and p != "▁"]
    chosen |= dict(inner[:pieces])
    for c, n in chars.items():
        chosen.setdefault(c, n)
    total = sum(chosen.values())
    scored = sorted(((p, math.log(n / total)) for p, n in chosen.items()), key=lambda s: (-s[1], s[0]))
    return [(PAD, 0.0), (EOS, 0.0), (UNK, 0.0)] + scored


def build_t5_tokenizer(vocab: list[tuple[str, float]] | None = None):
    """T5's tokenizer pipeline around a Unigram model of ``vocab`` (``unigram_vocab()``): a ``tokenizers``
    ``Tokenizer``, needing nothing else."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    tok = Tokenizer(models.Unigram(vocab or unigram_vocab(), unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
    ])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.add_special_tokens([PAD, EOS, UNK])  # matched whole in text and skipped by decode, as in T5's own file
    tok.post_processor = processors.TemplateProcessing(single=f"$A {EOS}", pair=f"$A {EOS} $B {EOS}",
                                                       special_tokens=[(EOS, 1)])
    return tok


def build_t5_tokenizer_fast(out_dir: Path, model_max_length: int = 512):
    """``build_t5_tokenizer()`` as transformers' ``T5TokenizerFast``, saved in ``out_dir`` (``tokenizer.json``
    with the sentinels, and ``tokenizer_config.json``): the reference, and the file an artifact ships."""
    from transformers import T5TokenizerFast

    tok = T5TokenizerFast(tokenizer_object=build_t5_tokenizer(), extra_ids=EXTRA_IDS,
                          model_max_length=model_max_length)
    got = (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id)
    if got != (0, 1, 2):
        raise RuntimeError(f"T5TokenizerFast numbered pad, eos, unk as {got}, not T5's 0, 1, 2")
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(out_dir))
    return tok
