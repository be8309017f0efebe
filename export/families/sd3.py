"""SD3 / SD3.5 at export: CLIP-L and CLIP-G (penultimate hidden states and pooled projections), T5's encoder
(optional, as diffusers' ``text_encoder_3=None``), the MMDiT as the denoiser and a 16-channel VAE.

The transformer's graph speaks the runtime's denoiser contract: NCHW latents ``sample`` [batch, 16, h, w],
``timestep`` [batch] (sigma * 1000, as the pipeline feeds it), ``encoder_hidden_states`` [batch, sequence,
joint_attention_dim], ``pooled_projections`` [batch, pooled_projection_dim] -> ``out_sample``, the flow velocity.
Patching and the cropped position embedding are inside ``SD3Transformer2DModel`` and trace with dynamic height
and width (multiples of its patch size).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from edgediff.runtime.manifest import TensorSpec

from .. import components as C
from ..components import ExportError
from ..t5 import t5_encoder_contract

TITLE = "Stable Diffusion 3"
PIPELINES = ("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline", "StableDiffusion3InpaintPipeline")
PARTS = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "transformer", "vae", "scheduler")
# in conditioning order; text_encoder_3 (T5) is left out where the pipeline has none
TEXT_ENCODERS = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"), ("text_encoder_3", "tokenizer_3"))
TEXT_KINDS = {"text_encoder_3": "t5"}  # the others are CLIP
T5_MAX_LENGTH = 256  # diffusers' StableDiffusion3Pipeline max_sequence_length default
MAX_LENGTHS = {"text_encoder_3": T5_MAX_LENGTH}  # else the tokenizer's model_max_length
DENOISER = "transformer"  # the pipeline attribute and component name of its denoiser
SCHEDULER_STANDS_IN: dict[str, str] = {}
DEFAULTS = {"steps": 28, "guidance": 7.0}  # StableDiffusion3Pipeline's own defaults (edgediff's are 25 and 7.5)


def name(pipe: Any) -> str:
    return "sd3"


def check(pipe: Any, source: str) -> None:
    """Beyond its ``PARTS``: T5, where present, is as wide as the transformer's context."""
    t5 = getattr(pipe, "text_encoder_3", None)
    joint = pipe.transformer.config.joint_attention_dim
    if t5 is not None and t5.config.d_model != joint:
        raise ExportError(f"{source}: T5 is {t5.config.d_model} wide but the transformer's joint_attention_dim is "
                          f"{joint}")


SINGLE_FILE_HINT = "model.diffusion_model.joint_blocks.*"


def is_single_file(keys: set[str]) -> bool:
    return any(k.startswith("model.diffusion_model.joint_blocks.") for k in keys)


def text_contracts(pipe: Any) -> list[Callable[[], C.Contract]]:
    makers = [lambda: C.xl_text_encoder_contract(pipe.text_encoder, int(pipe.tokenizer.model_max_length),
                                                 "text_encoder", pooled=True),
              lambda: C.xl_text_encoder_contract(pipe.text_encoder_2, int(pipe.tokenizer_2.model_max_length),
                                                 "text_encoder_2", pooled=True)]
    if getattr(pipe, "text_encoder_3", None) is not None:
        makers.append(lambda: t5_encoder_contract(pipe.text_encoder_3, T5_MAX_LENGTH, name="text_encoder_3"))
    return makers


class _Transformer(torch.nn.Module):
    def __init__(self, transformer):
        super().__init__()
        self.transformer = transformer

    def forward(self, sample, timestep, encoder_hidden_states, pooled_projections):
        return self.transformer(hidden_states=sample, timestep=timestep, encoder_hidden_states=encoder_hidden_states,
                                pooled_projections=pooled_projections, return_dict=False)[0]


def transformer_contract(transformer, latent_size: int) -> C.Contract:
    """The MMDiT on the runtime's denoiser contract, traced at a non-square size (dynamic height and width)."""
    c = transformer.config
    p = c.patch_size
    h = max(p, latent_size // p * p)
    w = h + 2 * p
    if max(h, w) // p > c.pos_embed_max_size:
        h = w = c.pos_embed_max_size * p // 2
        w += p
    joint, pooled = c.joint_attention_dim, c.pooled_projection_dim

    def sample():
        g = torch.Generator().manual_seed(1)
        return (torch.randn(2, c.in_channels, h, w, generator=g), torch.tensor([981.0, 981.0]),
                torch.randn(2, 77 + 16, joint, generator=g), torch.randn(2, pooled, generator=g))

    return C.Contract(
        "transformer",
        _Transformer(transformer),
        (TensorSpec("sample", "float32", ("batch", c.in_channels, "height", "width")),
         TensorSpec("timestep", "float32", ("batch",)),
         TensorSpec("encoder_hidden_states", "float32", ("batch", "sequence", joint)),
         TensorSpec("pooled_projections", "float32", ("batch", pooled))),
        (TensorSpec("out_sample", "float32", ("batch", c.out_channels, "height", "width")),),
        sample,
    )


def denoiser_contracts(pipe: Any, latent_size: int) -> list[Callable[[], C.Contract]]:
    return [lambda: transformer_contract(pipe.transformer, latent_size)]


def manifest_fields(pipe: Any) -> dict[str, Any]:
    return {}
