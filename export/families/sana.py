"""Sana and Sana-Sprint at export: Gemma2's decoder as the text encoder, the linear-attention DiT as the denoiser and
the 32x deep-compression autoencoder (``AutoencoderDC``, f32c32) as the VAE.

The transformer's graph speaks the runtime's denoiser contract: NCHW latents ``sample`` [batch, channels, h, w],
``timestep`` [batch], ``encoder_hidden_states`` [batch, sequence, caption_channels] with Gemma2's
``encoder_attention_mask`` [batch, sequence] (int64, 1 for a token) -> ``out_sample``. What diffusers' pipelines
do around the transformer call is folded into the graph, so the runtime feeds what the pipeline's loop holds:

* ``timestep`` is the scheduler's; the graph multiplies it by the config's ``timestep_scale`` (SanaPipeline does);
* Sana-Sprint's graph also takes ``guidance`` [batch], the user's guidance scale; the graph multiplies it by
  ``guidance_embeds_scale`` (0.1) as SanaSprintPipeline does before the call. The TrigFlow transforms of the
  Sprint loop are the SCM scheduler's (``runtime/schedulers/scm.py``);
* a transformer with learned sigma (``out_channels`` twice the latent's) gives its first half, as the pipeline
  keeps it.

The autoencoder is deterministic: its encoder's graph gives ``latents`` (``vae.encode(x).latent``, in the VAE's
own units; the runtime scales them), its decoder the image. ``AutoencoderDC`` moves channels last with
``movedim(1, -1)``, which the TorchScript exporter writes as a Transpose with a negative axis that ONNX Runtime
refuses to load; it is traced with ``movedim``'s dims made positive (the same permutation, written legally), as
optimum's ``onnx_compatible_movedim`` patch does.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch

from edgediff.runtime.manifest import TensorSpec

from .. import components as C
from ..components import ExportError

TITLE = "Sana"
PIPELINES = ("SanaPipeline", "SanaSprintPipeline", "SanaSprintImg2ImgPipeline")
PARTS = ("text_encoder", "tokenizer", "transformer", "vae", "scheduler")
TEXT_ENCODERS = (("text_encoder", "tokenizer"),)
TEXT_KINDS = {"text_encoder": "gemma"}
MAX_SEQUENCE_LENGTH = 300  # both pipelines' max_sequence_length default: the prompt's tokens the DiT reads
MAX_LENGTHS = {"text_encoder": MAX_SEQUENCE_LENGTH}
DENOISER = "transformer"
SCHEDULER_STANDS_IN: dict[str, str] = {}
# the pipelines' own defaults: Sana 20 steps with CFG 4.5; Sprint 2 steps, its guidance 4.5 an input of the model
FAMILY_DEFAULTS = {"sana": {"steps": 20, "guidance": 4.5}, "sana_sprint": {"steps": 2, "guidance": 4.5}}


def name(pipe: Any) -> str:
    """``sana_sprint`` for a guidance-distilled transformer (its ``guidance_embeds``), else ``sana``."""
    return "sana_sprint" if pipe.transformer.config.guidance_embeds else "sana"


def defaults(pipe: Any) -> dict[str, Any]:
    return FAMILY_DEFAULTS[name(pipe)]


def check(pipe: Any, source: str) -> None:
    """Beyond its ``PARTS``: the text encoder is Gemma's and as wide as the transformer's caption input; the VAE is
    the deep-compression autoencoder; a SanaSprintPipeline's transformer takes a guidance input."""
    config = pipe.text_encoder.config
    if getattr(config, "model_type", None) not in ("gemma", "gemma2"):
        raise ExportError(f"{source}: Sana's text encoder is Gemma2, not {type(pipe.text_encoder).__name__}")
    caption = pipe.transformer.config.caption_channels
    if config.hidden_size != caption:
        raise ExportError(f"{source}: the text encoder is {config.hidden_size} wide but the transformer's "
                          f"caption_channels is {caption}")
    if type(pipe.vae).__name__ != "AutoencoderDC":
        raise ExportError(f"{source}: Sana's VAE is an AutoencoderDC, not {type(pipe.vae).__name__}")
    if type(pipe).__name__.startswith("SanaSprint") and not pipe.transformer.config.guidance_embeds:
        raise ExportError(f"{source} is a SanaSprintPipeline whose transformer has no guidance embedding "
                          "(guidance_embeds=false); Sana-Sprint's has one")


SINGLE_FILE_HINT = "none (a Sana checkpoint is read as a diffusers folder)"


def is_single_file(keys: set[str]) -> bool:
    return False  # Sana's original .pth layout is converted by diffusers' script, not read by from_single_file


def text_contracts(pipe: Any) -> list[Callable[[], C.Contract]]:
    from ..gemma import gemma_encoder_contract

    return [lambda: gemma_encoder_contract(pipe.text_encoder, MAX_SEQUENCE_LENGTH, name="text_encoder")]


class _Transformer(torch.nn.Module):
    def __init__(self, transformer, latent_channels: int):
        super().__init__()
        self.transformer = transformer
        self.latent_channels = latent_channels
        self.timestep_scale = float(transformer.config.timestep_scale)
        self.guidance_scale = float(transformer.config.guidance_embeds_scale)

    def forward(self, sample, timestep, encoder_hidden_states, encoder_attention_mask, guidance=None):
        out = self.transformer(sample, encoder_hidden_states=encoder_hidden_states,
                               encoder_attention_mask=encoder_attention_mask,
                               timestep=timestep * self.timestep_scale,
                               guidance=None if guidance is None else guidance * self.guidance_scale,
                               return_dict=False)[0]
        return out[:, : self.latent_channels]  # learned sigma: the pipeline keeps the first half


