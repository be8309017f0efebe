"""A tiny VAE (TAESD; diffusers' ``AutoencoderTiny``) as the ``tiny`` variant of vae_decoder and vae_encoder.

TAESD (madebyollin/taesd: ``taesd`` for SD 1.x/2.x, ``taesdxl`` for SDXL) decodes an SD latent for a
fraction of the full VAE's work: at 512x512 the full decoder is 2.5 TFLOP, more than a UNet step, and most
of a 1-step SD-Turbo image. Its graphs work on the scaled latents the denoiser sees (its scaling factor is
1.0), so each variant records its own latent units (``Manifest.latent_units``); its encoder is deterministic
(``latents``, no distribution to sample), as in diffusers.

Sana's tiny VAE is taesana (``export/taesana.py``: taesd.py's F32Decoder, which diffusers has no class for),
given as its decoder's weight file and exported as a ``tiny`` vae_decoder only; the family says so through hooks
(``check_tiny_vae``, ``tiny_vae_contracts``), the way ``families.vae_contracts`` asks for its autoencoder. The
runtime decodes with it and still encodes (image-to-image) with the checkpoint's VAE.

A tiny VAE is gated like any variant, by the quantizer's own measurement (``edgediff.quantize.measure``):
images drawn with the tiny decoder, and encode-decode round trips through the tiny encoder, against the
checkpoint's VAE (PSNR, SSIM; on the embedded shapes model also the attribute accuracy). Below the gate a
variant is dropped unless forced. A random-weight artifact is not gated (it draws noise); it records so.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import torch

from edgediff.runtime.manifest import Manifest, Variant

from .components import ExportError, export_component, tiny_vae_decoder_contract, tiny_vae_encoder_contract

TINY = "tiny"
COMPONENTS = ("vae_decoder", "vae_encoder")
FILE_SUFFIXES = (".pth", ".pt", ".safetensors")  # a single-file tiny decoder's state dict (taesana)


class TinyVaeRefused(ExportError):
    """The artifact was written, without the tiny VAE: it measured below the quality gate."""

    def __init__(self, message: str, manifest: Manifest):
        super().__init__(message)
        self.manifest = manifest


def check_source(source: str | Path) -> None:
    """``source`` must be an AutoencoderTiny folder, a hub id, or a single-file tiny decoder (a state dict: Sana's
    taesana_decoder.pth, which only a family with its own tiny VAE takes, ``check_family``): checked before the
    checkpoint loads."""
    path = Path(source)
    if path.is_file():
        if path.suffix not in FILE_SUFFIXES:
            raise ExportError(f"--tiny-vae {source} is a file, not a tiny VAE: give the AutoencoderTiny folder "
                              "(config.json and diffusion_pytorch_model.safetensors), e.g. a download of "
                              f"madebyollin/taesd, or for Sana the decoder's weights ({', '.join(FILE_SUFFIXES)}: "
                              "taesana_decoder.pth)")
        return
    if path.is_dir():
        config = path / "config.json"
        if not config.is_file():
            raise ExportError(f"--tiny-vae {source} has no config.json; expected a diffusers AutoencoderTiny folder")
        if '"AutoencoderTiny"' not in config.read_text(errors="replace"):
            raise ExportError(f"--tiny-vae {source}/config.json is not an AutoencoderTiny's (_class_name); a tiny VAE "
                              "is diffusers' AutoencoderTiny (TAESD)")
    elif str(source).count("/") != 1:
        raise ExportError(f"--tiny-vae {source} does not exist locally and is not a hub id (owner/name such as "
                          "madebyollin/taesd)")


def check_family(family, pipe, source: str | Path) -> None:
    """Before the checkpoint's graphs are exported: a family with a tiny VAE of its own (``check_tiny_vae``,
    Sana's taesana) checks ``source`` against the loaded pipeline; the others take an AutoencoderTiny."""
    own = getattr(family, "check_tiny_vae", None)
    if own is not None:
        own(pipe, source)
    elif Path(source).is_file():
        raise ExportError(f"--tiny-vae {source} is a file; a {family.TITLE} checkpoint's tiny VAE is a diffusers "
                          "AutoencoderTiny folder or hub id (madebyollin/taesd for SD 1.x/2.x, taesdxl for SDXL, "
                          "taesd3 for SD3); single-file decoders are Sana's (taesana_decoder.pth)")


def load_tiny_vae(source: str | Path):
    """An ``AutoencoderTiny`` from a diffusers folder (config.json + weights) or a hub id, in fp32."""
    import diffusers

    check_source(source)
    try:
        return diffusers.AutoencoderTiny.from_pretrained(str(source), torch_dtype=torch.float32).eval()
    except (OSError, ValueError, RuntimeError) as e:
        raise ExportError(f"--tiny-vae {source} could not be loaded as an AutoencoderTiny: {str(e)[:300]}") from e


