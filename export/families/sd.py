"""Stable Diffusion 1.x and 2.x at export: one CLIP text encoder (its last hidden state) and its tokenizer."""

from __future__ import annotations

from typing import Any, Callable

from .. import components as C

TITLE = "Stable Diffusion 1.x/2.x"
PIPELINES = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline")
PARTS = ("text_encoder", "tokenizer", "unet", "vae", "scheduler")
TEXT_ENCODERS = (("text_encoder", "tokenizer"),)  # (component, its tokenizer's folder), in conditioning order
# DDPMScheduler is a training scheduler (1,000 steps to sample): Euler samples with its betas and prediction type
SCHEDULER_STANDS_IN = {"DDPMScheduler": "euler"}


def name(pipe: Any) -> str:
    """sd1 (CLIP ViT-L, 768 wide), sd2 (OpenCLIP ViT-H, 1024) or sd (another width: the same arithmetic)."""
    return {768: "sd1", 1024: "sd2"}.get(pipe.unet.config.cross_attention_dim, "sd")


def check(pipe: Any, source: str) -> None:
    """Nothing beyond its ``PARTS``."""


SINGLE_FILE_HINT = "cond_stage_model.*"  # the tensor names is_single_file looks for, in words


def is_single_file(keys: set[str]) -> bool:
    return any(k.startswith("cond_stage_model.") for k in keys)


def text_contracts(pipe: Any) -> list[Callable[[], C.Contract]]:
    return [lambda: C.text_encoder_contract(pipe.text_encoder, int(pipe.tokenizer.model_max_length))]


def manifest_fields(pipe: Any) -> dict[str, Any]:
    return {}
