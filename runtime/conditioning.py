"""Prompts -> the denoiser's conditioning inputs: what every family's conditioner shares.

``Guidance`` (classifier-free guidance, batched or off) is chosen once per
generation; the conditioner is chosen once per pipeline, by the manifest's
family (``edgediff.runtime.families``: each family's file holds its
conditioner). Neither the tasks nor the denoising loop branch on the family.

The CLIP conditioners encode a prompt in 77-token chunks, with ``(word:1.3)`` weights and ``BREAK``
(``edgediff.runtime.prompts``, ``encode_prompts``): the context grows by 77 tokens per chunk.
"""

from __future__ import annotations

from typing import Callable, Protocol

import numpy as np

from .settings import GenerationSettings
from .text import PromptTokenizer

# component, named inputs -> named outputs (timed, checked for NaN/Inf)
Call = Callable[..., dict[str, np.ndarray]]


class Guidance:
    """Classifier-free guidance, chosen once per generation by the family (``Family.guidance``): batched (uncond +
    cond in one denoiser call) or none (a scale of 1 or below). It owns the batch: the input builders build their
    guided inputs once, for both halves, and take ``rows`` of them at each call, so a cut-off (``stop``) is one
    call here, not a change in each builder."""

    def __init__(self, scale: float):
        self.scale = scale
        self.enabled = scale > 1.0
        self.stopped = False  # the CFG cut-off came: the conditional half alone from then on

    def stop(self) -> None:
        """Guidance off for the rest of the run (``cfg_until``, diffusers' ``SDCFGCutoffCallback``): the denoiser
        gets the conditional half of every guided input from the next call on, at half the batch."""
        if self.enabled:
            self.enabled, self.stopped = False, True

    def rows(self, guided: np.ndarray) -> np.ndarray:
        """The rows of an input built for the guided batch (``embeddings``, ``model_input``: unconditional half
        first) that the denoiser takes now: all of them, or the conditional half once guidance stopped."""
        return guided[len(guided) // 2 :] if self.stopped else guided

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


    def inputs(self, batch: int) -> dict[str, np.ndarray]:
        """The denoiser inputs guidance adds beside the conditioning: none for CFG."""
        return {}


class DistilledGuidance(Guidance):
    """Guidance distilled into the model (Sana-Sprint, FLUX.1-dev): no unconditional half, one denoiser call per
    step; the scale is the denoiser's ``guidance`` input, one value per image."""

    def __init__(self, scale: float):
        super().__init__(scale)
        self.enabled = False

    def inputs(self, batch: int) -> dict[str, np.ndarray]:
        return {"guidance": np.full((batch,), self.scale, dtype=np.float32)}


class Conditioning(Protocol):
    components: tuple[str, ...]  # the text encoder components it runs, in order

    def __call__(self, call: Call, settings: GenerationSettings, cfg: Guidance) -> dict[str, np.ndarray]:
        """The denoiser's conditioning inputs for every image of ``settings`` (both CFG halves when enabled)."""
        ...


def per_image(a: np.ndarray, settings: GenerationSettings) -> np.ndarray:
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
