"""Textual inversion: embeddings added to the text encoders as new tokens at load time.

A file holds one or more vectors of the text encoder's width, learned for a new word; the word becomes a new
token of the tokenizer (several tokens for a multi-vector embedding, written once in the prompt, as diffusers'
``load_textual_inversion`` expands it) and its vectors new rows of the encoder's token-embedding table, which
the weight map names (``edgediff.export.weight_map``), merged as LoRAs are (``edgediff.runtime.lora``).

A word is matched as a whole word: where it begins or ends with a letter, digit or ``_`` (``shiny``, ``ircl``),
no such character may touch it there, so ``ircl`` is not found inside "a red circle" (diffusers would turn
that into ``c <ircl> e``). A word with other characters at both ends (``<cat-toy>``) is delimited by them and
matches wherever it is written, as in diffusers. Case is ignored, as the tokenizer lowercases prompts.

Files (``.safetensors`` only, as for LoRAs):

- diffusers: one tensor named by its token (``{"<cat-toy>": (n, 768)}``);
- A1111: ``emb_params`` (n, width), the word being the file's name (``cat-toy.safetensors`` -> ``cat-toy``);
- SDXL: ``clip_l`` (n, 768) for the first encoder and ``clip_g`` (n, 1280) for the second, the file's name.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .lora import LoraError, WeightPatch, check_float, file_identity, read_tensors, shown_list, weight_maps
from .manifest import ArtifactError, Manifest
from .text import PromptTokenizer

TOKEN_TABLE = "embeddings.token_embedding.weight"  # the diffusers parameter (CLIPTextModel; with text_model. in 2)
SDXL_KEYS = ("clip_l", "clip_g")  # the first and second text encoder's vectors in an SDXL file
MAX_VECTORS = 75  # one chunk


@dataclass(frozen=True)
class Embedding:
    """One textual-inversion word: its name and its vectors for each text encoder component."""

    path: Path
    name: str
    vectors: dict[str, np.ndarray]  # component -> (n, width) float32

    @property
    def count(self) -> int:
        return next(iter(self.vectors.values())).shape[0]


def read_embedding(path: Path, manifest: Manifest) -> Embedding:
    """The file's word and vectors, checked against this artifact's text encoders (their number and widths)."""
    path = Path(path)
    tensors, _ = read_tensors(path)
    encoders = manifest.text_encoders
    if set(tensors) == set(SDXL_KEYS):
        if len(encoders) != 2:
            raise LoraError(f"{path} is an SDXL embedding (clip_l and clip_g); this {manifest.family} artifact has one "
                            f"text encoder: use an embedding made for it (one tensor of width {encoders[0].hidden_size})")
        name, found = path.stem, {e.name: tensors[key] for e, key in zip(encoders, SDXL_KEYS)}
    elif len(tensors) == 1:
        key, value = next(iter(tensors.items()))
        name = path.stem if key == "emb_params" else key
        if len(encoders) != 1:
            raise LoraError(f"{path} holds one tensor ({key!r:.60}), an SD 1.x/2.x embedding; this SDXL artifact has two "
                            "text encoders: an SDXL embedding holds clip_l and clip_g")
        found = {encoders[0].name: value}
    else:
        raise LoraError(f"{path} is not a textual-inversion embedding: it holds {len(tensors)} tensors "
                        f"({shown_list(sorted(tensors))}); accepted: one tensor (diffusers: named by its token; "
                        "A1111: emb_params) or, for SDXL, clip_l and clip_g")
    if not name.strip() or any(c.isspace() for c in name):
        raise LoraError(f"{path}: the embedding's word {name!r:.60} must be one word without spaces (it is written in "
                        "prompts); rename the file")
    vectors = {}
    for encoder in encoders:
        v = found[encoder.name]
        v = v[None] if v.ndim == 1 else v
        if v.ndim != 2 or v.shape[1] != encoder.hidden_size or not 1 <= v.shape[0] <= MAX_VECTORS:
            raise LoraError(f"{path}: the embedding for {encoder.name} is {list(v.shape)}, but that encoder's tokens are "
                            f"{encoder.hidden_size} wide: expected (vectors, {encoder.hidden_size}) with 1 to "
                            f"{MAX_VECTORS} vectors. Was it made for another model (SD 1.x: 768, SD 2.x: 1024, "
                            "SDXL: 768 and 1280)?")
        vectors[encoder.name] = v.astype(np.float32)
    counts = {v.shape[0] for v in vectors.values()}
    if len(counts) != 1:
        raise LoraError(f"{path}: clip_l and clip_g hold different numbers of vectors ({sorted(counts)})")
    return Embedding(path, name, vectors)


def plan(embeddings: list[Embedding], tokenizers: dict[str, PromptTokenizer], root: Path, manifest: Manifest,
         precision: dict[str, str]) -> dict[str, WeightPatch]:
    """Add each embedding's word to its tokenizers; the patch that appends its vectors to each text encoder's
    token-embedding table, at the ids the tokenizer gave the word."""
    if not embeddings:
        return {}
    maps = weight_maps(root, manifest, precision)
    rows: dict[str, list[np.ndarray]] = {}
    first_id: dict[str, int] = {}
    for embedding in embeddings:
        for component, vectors in embedding.vectors.items():
            ids = tokenizers[component].add_word(embedding.name, len(vectors), embedding.path)
            first_id.setdefault(component, ids[0])
            rows.setdefault(component, []).append(vectors)
    identity = [file_identity(e.path) for e in embeddings]
    patches = {}
    for component, vectors in rows.items():
        check_float(component, precision.get(component, "fp32"), "an embedding")
        table = [(g, p) for graphs in maps.values() for g in graphs if g.component == component
                 for p in g.weights if p.endswith(TOKEN_TABLE)]
        if not table:
            raise LoraError(f"this artifact's {component} has no weight map naming its token-embedding table "
                            "(exported before edgediff recorded weight maps: re-export it) ")
        graph, param = table[0]
        initializer = graph.weights[param][0]
        patches[component] = WeightPatch(component, {initializer: _appender(np.concatenate(vectors),
                                                                            first_id[component], component)},
                                         identity)
    return patches


def _appender(new_rows: np.ndarray, first_id: int, component: str):
    def append(base: np.ndarray) -> np.ndarray:
        if base.shape[0] != first_id:
            raise ArtifactError(f"{component}'s token-embedding table has {base.shape[0]} rows but its tokenizer "
                                f"{first_id} tokens: the tokenizer and the graph do not belong together; re-export")
        return np.concatenate([base, new_rows.astype(base.dtype)])

    return append
