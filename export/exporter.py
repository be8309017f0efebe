"""``edgediff export``: a diffusers checkpoint becomes one artifact folder.

The artifact is written into a temporary sibling folder and moved into place
only after every component passed its parity check, so an interrupted or
failed export never leaves a folder that looks valid. OUT is locked for the
whole export (a second export to it waits, then finds it taken), and
``--force`` replaces only what an export wrote: an edgediff artifact, or an
empty folder, never a folder of the user's files or the source itself. An
artifact holding anything its manifest does not name (a LoRA put beside it, a
folder of the user's) is refused before anything is written, naming those
files; no input (the source, a ``--controlnet``, ``--tiny-vae``) may lie
inside OUT. The replaced artifact loses only the files its manifest names.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import posixpath
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterable

from edgediff import __version__
from edgediff.runtime.locking import folder_lock
from edgediff.runtime.outputs import PROBE
from edgediff.runtime.manifest import (MANIFEST_FILE, MODEL_SUFFIXES, ArtifactError, ControlNetSpec, DenoiserSpec,
                                       Manifest, ShallowDenoiserSpec, TextEncoderSpec, check_defaults, current_umask,
                                       is_artifact, read_manifest_json)

from . import components as C
from . import families
from .components import ExportError
from .tiny_vae import TinyVaeRefused, add_tiny_vae
from .tiny_vae import check_family as check_tiny_vae_family
from .weight_map import fingerprints
from .tiny_vae import check_source as check_tiny_vae_source

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
ROLE_OF = {"text_encoder": "text_encoder", "text_encoder_2": "text_encoder", "text_encoder_3": "text_encoder",
           "unet": "denoiser", "transformer": "denoiser", "unet_shallow": "shallow_denoiser"}  # else: the name
DEEPCACHE_BRANCH = 0  # DeepCache's shallowest branch: its authors' default, the largest saving per skipped step
# the diffusers model whose parameters each graph holds (LoRA's targets; edgediff.export.weight_map)
WEIGHTS_OF = {"text_encoder": "text_encoder", "text_encoder_2": "text_encoder_2", "unet": "unet", "unet_shallow": "unet"}
PARTIAL_MARKER = ".edgediff-partial"  # inside an export's temporary folder: only such folders are cleaned up


def check_target(out: str | Path, force: bool, source: str | None = None,
                 inputs: Iterable[tuple[str, str | Path]] = ()) -> None:
    """Refuse an OUT that the export must not write: run before anything loads, and again under OUT's lock.

    OUT may be new, or (with ``force``) an edgediff artifact holding only what its manifest names (and
    edgediff's own temporary files), or an empty folder. Never a file, a symlink, a folder of other files, the
    source, a folder holding the source, a folder inside the source, or a folder holding another input:
    ``inputs`` are (option, path) pairs such as ``("--controlnet mask=cn", "cn")`` (``export_inputs``).
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
    for option, path in inputs:
        if Path(path).exists() and (Path(path).resolve() == out.resolve() or out.resolve() in Path(path).resolve().parents):
            raise ExportError(f"{option}: {path} is inside {out}, which the export replaces (with --force, deletes); "
                              "move it out of OUT or choose another OUT")
    entries = sorted(e.name for e in out.iterdir())
    if entries and not is_artifact(out):
        raise ExportError(f"{out} already exists and is not an edgediff artifact: it holds {_shown(entries)}. "
                          + ("--force would have deleted them; it " if force else "--force ")
                          + "replaces only an edgediff artifact (a folder with an edgediff manifest.json) or an empty "
                          "folder. Choose another OUT")
    if not force:
        raise ExportError(f"{out} already exists ({'an edgediff artifact' if entries else 'an empty folder'}); "
                          "pass --force to replace it")
    foreign = foreign_files(out) if entries else []
    if foreign:
        raise ExportError(f"{out} holds files that are not this artifact's: {_shown(foreign)}. --force replaces only "
                          "what the artifact's manifest names; move them out or choose another OUT")


def export_inputs(controlnets: Iterable[str] = (), tiny_vae: str | Path | None = None) -> list[tuple[str, str]]:
    """The (option, path) pairs of an export's inputs besides the source, for ``check_target``."""
    pairs = [(f"--controlnet {c}", c.partition("=")[2].strip() if "=" in c else c) for c in controlnets]
    return pairs + ([("--tiny-vae", str(tiny_vae))] if tiny_vae not in (None, "random") else [])


def _shown(names: list[str]) -> str:
    return ", ".join(n[:200] for n in names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


# edgediff's own temporary files inside an artifact, left by an interrupted run: the manifest's temporary copy
# (Manifest.save, in the root), quantize's candidates and fp16 shape-inference copies (in a component's folder),
# and the writability probe of quantize and tune (there for an instant)
ROOT_BOOKKEEPING = (f".{MANIFEST_FILE}.*.tmp", PARTIAL_MARKER, f"{PROBE}*")
COMPONENT_BOOKKEEPING = ("model.*.partial-*", "model.*.shapes-*.onnx", f"{PROBE}*")


def owned_files(folder: Path) -> set[str]:
    """The files (relative POSIX paths) that the manifest of the artifact ``folder`` names: each variant's graph
    with its external data or IR weights, weight maps, tokenizers, the scheduler config and the manifest itself.
    Read leniently (a damaged artifact still owns the files it names); only paths inside the folder with an
    artifact file's ending count."""
    try:
        d = read_manifest_json(folder / MANIFEST_FILE)
    except ArtifactError:
        d = {}
    d = d if isinstance(d, dict) else {}
    names: list[Any] = [MANIFEST_FILE, Manifest.scheduler_file]
    comps = d.get("components")
    for entry in comps.values() if isinstance(comps, dict) else ():
        if not isinstance(entry, dict):
            continue
        names.append(("tokenizer", entry.get("tokenizer")))
        variants = entry.get("variants")
        for v in variants.values() if isinstance(variants, dict) else ():
            file = v.get("file") if isinstance(v, dict) else None
            if isinstance(file, str) and file.endswith(MODEL_SUFFIXES):
                names += [file, str(PurePosixPath(file).with_suffix(".bin")) if file.endswith(".xml") else file + ".data"]
            if isinstance(v, dict):
                names.append(("weights", v.get("weights")))
    if d.get("format_version") == 1:  # tokenizers named by the format, not the manifest
        text_2 = d.get("text_2")
        names += ["tokenizer/tokenizer.json", ("tokenizer", text_2.get("tokenizer") if isinstance(text_2, dict) else None)]
    owned = set()
    for name in names:
        if isinstance(name, tuple):  # a tokenizer or weight map: a .json file
            name = name[1] if isinstance(name[1], str) and name[1].endswith(".json") else None
        if not isinstance(name, str) or "\\" in name or "\0" in name:
            continue
        norm = posixpath.normpath(name)
        if not norm.startswith(("/", "../")) and norm not in ("..", "."):
            owned.add(norm)
    return owned


def foreign_files(folder: Path) -> list[str]:
    """What the artifact ``folder`` holds besides the files its manifest names and edgediff's temporary files:
    files, symlinks and empty folders, relative to ``folder``, sorted. Symlinked folders are not entered."""
    owned = owned_files(folder)
    used_dirs = {str(p) for name in owned for p in PurePosixPath(name).parents if str(p) != "."}
    foreign = []
    for dirpath, dirnames, filenames in os.walk(folder):
        here = Path(dirpath)
        rel_dir = here.relative_to(folder).as_posix()
        patterns = ROOT_BOOKKEEPING if rel_dir == "." else COMPONENT_BOOKKEEPING if rel_dir in used_dirs else ()
        for name in sorted(filenames + [d for d in dirnames if (here / d).is_symlink()]):
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            if rel in owned or (rel in used_dirs and (here / name).is_symlink()):
                continue
            if not any(PurePosixPath(name).match(p) for p in patterns) or (here / name).is_symlink():
                foreign.append(rel)
        for name in dirnames:
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            if not (here / name).is_symlink() and rel not in used_dirs and not any((here / name).iterdir()):
                foreign.append(rel + "/")
    return sorted(foreign)


def _discard(old: Path, progress: Callable[[str], Any]) -> None:
    """Delete a replaced artifact: only the files its manifest names and edgediff's temporary files (the manifest
    last, so an interrupted run leaves a folder the next export still recognises), then its empty folders. What
    else it holds (a file put there while the export ran) stays, with the manifest and the folders on its way."""
    keep = set(foreign_files(old))
    for dirpath, dirnames, filenames in os.walk(old):
        for name in filenames + [d for d in dirnames if (Path(dirpath) / d).is_symlink()]:
            path = Path(dirpath) / name
            if path.relative_to(old).as_posix() not in keep and path != old / MANIFEST_FILE:
                path.unlink(missing_ok=True)
    if keep:
        progress(f"kept {old}: it holds files that are not the artifact's ({_shown(sorted(keep))})")
    else:
        (old / MANIFEST_FILE).unlink(missing_ok=True)
    for dirpath, _, _ in sorted(os.walk(old), key=lambda w: -len(Path(w[0]).parts)):
        try:
            Path(dirpath).rmdir()
        except OSError:
            pass


def _clean_stale(out: Path, progress: Callable[[str], Any]) -> None:
    """Remove what interrupted exports to OUT left beside it (we hold OUT's lock: no export is writing them)."""
    for leftover in sorted(out.parent.glob(f".{out.name}.partial-*")) + sorted(out.parent.glob(f".{out.name}.old-*")):
        if (leftover / PARTIAL_MARKER).is_file():
            progress(f"removing {leftover}, left by an interrupted export")
            shutil.rmtree(leftover, ignore_errors=True)
        elif is_artifact(leftover):  # a replaced artifact: only what its manifest names goes
            progress(f"removing {leftover}, left by an interrupted export")
            _discard(leftover, progress)


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
        # a part saved as absent ([null, null] in model_index.json: SD3 without T5) is passed as None, as diffusers
        # asks (from_pretrained refuses the folder otherwise)
        try:
            index = json.loads((path / "model_index.json").read_text())
            absent = {k: None for k, v in index.items() if not k.startswith("_") and v in ([None, None], None)}
        except (OSError, ValueError, AttributeError):
            absent = {}  # diffusers reports a broken index itself
        return diffusers.DiffusionPipeline.from_pretrained(
            str(path), **({"safety_checker": None, "requires_safety_checker": False} | absent), **fp32)
    if path.suffix in SINGLE_FILE_SUFFIXES:
        if not path.is_file():
            raise ExportError(f"{source}: no such checkpoint file")
        # diffusers reads the original SD key layout; the component configs come
        # from `config` (a local diffusers folder or hub id) or are inferred.
        kwargs: dict[str, Any] = {"config": config, **fp32} if config else fp32
        cls = getattr(diffusers, families.single_file_pipeline(_tensor_names(path), source))
        return cls.from_single_file(str(path), **kwargs)
    if path.exists():
        raise ExportError(f"{source} is neither a diffusers folder nor a {'/'.join(SINGLE_FILE_SUFFIXES)} file")
    if source.count("/") != 1:
        raise ExportError(
            f"{source} does not exist locally and is not a hub id (owner/name); "
            "accepted: a diffusers folder, a .safetensors/.ckpt file, or a hub id"
        )
    return diffusers.DiffusionPipeline.from_pretrained(source, safety_checker=None, requires_safety_checker=False, **fp32)


def _tensor_names(path: Path) -> set[str] | None:
    """A .safetensors file's tensor names, read from its header (None for a .ckpt: a pickle is not opened here)."""
    if path.suffix != ".safetensors":
        return None
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return set(f.keys())


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
    no_t5: bool = False,
    progress: Callable[[str], Any] = lambda s: None,
) -> Manifest:
    """Export ``source`` to the artifact folder ``out``; returns its manifest.

    ``defaults``: the model's recommended ``steps`` / ``guidance``, recorded in the manifest.
    ``tiny_vae``: a diffusers ``AutoencoderTiny`` folder (or hub id) exported as the ``tiny`` variant of
    vae_decoder and vae_encoder (``edgediff.export.tiny_vae``; for Sana the taesana decoder's weight file, a
    ``tiny`` vae_decoder only: ``edgediff.export.taesana``), kept only if it passes the quality gate
    against the checkpoint's VAE (or ``force_tiny_vae``); a refused one raises ``TinyVaeRefused`` after the
    artifact was written without it. ``gate_settings``: the gate's prompts and steps (``GateSettings``).
    ``deepcache_branch``: DeepCache's ``cache_branch_id`` of the shallow graph exported beside the UNet (which
    then also outputs the feature it caches; ``edgediff.export.deepcache``); None exports the UNet alone.
    ``controlnets``: ``NAME=PATH`` (or ``PATH``) of ControlNets exported beside the UNet, which then takes their
    residuals (``edgediff.export.controlnet``); each must fit the checkpoint's UNet.
    ``no_t5``: leave an SD3 checkpoint's T5 encoder out (diffusers' ``text_encoder_3=None``: the runtime puts
    zeros in its place, as diffusers does); an ExportError for a family without T5.
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
    inputs = [(f"--controlnet {name}={path}", path) for name, path in named] + export_inputs((), tiny_vae)
    check_target(out, force, source, inputs)
    if tiny_vae is not None:
        check_tiny_vae_source(tiny_vae)
    out.parent.mkdir(parents=True, exist_ok=True)
    with folder_lock(out, progress):
        check_target(out, force, source, inputs)  # another export may have finished meanwhile
        _clean_stale(out, progress)
        return _export(source, out, force, config, random_weights, source_label, defaults, tiny_vae, force_tiny_vae,
                       gate_settings, deepcache_branch, named, no_t5, progress)


def _export(source: str, out: Path, force: bool, config: str | None, random_weights: bool, source_label: str | None,
            defaults: dict[str, Any], tiny_vae: str | Path | None, force_tiny_vae: bool, gate_settings: Any,
            deepcache_branch: int | None, controlnets: list[tuple[str, str]], no_t5: bool,
            progress: Callable[[str], Any]) -> Manifest:
    from . import controlnet as CN

    progress(f"loading {source}")
    pipe = load_source(str(source), config)
    family = families.detect(pipe, str(source_label or source))
    family_name = family.name(pipe)
    defaults = families.defaults(family, pipe) | defaults  # the family's pipeline defaults, where it has its own
    if tiny_vae is not None:  # before any graph is written: the family's kind of tiny VAE, fitting its latents
        check_tiny_vae_family(family, pipe, tiny_vae)
    if no_t5:
        if "text_encoder_3" not in [c for c, _ in family.TEXT_ENCODERS]:
            raise ExportError(f"--no-t5: {source_label or source} is a {family.TITLE} checkpoint, which has no T5 "
                              "text encoder to leave out (SD3's is optional)")
        pipe.text_encoder_3 = pipe.tokenizer_3 = None  # diffusers' text_encoder_3=None: zeros in T5's place
    denoiser_name = families.denoiser(family)
    denoiser_module = getattr(pipe, denoiser_name)
    text_parts = families.text_encoders(family, pipe)
    if denoiser_name != "unet":  # a DiT: DeepCache and ControlNets are UNet methods
        if controlnets:
            raise ExportError(f"--controlnet: a {family.TITLE} checkpoint has no UNet for a ControlNet to steer; "
                              "export it without --controlnet")
        if deepcache_branch is not None:
            progress(f"no DeepCache graphs: a {family.TITLE} checkpoint's denoiser is a transformer, not a UNet")
            deepcache_branch = None
    sched_config = dict(pipe.scheduler.config)
    sched_config["_class_name"] = type(pipe.scheduler).__name__
    # both refused before anything is traced: no silent stand-in for a prediction type or a scheduler
    prediction = families.prediction_type(sched_config, family_name, str(source_label or source))
    scheduler = families.scheduler_name(sched_config, prediction, family, str(source_label or source))
    if deepcache_branch is not None:
        from .deepcache import branch_of

        try:
            branch_of(pipe.unet, deepcache_branch)
        except ValueError as e:
            raise ExportError(f"--deepcache-branch: {e}") from None
    vae_scale = families.vae_scale(family, pipe.vae)
    control_models = {}
    for name, path in controlnets:  # read and matched to the UNet before anything is written
        progress(f"loading ControlNet {name} from {path}")
        control_models[name] = CN.load_controlnet(path, pipe.unet)
        CN.check_fits(control_models[name], pipe.unet, vae_scale, f"{name}={path}")
    residuals = CN.residuals_of(pipe.unet) if control_models else []
    for component, _ in text_parts:
        getattr(pipe, component).eval()
    denoiser_module.eval()
    pipe.vae.eval()

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it 0700; the artifact gets the user's usual mode
    (tmp / PARTIAL_MARKER).touch()
    try:
        latent = int(denoiser_module.config.sample_size)
        text_contracts = family.text_contracts(pipe)
        if denoiser_name == "unet":
            unet_contracts = [lambda: C.unet_contract(pipe.unet, min(latent, 64), deepcache_branch, residuals)]
        else:
            unet_contracts = family.denoiser_contracts(pipe, min(latent, 64))
        # the ControlNets' graphs take the UNet's conditioning: their contracts read the UNet's, before it is dropped
        unet_inputs = C.unet_contract(pipe.unet, min(latent, 64), None, residuals) if control_models else None
        if unet_inputs is not None:
            unet_inputs.module = None  # only its inputs and samples are read: the UNet is not held for them
        control_contracts = [lambda n=n: CN.controlnet_contract(control_models.pop(n), unet_inputs, residuals,
                                                                vae_scale, n) for n in list(control_models)]
        if deepcache_branch is not None:
            unet_contracts.append(lambda: C.shallow_unet_contract(pipe.unet, min(latent, 64), deepcache_branch))
        contracts = text_contracts + unet_contracts + control_contracts + families.vae_contracts(
            family, pipe, min(latent, 64), vae_scale)
        # what the manifest needs, read before the modules are dropped one by one
        configs = {"unet": denoiser_module.config, "vae": pipe.vae.config}
        lengths, kinds = getattr(family, "MAX_LENGTHS", {}), getattr(family, "TEXT_KINDS", {})
        text_encoders = tuple(TextEncoderSpec(component, f"{folder}/tokenizer.json",
                                              int(lengths.get(component, getattr(pipe, folder).model_max_length)),
                                              int(getattr(pipe, component).config.hidden_size),
                                              int(getattr(pipe, folder).pad_token_id), kinds.get(component, "clip"))
                              for component, folder in text_parts)
        # each PyTorch module is dropped once its last graph is traced (vae_decoder and vae_encoder share the VAE)
        last_user = {"text_encoder": "text_encoder", "text_encoder_2": "text_encoder_2",
                     "text_encoder_3": "text_encoder_3", "vae_encoder": "vae", "transformer": "transformer",
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

        for _, folder in text_parts:
            getattr(pipe, folder).backend_tokenizer.save(str(_mkdir(tmp / folder) / "tokenizer.json"))
        (_mkdir(tmp / "scheduler") / "scheduler_config.json").write_text(json.dumps(sched_config, indent=2, default=list))

        manifest = Manifest(
            family=family_name,
            prediction_type=prediction,
            sample_size=latent * vae_scale,
            vae_scale_factor=vae_scale,
            latent_channels=int(configs["vae"].latent_channels),
            scaling_factor=float(configs["vae"].scaling_factor),
            shift_factor=float(getattr(configs["vae"], "shift_factor", None) or 0.0),
            scheduler=scheduler,
            components=components,
            roles={name: "controlnet" if name.startswith("controlnet_") else ROLE_OF.get(name, name)
                   for name in components},
            text_encoders=text_encoders,
            denoiser=DenoiserSpec(denoiser_name, "unet" if denoiser_name == "unet" else "transformer",
                                  int(configs["unet"].in_channels)),
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
            **family.manifest_fields(pipe),
        )
        refused = None
        if tiny_vae is not None:
            manifest, refused = add_tiny_vae(tmp, manifest, tiny_vae, force=force_tiny_vae, settings=gate_settings,
                                            family=family, progress=progress)
        (tmp / PARTIAL_MARKER).unlink()
        manifest.save(tmp)  # written last: a folder without it is never taken for an artifact
        check_target(out, force)  # OUT may have changed during the export (a file of the user's put in it)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{time.time_ns()}")
            out.rename(old)
            tmp.rename(out)
            _discard(old, progress)
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


def add_weight_maps(artifact: str | Path, source: str, progress: Callable[[str], Any] = lambda s: None) -> Manifest:
    """Write the LoRA weight maps (``edgediff.export.weight_map``) of an artifact exported before edgediff made
    them, from the checkpoint it was exported from; its graphs are left as they are. A graph none of whose
    weights match the source's is refused: it was exported from another checkpoint."""
    from edgediff.runtime.manifest import load_manifest

    from .weight_map import FILE, unread_parameters, write_weight_map

    artifact = Path(artifact)
    manifest = load_manifest(artifact)
    pipe = load_source(str(source))
    texts = {c.name: c for c in (make() for make in families.detect(pipe, source).text_contracts(pipe))}
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
