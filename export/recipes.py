"""Checkpoints built from configs with seeded random weights.

``sd15``, ``sd21``, ``sd-turbo`` and ``sdxl`` are architecture-exact Stable Diffusion 1.5, 2.1, SD-Turbo and SDXL base
(text encoder, UNet and VAE of the published configs): dense compute makes
their latency that of the real models, without downloading gigabytes. They
are marked ``random_weights`` in the manifest: not for images.

``sana-600m`` and ``sana-sprint-0.6b`` are Sana's 1024-px transformers with Gemma2-2B and the f32c32 DC-AE (the
offline Gemma tokenizer stands in for Gemma's 256k-piece one).

``tiny-sd1``, ``tiny-sd2-v``, ``tiny-sdxl``, ``tiny-sd3``, ``tiny-sana`` and ``tiny-sana-sprint`` are the test
models: the real Stable Diffusion classes (CLIPTextModel, UNet2DConditionModel with cross-attention,
AutoencoderKL with a downsampling factor of 8) at toy widths, with the real
CLIP tokenizer (and an offline T5 one, ``export/t5_tokenizer.py``). ``tiny-sd3`` is SD3.5-medium's
pipeline (two CLIP encoders with projections, T5, ``SD3Transformer2DModel`` with RMS qk-norm and a dual-attention
layer, a 16-channel VAE with its shift factor, FlowMatchEuler with shift 3.0) at diffusers' test widths;
``tiny-sana`` and ``tiny-sana-sprint`` are diffusers' Sana and Sana-Sprint test models, their conditioning paths
scaled up. Their
images are noise; they exist to prove the export and runtime paths equal diffusers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .clip_tokenizer import build_clip_tokenizer

PNDM_SD1 = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "clip_sample": False,
}
# SDXL base's scheduler: SD's betas, Euler with leading spacing
EULER_SDXL = {k: PNDM_SD1[k] for k in ("beta_start", "beta_end", "beta_schedule", "num_train_timesteps", "steps_offset")} | {
    "prediction_type": "epsilon", "timestep_spacing": "leading", "interpolation_type": "linear", "use_karras_sigmas": False}


SD_VAE = {"block_out_channels": (128, 256, 512, 512), "layers_per_block": 2, "norm_num_groups": 32}

RECIPES: dict[str, dict[str, Any]] = {
    "sd15": {
        "text": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                 "hidden_act": "quick_gelu", "projection_dim": 768},
        "unet": {"sample_size": 64},  # diffusers' UNet2DConditionModel defaults are SD 1.x's
        "vae": SD_VAE,
        "scheduler": ("PNDMScheduler", {**PNDM_SD1, "prediction_type": "epsilon"}),
        "pad_token": "<|endoftext|>",
    },
    "sd21": {
        "text": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23, "num_attention_heads": 16,
                 "hidden_act": "gelu", "projection_dim": 512},
        "unet": {"sample_size": 96, "attention_head_dim": (5, 10, 20, 20), "use_linear_projection": True},
        "vae": SD_VAE,
        "scheduler": ("DDIMScheduler", {**PNDM_SD1, "prediction_type": "v_prediction", "timestep_spacing": "leading"}),
        "pad_token": "!",
    },
    "sd-turbo": {  # SD 2.1's architecture at 512x512, distilled for 1-4 steps without guidance
        "text": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23, "num_attention_heads": 16,
                 "hidden_act": "gelu", "projection_dim": 512},
        "unet": {"sample_size": 64, "attention_head_dim": (5, 10, 20, 20), "use_linear_projection": True},
        "vae": SD_VAE,
        "scheduler": ("EulerAncestralDiscreteScheduler",
                      {**PNDM_SD1, "prediction_type": "epsilon", "timestep_spacing": "trailing"}),
        "pad_token": "!",
        "defaults": {"steps": 1, "guidance": 0.0},  # the model card's usage
    },
    "sdxl": {  # SDXL base 1.0: CLIP ViT-L + OpenCLIP bigG, 2.6B-parameter UNet at 1024x1024
        "arch": "sdxl",
        "text": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                 "hidden_act": "quick_gelu", "projection_dim": 768},
        "text_2": {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20,
                   "hidden_act": "gelu", "projection_dim": 1280},
        "unet": {"sample_size": 128, "block_out_channels": (320, 640, 1280), "layers_per_block": 2,
                 "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 "attention_head_dim": (5, 10, 20), "transformer_layers_per_block": (1, 2, 10),
                 "use_linear_projection": True, "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
                 "projection_class_embeddings_input_dim": 2816},
        "vae": {**SD_VAE, "scaling_factor": 0.13025, "force_upcast": True},
        "scheduler": ("EulerDiscreteScheduler", {**EULER_SDXL}),
        "defaults": {"guidance": 5.0},  # diffusers' StableDiffusionXLPipeline default
        "pad_token": "<|endoftext|>",
        "pad_token_2": "!",
    },
    "tiny-sd1": {
        "text": {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4},
        "unet": {
            "block_out_channels": (32, 64),
            "layers_per_block": 1,
            "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
            "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
            "attention_head_dim": 8,
            "norm_num_groups": 16,
            "sample_size": 8,
        },
        "vae": {"block_out_channels": (16, 16, 32, 32), "layers_per_block": 1, "norm_num_groups": 8},
        "scheduler": ("PNDMScheduler", {**PNDM_SD1, "prediction_type": "epsilon"}),
        "pad_token": "<|endoftext|>",
    },
    "tiny-sd2-v": {
        "text": {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4,
                 "hidden_act": "gelu"},
        "unet": {
            "block_out_channels": (32, 64),
            "layers_per_block": 1,
            "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
            "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
            "attention_head_dim": (2, 4),
            "use_linear_projection": True,
            "norm_num_groups": 16,
            "sample_size": 8,
        },
        "vae": {"block_out_channels": (16, 16, 32, 32), "layers_per_block": 1, "norm_num_groups": 8},
        "scheduler": ("DDIMScheduler", {**PNDM_SD1, "prediction_type": "v_prediction", "timestep_spacing": "trailing"}),
        "pad_token": "!",
    },
    "tiny-sdxl": {  # the SDXL pipeline's shapes at toy widths (two text encoders, text_time conditioning)
        "arch": "sdxl",
        "text": {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 3, "num_attention_heads": 4,
                 "hidden_act": "gelu", "projection_dim": 32},
        "text_2": {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 3, "num_attention_heads": 4,
                   "hidden_act": "gelu", "projection_dim": 32},
        "unet": {"sample_size": 8, "block_out_channels": (32, 64), "layers_per_block": 1,
                 "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
                 "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
                 "attention_head_dim": (2, 4), "transformer_layers_per_block": (1, 2), "use_linear_projection": True,
                 "addition_embed_type": "text_time", "addition_time_embed_dim": 8,
                 "projection_class_embeddings_input_dim": 80, "norm_num_groups": 16},  # 6 * 8 + 32
        "vae": {"block_out_channels": (16, 16, 32, 32), "layers_per_block": 1, "norm_num_groups": 8,
                "scaling_factor": 0.13025},
        "scheduler": ("EulerDiscreteScheduler", {**EULER_SDXL}),
        "pad_token": "<|endoftext|>",
        "pad_token_2": "!",
    },
    "sd35-medium": {  # SD3.5 medium (2.24 B-parameter MMDiT, CLIP-L + CLIP-G) at 1024x1024, without T5-XXL: its
        # 4.76 B parameters are 19 GB in fp32 and do not fit one trace beside the transformer on a 24 GB machine
        # (export it in parts or reduced; SD3_T5_XXL is its config), so this is diffusers' text_encoder_3=None
        "arch": "sd3",
        "text": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                 "hidden_act": "quick_gelu", "projection_dim": 768},
        "text_2": {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20,
                   "hidden_act": "gelu", "projection_dim": 1280},
        "t5": None,
        "transformer": {"sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 24,
                        "attention_head_dim": 64, "num_attention_heads": 24, "caption_projection_dim": 1536,
                        "joint_attention_dim": 4096, "pooled_projection_dim": 2048, "pos_embed_max_size": 384,
                        "qk_norm": "rms_norm", "dual_attention_layers": tuple(range(13))},
        "vae": {**SD_VAE, "latent_channels": 16, "use_quant_conv": False, "use_post_quant_conv": False,
                "shift_factor": 0.0609, "scaling_factor": 1.5305},  # the released VAE's (diffusers' tests: 1.5035)
        "scheduler": ("FlowMatchEulerDiscreteScheduler", {"num_train_timesteps": 1000, "shift": 3.0}),
        "pad_token": "<|endoftext|>",
        "pad_token_2": "!",
    },
    "tiny-sd3": {  # diffusers' SD3 get_dummy_components, SD3.5's qk-norm and dual attention, a 16-channel 2x VAE
        "arch": "sd3",
        "text": {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 5, "num_attention_heads": 4,
                 "projection_dim": 32},
        "text_2": {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 5, "num_attention_heads": 4,
                   "projection_dim": 32},
        # wider than both CLIPs side by side (64), as T5-XXL's 4096 is than CLIP-L + G's 2048: their padding bites
        "t5": {"d_model": 80, "d_kv": 8, "d_ff": 37, "num_layers": 2, "num_heads": 4,
               "relative_attention_num_buckets": 8, "feed_forward_proj": "gated-gelu"},
        "transformer": {"sample_size": 16, "patch_size": 1, "in_channels": 16, "out_channels": 16, "num_layers": 2,
                        "attention_head_dim": 8, "num_attention_heads": 4, "caption_projection_dim": 32,
                        "joint_attention_dim": 80, "pooled_projection_dim": 64, "pos_embed_max_size": 48,
                        "qk_norm": "rms_norm", "dual_attention_layers": (0,)},
        "conditioning_gain": 3.0,
        "vae": {"block_out_channels": (8, 16), "layers_per_block": 1, "norm_num_groups": 4, "latent_channels": 16,
                "use_quant_conv": False, "use_post_quant_conv": False, "shift_factor": 0.0609,
                "scaling_factor": 1.5035},
        "scheduler": ("FlowMatchEulerDiscreteScheduler", {"num_train_timesteps": 1000, "shift": 3.0}),
        "pad_token": "<|endoftext|>",
        "pad_token_2": "!",
    },
    "tiny-sana": {  # diffusers' Sana get_dummy_components, a little wider (its prompts must move the image), the
        # DC-AE at 2x, Sana's own scheduler (DPM-Solver++ on flow sigmas, shift 3)
        "arch": "sana",
        "gemma": {"hidden_size": 16, "head_dim": 8, "intermediate_size": 32, "num_hidden_layers": 2,
                  "num_attention_heads": 2, "num_key_value_heads": 1, "initializer_range": 0.5},
        "transformer": {"patch_size": 1, "in_channels": 4, "out_channels": 4, "num_layers": 2,
                        "num_attention_heads": 2, "attention_head_dim": 8, "num_cross_attention_heads": 2,
                        "cross_attention_head_dim": 8, "cross_attention_dim": 16, "caption_channels": 16,
                        "sample_size": 32},
        "conditioning_gain": 3.0,
        "vae": {"latent_channels": 4, "attention_head_dim": 2, "encoder_block_types": ("ResBlock", "EfficientViTBlock"),
                "decoder_block_types": ("ResBlock", "EfficientViTBlock"), "encoder_block_out_channels": (8, 8),
                "decoder_block_out_channels": (8, 8), "encoder_qkv_multiscales": ((), (5,)),
                "decoder_qkv_multiscales": ((), (5,)), "encoder_layers_per_block": (1, 1),
                "decoder_layers_per_block": (1, 1), "downsample_block_type": "conv",
                "upsample_block_type": "interpolate", "decoder_norm_types": "rms_norm", "decoder_act_fns": "silu",
                "scaling_factor": 0.41407},
        "scheduler": ("DPMSolverMultistepScheduler", {"flow_shift": 3.0, "use_flow_sigmas": True,
                                                      "prediction_type": "flow_prediction"}),
    },
}
# Sana-Sprint's test model: Sana's with qk-norm and the guidance embedding, sampled by SCM
RECIPES["tiny-sana-sprint"] = RECIPES["tiny-sana"] | {
    "transformer": RECIPES["tiny-sana"]["transformer"] | {"qk_norm": "rms_norm_across_heads", "guidance_embeds": True},
    "scheduler": ("SCMScheduler", {}),
}

# Gemma2-2B's decoder (Sana's text_encoder, gemma-2-2b-it): 2.61 B parameters, 0.59 B of them the embedding
GEMMA2_2B = {"vocab_size": 256000, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
             "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
             "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 8192, "rms_norm_eps": 1e-6,
             "query_pre_attn_scalar": 256, "sliding_window": 4096, "attn_logit_softcapping": 50.0,
             "final_logit_softcapping": 30.0}
# Sana 600M at 1024x1024 (diffusers' convert_sana_to_diffusers.py, SanaMS_600M_P1_D28): the 0.59 B linear-attention
# DiT, Gemma2-2B, the f32c32 DC-AE (convert_dcae_to_diffusers.py, 312 M), DPM-Solver++ on flow sigmas at shift 3
RECIPES["sana-600m"] = {
    "arch": "sana",
    "gemma": GEMMA2_2B,
    "transformer": {"in_channels": 32, "out_channels": 32, "num_attention_heads": 36, "attention_head_dim": 32,
                    "num_layers": 28, "num_cross_attention_heads": 16, "cross_attention_head_dim": 72,
                    "cross_attention_dim": 1152, "caption_channels": 2304, "mlp_ratio": 2.5, "attention_bias": False,
                    "sample_size": 32, "patch_size": 1, "norm_elementwise_affine": False, "norm_eps": 1e-6,
                    "interpolation_scale": None},  # no positional embedding at 512 and 1024 px
    "vae": {"latent_channels": 32, "attention_head_dim": 32, "encoder_block_types": ("ResBlock",) * 3 + (
            "EfficientViTBlock",) * 3, "decoder_block_types": ("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
            "encoder_block_out_channels": (128, 256, 512, 512, 1024, 1024),
            "decoder_block_out_channels": (128, 256, 512, 512, 1024, 1024),
            "encoder_layers_per_block": (2, 2, 2, 3, 3, 3), "decoder_layers_per_block": (3, 3, 3, 3, 3, 3),
            "encoder_qkv_multiscales": ((), (), (), (5,), (5,), (5,)),
            "decoder_qkv_multiscales": ((), (), (), (5,), (5,), (5,)), "downsample_block_type": "conv",
            "upsample_block_type": "interpolate", "decoder_norm_types": "rms_norm", "decoder_act_fns": "silu",
            "scaling_factor": 0.41407},
    "scheduler": ("DPMSolverMultistepScheduler", {"flow_shift": 3.0, "use_flow_sigmas": True,
                                                  "prediction_type": "flow_prediction"}),
}
# Sana-Sprint 0.6B at 1024x1024 (SanaSprint_600M_P1_D28): Sana 600M's DiT with qk-norm across heads and the guidance
# embedding (its input scaled by guidance_embeds_scale 0.1), sampled by SCM (TrigFlow; max_timesteps 1.5708 and
# intermediate_timesteps 1.3 are SanaSprintPipeline's call arguments, not the scheduler's config)
RECIPES["sana-sprint-0.6b"] = RECIPES["sana-600m"] | {
    "transformer": RECIPES["sana-600m"]["transformer"] | {"qk_norm": "rms_norm_across_heads", "guidance_embeds": True,
                                                          "guidance_embeds_scale": 0.1},
    "scheduler": ("SCMScheduler", {"num_train_timesteps": 1000, "prediction_type": "trigflow", "sigma_data": 0.5}),
}


# T5 v1.1 XXL's encoder (SD3's text_encoder_3, FLUX.1's text_encoder_2): 4.76 B parameters
SD3_T5_XXL = {"vocab_size": 32128, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_heads": 64,
              "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128,
              "feed_forward_proj": "gated-gelu"}


# A tiny VAE (diffusers' AutoencoderTiny) for each recipe's random-weight export with `--tiny-vae random`: TAESD's own
# architecture for the real-size recipes, toy widths for the test models.
TINY_VAE = {"tiny": {"encoder_block_out_channels": (8, 8, 8, 8), "decoder_block_out_channels": (8, 8, 8, 8)},
            # taesd3's units (16 channels, SD3's shift), at tiny-sd3's 2x scale
            "tiny-sd3": {"encoder_block_out_channels": (8, 8), "decoder_block_out_channels": (8, 8),
                         "num_encoder_blocks": (1, 1), "num_decoder_blocks": (1, 1), "latent_channels": 16,
                         "scaling_factor": 1.5035, "shift_factor": 0.0609},
            # a taesd3-sized one: TAESD's architecture with 16 channels, in SD3's latent units
            "sd35-medium": {"latent_channels": 16, "scaling_factor": 1.5305, "shift_factor": 0.0609},
            # Sana's: taesana (export/taesana.py, a decoder only), at the tiny recipes' 4-channel 2x DC-AE ...
            "tiny-sana": {"arch": "taesana", "latent_channels": 4, "upscale": 2},
            "tiny-sana-sprint": {"arch": "taesana", "latent_channels": 4, "upscale": 2},
            # ... and taesana's own architecture (f32c32) at real size
            "sana-600m": {"arch": "taesana", "latent_channels": 32, "upscale": 32},
            "sana-sprint-0.6b": {"arch": "taesana", "latent_channels": 32, "upscale": 32}}


def tiny_vae_config(recipe: str) -> dict[str, Any]:
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; valid: {', '.join(RECIPES)}")
    if recipe in TINY_VAE:
        return TINY_VAE[recipe]
    return TINY_VAE["tiny"] if recipe.startswith("tiny") else {}


def build_pipeline(recipe: str, out_dir: str | Path, seed: int = 0, inpainting: bool = False) -> Path:
    """Build ``recipe`` with seeded random weights and save it as a diffusers folder."""
    import diffusers
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; valid: {', '.join(RECIPES)}")
    r = RECIPES[recipe]
    if r.get("arch") in ("sd3", "sana"):
        if inpainting:
            raise ValueError(f"the {r['arch']} recipes have no inpainting variant")
        return (_build_sd3 if r["arch"] == "sd3" else _build_sana)(r, Path(out_dir), seed)
    xl = r.get("arch") == "sdxl"
    if xl and inpainting:
        raise ValueError("the sdxl recipes have no inpainting variant")
    out_dir = Path(out_dir)
    tokenizer = build_clip_tokenizer(out_dir / "tokenizer", pad_token=r["pad_token"])

    def text_config(tok, arch):
        return CLIPTextConfig(vocab_size=len(tok), max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                              eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **arch)

    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(text_config(tokenizer, r["text"])).eval()
    extra: dict[str, Any] = {}
    context = r["text"]["hidden_size"]
    if xl:
        tokenizer_2 = build_clip_tokenizer(out_dir / "tokenizer_2", pad_token=r["pad_token_2"])
        text_encoder_2 = CLIPTextModelWithProjection(text_config(tokenizer_2, r["text_2"])).eval()
        extra = {"text_encoder_2": text_encoder_2, "tokenizer_2": tokenizer_2}
        context += r["text_2"]["hidden_size"]
    unet = diffusers.UNet2DConditionModel(
        in_channels=9 if inpainting else 4,
        out_channels=4,
        cross_attention_dim=context,
        **r["unet"],
    ).eval()
    n = len(r["vae"]["block_out_channels"])
    vae = diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        sample_size=r["unet"]["sample_size"] * 2 ** (n - 1),
        **r["vae"],
    ).eval()
    if recipe.startswith("tiny"):
        _perturb_zero_init(unet)
    sched_cls, sched_cfg = r["scheduler"]
    scheduler = getattr(diffusers, sched_cls).from_config(sched_cfg)
    if xl:
        pipe = diffusers.StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                                   scheduler=scheduler, **extra)
        pipe.save_pretrained(out_dir, max_shard_size="2GB")  # serialised shard by shard: an fp32 SDXL is 14 GB
        return out_dir
    pipe_cls = diffusers.StableDiffusionInpaintPipeline if inpainting else diffusers.StableDiffusionPipeline
    pipe = pipe_cls(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out_dir)
    return out_dir


def _build_sd3(r: dict[str, Any], out_dir: Path, seed: int) -> Path:
    """SD3's pipeline: CLIP-L and CLIP-G with projections, T5's encoder, the MMDiT, a 16-channel VAE."""
    import diffusers
    import torch
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from .t5_tokenizer import build_t5_tokenizer_fast

    tokenizer = build_clip_tokenizer(out_dir / "tokenizer", pad_token=r["pad_token"])
    tokenizer_2 = build_clip_tokenizer(out_dir / "tokenizer_2", pad_token=r["pad_token_2"])
    tokenizer_3 = build_t5_tokenizer_fast(out_dir / "tokenizer_3") if r["t5"] is not None else None

    def text_config(tok, arch):
        return CLIPTextConfig(vocab_size=len(tok), max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                              eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **arch)

    torch.manual_seed(seed)
    text_encoder = CLIPTextModelWithProjection(text_config(tokenizer, r["text"])).eval()
    text_encoder_2 = CLIPTextModelWithProjection(text_config(tokenizer_2, r["text_2"])).eval()
    text_encoder_3 = None if r["t5"] is None else T5EncoderModel(T5Config(
        **{"vocab_size": len(tokenizer_3), "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0}
        | r["t5"])).eval()
    transformer = diffusers.SD3Transformer2DModel(**r["transformer"]).eval()
    # at random widths the timestep and the prompt barely move the velocity (another shift or prompt gave an image
    # within 40 dB): the conditioning paths are scaled up, so a parity test fails when either is read wrong
    with torch.no_grad():
        for param_name, p in transformer.named_parameters():
            if param_name.startswith(("time_text_embed.", "context_embedder.", "norm_out.")) or ".norm1" in param_name:
                p.mul_(r.get("conditioning_gain", 1.0))
    n = len(r["vae"]["block_out_channels"])
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                                  up_block_types=("UpDecoderBlock2D",) * n,
                                  sample_size=r["transformer"]["sample_size"] * 2 ** (n - 1), **r["vae"]).eval()
    sched_cls, sched_cfg = r["scheduler"]
    scheduler = getattr(diffusers, sched_cls).from_config(sched_cfg)
    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3)
    pipe.save_pretrained(out_dir, max_shard_size="2GB")  # serialised shard by shard: SD3.5 medium is 12 GB in fp32
    return out_dir


def _build_sana(r: dict[str, Any], out_dir: Path, seed: int) -> Path:
    """Sana's pipeline (Sana-Sprint's with a guidance-embedding transformer): Gemma2, the linear-attention DiT, the
    deep-compression autoencoder."""
    import diffusers
    import torch
    from transformers import Gemma2Config, Gemma2Model

    from .gemma_tokenizer import build_gemma_tokenizer_fast

    tokenizer = build_gemma_tokenizer_fast(out_dir / "tokenizer")
    torch.manual_seed(seed)
    # the tiny recipes' vocabulary is the offline tokenizer's; the real-size ones keep Gemma's 256,000 (every id the
    # offline tokenizer gives is below it)
    text_encoder = Gemma2Model(Gemma2Config(**({"vocab_size": len(tokenizer)} | r["gemma"]),
                                            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                                            eos_token_id=tokenizer.eos_token_id, attn_implementation="eager")).eval()
    transformer = diffusers.SanaTransformer2DModel(**r["transformer"]).eval()
    # as tiny-sd3's: the timestep and caption paths scaled up, so that a parity test fails when either is read wrong
    with torch.no_grad():
        for param_name, p in transformer.named_parameters():
            if param_name.startswith(("time_embed.", "caption_norm.", "scale_shift_table")):
                p.mul_(r.get("conditioning_gain", 1.0))
            if ".attn2.to_out" in param_name:  # the prompt's way into the image (the caption is RMS-normed before)
                p.mul_(r.get("conditioning_gain", 1.0) ** 3)
            if param_name.startswith("time_embed.guidance_embedder.linear_1"):
                p.mul_(r.get("conditioning_gain", 1.0) ** 2)  # Sprint's guidance (0.45 for 4.5) is a small input
    _perturb_zero_init(transformer)
    vae = diffusers.AutoencoderDC(in_channels=3, **r["vae"]).eval()
    sched_cls, sched_cfg = r["scheduler"]
    scheduler = getattr(diffusers, sched_cls).from_config(sched_cfg)
    pipe_cls = diffusers.SanaSprintPipeline if r["transformer"].get("guidance_embeds") else diffusers.SanaPipeline
    pipe = pipe_cls(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                    scheduler=scheduler)
    pipe.save_pretrained(out_dir, max_shard_size="2GB")
    return out_dir


def _perturb_zero_init(module) -> None:
    """diffusers zero-initialises output convs; random weights there make parity tests bite."""
    import torch

    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for p in module.parameters():
            if p.ndim > 0 and torch.count_nonzero(p) == 0:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def build_controlnet(source: str | Path, out_dir: str | Path, seed: int = 0, copy_unet: bool = True,
                     zero_conv_std: float = 0.5) -> Path:
    """A ControlNet for the diffusers checkpoint ``source`` (``ControlNetModel.from_unet``: its encoder copied
    from the UNet, or seeded random weights), saved as a diffusers folder. ControlNets start with zero
    convolutions, which would make them do nothing: seeded random ones of ``zero_conv_std`` make their effect
    large enough for parity tests to tell a ControlNet applied from one ignored. For tests and latency only."""
    import diffusers
    import torch

    unet = diffusers.UNet2DConditionModel.from_pretrained(str(source), subfolder="unet")
    vae_config = diffusers.AutoencoderKL.load_config(str(source), subfolder="vae")
    levels = len(vae_config["block_out_channels"])  # the control image is shrunk by the VAE's factor
    widths = (16, 32, 96, 256) if unet.config.block_out_channels[0] >= 256 else (8,) * (levels - 1) + (16,)
    torch.manual_seed(seed)
    controlnet = diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=widths,
                                                     load_weights_from_unet=copy_unet)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for block in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block,
                      controlnet.controlnet_cond_embedding.conv_out]:
            for p in block.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * zero_conv_std / max(1, p[0].numel()) ** 0.5)
    controlnet.save_pretrained(str(out_dir))
    return Path(out_dir)
