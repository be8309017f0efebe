"""Model families at export: which one a checkpoint is, and what each exports for its text side.

The counterpart of ``edgediff.runtime.families``, under the same names. A family's file says which diffusers
pipeline classes it takes (a folder's ``model_index.json``, read back as the loaded pipeline's class), how a
single-file checkpoint of it is recognised by its keys, the pipeline parts it needs, its text encoders'
contracts and tokenizers, the manifest fields only it has, and the scheduler classes it runs. ``detect`` picks
the family or refuses the checkpoint by name; nothing is guessed from a count of text encoders and nothing
falls back: a scheduler class or a prediction type the family does not run is an export error.

A new family is a new file here (and its runtime file), and a line in ``FAMILIES``.
"""

from __future__ import annotations

from typing import Any

from edgediff.runtime.families import FAMILIES as RUNTIME_FAMILIES
from edgediff.runtime.schedulers import PREDICTION_ALIASES, REGISTRY, default_scheduler_name, schedulers_for

from .. import components as C
from ..components import ExportError
from . import sana, sd, sd3, sdxl

# the export side of each family, most specific first: the first whose pipelines include the source's wins
FAMILIES = (sana, sd3, sdxl, sd)

# pipelines of families edgediff does not export yet, named in the refusal (what a user downloads most)
NOT_YET = {"FluxPipeline": "FLUX.1", "Flux2Pipeline": "FLUX.2",
           "ZImagePipeline": "Z-Image",
           "PixArtAlphaPipeline": "PixArt", "PixArtSigmaPipeline": "PixArt"}


def detect(pipe: Any, source: str):
    """The family module of a loaded diffusers pipeline; ExportError naming what edgediff exports otherwise."""
    cls = type(pipe).__name__
    for family in FAMILIES:
        if cls in family.PIPELINES:
            missing = [part for part in family.PARTS if getattr(pipe, part, None) is None]
            if missing:
                raise ExportError(f"{source} has no {', '.join(missing)}; a {family.TITLE} checkpoint has "
                                  f"{', '.join(family.PARTS)}")
            family.check(pipe, source)
            return family
    what = f"a {NOT_YET[cls]} checkpoint, which edgediff does not export yet" if cls in NOT_YET else \
        f"a {cls} checkpoint"
    raise ExportError(f"{source} is {what}; edgediff exports "
                      + "; ".join(f"{f.TITLE} ({', '.join(f.PIPELINES)})" for f in FAMILIES))


def single_file_pipeline(keys: set[str] | None, source: str) -> str:
    """The diffusers pipeline class to read an original-layout checkpoint with, from its tensor names (None: a
    .ckpt, whose names are not read before loading: SD's); ExportError for names no family has."""
    if keys is None:
        return sd.PIPELINES[0]
    for family in FAMILIES:
        if family.is_single_file(keys):
            return family.PIPELINES[0]
    raise ExportError(f"{source} holds none of the tensors of a checkpoint edgediff exports ("
                      + "; ".join(f"{f.TITLE}: {f.SINGLE_FILE_HINT}" for f in FAMILIES)
                      + "); a single file must be in the original layout of one of them")


def scheduler_name(config: dict[str, Any], prediction: str, family, source: str) -> str:
    """Our scheduler for the checkpoint's scheduler config and prediction type: the port of its class that samples
    that prediction; for a class the family runs under another name (a training-only DDPMScheduler), that one
    (``family.SCHEDULER_STANDS_IN``); anything else is an ExportError naming what is accepted (a flow scheduler
    on an SD checkpoint, a class edgediff has no port of)."""
    cls = config.get("_class_name")
    name = default_scheduler_name(config)
    if REGISTRY[name].diffusers_class == cls and name in schedulers_for(prediction):
        return name
    if cls in family.SCHEDULER_STANDS_IN:
        return family.SCHEDULER_STANDS_IN[cls]
    accepted = sorted({REGISTRY[n].diffusers_class for n in schedulers_for(prediction)} | set(family.SCHEDULER_STANDS_IN))
    raise ExportError(f"{source}'s scheduler is {str(cls)[:80]}, which edgediff does not run for a {family.TITLE} "
                      f"model predicting {prediction}; accepted: {', '.join(accepted)}. Set "
                      "scheduler/scheduler_config.json's _class_name to one of them (the model's own sampling "
                      "settings kept)")


def prediction_type(config: dict[str, Any], name: str, source: str) -> str:
    """The scheduler config's prediction type, one the family's denoisers make; ExportError otherwise. A config
    without one (FlowMatchEulerDiscreteScheduler has no such setting) is the family's only prediction, where it
    has one (SD3's flow); "flow_prediction" (the multistep solvers' flow flag) reads as "flow"."""
    accepted = RUNTIME_FAMILIES[name].predictions
    prediction = config.get("prediction_type", accepted[0] if len(accepted) == 1 else None)
    prediction = PREDICTION_ALIASES.get(prediction, prediction)
    if prediction not in accepted:
        raise ExportError(f"{source}'s scheduler config gives the prediction type {str(prediction)[:60]!r}; a "
                          f"{RUNTIME_FAMILIES[name].title} model predicts {' or '.join(accepted)}")
    return prediction


def denoiser(family) -> str:
    """The pipeline attribute (and component name) of the family's denoiser: its ``DENOISER``, else the UNet."""
    return getattr(family, "DENOISER", "unet")


def defaults(family, pipe: Any) -> dict[str, Any]:
    """The recommended steps and guidance of the family's pipeline (its ``defaults(pipe)`` where the family has
    pipelines with different ones, else its ``DEFAULTS``; none: edgediff's own)."""
    return family.defaults(pipe) if hasattr(family, "defaults") else getattr(family, "DEFAULTS", {})


def vae_scale(family, vae: Any) -> int:
    """The VAE's spatial factor: the family's ``vae_scale`` (Sana's 32x autoencoder), else an AutoencoderKL's."""
    if hasattr(family, "vae_scale"):
        return family.vae_scale(vae)
    return 2 ** (len(vae.config.block_out_channels) - 1)


def vae_contracts(family, pipe: Any, latent_size: int, scale: int) -> list:
    """Makers of the VAE's decoder and encoder contracts: the family's ``vae_contracts``, else an AutoencoderKL's
    (its encoder giving the latent distribution's moments)."""
    if hasattr(family, "vae_contracts"):
        return family.vae_contracts(pipe, latent_size)
    return [lambda: C.vae_decoder_contract(pipe.vae, latent_size),
            lambda: C.vae_encoder_contract(pipe.vae, latent_size * scale)]


def text_encoders(family, pipe: Any) -> list[tuple[str, str]]:
    """(component, its tokenizer's folder) of each text encoder the pipeline has, in conditioning order (an
    optional one set to None, SD3's T5 without it, is left out)."""
    return [(c, f) for c, f in family.TEXT_ENCODERS if getattr(pipe, c, None) is not None]


__all__ = ["FAMILIES", "defaults", "denoiser", "detect", "prediction_type", "scheduler_name", "single_file_pipeline",
           "text_encoders", "vae_contracts", "vae_scale"]
