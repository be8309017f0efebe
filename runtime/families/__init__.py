"""Model families: what a manifest's ``family`` selects, one file per family, read from one registry.

A ``Family`` says what varies between model families and nothing else: its conditioner (text encoders ->
the denoiser's conditioning inputs), the prediction types its denoisers make, how the guidance scale steers them
(classifier-free guidance, or an input of a guidance-distilled model), the tasks its pipelines do, and the first
denoiser call of an image-to-image run. The pipeline asks the family once, at load (``family_of``); the tasks and
the denoising loop never branch on it. The runtime contract with the denoiser graph is the same for every family (NCHW
latents ``sample``, ``timestep`` and the conditioning in, ``out_sample`` out): a family's own layout
(packed patches, position ids) is folded into its exported graph.

A new family is a new file here and a line in ``FAMILIES``, as a scheduler is a file in ``schedulers/`` and
a line in its registry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ..conditioning import Guidance
from ..manifest import ArtifactError, Manifest


def sd_start_index(steps: int, strength: float, order: int) -> int:
    """First denoiser call of an image-to-image run (diffusers' ``get_timesteps``), at least one step."""
    init = min(max(int(steps * strength), 1), steps)
    return (steps - init) * order


@dataclass(frozen=True)
class Family:
    name: str  # the manifest's ``family``
    title: str  # in words, for messages
    text_encoders: int | tuple[int, ...]  # how many text encoders its conditioner reads (or the counts it takes)
    # (manifest, one tokenizer per text encoder: a PromptTokenizer for CLIP, an encoders.T5Encoder for T5)
    conditioner: Callable[[Manifest, list[Any]], Any]  # -> a conditioning.Conditioning
    predictions: tuple[str, ...]  # what its denoisers predict (the manifest's prediction_type)
    start_index: Callable[[int, float, int], int] = sd_start_index  # (steps, strength, scheduler order) -> call
    guidance: Callable[[float], Guidance] = Guidance  # the guidance scale -> how it steers (CFG, or a model input)
    tasks: tuple[str, ...] = ("txt2img", "img2img", "inpaint")  # what its pipelines do


from . import sana, sd, sd3, sdxl  # noqa: E402  (the family files build on Family)

# the manifest's family -> its Family; read by family_of and the tests
FAMILIES: dict[str, Family] = {f.name: f for f in (*sd.FAMILIES, sdxl.SDXL, sd3.SD3, *sana.FAMILIES)}


def family_of(manifest: Manifest) -> Family:
    """The manifest's family, checked against what the artifact holds: an unknown family, a prediction type or
    a number of text encoders the family does not have is an ArtifactError naming what is accepted."""
    family = FAMILIES.get(manifest.family)
    if family is None:
        raise ArtifactError(f"manifest.json: family {manifest.family!r:.60} is not one this edgediff runs; accepted: "
                            f"{', '.join(FAMILIES)} (a newer edgediff may run it)")
    if manifest.prediction_type not in family.predictions:
        raise ArtifactError(f"manifest.json: a {family.title} model predicts {' or '.join(family.predictions)}, not "
                            f"{manifest.prediction_type!r:.40}")
    counts = family.text_encoders if isinstance(family.text_encoders, tuple) else (family.text_encoders,)
    if len(manifest.text_encoders) not in counts:
        raise ArtifactError(f"manifest.json: a {family.title} model has {' or '.join(map(str, counts))} text "
                            f"encoder(s); this one names {len(manifest.text_encoders)}")
    return family


__all__ = ["FAMILIES", "Family", "family_of", "sd_start_index"]
