"""DeepCache (Ma et al., CVPR 2024) for diffusers' UNet2DConditionModel as two traceable graphs.

DeepCache runs the whole UNet every ``cache_interval`` steps and, in the steps
between, only a shallow branch that reuses one high-level feature of the last
full step. ``DeepCacheFull`` is the UNet that also returns that feature;
``DeepCacheShallow`` takes it and computes only the shallow branch. Both trace
with torch.onnx's TorchScript exporter.

The skip rule is that of the authors' helper (``DeepCacheSDHelper``, pip
``deepcache`` 0.1.1). For ``cache_branch_id`` b, with block B = b // 3 and
layer L = b % 3, a skip step returns the cached outputs of: the down blocks
with index > B; in down block B its layers (resnet and attention) with index
>= L and its downsampler (the whole block when L == 0); the mid block; the up
blocks whose index counted from the output end, ri = n_up - 1 - i, is > B;
and in up block ri == B the layers whose reversed index rl = n_layers - 1 - j
is > L. Everything else is computed fresh.

Why exactly one tensor is cached. The fresh part of the up path is a chain:
up block B's layers rl = L, ..., 0, its upsampler, then up blocks B - 1, ..., 0
and the output convs. A layer's inputs are the hidden state coming along the
chain and one skip connection. Along the chain, the only value that comes from
the cached part is the hidden state entering the first fresh layer (rl = L):
the output of the cached layer before it (rl = L + 1; its attention where the
block has attentions) or, when rl = L is the block's first layer, the input of
up block B: the output of up block B + 1 with its upsampler (the mid block's
when B is the deepest block). The skip connections: up block ri's layer rl
reads down block ri's layer rl - 1 for rl >= 1, and for rl = 0 the output of
down block ri - 1's downsampler (of conv_in when ri == 0). So the fresh layers
of up block B read conv_in or down block B - 1's downsampler and down block
B's layers < L, and up blocks < B read conv_in and down blocks < B: exactly the
down modules the rule computes fresh. What it caches on the down side (down
blocks > B, down block B's layers >= L and downsampler, the mid block) feeds
only cached modules, so the shallow graph neither computes nor carries it.

Latent sizes that are not multiples of 2 ** num_upsamplers: diffusers then
passes each upsampler the spatial size of the next skip connection; both
graphs do the same (traced at such a size, the sizes come from the tensors).
"""

from __future__ import annotations

import torch
from diffusers.models.unets.unet_2d_blocks import CrossAttnDownBlock2D, CrossAttnUpBlock2D, DownBlock2D, UpBlock2D
from torch import nn

LAYERS_PER_BRANCH_BLOCK = 3  # DeepCache numbers branches cache_block_id * 3 + cache_layer_id
REPLICATED_DOWN_BLOCKS = (CrossAttnDownBlock2D, DownBlock2D)
REPLICATED_UP_BLOCKS = (CrossAttnUpBlock2D, UpBlock2D)
FREEU_FACTORS = ("s1", "s2", "b1", "b2")


def branch_ids(unet) -> list[int]:
    """The cache_branch_id values of DeepCache (Ma et al., CVPR 2024) that ``unet`` has."""
    n_up = len(unet.up_blocks)
    return [block * LAYERS_PER_BRANCH_BLOCK + layer for block in range(n_up)
            for layer in range(min(LAYERS_PER_BRANCH_BLOCK, len(unet.up_blocks[n_up - 1 - block].resnets)))]


def branch_of(unet, cache_branch_id: int) -> tuple[int, int]:
    """(cache_block_id, cache_layer_id) of DeepCache's (Ma et al., CVPR 2024) cache_branch_id, checked on unet."""
    if isinstance(cache_branch_id, bool) or not isinstance(cache_branch_id, int):
        raise ValueError(f"cache_branch_id must be an int, got {cache_branch_id!r}")
    block, layer = divmod(cache_branch_id, LAYERS_PER_BRANCH_BLOCK)
    n_up = len(unet.up_blocks)
    if not 0 <= block < n_up:
        raise ValueError(f"cache_branch_id {cache_branch_id}: its block {cache_branch_id} // 3 = {block} must be in "
                         f"[0, {n_up}) (this UNet has {n_up} up blocks); valid ids: {branch_ids(unet)}")
    n_layers = len(unet.up_blocks[n_up - 1 - block].resnets)
    if layer >= n_layers:
        raise ValueError(f"cache_branch_id {cache_branch_id}: its layer {cache_branch_id} % 3 = {layer} must be in "
                         f"[0, {n_layers}) (up block {block} from the output has {n_layers} layers); "
                         f"valid ids: {branch_ids(unet)}")
    return block, layer


