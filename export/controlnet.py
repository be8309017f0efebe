"""ControlNets (Zhang et al., ICCV 2023) in the artifact: each its own graph, the UNet taking their residuals.

A ControlNet is a copy of the UNet's encoder that reads a control image
(edges, depth, pose...) and returns one residual per skip connection of the
UNet's down path and one for its mid block; the UNet adds them in
(diffusers' ``down_block_additional_residuals`` / ``mid_block_additional_residual``).
``edgediff export --controlnet NAME=PATH`` exports each ControlNet with its
residuals as outputs (``controlnet_contract``) and the UNet with the same
residuals as inputs (``components.unet_contract(residuals=...)``), so the
runtime passes one graph's outputs to the other by name (zeros when no
control image is given: the UNet's own output, exactly). The conditioning
scale and the guidance window are applied by the runtime
(``edgediff.runtime.control``), so one graph serves every scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from edgediff.runtime.manifest import DOWN_RESIDUAL, MID_RESIDUAL, ArtifactError, TensorSpec, check_control_name

from .components import Contract, ExportError, _gen


@dataclass(frozen=True)
class Residual:
    """One residual the UNet takes: its channels and how often its level halves the latent size."""

    name: str
    channels: int
    level: int  # the latent size divided by 2 ** level (rounded up)

    def spec(self) -> TensorSpec:
        f = 2 ** self.level
        return TensorSpec(self.name, "float32", ("batch", self.channels, f"height/{f}", f"width/{f}"))

    def size(self, height: int, width: int) -> tuple[int, int]:
        f = 2 ** self.level
        return -(-height // f), -(-width // f)


def residuals_of(unet) -> list[Residual]:
    """The residuals of ``unet``'s skip connections in diffusers' order (conv_in, each down block's layers, its
    downsampler), then the mid block's."""
    c = unet.config
    per_block = c.layers_per_block if isinstance(c.layers_per_block, (list, tuple)) else \
        [c.layers_per_block] * len(c.block_out_channels)
    found = [(c.block_out_channels[0], 0)]
    for i, (channels, layers) in enumerate(zip(c.block_out_channels, per_block)):
        found += [(channels, i)] * layers
        if i < len(c.block_out_channels) - 1:
            found.append((channels, i + 1))
    down = [Residual(f"{DOWN_RESIDUAL}{k}", ch, level) for k, (ch, level) in enumerate(found)]
    return down + [Residual(MID_RESIDUAL, c.block_out_channels[-1], len(c.block_out_channels) - 1)]


def residual_samples(residuals: list[Residual], batch: int, height: int, width: int, seed: int) -> tuple[torch.Tensor, ...]:
    g = _gen(seed)
    return tuple(torch.randn(batch, r.channels, *r.size(height, width), generator=g) * 0.5 for r in residuals)


def parse_controlnet_arg(text: str) -> tuple[str, str]:
    """``NAME=PATH`` or ``PATH`` (named after the folder or file) -> (name, path)."""
    name, sep, path = text.partition("=")
    if not sep:
        path, name = text, Path(text.rstrip("/\\")).stem.lower().replace(" ", "_").replace(".", "_")
    try:
        return check_control_name(name.strip(), f"--controlnet {text!r:.80}: the name"), path.strip()
    except ArtifactError as e:
        raise ExportError(f"{e}; write --controlnet NAME=PATH") from None


def load_controlnet(path: str, base_unet):
    """A diffusers ``ControlNetModel`` from a folder (config.json + weights), a hub id, or one ``.safetensors``
    file: in diffusers' key layout (its config taken from the base UNet, as ``ControlNetModel.from_unet``),
    or in the original layout (diffusers' ``from_single_file``, which reads its config from the hub)."""
    import diffusers

    p = Path(path)
    fp32 = {"torch_dtype": torch.float32}
    try:
        if p.is_dir():
            if not (p / "config.json").is_file():
                raise ExportError(f"--controlnet {path}: a folder without config.json; expected a diffusers "
                                  "ControlNetModel folder (config.json + diffusion_pytorch_model.safetensors) or a "
                                  ".safetensors file")
            return diffusers.ControlNetModel.from_pretrained(str(p), **fp32).eval()
        if p.suffix == ".safetensors" and p.is_file():
            return _from_safetensors(p, base_unet)
        if p.exists():
            raise ExportError(f"--controlnet {path}: neither a diffusers ControlNetModel folder nor a .safetensors file")
        if path.count("/") != 1:
            raise ExportError(f"--controlnet {path}: no such file or folder (nor a hub id owner/name)")
        return diffusers.ControlNetModel.from_pretrained(path, **fp32).eval()
    except ExportError:
        raise
    except Exception as e:  # diffusers/safetensors raise their own types for unreadable or foreign files
        raise ExportError(f"--controlnet {path} could not be read as a ControlNet ({type(e).__name__}: "
                          f"{str(e)[:300]})") from None


