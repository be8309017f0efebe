"""LoRA files for tests, in the layouts people download: kohya/A1111 (diffusers or SDXL's original UNet names,
LoCon's 3x3 convolution kernels included), and diffusers/PEFT as diffusers itself saves them. Random factors,
large enough that the LoRA visibly changes the image. Needs torch (full tier)."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import save_file

KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te_text_model_", "text_encoder_2": "lora_te2_text_model_"}
XL_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te1_text_model_", "text_encoder_2": "lora_te2_text_model_"}


def _layers(model: torch.nn.Module, conv3: bool):
    """The layers kohya's sd-scripts trains: the UNet's transformer blocks (and with LoCon its resnets, down- and
    upsamplers), the text encoders' attention and MLP layers."""
    for name, m in model.named_modules():
        if not re.search(r"attentions\.|resnets\.|samplers\.|self_attn\.|mlp\.", name):
            continue
        if isinstance(m, torch.nn.Linear):
            yield name, (m.in_features,), m.out_features
        elif isinstance(m, torch.nn.Conv2d) and (conv3 or m.kernel_size == (1, 1)):
            yield name, (m.in_channels, *m.kernel_size), m.out_channels


def kohya(pipe, path: Path, models=("unet", "text_encoder"), rank: int = 4, alpha: float = 2.0, seed: int = 0,
          conv3: bool = True, sgm: bool = False, std: float = 0.25) -> Path:
    """A kohya/A1111 LoRA (LoCon when ``conv3``: every conv, 3x3 kernels too) on every layer of ``models``;
    ``sgm``: the UNet named as kohya names SDXL's (input_blocks / middle_block / output_blocks)."""
    g = torch.Generator().manual_seed(seed)
    prefixes = XL_PREFIX if getattr(pipe, "text_encoder_2", None) is not None else KOHYA_PREFIX
    tensors = {}
    for model_name in models:
        model = getattr(pipe, model_name)
        for name, fan_in, out in _layers(model, conv3):
            module = sgm_name(name, model.config.layers_per_block) if sgm and model_name == "unet" else name
            module = module.removeprefix("text_model.")  # kohya's text encoder names have one text_model level
            key = prefixes[model_name] + module.replace(".", "_")
            down = torch.randn(rank, *fan_in, generator=g) * std
            up = torch.randn(out, rank, *((1, 1) if len(fan_in) == 3 else ()), generator=g) * std
            tensors[f"{key}.lora_down.weight"] = down.to(torch.float16)
            tensors[f"{key}.lora_up.weight"] = up.to(torch.float16)
            tensors[f"{key}.alpha"] = torch.tensor(alpha)
    save_file(tensors, str(path))
    return path


def sgm_name(path: str, layers_per_block: int) -> str:
    """A diffusers UNet module path in the original SD/SDXL UNet's layout (the inverse of diffusers' mapping)."""
    per = layers_per_block + 1
    whole = {"conv_in": "input_blocks.0.0", "conv_out": "out.2", "time_embedding.linear_1": "time_embed.0",
             "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
             "add_embedding.linear_2": "label_emb.0.2"}
    if path in whole:
        return whole[path]
    resnet = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
              "conv_shortcut": "skip_connection"}
    for blocks, sgm_blocks, first in (("down_blocks", "input_blocks", 1), ("up_blocks", "output_blocks", 0)):
        m = re.fullmatch(rf"{blocks}\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", path)
        if m:
            block, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
            inner = 0 if kind == "resnets" else 1
            return f"{sgm_blocks}.{first + block * per + layer}.{inner}.{resnet.get(rest, rest) if inner == 0 else rest}"
    m = re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv", path)
    if m:
        return f"input_blocks.{(int(m[1]) + 1) * per}.0.op"
    m = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", path)
    if m:
        index = {("resnets", 0): 0, ("attentions", 0): 1, ("resnets", 1): 2}[(m[1], int(m[2]))]
        return f"middle_block.{index}.{resnet.get(m[3], m[3]) if m[1] == 'resnets' else m[3]}"
    m = re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv", path)
    if m:
        return f"output_blocks.{int(m[1]) * per + layers_per_block}.2.conv"
    raise ValueError(f"no SGM name for {path}")


def peft(pipe, folder: Path, rank: int = 4, seed: int = 0, text_encoder: bool = True, old_names: bool = False) -> Path:
    """A diffusers/PEFT LoRA (``lora_A`` / ``lora_B``) on the attention, projection and conv layers, written by
    diffusers' ``save_lora_weights``, with random factors; ``old_names``: diffusers' earlier layout instead
    (attention processors' ``to_q_lora.down`` in the UNet, ``lora_linear_layer.down`` in the text encoder)."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    targets = {"unet": ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "conv1", "conv2", "ff.net.2",
                        "time_emb_proj"],
               "text_encoder": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1"]}
    layers = {}
    for model in ("unet", "text_encoder") if text_encoder else ("unet",):
        module = getattr(pipe, model)
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets[model]), module)
        state = {}
        for key, value in get_peft_model_state_dict(module).items():
            if old_names:
                key = _old_diffusers_name(key, model)
                if key is None:
                    continue
            state[key] = torch.randn(value.shape) * 0.3  # PEFT starts B at zero: random, so it changes the image
        layers[f"{model}_lora_layers"] = state
    type(pipe).save_lora_weights(str(folder), **layers)
    return folder / "pytorch_lora_weights.safetensors"


def _old_diffusers_name(key: str, model: str) -> str | None:
    """PEFT's key in diffusers' pre-PEFT layout (what diffusers < 0.24 saved); None where that had no LoRA."""
    down_up = {"lora_A": "down", "lora_B": "up"}
    if model == "text_encoder":
        return re.sub(r"\.(lora_A|lora_B)\.", lambda m: f".lora_linear_layer.{down_up[m[1]]}.", key)
    m = re.fullmatch(r"(.*\.attn[12])\.(to_q|to_k|to_v|to_out\.0)\.(lora_A|lora_B)\.weight", key)
    if m is None:
        return None
    return f"{m[1]}.processor.{m[2].removesuffix('.0')}_lora.{down_up[m[3]]}.weight"
