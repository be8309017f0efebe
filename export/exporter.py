"""``edgediff export``: a diffusers checkpoint becomes one artifact folder.

The artifact is written into a temporary sibling folder and moved into place
only after every component passed its parity check, so an interrupted or
failed export never leaves a folder that looks valid. OUT is locked for the
whole export (a second export to it waits, then finds it taken), and
``--force`` replaces only what an export wrote: an edgediff artifact, or an
empty folder, never a folder of the user's files or the source itself.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from edgediff import __version__
from edgediff.runtime.locking import folder_lock
from edgediff.runtime.manifest import (MANIFEST_FILE, ControlNetSpec, DenoiserSpec, Manifest, ShallowDenoiserSpec,
                                       TextEncoderSpec, check_defaults, current_umask, is_artifact)
from edgediff.runtime.schedulers import default_scheduler_name

from . import components as C
from .components import ExportError
from .tiny_vae import TinyVaeRefused, add_tiny_vae
from .weight_map import fingerprints
from .tiny_vae import check_source as check_tiny_vae_source

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
ROLE_OF = {"text_encoder": "text_encoder", "text_encoder_2": "text_encoder", "unet": "denoiser",
           "unet_shallow": "shallow_denoiser"}  # else: the name
DEEPCACHE_BRANCH = 0  # DeepCache's shallowest branch: its authors' default, the largest saving per skipped step
# the diffusers model whose parameters each graph holds (LoRA's targets; edgediff.export.weight_map)
WEIGHTS_OF = {"text_encoder": "text_encoder", "text_encoder_2": "text_encoder_2", "unet": "unet", "unet_shallow": "unet"}
PARTIAL_MARKER = ".edgediff-partial"  # inside an export's temporary folder: only such folders are cleaned up


def check_target(out: str | Path, force: bool, source: str | None = None) -> None:
    """Refuse an OUT that the export must not write: run before anything loads, and again under OUT's lock.

    OUT may be new, or (with ``force``) an edgediff artifact or an empty
    folder. Never a file, a symlink, a folder of other files, the source, a
    folder holding the source, or a folder inside the source.
    """
    out = Path(out)
    if out.is_symlink():
        raise ExportError(f"{out} is a symlink; give the folder it points to, or another OUT")
    if source is not None and Path(source).exists():
        src, dst = Path(source).resolve(), out.resolve()
        if src == dst or dst in src.parents:
            raise ExportError(f"the source {source} is inside {out}: writing the artifact there would replace it "
                              "(with --force, delete it); choose an OUT outside the source")
        if src in dst.parents:
            raise ExportError(f"{out} is inside the source {source}; choose an OUT outside the checkpoint folder")
    if not out.exists():
        ancestor = next((p for p in out.parents if p.exists()), None)
        if ancestor is not None and not ancestor.is_dir():
            raise ExportError(f"{out}: {ancestor} is a file, not a folder")
        return
    if not out.is_dir():
        raise ExportError(f"{out} is a file; OUT must be a folder (new, or with --force an edgediff artifact)")
    entries = sorted(e.name for e in out.iterdir())
    if entries and not is_artifact(out):
        shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
        raise ExportError(f"{out} already exists and is not an edgediff artifact: it holds {shown}. "
                          + ("--force would have deleted them; it " if force else "--force ")
                          + "replaces only an edgediff artifact (a folder with an edgediff manifest.json) or an empty "
                          "folder. Choose another OUT")
    if not force:
        raise ExportError(f"{out} already exists ({'an edgediff artifact' if entries else 'an empty folder'}); "
                          "pass --force to replace it")


def _clean_stale(out: Path, progress: Callable[[str], Any]) -> None:
    """Remove what interrupted exports to OUT left beside it (we hold OUT's lock: no export is writing them)."""
    for leftover in sorted(out.parent.glob(f".{out.name}.partial-*")) + sorted(out.parent.glob(f".{out.name}.old-*")):
        if (leftover / PARTIAL_MARKER).is_file() or is_artifact(leftover):
            progress(f"removing {leftover}, left by an interrupted export")
            shutil.rmtree(leftover, ignore_errors=True)


def load_source(source: str, config: str | None = None):
    """A diffusers pipeline from a folder, a single-file checkpoint or a hub id."""
    import diffusers
    import torch

    # fp32 graphs whatever the stored dtype (fp16 checkpoints are common); quantize makes fp16
    fp32 = {"torch_dtype": torch.float32}
    path = Path(source)
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ExportError(
                f"{source} is a folder without model_index.json; expected a diffusers checkpoint folder, "
                "a .safetensors/.ckpt file or a hub id"
            )
        return diffusers.DiffusionPipeline.from_pretrained(str(path), safety_checker=None, requires_safety_checker=False, **fp32)
    if path.suffix in SINGLE_FILE_SUFFIXES:
        if not path.is_file():
            raise ExportError(f"{source}: no such checkpoint file")
        # diffusers reads the original SD key layout; the component configs come
        # from `config` (a local diffusers folder or hub id) or are inferred.
        kwargs: dict[str, Any] = {"config": config, **fp32} if config else fp32
        cls = diffusers.StableDiffusionXLPipeline if _single_file_is_xl(path) else diffusers.StableDiffusionPipeline
        return cls.from_single_file(str(path), **kwargs)
    if path.exists():
        raise ExportError(f"{source} is neither a diffusers folder nor a {'/'.join(SINGLE_FILE_SUFFIXES)} file")
    if source.count("/") != 1:
        raise ExportError(
            f"{source} does not exist locally and is not a hub id (owner/name); "
            "accepted: a diffusers folder, a .safetensors/.ckpt file, or a hub id"
        )
    return diffusers.DiffusionPipeline.from_pretrained(source, safety_checker=None, requires_safety_checker=False, **fp32)


def _single_file_is_xl(path: Path) -> bool:
    """SDXL checkpoints in the original layout carry a second text encoder under ``conditioner.embedders.1``."""
    if path.suffix != ".safetensors":
        return False
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return any(k.startswith("conditioner.embedders.1.") for k in f.keys())


def is_xl(pipe) -> bool:
    return getattr(pipe, "text_encoder_2", None) is not None and pipe.unet.config.addition_embed_type == "text_time"


def _versions() -> dict[str, str]:
    import diffusers
    import onnx
    import onnxruntime
    import torch
    import transformers

    return {
        "edgediff": __version__,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "python": platform.python_version(),
    }


def export_artifact(
    source: str,
    out: str | Path,
    *,
    force: bool = False,
    config: str | None = None,
    random_weights: bool = False,
    source_label: str | None = None,
    defaults: dict[str, Any] | None = None,
    tiny_vae: str | Path | None = None,
    force_tiny_vae: bool = False,
    gate_settings: Any = None,
    deepcache_branch: int | None = DEEPCACHE_BRANCH,
    controlnets: list[str] | tuple[str, ...] = (),
    progress: Callable[[str], Any] = lambda s: None,
) -> Manifest:
    """Export ``source`` to the artifact folder ``out``; returns its manifest.

    ``defaults``: the model's recommended ``steps`` / ``guidance``, recorded in the manifest.
    ``tiny_vae``: a diffusers ``AutoencoderTiny`` folder (or hub id) exported as the ``tiny`` variant of
    vae_decoder and vae_encoder (``edgediff.export.tiny_vae``), kept only if it passes the quality gate
    against the checkpoint's VAE (or ``force_tiny_vae``); a refused one raises ``TinyVaeRefused`` after the
    artifact was written without it. ``gate_settings``: the gate's prompts and steps (``GateSettings``).
    ``deepcache_branch``: DeepCache's ``cache_branch_id`` of the shallow graph exported beside the UNet (which
    then also outputs the feature it caches; ``edgediff.export.deepcache``); None exports the UNet alone.
    ``controlnets``: ``NAME=PATH`` (or ``PATH``) of ControlNets exported beside the UNet, which then takes their
    residuals (``edgediff.export.controlnet``); each must fit the checkpoint's UNet.
    """
    from .controlnet import parse_controlnet_arg

    out = Path(out)
    defaults = check_defaults(defaults or {})
    named = [parse_controlnet_arg(c) for c in controlnets]
    duplicate = next((n for i, (n, _) in enumerate(named) if n in [m for m, _ in named[:i]]), None)
    if duplicate:
        raise ExportError(f"two --controlnet are named {duplicate!r}; give each its own NAME=PATH")
    for name, path in named:  # before the checkpoint loads
        if not Path(path).exists() and path.count("/") != 1:
            raise ExportError(f"--controlnet {name}={path}: no such file or folder (nor a hub id owner/name)")
    check_target(out, force, source)
    if tiny_vae is not None:
        check_tiny_vae_source(tiny_vae)
    out.parent.mkdir(parents=True, exist_ok=True)
    with folder_lock(out, progress):
        check_target(out, force, source)  # another export may have finished meanwhile
        _clean_stale(out, progress)
        return _export(source, out, force, config, random_weights, source_label, defaults, tiny_vae, force_tiny_vae,
                       gate_settings, deepcache_branch, named, progress)


def _export(source: str, out: Path, force: bool, config: str | None, random_weights: bool, source_label: str | None,
            defaults: dict[str, Any], tiny_vae: str | Path | None, force_tiny_vae: bool, gate_settings: Any,
            deepcache_branch: int | None, controlnets: list[tuple[str, str]],
            progress: Callable[[str], Any]) -> Manifest:
    from . import controlnet as CN

    progress(f"loading {source}")
    pipe = load_source(str(source), config)
    xl = getattr(pipe, "text_encoder_2", None) is not None
    for name in ("text_encoder", "unet", "vae", "tokenizer", "scheduler") + (("tokenizer_2",) if xl else ()):
        if getattr(pipe, name, None) is None:
            raise ExportError(f"{source} has no {name}; edgediff exports Stable Diffusion 1.x/2.x and SDXL checkpoints")
    if xl and not is_xl(pipe):
        raise ExportError(f"{source} has a second text encoder but its UNet lacks SDXL's text_time conditioning")
    if deepcache_branch is not None:
        from .deepcache import branch_of

        try:
            branch_of(pipe.unet, deepcache_branch)
        except ValueError as e:
            raise ExportError(f"--deepcache-branch: {e}") from None
    vae_scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    control_models = {}
    for name, path in controlnets:  # read and matched to the UNet before anything is written
        progress(f"loading ControlNet {name} from {path}")
        control_models[name] = CN.load_controlnet(path, pipe.unet)
        CN.check_fits(control_models[name], pipe.unet, vae_scale, f"{name}={path}")
    residuals = CN.residuals_of(pipe.unet) if control_models else []
    if xl:
        pipe.text_encoder_2.eval()
    pipe.text_encoder.eval()
    pipe.unet.eval()
    pipe.vae.eval()

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it 0700; the artifact gets the user's usual mode
    (tmp / PARTIAL_MARKER).touch()
    try:
        latent = int(pipe.unet.config.sample_size)
        text_contracts = _text_contracts(pipe)
        unet_contracts = [lambda: C.unet_contract(pipe.unet, min(latent, 64), deepcache_branch, residuals)]
        # the ControlNets' graphs take the UNet's conditioning: their contracts read the UNet's, before it is dropped
        unet_inputs = C.unet_contract(pipe.unet, min(latent, 64), None, residuals) if control_models else None
        if unet_inputs is not None:
            unet_inputs.module = None  # only its inputs and samples are read: the UNet is not held for them
        control_contracts = [lambda n=n: CN.controlnet_contract(control_models.pop(n), unet_inputs, residuals,
                                                                vae_scale, n) for n in list(control_models)]
        if deepcache_branch is not None:
            unet_contracts.append(lambda: C.shallow_unet_contract(pipe.unet, min(latent, 64), deepcache_branch))
        contracts = text_contracts + unet_contracts + control_contracts + [
            lambda: C.vae_decoder_contract(pipe.vae, min(latent, 64)),
            lambda: C.vae_encoder_contract(pipe.vae, min(latent, 64) * vae_scale),
        ]
        # what the manifest needs, read before the modules are dropped one by one
        configs = {name: getattr(pipe, name).config for name in ("text_encoder", "unet", "vae") + (("text_encoder_2",) if xl else ())}
        # each PyTorch module is dropped once its last graph is traced (vae_decoder and vae_encoder share the VAE)
        last_user = {"text_encoder": "text_encoder", "text_encoder_2": "text_encoder_2", "vae_encoder": "vae",
                     "unet" if deepcache_branch is None else "unet_shallow": "unet"}
        components = {}
        prints: dict[str, Any] = {}  # diffusers model -> its weights' fingerprints (the LoRA weight map)
        for make in contracts:
            t0 = time.perf_counter()
            contract = make()
            owner = last_user.get(contract.name)
            release = (lambda o=owner: setattr(pipe, o, None)) if owner else None
            model = WEIGHTS_OF.get(contract.name)
            if model is not None and model not in prints:
                prints[model] = fingerprints(getattr(pipe, model))
            variant = C.export_component(contract, tmp, progress, release=release,
                                         weight_prints=(model, prints[model]) if model else None)
            variant.quality["export_seconds"] = round(time.perf_counter() - t0, 2)
            components[contract.name] = {"fp32": variant}
            del contract
            gc.collect()

        text_encoders = []
        for suffix in ("", "_2") if xl else ("",):  # text_encoder with tokenizer/, SDXL's second with tokenizer_2/
            tokenizer = getattr(pipe, f"tokenizer{suffix}")
            tokenizer.backend_tokenizer.save(str(_mkdir(tmp / f"tokenizer{suffix}") / "tokenizer.json"))
            text_encoders.append(TextEncoderSpec(f"text_encoder{suffix}", f"tokenizer{suffix}/tokenizer.json",
                                                 int(tokenizer.model_max_length),
                                                 int(configs[f"text_encoder{suffix}"].hidden_size),
                                                 int(tokenizer.pad_token_id)))
        sched_config = dict(pipe.scheduler.config)
        sched_config["_class_name"] = type(pipe.scheduler).__name__
        (_mkdir(tmp / "scheduler") / "scheduler_config.json").write_text(json.dumps(sched_config, indent=2, default=list))

        manifest = Manifest(
            family="sdxl" if xl else {768: "sd1", 1024: "sd2"}.get(configs["unet"].cross_attention_dim, "sd"),
            prediction_type=pipe.scheduler.config.get("prediction_type", "epsilon"),
            sample_size=latent * vae_scale,
            vae_scale_factor=vae_scale,
            latent_channels=int(configs["vae"].latent_channels),
            scaling_factor=float(configs["vae"].scaling_factor),
            shift_factor=float(getattr(configs["vae"], "shift_factor", None) or 0.0),
            force_zeros_for_empty_prompt=bool(xl and pipe.config.get("force_zeros_for_empty_prompt", True)),
            scheduler=default_scheduler_name(sched_config),
            components=components,
            roles={name: "controlnet" if name.startswith("controlnet_") else ROLE_OF.get(name, name)
                   for name in components},
            text_encoders=tuple(text_encoders),
            denoiser=DenoiserSpec("unet", "unet", int(configs["unet"].in_channels)),
            shallow_denoiser=None if deepcache_branch is None else ShallowDenoiserSpec("unet_shallow", "deepcache",
                                                                                      deepcache_branch),
            controlnets=tuple(ControlNetSpec(f"controlnet_{n}", n, int(components[f"controlnet_{n}"]["fp32"].inputs[-1].shape[1]),
                                             path) for n, path in controlnets),
            random_weights=random_weights,
            defaults=defaults,
            provenance={
                "source": source_label or str(source),
                "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "opset": C.OPSET,
                "versions": _versions(),
            },
        )
        refused = None
        if tiny_vae is not None:
            manifest, refused = add_tiny_vae(tmp, manifest, tiny_vae, force=force_tiny_vae, settings=gate_settings,
                                            progress=progress)
        (tmp / PARTIAL_MARKER).unlink()
        manifest.save(tmp)  # written last: a folder without it is never taken for an artifact
        check_target(out, force)  # OUT may have changed during the export
        if out.exists():
            old = out.with_name(f".{out.name}.old-{time.time_ns()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
        progress(f"wrote {out / MANIFEST_FILE}")
        if refused:
            raise TinyVaeRefused(f"wrote {out} without the tiny VAE, which measured below the quality gate against "
                                 f"the checkpoint's VAE: {refused}. --force-tiny-vae keeps it anyway", manifest)
        return manifest
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _text_contracts(pipe) -> list[Callable[[], C.Contract]]:
    max_length = int(pipe.tokenizer.model_max_length)
    if getattr(pipe, "text_encoder_2", None) is None:
        return [lambda: C.text_encoder_contract(pipe.text_encoder, max_length)]
    return [lambda: C.xl_text_encoder_contract(pipe.text_encoder, max_length, "text_encoder"),
            lambda: C.xl_text_encoder_contract(pipe.text_encoder_2, int(pipe.tokenizer_2.model_max_length),
                                               "text_encoder_2")]


def add_weight_maps(artifact: str | Path, source: str, progress: Callable[[str], Any] = lambda s: None) -> Manifest:
    """Write the LoRA weight maps (``edgediff.export.weight_map``) of an artifact exported before edgediff made
    them, from the checkpoint it was exported from; its graphs are left as they are. A graph none of whose
    weights match the source's is refused: it was exported from another checkpoint."""
    from edgediff.runtime.manifest import load_manifest

    from .weight_map import FILE, unread_parameters, write_weight_map

    artifact = Path(artifact)
    manifest = load_manifest(artifact)
    pipe = load_source(str(source))
    texts = {c.name: c for c in (make() for make in _text_contracts(pipe))}
    comps = {name: dict(variants) for name, variants in manifest.components.items()}
    prints: dict[str, Any] = {}
    for component, model in WEIGHTS_OF.items():
        if component not in comps or getattr(pipe, model, None) is None:
            continue
        progress(f"mapping {component}'s weights to {model}'s parameters")
        prints.setdefault(model, fingerprints(getattr(pipe, model)))
        fp32 = comps[component]["fp32"]
        unread = []
        if component in texts:
            unread = unread_parameters(texts[component].module, texts[component].sample())
        figures = write_weight_map(artifact / fp32.file, model, prints[model], unread=unread, prefix="text_encoder.")
        if figures["mapped"] == 0:
            raise ExportError(f"none of {artifact / fp32.file}'s weights are {source}'s {model}: the artifact was "
                              "exported from another checkpoint")
        comps[component]["fp32"] = replace(fp32, weights=f"{component}/{FILE}", quality=fp32.quality | {"weight_map": figures})
    manifest = replace(manifest, components=comps)
    manifest.save(artifact)
    return manifest


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p
