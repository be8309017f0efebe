"""Stable Diffusion 3 / 3.5: CLIP-L and CLIP-G (penultimate hidden states, pooled projections) and T5, as diffusers'
``StableDiffusion3Pipeline.encode_prompt`` composes them.

The context is both CLIPs' penultimate hidden states side by side on the channel axis, zero-padded to T5's width
(cut to it, as ``torch.nn.functional.pad`` with a negative width does, where T5 is narrower), then T5's sequence
appended on the sequence axis: ``encoder_hidden_states`` (batch, 77 + T5's length, T5's width). Both pooled
projections side by side are ``pooled_projections``. The negative prompt (``""`` when none is given) is encoded
the same way; CFG batches (negative, positive) as diffusers does. An artifact without T5 (exported with
``--no-t5``, diffusers' ``text_encoder_3=None``) gets zeros in T5's place, 256 tokens (diffusers'
``max_sequence_length``) wide as the denoiser's context.

Prompts are read as diffusers reads them, for the same images: each CLIP sees at most 77 tokens (a longer prompt
is cut, with a warning naming what was dropped; T5 reads up to its ``max_length``), and A1111's ``(word:1.3)``
weights and ``BREAK`` are refused with a message (T5 cannot apply them, and weighting one encoder of three is
not what they mean). The denoiser predicts the flow velocity; FlowMatchEuler's timesteps (sigma * 1000) are what
the transformer is fed, as diffusers feeds it.
"""

from __future__ import annotations

import numpy as np

from .. import notes as call_notes
from ..conditioning import Call, Guidance, per_image
from ..encoders import T5Encoder, plain_text
from ..manifest import ArtifactError, Manifest
from ..settings import GenerationSettings
from ..text import PromptTokenizer
from . import Family

T5_LENGTH_WITHOUT_T5 = 256  # diffusers' max_sequence_length: the zeros standing for an absent T5


class SD3Conditioning:
    takes_embeddings = False  # prompts are read as diffusers reads them: no textual-inversion words

    def __init__(self, names: tuple[str, ...], clips: list[PromptTokenizer], t5: T5Encoder | None, width: int,
                 t5_length: int):
        self.components = names  # CLIP-L, CLIP-G[, T5]
        self.clips = clips
        self.t5 = t5
        self.width, self.t5_length = width, t5_length  # the denoiser's context width; T5's tokens

    def __call__(self, call: Call, settings: GenerationSettings, cfg: Guidance) -> dict[str, np.ndarray]:
        prompts = list(settings.prompts)
        negatives = list(settings.negative_prompts or [""] * len(prompts)) if cfg.enabled else []
        texts = prompts + negatives
        plain = [plain_text(p, "SD3's text encoders") for p in texts]
        hidden, pooled = [], []
        for component, tok in zip(self.components, self.clips):
            rows = [tok.truncated(t) for t in plain]
            for prompt, (_, cut) in zip(texts, rows):
                if cut:
                    call_notes.add(f"the prompt {prompt[:40]!r}{'...' if len(prompt) > 40 else ''} was cut to CLIP's "
                                  f"{tok.max_length} tokens for {component} (as diffusers cuts it; T5 reads more); "
                                  f"dropped: {cut[:200]!r}", stacklevel=2)
            out = call(component, input_ids=np.stack([ids for ids, _ in rows]))
            hidden.append(out["penultimate_hidden_state"])
            pooled.append(out["text_embeds"])
        clip = np.concatenate(hidden, axis=-1)
        if clip.shape[-1] < self.width:  # diffusers' F.pad(clip, (0, t5_width - clip_width)): zeros, or a cut
            clip = np.concatenate([clip, np.zeros((*clip.shape[:2], self.width - clip.shape[-1]), np.float32)], -1)
        clip = clip[..., : self.width]
        if self.t5 is not None:
            t5 = self.t5.encode(call, texts).hidden
        else:
            t5 = np.zeros((len(texts), self.t5_length, self.width), np.float32)
        context = np.concatenate([clip, t5], axis=1).astype(np.float32)
        vector = np.concatenate(pooled, axis=-1).astype(np.float32)
        n = len(prompts)
        cond, cond_pooled = per_image(context[:n], settings), per_image(vector[:n], settings)
        uncond = per_image(context[n:], settings) if cfg.enabled else None
        uncond_pooled = per_image(vector[n:], settings) if cfg.enabled else None
        return {"encoder_hidden_states": cfg.embeddings(cond, uncond),
                "pooled_projections": cfg.embeddings(cond_pooled, uncond_pooled)}


def conditioner(manifest: Manifest, tokenizers: list) -> SD3Conditioning:
    specs = manifest.text_encoders
    kinds = [t.kind for t in specs]
    if kinds not in (["clip", "clip"], ["clip", "clip", "t5"]):
        raise ArtifactError(f"manifest.json: an SD3 model's text encoders are CLIP-L, CLIP-G and optionally T5, in "
                            f"that order; this one has {', '.join(kinds)}")
    context = next((i for i in manifest.variant(manifest.denoiser.name).inputs if i.name == "encoder_hidden_states"),
                   None)
    if context is None or not isinstance(context.shape[-1], int):
        raise ArtifactError(f"manifest.json: the SD3 denoiser {manifest.denoiser.name} takes no encoder_hidden_states "
                            "of a fixed width")
    t5 = tokenizers[2] if len(tokenizers) == 3 else None
    if t5 is not None and specs[2].hidden_size != context.shape[-1]:
        raise ArtifactError(f"manifest.json: T5 ({specs[2].name}) is {specs[2].hidden_size} wide but the denoiser's "
                            f"context is {context.shape[-1]}")
    return SD3Conditioning(tuple(t.name for t in specs), tokenizers[:2], t5, int(context.shape[-1]),
                           specs[2].max_length if t5 is not None else T5_LENGTH_WITHOUT_T5)


def sd3_start_index(steps: int, strength: float, order: int) -> int:
    """First denoiser call of an image-to-image run, as diffusers' SD3 img2img ``get_timesteps``:
    ``int(steps - min(steps * strength, steps))`` calls skipped (no rounding of steps * strength first, unlike
    SD's rule), at least one call left."""
    start = int(max(steps - min(steps * strength, steps), 0))
    return min(start, steps - 1) * order


SD3 = Family("sd3", "Stable Diffusion 3", (2, 3), conditioner, ("flow",), sd3_start_index)
