"""SDXL: both CLIP encoders' penultimate hidden states side by side, the second's pooled projection as
``text_embeds`` and the micro-conditioning ``time_ids`` (original size, crop, target size); without a negative
prompt, zeros for the unconditional half (``force_zeros_for_empty_prompt``), as diffusers does."""

from __future__ import annotations

import numpy as np

from ..conditioning import Call, Guidance, encode_prompts, per_image
from ..manifest import Manifest
from ..settings import GenerationSettings
from ..text import PromptTokenizer
from . import Family


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
        cond, cond_pooled = (per_image(a[: len(prompts)], settings) for a in (context, pooled))
        uncond = uncond_pooled = None
        if cfg.enabled:
            if zeros:
                uncond, uncond_pooled = np.zeros_like(cond), np.zeros_like(cond_pooled)
            else:
                uncond, uncond_pooled = (per_image(a[len(prompts):], settings) for a in (context, pooled))
        context = cfg.embeddings(cond, uncond)
        # micro-conditioning: original size, crop top-left, target size (no crop, same size)
        h, w = settings.height, settings.width
        time_ids = np.array([h, w, 0, 0, h, w], dtype=np.float32)
        return {"encoder_hidden_states": context, "text_embeds": cfg.embeddings(cond_pooled, uncond_pooled),
                "time_ids": np.tile(time_ids, (len(context), 1))}


def conditioner(manifest: Manifest, tokenizers: list[PromptTokenizer]) -> XLConditioning:
    names = tuple(t.name for t in manifest.text_encoders)
    return XLConditioning(names, tokenizers, manifest.force_zeros_for_empty_prompt)


SDXL = Family("sdxl", "Stable Diffusion XL", 2, conditioner, ("epsilon", "v_prediction"))
