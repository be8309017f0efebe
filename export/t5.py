"""T5's encoder (SD3's ``text_encoder_3``, FLUX.1's ``text_encoder_2``) as a component with a declared contract.

The graph takes ``input_ids`` int64 [batch, max_length] (the pipelines' ``max_sequence_length``: SD3 256,
FLUX.1 256 or 512; fixed, since both pad every prompt to it) and, where asked, ``attention_mask`` int64 of the
same shape, and gives ``last_hidden_state`` float32 [batch, max_length, d_model]: the encoder's final
(RMS-normed) output, what diffusers feeds the transformer. It is exported with ``export_component`` and its
parity gate against PyTorch, like every other component.

fp32 only: T5 overflows in fp16 (inf in the gated FFN's ``wo``, then NaN in the norm: transformers #9295,
#4586; its authors trained with bfloat16 activations), so no fp16 variant is offered here; a reduced T5 must
keep fp32 activations (int8/int4 weights). The runtime side is ``edgediff.runtime.encoders.T5Encoder``.
"""

from __future__ import annotations

import torch

from edgediff.runtime.manifest import TensorSpec

from .components import Contract, ExportError


class _T5Encoder(torch.nn.Module):
    def __init__(self, text_encoder):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids, attention_mask=None):
        return self.text_encoder(input_ids=input_ids, attention_mask=attention_mask, return_dict=False)[0]


def t5_encoder_contract(text_encoder, max_length: int, *, name: str = "text_encoder_3",
                        attention_mask: bool = False) -> Contract:
    """``text_encoder`` (transformers' ``T5EncoderModel``) as ``name``: ``input_ids`` [batch, max_length] (and
    ``attention_mask`` with ``attention_mask=True``) -> ``last_hidden_state``. SD3 and FLUX.1 run T5 without the
    mask (diffusers does), so the default graph takes ids only."""
    config = text_encoder.config
    if getattr(config, "model_type", None) not in ("t5", "mt5", "umt5") or hasattr(text_encoder, "decoder"):
        raise ExportError(f"{name}: expected a T5EncoderModel (T5's encoder alone), got {type(text_encoder).__name__}")
    if max_length < 2:
        raise ExportError(f"{name}: max_length must be at least 2 (a token and </s>), got {max_length}")
    vocab, pad, eos = config.vocab_size, config.pad_token_id, config.eos_token_id

    def sample():
        # two prompts of different lengths: tokens, </s>, then <pad>, as the tokenizer gives them
        g = torch.Generator().manual_seed(5)
        ids = torch.randint(3, vocab, (2, max_length), generator=g)
        mask = torch.ones(2, max_length, dtype=torch.int64)
        for row, length in enumerate((max_length - 1, max(1, max_length // 3))):  # tokens before </s>
            ids[row, length] = eos
            ids[row, length + 1:] = pad
            mask[row, length + 1:] = 0
        return (ids, mask) if attention_mask else (ids,)

    ids = TensorSpec("input_ids", "int64", ("batch", max_length))
    inputs = (ids, TensorSpec("attention_mask", "int64", ("batch", max_length))) if attention_mask else (ids,)
    return Contract(
        name,
        _T5Encoder(text_encoder),  # export_component puts it in eval mode (T5's dropout off for the reference)
        inputs,
        (TensorSpec("last_hidden_state", "float32", ("batch", max_length, config.d_model)),),
        sample,
    )


__all__ = ["t5_encoder_contract"]
