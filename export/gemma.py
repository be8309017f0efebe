"""Gemma2's decoder (Sana's and Sana-Sprint's ``text_encoder``) as a component with a declared contract.

The graph takes ``input_ids`` and ``attention_mask`` int64 [batch, sequence] and gives ``last_hidden_state``
float32 [batch, sequence, hidden_size]: the decoder's final (RMS-normed) output read with the mask, what
diffusers' ``SanaPipeline`` feeds the transformer (``text_encoder(ids, attention_mask=mask)[0]``). The sequence
is dynamic: Sana feeds the prompt behind its instruction prefix at one length (the prefix's count plus
``max_sequence_length - 2``) and the negative prompt at another (``max_sequence_length``). It is exported with
``export_component`` and its parity gate against PyTorch, like every other component.

transformers builds Gemma2's causal and sliding-window masks in Python from the sequence length, so the wrapper
builds them itself from the inputs (as ``generate`` may: the model takes a ready ``{"full_attention": ...,
"sliding_attention": ...}`` mapping) and gives the positions as ``cumsum`` of ones: nothing in the graph is the
traced length. Attention is exported as ``eager``: plain ops the tracer records, and Gemma2's default
(transformers refuses SDPA for it, which cannot soft-cap the logits; flash and flex attention soft-cap as eager
does, so switching a model loaded with them changes nothing but the kernels).

fp32 only: Gemma2 is trained and run in bfloat16, whose range fp16 lacks (diffusers' SanaPipeline example moves
the text encoder to bfloat16 by itself; Gemma's activations and its 50-capped attention logits are not made for
fp16's 65,504 range and 11-bit mantissa), so no fp16 variant is offered here; a reduced Gemma2 must keep fp32
activations (int8/int4 weights). The runtime side is ``edgediff.runtime.encoders.GemmaEncoder``.
"""

from __future__ import annotations

import torch

from edgediff.runtime.manifest import TensorSpec

from .components import Contract, ExportError

MODELS = {"Gemma2Model": "gemma2", "GemmaModel": "gemma"}  # the decoders alone, as diffusers loads Sana's


class _GemmaEncoder(torch.nn.Module):
    """The decoder with its masks built here: ``full`` lets each token see itself and the unpadded tokens before it
    (transformers' causal mask and padding mask); Gemma2's sliding layers see, of those, the last ``window`` only
    (``kv > q - window``, ``masking_utils.sliding_window_overlay``). Additive, the dtype's minimum where not
    allowed, as transformers makes them for eager attention."""

    def __init__(self, text_encoder, window: int | None, sliding: bool):
        super().__init__()
        self.text_encoder, self.window, self.sliding = text_encoder, window, sliding

    def forward(self, input_ids, attention_mask):
        positions = torch.ones_like(input_ids[:1]).cumsum(-1) - 1  # [1, sequence]: 0, 1, ...
        q, k = positions[0].unsqueeze(-1), positions[0].unsqueeze(0)
        padded = attention_mask[:, None, None, :] == 0  # [batch, 1, 1, sequence]
        blocked = (k > q)[None, None] | padded  # [batch, 1, sequence, sequence]
        low = torch.finfo(torch.float32).min
        full = torch.zeros_like(blocked, dtype=torch.float32).masked_fill(blocked, low)
        masks = full
        if self.sliding:
            near = blocked if self.window is None else blocked | (k <= q - self.window)[None, None]
            masks = {"full_attention": full,
                     "sliding_attention": torch.zeros_like(near, dtype=torch.float32).masked_fill(near, low)}
        return self.text_encoder(input_ids=input_ids, attention_mask=masks, position_ids=positions, use_cache=False,
                                 return_dict=False)[0]


def gemma_encoder_contract(text_encoder, max_length: int, *, name: str = "text_encoder") -> Contract:
    """``text_encoder`` (transformers' ``Gemma2Model``, or Gemma's ``GemmaModel``) as ``name``: ``input_ids`` and
    ``attention_mask`` [batch, sequence] -> ``last_hidden_state`` [batch, sequence, hidden_size]. ``max_length``
    (Sana's ``max_sequence_length``) sizes the sample; the graph is traced a few tokens longer, so a length baked
    in would fail the runtime's first call at the real one. A model loaded with flash or flex attention is switched
    to eager (the same soft-capped attention) for export."""
    kind = type(text_encoder).__name__
    config = getattr(text_encoder, "config", None)
    if MODELS.get(kind) != getattr(config, "model_type", None):
        raise ExportError(f"{name}: expected Gemma2's decoder alone (a Gemma2Model, or a GemmaModel), got {kind}"
                          f"{' (its .model is the decoder)' if kind.endswith('ForCausalLM') else ''}")
    if getattr(config, "use_bidirectional_attention", None):
        raise ExportError(f"{name}: {kind} has use_bidirectional_attention set; Sana's Gemma2 reads causally")
    if max_length < 2:
        raise ExportError(f"{name}: max_length must be at least 2 (<bos> and a token), got {max_length}")
    if config._attn_implementation != "eager":
        text_encoder.set_attn_implementation("eager")
    vocab, pad, bos = config.vocab_size, config.pad_token_id or 0, config.bos_token_id
    bos = 2 if bos is None else bos
    sliding = kind == "Gemma2Model"
    length = max_length + 3  # not the real length: the dynamic axis is proven by the runtime's calls

    def sample():
        # two prompts of different lengths: <bos>, tokens, then <pad>, as the tokenizer pads them (on the right)
        g = torch.Generator().manual_seed(5)
        ids = torch.randint(min(5, vocab - 1), vocab, (2, length), generator=g)
        ids[:, 0] = bos
        mask = torch.ones(2, length, dtype=torch.int64)
        for row, used in enumerate((length - 2, max(2, length // 3))):  # <bos> and tokens
            ids[row, used:] = pad
            mask[row, used:] = 0
        return ids, mask

    return Contract(
        name,
        _GemmaEncoder(text_encoder, getattr(config, "sliding_window", None), sliding),  # eval mode in export
        (TensorSpec("input_ids", "int64", ("batch", "sequence")),
         TensorSpec("attention_mask", "int64", ("batch", "sequence"))),
        (TensorSpec("last_hidden_state", "float32", ("batch", "sequence", config.hidden_size)),),
        sample,
    )


__all__ = ["gemma_encoder_contract"]