def check_fits(vae, manifest: Manifest) -> None:
    """The tiny VAE must speak the checkpoint's latents: the same channels and the same 8x (or other) scale."""
    channels = vae.config.latent_channels
    if channels != manifest.latent_channels:
        raise ExportError(f"the tiny VAE has {channels} latent channels, the checkpoint {manifest.latent_channels}: "
                          "it belongs to another model family (taesd for SD 1.x/2.x, taesdxl for SDXL, taesd3 for SD3)")
    with torch.no_grad():
        out = vae.decode(torch.zeros(1, channels, 2, 3), return_dict=False)[0]
    f = manifest.vae_scale_factor
    if tuple(out.shape) != (1, 3, 2 * f, 3 * f):
        raise ExportError(f"the tiny VAE decodes a 2x3 latent to {tuple(out.shape[2:])} pixels; the checkpoint's "
                          f"VAE scale is {f}x, so it must give {(2 * f, 3 * f)}")


def add_tiny_vae(root: Path, manifest: Manifest, source: str | Path, *, force: bool = False, gate=None, settings=None,
                 family=None, progress: Callable[[str], Any] = lambda s: None) -> tuple[Manifest, str | None]:
    """Export ``source`` into the artifact folder ``root`` as the ``tiny`` variants; returns the manifest with the
    variants that passed the gate (or all, with ``force``) and the reasons for those refused (None: none).
    ``family`` (the export side's module): one with a tiny VAE of its own makes the contracts
    (``tiny_vae_contracts(source, manifest, latent_size)``: Sana's taesana, a decoder only); else an
    AutoencoderTiny's decoder and encoder."""
    from edgediff.quantize.quantize import Gate, GateSettings, measure, passes

    progress(f"loading the tiny VAE {source}")
    latent = min(manifest.sample_size // manifest.vae_scale_factor, 64)
    own = getattr(family, "tiny_vae_contracts", None)
    if own is not None:
        contracts = own(source, manifest, latent)
    else:
        vae = load_tiny_vae(source)
        check_fits(vae, manifest)
        contracts = (tiny_vae_decoder_contract(vae, latent),
                     tiny_vae_encoder_contract(vae, latent * manifest.vae_scale_factor))
    variants = {c.name: export_component(c, root, progress) for c in contracts}
    del contracts
    trial = _with(manifest, variants)
    if manifest.random_weights:
        for variant in variants.values():
            variant.quality["gate"] = {"passed": None, "not_measured": "random weights draw noise"}
        return trial, None
    gate, settings = gate or Gate(), settings or GateSettings()
    refused: dict[str, str] = {}
    for name, variant in variants.items():
        progress(f"{name} tiny: measuring against the checkpoint's VAE")
        quality = measure(root, trial, name, TINY, settings)
        failures = passes(quality, gate)
        variant.quality.update(quality, vs="the checkpoint's VAE (fp32)",
                               gate={"min_psnr": gate.min_psnr, "min_ssim": gate.min_ssim, "passed": not failures,
                                     "forced": bool(failures and force)})
        if failures and not force:
            refused[name] = "; ".join(failures)
            for f in variant.files():
                (root / f).unlink(missing_ok=True)
    kept = {name: variant for name, variant in variants.items() if name not in refused}
    return _with(manifest, kept), " | ".join(f"{name}: {why}" for name, why in refused.items()) or None


def _with(manifest: Manifest, variants: dict[str, Variant]) -> Manifest:
    components = {c: dict(v) for c, v in manifest.components.items()}
    for name, variant in variants.items():
        components[name][TINY] = variant
    return dataclasses.replace(manifest, components=components)


def build_random_tiny_vae(out: Path, seed: int = 0, arch: str = "AutoencoderTiny", **config: Any) -> Path:
    """A tiny VAE with seeded random weights, for latency measurement and the parity tests: an ``AutoencoderTiny``
    (TAESD's architecture unless ``config`` says otherwise) saved as a diffusers folder, or with ``arch="taesana"``
    Sana's tiny decoder (``export/taesana.py``; ``config``: latent_channels, upscale) as a .safetensors file in
    ``out``; returns what ``--tiny-vae`` takes."""
    if arch not in RANDOM_BUILDERS:
        raise ExportError(f"unknown tiny VAE architecture {arch!r}; valid: {', '.join(RANDOM_BUILDERS)}")
    return RANDOM_BUILDERS[arch](Path(out), seed, **config)


def _random_autoencoder_tiny(out: Path, seed: int, **config: Any) -> Path:
    import diffusers

    torch.manual_seed(seed)
    vae = diffusers.AutoencoderTiny(**config).eval()
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"{out} exists and is not empty; the random tiny VAE is written to a new folder")
    vae.save_pretrained(str(out))
    return out


def _random_taesana(out: Path, seed: int, **config: Any) -> Path:
    from .taesana import save_random_taesana

    return save_random_taesana(out, seed, **config)


RANDOM_BUILDERS: dict[str, Callable[..., Path]] = {"AutoencoderTiny": _random_autoencoder_tiny,
                                                   "taesana": _random_taesana}