def _refuse_unreplicated(unet, block: int) -> None:
    """Refuse the UNet features that DeepCache's (Ma et al., CVPR 2024) shallow branch here does not replicate."""
    config = unet.config
    problems = []
    if config.center_input_sample:
        problems.append("center_input_sample=True")
    if unet.class_embedding is not None:
        problems.append(f"a class embedding (class_embed_type={config.class_embed_type!r}, "
                        f"num_class_embeds={config.num_class_embeds!r})")
    if config.addition_embed_type not in (None, "text_time"):
        problems.append(f"addition_embed_type={config.addition_embed_type!r} (supported: None, 'text_time')")
    if unet.encoder_hid_proj is not None:
        problems.append(f"encoder_hid_proj (encoder_hid_dim_type={config.encoder_hid_dim_type!r})")
    if any(all(getattr(up, factor, None) for factor in FREEU_FACTORS) for up in unet.up_blocks):
        problems.append("FreeU (call unet.disable_freeu())")
    n_up = len(unet.up_blocks)
    shallow = [*unet.down_blocks[:block + 1], *unet.up_blocks[n_up - 1 - block:]]
    problems += [f"a {type(b).__name__} in the shallow branch" for b in shallow
                 if type(b) not in REPLICATED_DOWN_BLOCKS + REPLICATED_UP_BLOCKS]
    if problems:
        raise NotImplementedError(f"DeepCache export does not replicate this UNet: {'; '.join(problems)}")


def _added_cond_kwargs(unet, text_embeds, time_ids) -> dict[str, torch.Tensor] | None:
    """SDXL's text_time conditioning as diffusers takes it, for DeepCache (Ma et al., CVPR 2024)."""
    if unet.config.addition_embed_type == "text_time":
        if text_embeds is None or time_ids is None:
            raise TypeError("this UNet has text_time conditioning (SDXL): pass text_embeds and time_ids")
        return {"text_embeds": text_embeds, "time_ids": time_ids}
    if text_embeds is not None or time_ids is not None:
        raise TypeError("text_embeds and time_ids are for text_time UNets (SDXL); this UNet takes neither")
    return None


def residual_kwargs(residuals) -> dict:
    """ControlNet residuals (down blocks' then the mid block's) as diffusers' UNet takes them; none: {}."""
    if not residuals:
        return {}
    return {"down_block_additional_residuals": tuple(residuals[:-1]), "mid_block_additional_residual": residuals[-1]}


def _cross_attention_kwargs(block, encoder_hidden_states) -> dict[str, torch.Tensor]:
    """The text conditioning a block takes, as UNet2DConditionModel.forward passes it (Ma et al., CVPR 2024)."""
    return {"encoder_hidden_states": encoder_hidden_states} if getattr(block, "has_cross_attention", False) else {}


def _layer(block, index: int, hidden_states, temb, encoder_hidden_states):
    """Layer ``index`` of a diffusers block (resnet, then attention if any), a DeepCache (Ma et al., CVPR 2024) unit."""
    hidden_states = block.resnets[index](hidden_states, temb)
    if getattr(block, "has_cross_attention", False):
        hidden_states = block.attentions[index](hidden_states, encoder_hidden_states=encoder_hidden_states,
                                                return_dict=False)[0]
    return hidden_states


class DeepCacheFull(nn.Module):
    """The whole UNet, also returning DeepCache's (Ma et al., CVPR 2024) cached feature for ``cache_branch_id``."""

    def __init__(self, unet, cache_branch_id: int, residuals: int = 0):
        super().__init__()
        self.block, self.layer = branch_of(unet, cache_branch_id)
        _refuse_unreplicated(unet, self.block)
        self.unet = unet
        self.residuals = residuals  # ControlNet residuals taken after the conditioning (export/controlnet.py)

    def _capture_feature(self, captured: list) -> torch.utils.hooks.RemovableHandle:
        """Hook the hidden state entering the first fresh layer of up block B (DeepCache, Ma et al., CVPR 2024)."""
        up = self.unet.up_blocks[len(self.unet.up_blocks) - 1 - self.block]
        first_fresh = len(up.resnets) - 1 - self.layer
        if first_fresh == 0:
            return up.register_forward_pre_hook(
                lambda module, args, kwargs: captured.append(kwargs["hidden_states"]), with_kwargs=True)
        if getattr(up, "has_cross_attention", False):
            return up.attentions[first_fresh - 1].register_forward_hook(
                lambda module, args, output: captured.append(output[0]))
        return up.resnets[first_fresh - 1].register_forward_hook(lambda module, args, output: captured.append(output))

    def forward(self, sample, timestep, encoder_hidden_states, *inputs):
        """(out_sample, deep_feature): the UNet's output and DeepCache's (Ma et al., CVPR 2024) cached feature;
        inputs: [text_embeds, time_ids,] and the ``residuals`` ControlNet residuals."""
        _refuse_unreplicated(self.unet, self.block)
        split = len(inputs) - self.residuals
        conditioning, residuals = inputs[:split], inputs[split:]
        text_embeds, time_ids = (tuple(conditioning) + (None, None))[:2]
        added_cond_kwargs = _added_cond_kwargs(self.unet, text_embeds, time_ids)
        captured: list[torch.Tensor] = []
        handle = self._capture_feature(captured)
        try:
            out_sample = self.unet(sample, timestep, encoder_hidden_states, added_cond_kwargs=added_cond_kwargs,
                                   **residual_kwargs(residuals), return_dict=False)[0]
        finally:
            handle.remove()
        return out_sample, captured[0]


