"""Sana and Sana-Sprint: Gemma2's last hidden states, read as diffusers' ``SanaPipeline.encode_prompt`` reads them.

A prompt is prefixed with Sana's "complex human instruction" (diffusers applies it by default: the lines below,
joined by newlines), tokenized to the instruction's tokens + 298 (``max_sequence_length`` 300, less the two the
pipeline counts twice), padded on the right, and run through Gemma2 with its attention mask; of the result the
first token (``<bos>``) and the last 299 are kept (Sana's paper, section 3.1), 300 tokens of hidden states and
mask: ``encoder_hidden_states`` and ``encoder_attention_mask``. A negative prompt (``""`` when none is given) is
tokenized to 300 tokens without the instruction, as diffusers does. Every prompt is lowercased and stripped first
(the pipelines' ``_text_preprocessing`` without ``clean_caption``).

Sana samples with classifier-free guidance, text to image (diffusers has no Sana image-to-image pipeline).
Sana-Sprint is guidance-distilled: no negative prompt, one transformer call per step, the guidance scale fed to
the transformer as its ``guidance`` input (``DistilledGuidance``); it also redraws an image
(``SanaSprintImg2ImgPipeline``).

Prompts are read as diffusers reads them: A1111's ``(word:1.3)`` weights and ``BREAK`` are refused (Gemma2 cannot
apply them), and a prompt longer than its tokens is cut, with a note naming what was dropped.
"""

from __future__ import annotations

import numpy as np

from ..conditioning import Call, DistilledGuidance, Guidance, per_image
from ..encoders import GemmaEncoder
from ..manifest import ArtifactError, Manifest
from ..settings import GenerationSettings
from . import Family
from .sd3 import sd3_start_index

MAX_SEQUENCE_LENGTH = 300  # both pipelines' default: the prompt tokens the transformer reads
# SanaPipeline's and SanaSprintPipeline's default complex_human_instruction
COMPLEX_HUMAN_INSTRUCTION = (
    "Given a user prompt, generate an 'Enhanced prompt' that provides detailed visual descriptions suitable for image "
    "generation. Evaluate the level of detail in the user prompt:",
    "- If the prompt is simple, focus on adding specifics about colors, shapes, sizes, textures, and spatial "
    "relationships to create vivid and concrete scenes.",
    "- If the prompt is already detailed, refine and enhance the existing details slightly without overcomplicating.",
    "Here are examples of how to transform or refine prompts:",
    "- User Prompt: A cat sleeping -> Enhanced: A small, fluffy white cat curled up in a round shape, sleeping "
    "peacefully on a warm sunny windowsill, surrounded by pots of blooming red flowers.",
    "- User Prompt: A busy city street -> Enhanced: A bustling city street scene at dusk, featuring glowing street "
    "lamps, a diverse crowd of people in colorful clothing, and a double-decker bus passing by towering glass "
    "skyscrapers.",
    "Please generate only the enhanced description for the prompt below and avoid including any additional "
    "commentary or evaluations:",
    "User Prompt: ",
)


class SanaConditioning:
    takes_embeddings = False  # prompts are read as diffusers reads them: no textual-inversion words

    def __init__(self, gemma: GemmaEncoder, max_sequence_length: int, instruction: tuple[str, ...], distilled: bool):
        self.components = (gemma.component,)
        self.gemma = gemma
        self.length = max_sequence_length
        self.prefix = "\n".join(instruction)
        # diffusers: max_length_all = len(tokenizer.encode(chi_prompt)) + max_sequence_length - 2
        self.prompt_length = gemma.count(self.prefix) + max_sequence_length - 2 if instruction else max_sequence_length
        self.distilled = distilled

    def __call__(self, call: Call, settings: GenerationSettings, cfg: Guidance) -> dict[str, np.ndarray]:
        if self.distilled and settings.negative_prompts:
            raise ValueError("Sana-Sprint takes no negative prompt: its guidance is distilled into the model (an "
                             "input of the transformer), there is no unconditional pass to steer away from; leave "
                             "the negative prompt out")
        prompts = [p.lower().strip() for p in settings.prompts]  # SanaPipeline._text_preprocessing
        positive = self.gemma.encode(call, prompts, self.prompt_length, self.prefix)
        # Sana's paper, 3.1: the first token and the last max_sequence_length - 1
        keep = [0] + list(range(self.prompt_length - self.length + 1, self.prompt_length))
        hidden, mask = positive.hidden[:, keep].astype(np.float32), positive.mask[:, keep]
        uncond = uncond_mask = None
        if cfg.enabled:
            negatives = [p.lower().strip() for p in settings.negative_prompts or [""] * len(prompts)]
            negative = self.gemma.encode(call, negatives, self.length)
            uncond, uncond_mask = per_image(negative.hidden.astype(np.float32), settings), per_image(negative.mask,
                                                                                                    settings)
        return {"encoder_hidden_states": cfg.embeddings(per_image(hidden, settings), uncond),
                "encoder_attention_mask": cfg.embeddings(per_image(mask, settings), uncond_mask).astype(np.int64)}


def _conditioner(distilled: bool):
    def conditioner(manifest: Manifest, tokenizers: list) -> SanaConditioning:
        spec = manifest.text_encoders[0]
        if spec.kind != "gemma":
            raise ArtifactError(f"manifest.json: a Sana model's text encoder is Gemma2, not a {spec.kind} encoder "
                                f"({spec.name})")
        inputs = {i.name for i in manifest.variant(manifest.denoiser.name).inputs}
        if distilled != ("guidance" in inputs):
            raise ArtifactError(f"manifest.json: the {manifest.family} denoiser {manifest.denoiser.name} "
                                f"{'takes no' if distilled else 'takes a'} guidance input; Sana-Sprint's has one, "
                                "Sana's has none")
        return SanaConditioning(tokenizers[0], spec.max_length, COMPLEX_HUMAN_INSTRUCTION, distilled)

    return conditioner


SANA = Family("sana", "Sana", 1, _conditioner(False), ("flow",), tasks=("txt2img",))
# Sprint's image-to-image (SanaSprintImg2ImgPipeline) starts as SD3's does; SCM's add_noise is TrigFlow's forward
# process to that step
SANA_SPRINT = Family("sana_sprint", "Sana-Sprint", 1, _conditioner(True), ("trigflow",), sd3_start_index,
                     guidance=DistilledGuidance, tasks=("txt2img", "img2img"))
FAMILIES = (SANA, SANA_SPRINT)
