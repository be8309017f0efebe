"""Prompts -> the denoiser's conditioning inputs, one class per model family, chosen once at load.

``Guidance`` (classifier-free guidance, batched or off) is chosen once per
generation; the conditioner is chosen once per pipeline, as the family's
manifest says. Neither the tasks nor the denoising loop branch on the family.

- ``TextConditioning`` (SD 1.x/2.x): one CLIP text encoder's last hidden state
  as ``encoder_hidden_states``.
- ``XLConditioning`` (SDXL): both encoders' penultimate hidden states side by
  side, the second's pooled projection as ``text_embeds`` and the
  micro-conditioning ``time_ids`` (original size, crop, target size);
  without a negative prompt, zeros for the unconditional half
  (``force_zeros_for_empty_prompt``), as diffusers does.

Both encode a prompt in 77-token chunks, with ``(word:1.3)`` weights and ``BREAK``
(``edgediff.runtime.prompts``, ``encode_prompts``): the context grows by 77 tokens per chunk.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

import numpy as np

from .manifest import Manifest
from .settings import GenerationSettings
from .text import PromptTokenizer

# component, named inputs -> named outputs (timed, checked for NaN/Inf)
Call = Callable[..., dict[str, np.ndarray]]


class Guidance:
    """Classifier-free guidance, chosen once: batched (uncond + cond in one UNet call) or none."""

    def __init__(self, scale: float):
        self.scale = scale
        self.enabled = scale > 1.0

    def embeddings(self, cond: np.ndarray, uncond: np.ndarray | None) -> np.ndarray:
        return np.concatenate([uncond, cond]) if self.enabled else cond

    def model_input(self, latents: np.ndarray) -> np.ndarray:
        return np.concatenate([latents, latents]) if self.enabled else latents

    def combine(self, out: np.ndarray) -> np.ndarray:
        if not self.enabled:
            return out
        uncond, cond = np.split(out, 2)
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow is caught, with its step, by the NaN/Inf guard
            return uncond + np.float32(self.scale) * (cond - uncond)


class Conditioning(Protocol):
    components: tuple[str, ...]  # the text encoder components it runs, in order

    def __call__(self, call: Call, settings: GenerationSettings, cfg: Guidance) -> dict[str, np.ndarray]:
        """The denoiser's conditioning inputs for every image of ``settings`` (both CFG halves when enabled)."""
        ...


def _per_image(a: np.ndarray, settings: GenerationSettings) -> np.ndarray:
    """One row per prompt -> one row per image."""
    return np.repeat(a, settings.images_per_prompt, axis=0)


def encode_prompts(call: Call, encoders: list[tuple[str, PromptTokenizer, str]], prompts: list[str],
                   pooled: str | None = None) -> tuple[list[np.ndarray], np.ndarray | None]:
    """Each prompt through each (component, tokenizer, output) text encoder, all chunks in one call per encoder.

    Every prompt gets the same number of chunks (the longest's): a shorter one is padded with chunks of the
    empty prompt, as A1111 pads a shorter negative prompt. A weighted chunk's hidden states are scaled token by
    token, then rescaled to the chunk's original mean (A1111). Returns, per encoder, (prompts, chunks x 77,
    width) hidden states; and ``pooled`` of the last encoder from each prompt's first chunk (SDXL)."""
    per_encoder = [[tok.chunks(p) for p in prompts] for _, tok, _ in encoders]
    count = max(len(c.ids) for chunks in per_encoder for c in chunks)
    hidden_states, pooled_out = [], None
    for (component, tok, output), chunks in zip(encoders, per_encoder):
        empty = tok.chunks("")
        ids = np.concatenate([np.concatenate([c.ids] + [empty.ids] * (count - len(c.ids))) for c in chunks])
        weights = np.concatenate([np.concatenate([c.weights] + [empty.weights] * (count - len(c.ids)))
                                  for c in chunks])
        out = call(component, input_ids=ids)
        hidden = out[output]
        if any(c.weighted for c in chunks):
            hidden = _weighted(hidden, weights)
        hidden_states.append(hidden.reshape(len(prompts), count * hidden.shape[1], hidden.shape[2]))
        if pooled is not None and component == encoders[-1][0]:
            pooled_out = out[pooled].reshape(len(prompts), count, -1)[:, 0]
    return hidden_states, pooled_out


