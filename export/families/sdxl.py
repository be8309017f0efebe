"""SDXL at export: two CLIP text encoders (penultimate hidden states, the second's pooled projection), their
tokenizers, and whether an absent negative prompt means zero embeddings."""

from __future__ import annotations

from typing import Any, Callable

from .. import components as C
from ..components import ExportError
from . import sd

TITLE = "Stable Diffusion XL"
PIPELINES = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline")
PARTS = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet", "vae", "scheduler")
TEXT_ENCODERS = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))
SCHEDULER_STANDS_IN = sd.SCHEDULER_STANDS_IN


def name(pipe: Any) -> str:
    return "sdxl"


def check(pipe: Any, source: str) -> None:
    """Beyond its ``PARTS``: the UNet's added conditioning is SDXL's (the refiner's, aesthetic-score time ids with
    one text encoder, is not exported yet)."""
    if pipe.unet.config.addition_embed_type != "text_time":
        raise ExportError(f"{source} has a second text encoder but its UNet lacks SDXL's text_time conditioning")


SINGLE_FILE_HINT = "conditioner.embedders.1.*"  # the tensor names is_single_file looks for, in words


def is_single_file(keys: set[str]) -> bool:
    """SDXL checkpoints in the original layout carry a second text encoder under ``conditioner.embedders.1``."""
    return any(k.startswith("conditioner.embedders.1.") for k in keys)


def text_contracts(pipe: Any) -> list[Callable[[], C.Contract]]:
    return [lambda: C.xl_text_encoder_contract(pipe.text_encoder, int(pipe.tokenizer.model_max_length), "text_encoder"),
            lambda: C.xl_text_encoder_contract(pipe.text_encoder_2, int(pipe.tokenizer_2.model_max_length),
                                               "text_encoder_2")]


def manifest_fields(pipe: Any) -> dict[str, Any]:
    return {"force_zeros_for_empty_prompt": bool(pipe.config.get("force_zeros_for_empty_prompt", True))}
