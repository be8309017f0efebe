"""A small Gemma tokenizer built offline: a byte-fallback BPE model through ``tokenizers``, Gemma's conventions.

Gemma's tokenizer (``google/gemma-2-2b-it``, Sana's ``tokenizer``) is a SentencePiece BPE model of 256,000 pieces
with ``<pad>`` = 0, ``<eos>`` = 1, ``<bos>`` = 2, ``<unk>`` = 3, ``<mask>`` = 4, byte fallback (a character
outside the vocabulary is its UTF-8 bytes, ``<0x00>``..``<0xFF>``, never ``<unk>``), no dummy prefix (``"a cat"``
is ``a``, ``▁cat``) and ``<bos>`` put before every sequence. The tiny Sana test models of diffusers read
``hf-internal-testing/dummy-gemma`` from the hub; this builds an equivalent one here, as ``export/t5_tokenizer.py``
builds T5's: BPE merges counted in ``t5_tokenizer.corpus()`` (the same ``tokenizer.json`` every time), and the
pipeline transformers' ``GemmaTokenizer`` gives the real one (``convert_slow_tokenizer.GemmaConverter``): the
normalizer replaces " " with ``▁``, the pre-tokenizer splits at " " (none are left: the string stays whole, so
merges may cross words as SentencePiece's whitespace pieces do), the decoder turns ``▁`` back to " " and fuses byte
tokens, and the ``<bos> $A`` post-processor.

``build_gemma_tokenizer`` needs only ``tokenizers`` (the runtime's dependency, so torch-free tests can use it);
``build_gemma_tokenizer_fast`` wraps it as transformers' ``GemmaTokenizer`` (tokenizers-backed in transformers 5:
the reference) and saves it, so the runtime reads the very ``tokenizer.json`` the reference tokenizes with. For
tests and random-weight recipes; real checkpoints bring their own tokenizer.
"""

from __future__ import annotations

from pathlib import Path

from .t5_tokenizer import corpus

PAD, EOS, BOS, UNK, MASK = "<pad>", "<eos>", "<bos>", "<unk>", "<mask>"  # ids 0..4, as in Gemma's vocabulary
SPECIALS = (PAD, EOS, BOS, UNK, MASK)
BYTES = tuple(f"<0x{b:02X}>" for b in range(256))  # byte fallback's pieces, ids 5..260
MERGES = 400  # BPE merges counted in the corpus (characters and bytes come on top)
SPACE = "▁"


def _words(text: list[str]) -> dict[str, int]:
    """SentencePiece's words with their counts: ``▁`` before every word but a line's first (Gemma has no dummy
    prefix), so merges never join across a space, as SentencePiece trains them."""
    from collections import Counter

    counts: Counter[str] = Counter()
    for line in text:
        words = line.split()
        counts.update(words[:1])
        counts.update(SPACE + w for w in words[1:])
    return dict(counts)


def bpe_vocab(text: list[str] | None = None, merges: int = MERGES) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Gemma's five specials, the 256 byte pieces, every character of ``text`` (``corpus()``) and ``merges`` BPE
    merges, each the most frequent adjacent pair of pieces at its step (ties to the smaller pair): the vocabulary
    (piece -> id) and the merges in order. Counted here, not by ``BpeTrainer``, so the result is plainly the same
    on every run."""
    words = {tuple(w): n for w, n in sorted(_words(text or corpus()).items())}
    pieces = list(SPECIALS) + list(BYTES) + sorted({c for w in words for c in w})
    done: list[tuple[str, str]] = []
    for _ in range(merges):
        pairs: dict[tuple[str, str], int] = {}
        for w, n in words.items():
            for pair in zip(w, w[1:]):
                pairs[pair] = pairs.get(pair, 0) + n
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        joined = best[0] + best[1]
        merged = {}
        for w, n in words.items():
            out, i = [], 0
            while i < len(w):
                if w[i:i + 2] == best:
                    out.append(joined)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + n
        words = merged
        done.append(best)
        if joined not in pieces:
            pieces.append(joined)
    return {p: i for i, p in enumerate(pieces)}, done


def build_gemma_tokenizer(vocab: tuple[dict[str, int], list[tuple[str, str]]] | None = None):
    """Gemma's tokenizer pipeline around a byte-fallback BPE model of ``vocab`` (``bpe_vocab()``): a ``tokenizers``
    ``Tokenizer``, needing nothing else."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    pieces, merges = vocab or bpe_vocab()
    # as GemmaTokenizer builds its backend (transformers 5 rebuilds it so when it loads a tokenizer.json)
    tok = Tokenizer(models.BPE(vocab=pieces, merges=merges, unk_token=UNK, fuse_unk=True, byte_fallback=True,
                               dropout=None))
    tok.normalizer = normalizers.Replace(" ", SPACE)
    tok.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous", invert=False)
    tok.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens(list(SPECIALS))  # matched whole in text and skipped by decode, as in Gemma's own file
    # transformers' add_bos_token=True, add_eos_token=False template, as Gemma's tokenizer.json has it
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1",
                                                       special_tokens=[(BOS, 2)])
    return tok


def build_gemma_tokenizer_fast(out_dir: Path, model_max_length: int = 8192):
    """``build_gemma_tokenizer()`` as transformers' ``GemmaTokenizer``, saved in ``out_dir`` (``tokenizer.json`` and
    ``tokenizer_config.json``): the reference, and the file an artifact ships. Its padding side is the class's
    (left, as Gemma's); Sana's pipelines set it to right before they tokenize."""
    from transformers import GemmaTokenizer

    tok = GemmaTokenizer(tokenizer_object=build_gemma_tokenizer(), add_bos_token=True, add_eos_token=False,
                         model_max_length=model_max_length)
    got = (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, tok.unk_token_id)
    if got != (0, 1, 2, 3):
        raise RuntimeError(f"GemmaTokenizer numbered pad, eos, bos, unk as {got}, not Gemma's 0, 1, 2, 3")
    if tok("a")["input_ids"][:1] != [2]:
        raise RuntimeError(f"GemmaTokenizer does not put {BOS} before a sequence: {tok('a')['input_ids']}")
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(out_dir))
    return tok


__all__ = ["bpe_vocab", "build_gemma_tokenizer", "build_gemma_tokenizer_fast"]
