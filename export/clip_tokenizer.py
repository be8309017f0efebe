"""The real CLIP BPE tokenizer, built offline from open-clip-torch's vocabulary file.

OpenAI's CLIP vocabulary (``bpe_simple_vocab_16e6.txt.gz``) ships inside the
``open-clip-torch`` wheel. The Hugging Face ``vocab.json``/``merges.txt`` of
``openai/clip-vit-large-patch14`` are a deterministic function of it (byte
tokens, their ``</w>`` forms, one token per merge, then the two specials), so
we rebuild them here instead of downloading. Used by tests and by the
random-weight recipes; real checkpoints bring their own tokenizer.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

VOCAB_SIZE = 49408


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def open_clip_vocab_path() -> Path:
    from .components import ExportError

    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ExportError(
            "the random-weight recipes build the real CLIP tokenizer from the vocabulary inside the open-clip-torch "
            "wheel, which is not installed: pip install --no-deps 'open-clip-torch==3.3.0' (--no-deps: its "
            "torchvision dependency would replace the pinned CPU torch)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise ExportError(f"{path} not found in the installed open-clip-torch; reinstall it: "
                          "pip install --no-deps --force-reinstall 'open-clip-torch==3.3.0'")
    return path


def write_vocab_and_merges(out_dir: Path) -> tuple[Path, Path]:
    lines = gzip.open(open_clip_vocab_path()).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == VOCAB_SIZE, len(vocab)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab_file = out_dir / "vocab.json"
    merges_file = out_dir / "merges.txt"
    vocab_file.write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    merges_file.write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return vocab_file, merges_file


def build_clip_tokenizer(out_dir: Path, pad_token: str = "<|endoftext|>"):
    """A ``CLIPTokenizer`` saved in ``out_dir`` (SD1 pads with ``<|endoftext|>``, SD2 with ``!``)."""
    from transformers import CLIPTokenizer

    vocab_file, merges_file = write_vocab_and_merges(Path(out_dir))
    tok = CLIPTokenizer(str(vocab_file), str(merges_file), pad_token=pad_token, model_max_length=77)
    tok.save_pretrained(out_dir)
    return tok