def transformer_contract(transformer, latent_size: int, latent_channels: int) -> C.Contract:
    """The DiT on the runtime's denoiser contract, traced at a non-square size and a prompt length that is not
    Sana's (dynamic height, width and sequence)."""
    c = transformer.config
    p = c.patch_size
    h = max(p, latent_size // 2 // p * p)
    w = h + 2 * p
    distilled = bool(c.guidance_embeds)

    def sample():
        g = torch.Generator().manual_seed(1)
        mask = torch.ones(2, 24, dtype=torch.int64)
        mask[0, 9:] = 0  # a short prompt's padding
        args = (torch.randn(2, c.in_channels, h, w, generator=g), torch.tensor([0.6, 0.6]),
                torch.randn(2, 24, c.caption_channels, generator=g), mask)
        return args + (torch.tensor([4.5, 4.5]),) if distilled else args

    inputs = (TensorSpec("sample", "float32", ("batch", c.in_channels, "height", "width")),
              TensorSpec("timestep", "float32", ("batch",)),
              TensorSpec("encoder_hidden_states", "float32", ("batch", "sequence", c.caption_channels)),
              TensorSpec("encoder_attention_mask", "int64", ("batch", "sequence")))
    if distilled:
        inputs += (TensorSpec("guidance", "float32", ("batch",)),)
    return C.Contract(
        "transformer",
        _Transformer(transformer, latent_channels),
        inputs,
        (TensorSpec("out_sample", "float32", ("batch", latent_channels, "height", "width")),),
        sample,
    )


def denoiser_contracts(pipe: Any, latent_size: int) -> list[Callable[[], C.Contract]]:
    return [lambda: transformer_contract(pipe.transformer, latent_size, int(pipe.vae.config.latent_channels))]


@contextlib.contextmanager
def positive_movedim():
    """``movedim`` with its negative dims read as the positive ones they are, while a module is traced."""
    original = torch.Tensor.movedim

    def movedim(self, source, destination):
        def positive(d):
            return tuple(x % self.ndim for x in d) if isinstance(d, (tuple, list)) else d % self.ndim
        return original(self, positive(source), positive(destination))

    torch.Tensor.movedim = movedim
    try:
        yield
    finally:
        torch.Tensor.movedim = original


class _Autoencoder(torch.nn.Module):
    """The autoencoder's ``decode`` or ``encode``, traced with positive ``movedim`` dims."""

    def __init__(self, vae, method: str):
        super().__init__()
        self.vae, self.method = vae, method

    def forward(self, x):
        with positive_movedim():
            return getattr(self.vae, self.method)(x, return_dict=False)[0]


def vae_scale(vae) -> int:
    return 2 ** (len(vae.config.encoder_block_out_channels) - 1)


def vae_contracts(pipe: Any, latent_size: int) -> list[Callable[[], C.Contract]]:
    """The autoencoder's decoder and (deterministic) encoder on the runtime's VAE contracts."""
    vae = pipe.vae
    ch, f = vae.config.latent_channels, vae_scale(vae)

    def decoder() -> C.Contract:
        contract = C.vae_decoder_contract(vae, max(1, latent_size // 2))
        contract.module = _Autoencoder(vae, "decode")
        return contract

    def encoder() -> C.Contract:
        size = max(1, latent_size // 2) * f

        def sample():
            return (torch.rand(1, 3, size, size + f, generator=torch.Generator().manual_seed(3)) * 2 - 1,)

        return C.Contract("vae_encoder", _Autoencoder(vae, "encode"),
                          (TensorSpec("sample", "float32", ("batch", 3, "height", "width")),),
                          (TensorSpec("latents", "float32", ("batch", ch, "latent_height", "latent_width")),),
                          sample)

    return [decoder, encoder]


def manifest_fields(pipe: Any) -> dict[str, Any]:
    return {}


# Sana's tiny VAE: taesana (madebyollin/taesd's F32Decoder, ``export/taesana.py``), a decoder only, given as its
# weight file (taesana_decoder.pth); ``edgediff.export.tiny_vae`` asks for these where a family has them.
def check_tiny_vae(pipe: Any, source: str) -> None:
    """``--tiny-vae`` must be a taesana decoder's weights, taking the autoencoder's channels at its scale."""
    from ..taesana import check_fits, load_taesana

    check_fits(load_taesana(source), int(pipe.vae.config.latent_channels), vae_scale(pipe.vae), str(source))


def tiny_vae_contracts(source: str, manifest: Any, latent_size: int) -> list[C.Contract]:
    """The ``tiny`` vae_decoder (in taesana's units: the transformer's latents as they are, scaling 1, shift 0); no
    encoder: an image-to-image job encodes with the DC-AE."""
    from ..taesana import check_fits, load_taesana, taesana_decoder_contract

    decoder = load_taesana(source)
    check_fits(decoder, manifest.latent_channels, manifest.vae_scale_factor, str(source))
    return [taesana_decoder_contract(decoder, latent_size)]
