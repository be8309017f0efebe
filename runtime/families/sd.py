"""Stable Diffusion 1.x and 2.x: one CLIP text encoder's last hidden state as ``encoder_hidden_states``."""

from __future__ import annotations

import numpy as np

from ..conditioning import Call, Guidance, encode_prompts, per_image
from ..manifest import Manifest
from ..settings import GenerationSettings
from ..text import PromptTokenizer
from . import Family


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
        cond = per_image(hidden[: len(prompts)], settings)
        uncond = per_image(hidden[len(prompts):], settings) if cfg.enabled else None
        return {"encoder_hidden_states": cfg.embeddings(cond, uncond)}


def conditioner(manifest: Manifest, tokenizers: list[PromptTokenizer]) -> TextConditioning:
    return TextConditioning(manifest.text_encoders[0].name, tokenizers[0])


PREDICTIONS = ("epsilon", "v_prediction")
# sd1 (CLIP ViT-L, 768 wide), sd2 (OpenCLIP ViT-H, 1024), sd (another width: the same arithmetic)
FAMILIES = tuple(Family(name, title, 1, conditioner, PREDICTIONS)
                 for name, title in (("sd1", "Stable Diffusion 1.x"), ("sd2", "Stable Diffusion 2.x"),
                                     ("sd", "Stable Diffusion")))