class DeepCacheShallow(nn.Module):
    """DeepCache's (Ma et al., CVPR 2024) shallow branch of ``cache_branch_id``, fed the cached feature."""

    def __init__(self, unet, cache_branch_id: int):
        super().__init__()
        self.block, self.layer = branch_of(unet, cache_branch_id)
        _refuse_unreplicated(unet, self.block)
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states, *inputs):
        """DeepCache's (Ma et al., CVPR 2024) shallow out_sample; inputs: [text_embeds, time_ids,] deep_feature."""
        unet = self.unet
        _refuse_unreplicated(unet, self.block)
        n_inputs = 3 if unet.config.addition_embed_type == "text_time" else 1
        if len(inputs) != n_inputs:
            raise TypeError(f"after encoder_hidden_states this UNet takes {n_inputs} inputs "
                            f"({'text_embeds, time_ids, ' if n_inputs == 3 else ''}deep_feature), got {len(inputs)}")
        *conditioning, deep_feature = inputs
        text_embeds, time_ids = conditioning or (None, None)
        added_cond_kwargs = _added_cond_kwargs(unet, text_embeds, time_ids)
        up_factor = 2 ** unet.num_upsamplers
        forward_upsample_size = any(dim % up_factor != 0 for dim in sample.shape[-2:])

        emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), None)
        if added_cond_kwargs is not None:
            emb = emb + unet.get_aug_embed(emb=emb, encoder_hidden_states=encoder_hidden_states,
                                           added_cond_kwargs=added_cond_kwargs)
        if unet.time_embed_act is not None:
            emb = unet.time_embed_act(emb)

        hidden_states = unet.conv_in(sample)
        skips = [hidden_states]
        for down in unet.down_blocks[:self.block]:
            hidden_states, res_samples = down(hidden_states=hidden_states, temb=emb,
                                              **_cross_attention_kwargs(down, encoder_hidden_states))
            skips.extend(res_samples)
        partial_down = unet.down_blocks[self.block]
        for index in range(self.layer):
            hidden_states = _layer(partial_down, index, hidden_states, emb, encoder_hidden_states)
            skips.append(hidden_states)

        n_up = len(unet.up_blocks)
        first_up = n_up - 1 - self.block
        partial_up = unet.up_blocks[first_up]
        upsample_size = None
        hidden_states = deep_feature
        for index in range(len(partial_up.resnets) - 1 - self.layer, len(partial_up.resnets)):
            hidden_states = torch.cat([hidden_states, skips.pop()], dim=1)
            hidden_states = _layer(partial_up, index, hidden_states, emb, encoder_hidden_states)
        if first_up < n_up - 1 and forward_upsample_size:
            upsample_size = skips[-1].shape[2:]
        if partial_up.upsamplers is not None:
            for upsampler in partial_up.upsamplers:
                hidden_states = upsampler(hidden_states, upsample_size)
        for i in range(first_up + 1, n_up):
            up = unet.up_blocks[i]
            res_samples = tuple(skips[-len(up.resnets):])
            del skips[-len(up.resnets):]
            if i < n_up - 1 and forward_upsample_size:
                upsample_size = skips[-1].shape[2:]
            hidden_states = up(hidden_states=hidden_states, temb=emb, res_hidden_states_tuple=res_samples,
                               upsample_size=upsample_size, **_cross_attention_kwargs(up, encoder_hidden_states))

        if unet.conv_norm_out is not None:
            hidden_states = unet.conv_act(unet.conv_norm_out(hidden_states))
        return unet.conv_out(hidden_states)
