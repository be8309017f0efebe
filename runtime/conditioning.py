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


class TextConditioning:
    def __init__(self, name: str, tokenizer: PromptTokenizer):
        self.components = (name,)
        self.tokenizer = tokenizer

    def encode(self, call: Call, prompts: list[str]) -> np.ndarray:
        return call(self.components[0], input_ids=self.tokenizer(prompts))["last_hidden_state"]

    def __call__(self, call: Call, settings: GenerationSettings, cfg: Guidance) -> dict[str, np.ndarray]:
        cond = _per_image(self.encode(call, list(settings.prompts)), settings)
        uncond = None
        if cfg.enabled:
            uncond = _per_image(self.encode(call, list(settings.negative_prompts or [""] * len(settings.prompts))), settings)
        return {"encoder_hidden_states": cfg.embeddings(cond, uncond)}


class XLConditioning:
    def __init__(self, names: tuple[str, str], tokenizers: list[PromptTokenizer], force_zeros_for_empty_prompt: bool):
        self.components = names
        self.tokenizer, self.tokenizer_2 = tokenizers
        self.force_zeros = force_zeros_for_empty_prompt

    def encode(self, call: Call, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Both encoders' penultimate layers side by side, and the pooled projection of the second."""
        first = call(self.components[0], input_ids=self.tokenizer(prompts))["penultimate_hidden_state"]
        second = call(self.components[1], input_ids=self.tokenizer_2(prompts))
        return np.concatenate([first, second["penultimate_hidden_state"]], axis=-1), second["text_embeds"]

    def __call__(self, call: Call, settings: GenerationSettings, cfg: Guidance) -> dict[str, np.ndarray]:
        cond, pooled = (_per_image(a, settings) for a in self.encode(call, list(settings.prompts)))
        uncond = uncond_pooled = None
        if cfg.enabled:
            if self.force_zeros and settings.negative_prompts is None:  # no negative prompt = zeros
                uncond, uncond_pooled = np.zeros_like(cond), np.zeros_like(pooled)
            else:
                negatives = list(settings.negative_prompts or [""] * len(settings.prompts))
                uncond, uncond_pooled = (_per_image(a, settings) for a in self.encode(call, negatives))
        context = cfg.embeddings(cond, uncond)
        # micro-conditioning: original size, crop top-left, target size (no crop, same size)
        h, w = settings.height, settings.width
        time_ids = np.array([h, w, 0, 0, h, w], dtype=np.float32)
        return {"encoder_hidden_states": context, "text_embeds": cfg.embeddings(pooled, uncond_pooled),
                "time_ids": np.tile(time_ids, (len(context), 1))}


def conditioning_for(manifest: Manifest, tokenizers: list[PromptTokenizer]) -> Any:
    """The family's conditioner, from the manifest's text encoders: two is SDXL's, one is SD's."""
    names = tuple(t.name for t in manifest.text_encoders)
    if len(names) == 2:
        return XLConditioning(names, tokenizers, manifest.force_zeros_for_empty_prompt)
    return TextConditioning(names[0], tokenizers[0])