MEAN_FLOOR = 1e-4  # a chunk whose mean is below this fraction of its mean magnitude is not rescaled


def _weighted(hidden: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Each chunk's tokens scaled by their weights, then the chunk brought back to its original mean (A1111).

    Where a chunk's mean is ~0 next to its values (a final LayerNorm without bias, as in random-weight test
    models) the ratio of means is noise, so that chunk keeps its scaled values; real encoders' means are
    far from that floor."""
    original = hidden.mean(axis=(1, 2), keepdims=True, dtype=np.float32)
    scaled = hidden * weights[:, :, None]
    new = scaled.mean(axis=(1, 2), keepdims=True, dtype=np.float32)
    magnitude = np.abs(hidden).mean(axis=(1, 2), keepdims=True, dtype=np.float32)
    usable = (np.abs(original) > MEAN_FLOOR * magnitude) & (np.abs(new) > MEAN_FLOOR * magnitude)
    ratio = np.where(usable, original / np.where(usable, new, 1), 1).astype(np.float32)
    return (scaled * ratio).astype(np.float32)


class TextConditioning:
    def __init__(self, name: str, tokenizer: PromptTokenizer):
        self.components = (name,)
        self.tokenizer = tokenizer

    def __call__(self, call: Call, settings: GenerationSettings, cfg: Guidance) -> dict[str, np.ndarray]:
        prompts = list(settings.prompts)
        negatives = list(settings.negative_prompts or [""] * len(prompts)) if cfg.enabled else []
        # prompts and negative prompts in one call: the same number of chunks, as CFG's batch needs
        (hidden,), _ = encode_prompts(call, [(self.components[0], self.tokenizer, "last_hidden_state")],
                                      prompts + negatives)
        cond = _per_image(hidden[: len(prompts)], settings)
        uncond = _per_image(hidden[len(prompts):], settings) if cfg.enabled else None
        return {"encoder_hidden_states": cfg.embeddings(cond, uncond)}


class XLConditioning:
    def __init__(self, names: tuple[str, str], tokenizers: list[PromptTokenizer], force_zeros_for_empty_prompt: bool):
        self.components = names
        self.tokenizer, self.tokenizer_2 = tokenizers
        self.force_zeros = force_zeros_for_empty_prompt

    def __call__(self, call: Call, settings: GenerationSettings, cfg: Guidance) -> dict[str, np.ndarray]:
        prompts = list(settings.prompts)
        zeros = self.force_zeros and settings.negative_prompts is None  # no negative prompt = zeros
        negatives = [] if not cfg.enabled or zeros else list(settings.negative_prompts or [""] * len(prompts))
        # both encoders' penultimate layers side by side, the second's pooled projection
        encoders = [(self.components[0], self.tokenizer, "penultimate_hidden_state"),
                    (self.components[1], self.tokenizer_2, "penultimate_hidden_state")]
        hidden, pooled = encode_prompts(call, encoders, prompts + negatives, pooled="text_embeds")
        context = np.concatenate(hidden, axis=-1)
        cond, cond_pooled = (_per_image(a[: len(prompts)], settings) for a in (context, pooled))
        uncond = uncond_pooled = None
        if cfg.enabled:
            if zeros:
                uncond, uncond_pooled = np.zeros_like(cond), np.zeros_like(cond_pooled)
            else:
                uncond, uncond_pooled = (_per_image(a[len(prompts):], settings) for a in (context, pooled))
        context = cfg.embeddings(cond, uncond)
        # micro-conditioning: original size, crop top-left, target size (no crop, same size)
        h, w = settings.height, settings.width
        time_ids = np.array([h, w, 0, 0, h, w], dtype=np.float32)
        return {"encoder_hidden_states": context, "text_embeds": cfg.embeddings(cond_pooled, uncond_pooled),
                "time_ids": np.tile(time_ids, (len(context), 1))}


def conditioning_for(manifest: Manifest, tokenizers: list[PromptTokenizer]) -> Any:
    """The family's conditioner, from the manifest's text encoders: two is SDXL's, one is SD's."""
    names = tuple(t.name for t in manifest.text_encoders)
    if len(names) == 2:
        return XLConditioning(names, tokenizers, manifest.force_zeros_for_empty_prompt)
    return TextConditioning(names[0], tokenizers[0])