def _from_safetensors(path: Path, base_unet):
    import diffusers
    from safetensors.torch import load_file

    state = load_file(str(path))
    if "controlnet_mid_block.weight" not in state:  # the original (ldm) layout: control_model.*
        return diffusers.ControlNetModel.from_single_file(str(path), torch_dtype=torch.float32).eval()
    conv_in = state.get("controlnet_cond_embedding.conv_in.weight")
    if conv_in is None:
        raise ExportError(f"--controlnet {path}: no controlnet_cond_embedding.conv_in.weight: not a ControlNet")
    widths = [conv_in.shape[0]] + [state[k].shape[0] for k in sorted(
        (k for k in state if k.startswith("controlnet_cond_embedding.blocks.") and k.endswith(".weight")
         and int(k.split(".")[2]) % 2 == 1), key=lambda k: int(k.split(".")[2]))]
    controlnet = diffusers.ControlNetModel.from_unet(base_unet, conditioning_embedding_out_channels=tuple(widths),
                                                     conditioning_channels=int(conv_in.shape[1]),
                                                     load_weights_from_unet=False)
    missing, unexpected = controlnet.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ExportError(f"--controlnet {path} does not fit this checkpoint's UNet: "
                          f"{len(missing)} weights missing (e.g. {missing[:2]}), {len(unexpected)} unexpected "
                          f"(e.g. {unexpected[:2]}): it is a ControlNet of another model family")
    return controlnet.to(torch.float32).eval()


def family(config) -> str:
    if getattr(config, "addition_embed_type", None) == "text_time":
        return "SDXL"
    return {768: "SD 1.x", 1024: "SD 2.x"}.get(config.cross_attention_dim, f"cross_attention_dim {config.cross_attention_dim}")


def check_fits(controlnet, unet, vae_scale: int, label: str) -> None:
    """Refuse a ControlNet made for another model: its residuals must be the UNet's, its text conditioning the
    same, its control image embedding must shrink images by the VAE's factor."""
    cn, un = controlnet.config, unet.config
    ours = [r.channels for r in residuals_of(unet)]
    theirs = [b.out_channels for b in controlnet.controlnet_down_blocks] + [controlnet.controlnet_mid_block.out_channels]
    problems = []
    if cn.cross_attention_dim != un.cross_attention_dim:
        problems.append(f"text conditioning width {cn.cross_attention_dim} (the UNet's: {un.cross_attention_dim})")
    if (cn.addition_embed_type or None) != (un.addition_embed_type or None):
        problems.append(f"added conditioning {cn.addition_embed_type!r} (the UNet's: {un.addition_embed_type!r})")
    if theirs != ours:
        problems.append(f"residual channels {theirs} (the UNet's: {ours})")
    if cn.in_channels != un.out_channels:
        problems.append(f"{cn.in_channels} latent channels (the UNet's: {un.out_channels})")
    shrink = 2 ** (len(cn.conditioning_embedding_out_channels) - 1)
    if shrink != vae_scale:
        problems.append(f"a control image embedding that shrinks by {shrink} (the VAE's factor: {vae_scale})")
    if cn.global_pool_conditions:
        problems.append("global_pool_conditions (shuffle-style ControlNets, guess mode only; not supported)")
    if problems:
        raise ExportError(f"--controlnet {label} is a {family(cn)} ControlNet and this checkpoint is {family(un)}: "
                          + "; ".join(problems) + ". Give a ControlNet trained for this model family")


class _ControlNet(torch.nn.Module):
    """(sample, timestep, encoder_hidden_states[, text_embeds, time_ids], controlnet_cond) -> the residuals at
    conditioning scale 1 (the runtime scales them)."""

    def __init__(self, controlnet, xl: bool):
        super().__init__()
        self.controlnet, self.xl = controlnet, xl

    def forward(self, sample, timestep, encoder_hidden_states, *rest):
        *conditioning, controlnet_cond = rest
        added = {"text_embeds": conditioning[0], "time_ids": conditioning[1]} if self.xl else None
        down, mid = self.controlnet(sample, timestep, encoder_hidden_states, controlnet_cond=controlnet_cond,
                                    conditioning_scale=1.0, added_cond_kwargs=added, guess_mode=False,
                                    return_dict=False)
        return (*down, mid)


def controlnet_contract(controlnet, unet_contract: Contract, residuals: list[Residual], vae_scale: int,
                        name: str) -> Contract:
    """The ControlNet's graph: the UNet's conditioning inputs and the control image in, the residuals out."""
    conditioning = tuple(t for t in unet_contract.inputs if not t.name.startswith((DOWN_RESIDUAL, MID_RESIDUAL)))
    channels = controlnet.config.conditioning_channels
    image = TensorSpec("controlnet_cond", "float32", ("batch", channels, "image_height", "image_width"))
    n_conditioning = len(conditioning)

    def sample():
        args = unet_contract.sample()[:n_conditioning]
        h, w = args[0].shape[-2:]
        return args + (torch.rand(args[0].shape[0], channels, h * vae_scale, w * vae_scale, generator=_gen(4)),)

    xl = controlnet.config.addition_embed_type == "text_time"
    return Contract(f"controlnet_{name}", _ControlNet(controlnet, xl), conditioning + (image,),
                    tuple(r.spec() for r in residuals), sample)
