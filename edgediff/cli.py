"""The ``edgediff`` command line: export, quantize, generate, bench, tune, cache, check, info.

``generate``, ``bench`` and ``info`` import only the runtime (no torch);
``export`` and ``quantize`` import their side lazily.
"""

from __future__ import annotations

import functools
import gc
import json
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.splitlines()[0] if __doc__ else None)
console = Console(stderr=True)


@app.callback()
def _setup() -> None:
    """Warnings (a long prompt cut, a precision some components lack) as one note line on stderr."""
    import warnings

    from rich.markup import escape

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        console.print(f"[yellow]note:[/] {escape(str(message))}", soft_wrap=True)

    warnings.showwarning = show


ERROR_CHARS = 2000  # an error line at most: rich takes minutes to wrap a 100 KB word a file put in a message


def _print_error(message: str) -> None:
    from rich.markup import escape

    if len(message) > ERROR_CHARS:
        message = f"{message[:ERROR_CHARS]}... ({len(message) - ERROR_CHARS:,} more characters)"
    console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True, emoji=False)  # a path "x:abc:" is no emoji


def _fail(message: str) -> None:
    _print_error(message)
    raise typer.Exit(code=2)


def _nothing_written_on_interrupt(command):
    """Ctrl-C in a command whose outputs are written at its end, all or none (``runtime.outputs.write_pngs``):
    one line saying so, exit code 130 (as a shell reports SIGINT)."""

    @functools.wraps(command)
    def run(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except KeyboardInterrupt:
            console.print("interrupted; nothing written", markup=False, highlight=False)
            raise typer.Exit(code=130) from None

    return run


def _utf8(text: str, what: str) -> None:
    """A ValueError naming ``what`` where ``text`` is not UTF-8 (bytes the shell passed that are not: Python
    keeps them as surrogate escapes, which the tokenizer cannot take)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        try:
            shown = "byte " + text[e.start : e.end].encode("utf-8", "surrogateescape")[:4].hex(" ")
        except UnicodeEncodeError:
            shown = f"code point U+{ord(text[e.start]):04X}"
        raise ValueError(f"{what} is not valid UTF-8 text ({shown} at character {e.start}); prompts must be "
                         "UTF-8: convert the file it came from, e.g. iconv -f latin1 -t utf-8") from None


def _size_words(width: int | None, height: int | None) -> str:
    if width and height:
        return f"{width}x{height}"
    if width or height:
        return f"{'width' if width else 'height'} {width or height} (the other side the model's default)"
    return "the model's default size"


@app.command()
def export(
    source: Optional[str] = typer.Argument(None, help="diffusers folder, .safetensors/.ckpt file, or hub id"),
    out: Optional[Path] = typer.Argument(None, help="artifact folder to write"),
    force: bool = typer.Option(False, "--force", help="replace OUT if it is an empty folder or an edgediff artifact holding only the files its manifest names; OUT holding anything else (a LoRA, a folder of yours) or an input (SOURCE, --controlnet, --tiny-vae) is refused before anything is written"),
    config: Optional[str] = typer.Option(None, help="for single-file checkpoints: a diffusers folder or hub id giving the component configs"),
    random_weights: Optional[str] = typer.Option(
        None, "--random-weights", help="export an architecture built from a recipe with seeded random weights (then the only argument is OUT)"
    ),
    seed: int = typer.Option(0, help="seed of --random-weights"),
    default_steps: Optional[int] = typer.Option(None, "--default-steps", help="the model's recommended steps, recorded in the manifest (generate uses them when not given)"),
    default_guidance: Optional[float] = typer.Option(None, "--default-guidance", help="the model's recommended guidance scale, recorded likewise"),
    tiny_vae: Optional[str] = typer.Option(None, "--tiny-vae", help="a diffusers AutoencoderTiny folder or hub id (TAESD: madebyollin/taesd, taesdxl, taesd3), or for Sana taesana's decoder file (taesana_decoder.pth / .safetensors), added as the 'tiny' VAE (generate --vae tiny), kept if it passes the quality gate; with --random-weights, 'random'"),
    force_tiny_vae: bool = typer.Option(False, "--force-tiny-vae", help="keep the tiny VAE even when it measures below the quality gate"),
    deepcache_branch: int = typer.Option(0, "--deepcache-branch", min=0, help="DeepCache's cache_branch_id of the shallow UNet graph exported beside the UNet (0: the shallowest, the largest saving; generate --cache-interval uses it)"),
    no_deepcache: bool = typer.Option(False, "--no-deepcache", help="export the UNet alone, without DeepCache's graph pair"),
    controlnet: Optional[list[str]] = typer.Option(None, "--controlnet", help="NAME=PATH: a ControlNet (a diffusers ControlNetModel folder, a .safetensors file or a hub id) exported beside the UNet, which then takes its residuals; generate --control NAME=IMAGE uses it. Repeat for several"),
    no_t5: bool = typer.Option(False, "--no-t5", help="SD3: leave the T5 text encoder out (as diffusers' text_encoder_3=None; zeros stand in its place)"),
) -> None:
    """Export a Stable Diffusion checkpoint to an artifact folder (ONNX + manifest)."""
    try:
        from edgediff.export import ExportError, export_artifact
        from edgediff.export.exporter import check_target, export_inputs
        from edgediff.export.recipes import RECIPES, build_pipeline
    except ImportError as e:
        _fail(f"export needs the export extra ({e.name} is missing): pip install 'edgediff[export]'")
    import tempfile

    from edgediff.runtime import ArtifactError
    from edgediff.runtime.manifest import check_defaults

    try:
        defaults = check_defaults({k: v for k, v in (("steps", default_steps), ("guidance", default_guidance)) if v is not None},
                                  "--default-steps/--default-guidance")
    except ArtifactError as e:
        _fail(str(e))

    if random_weights:
        if out is None and source is not None:
            source, out = None, Path(source)
        if source is not None or out is None:
            _fail("with --random-weights give only OUT: edgediff export --random-weights RECIPE OUT")
        if random_weights not in RECIPES:
            _fail(f"unknown recipe {random_weights!r}; valid: {', '.join(RECIPES)}")
    elif source is None or out is None:
        _fail("usage: edgediff export SOURCE OUT (or --random-weights RECIPE OUT)")
    if tiny_vae == "random" and not random_weights:
        _fail("--tiny-vae random (a tiny VAE with random weights) goes with --random-weights; otherwise give an "
              "AutoencoderTiny folder or hub id (Sana: a taesana decoder file)")
    try:
        check_target(out, force, source, export_inputs(controlnet or (), tiny_vae))  # before anything loads; again under OUT's lock
        if tiny_vae not in (None, "random"):
            from edgediff.export.tiny_vae import check_source

            check_source(tiny_vae)
        if random_weights:
            from edgediff.export.clip_tokenizer import open_clip_vocab_path

            open_clip_vocab_path()
    except ExportError as e:
        _fail(str(e))
    from edgediff.export.tiny_vae import TinyVaeRefused
    from edgediff.models import default_model_source

    gate = None
    if tiny_vae is not None:
        from edgediff.quantize import GateSettings

        # on the embedded model the tiny VAE's gate also checks what it draws (attribute accuracy)
        gate = GateSettings(evaluate_shapes=source is not None and Path(source).resolve() == default_model_source())
    branch = None if no_deepcache else deepcache_branch
    t0 = time.perf_counter()
    with console.status("exporting") as status:
        try:
            if random_weights:
                from edgediff.export.recipes import tiny_vae_config
                from edgediff.export.tiny_vae import build_random_tiny_vae

                with tempfile.TemporaryDirectory() as tmp:
                    status.update(f"building {random_weights} with random weights (seed {seed})")
                    build_pipeline(random_weights, Path(tmp) / "src", seed=seed)
                    if tiny_vae == "random":
                        tiny_vae = str(build_random_tiny_vae(Path(tmp) / "tiny_vae", seed, **tiny_vae_config(random_weights)))
                    gc.collect()  # the built modules go before the export loads them again (SDXL: 14 GB)
                    manifest = export_artifact(str(Path(tmp) / "src"), out, force=force, random_weights=True,
                                               source_label=f"random-weights:{random_weights}:seed={seed}",
                                               defaults=RECIPES[random_weights].get("defaults", {}) | defaults,
                                               tiny_vae=tiny_vae, deepcache_branch=branch, controlnets=controlnet or (),
                                               no_t5=no_t5, progress=status.update)
            else:
                manifest = export_artifact(source, out, force=force, config=config, defaults=defaults,
                                           tiny_vae=tiny_vae, force_tiny_vae=force_tiny_vae, gate_settings=gate,
                                           deepcache_branch=branch, controlnets=controlnet or (),
                                           no_t5=no_t5, progress=status.update)
        except TinyVaeRefused as e:
            _print_exported(e.manifest, out, t0)
            _fail(str(e))
        except (ExportError, OSError, ValueError) as e:
            _fail(str(e))
        except MemoryError:
            _fail("out of memory while exporting; close other programs, or export on a machine with more RAM "
                  "(an SDXL export needs about 20 GB)")
    _print_exported(manifest, out, t0)


def _print_exported(manifest, out: Path, t0: float) -> None:
    for comp, variants in manifest.components.items():
        for name, v in variants.items():
            err = v.quality["parity_vs_torch"]["max_rel_err"]
            gated = f"; {quality_words(v.quality)}" if "psnr_db" in v.quality else ""
            console.print(f"  {comp:13s} {name:5s} {v.bytes / 1e6:9.1f} MB   ONNX vs PyTorch relative error {err:.2e}"
                          f"{gated}", soft_wrap=True)
    console.print(f"exported {manifest.family} ({manifest.prediction_type}) to [bold]{out}[/] in {time.perf_counter() - t0:.1f} s")


@app.command()
def quantize(
    artifact: Path = typer.Argument(..., help="artifact folder (variants are added into it)"),
    precision: str = typer.Option(..., "--precision", "-p", help="fp16, int8, int8-static, int8-static-attn (attention products too: OpenVINO's int8 attention), int4, or (OpenVINO IR, needs nncf) nncf-int8, nncf-hybrid, or fp16-cuda (the UNet fused by ONNX Runtime's optimizer for its CUDA EP; gated on a CUDA GPU)"),
    components: Optional[str] = typer.Option(None, help="comma-separated, e.g. unet,text_encoder (default: the ones the precision suits)"),
    force: bool = typer.Option(False, "--force", help="add a variant even when it measures below the quality gate"),
    min_psnr: float = typer.Option(20.0, help="gate: mean PSNR (dB) of the prompt set's images vs fp32"),
    min_ssim: float = typer.Option(0.70, help="gate: mean SSIM vs fp32"),
    max_accuracy_drop: float = typer.Option(0.10, help="gate (embedded shapes model): allowed drop of attribute accuracy"),
    steps: int = typer.Option(15, min=1, help="denoising steps of the gate's generations"),
    size: Optional[int] = typer.Option(None, help="image side of the gate's generations (default: the model's)"),
    prompts: Optional[str] = typer.Option(None, help="gate prompts separated by '|' (default: a fixed set of 4)"),
    seeds: int = typer.Option(2, min=1, help="seeds per prompt in the gate"),
    conv: bool = typer.Option(False, "--conv", help="int8: quantize Conv too (ConvInteger)"),
    threads: Optional[int] = typer.Option(None, help="intra-op threads"),
) -> None:
    """Add fp16 / int8 / int8-static / int4 variants to an artifact, each measured against fp32."""
    try:
        from edgediff.quantize import Gate, GateSettings, QualityGateError, quantize_artifact
        from edgediff.quantize.quantize import DEFAULT_PROMPTS
    except ImportError as e:
        _fail(f"quantize needs onnx and onnxruntime's tools ({e.name} is missing): pip install 'edgediff[quantize]'")
    from edgediff.models import default_model_path
    from edgediff.runtime import ArtifactError, BackendError, GenerationError

    if prompts is not None and not any(p.strip() for p in prompts.split("|")):
        _fail("--prompts needs at least one prompt (separated by '|')")
    settings = GateSettings(
        prompts=tuple(p.strip() for p in prompts.split("|") if p.strip()) if prompts is not None else DEFAULT_PROMPTS,
        seeds=tuple(range(seeds)), steps=steps, size=size, threads=threads,
        evaluate_shapes=artifact.resolve() == default_model_path().resolve(),
    )
    comps = tuple(c.strip() for c in components.split(",")) if components else None
    with console.status("quantizing") as status:
        try:
            results = quantize_artifact(artifact, precision, comps, force=force, conv=conv, progress=status.update,
                                        gate=Gate(min_psnr, min_ssim, max_accuracy_drop), settings=settings)
        except QualityGateError as e:
            _fail(str(e))
        except (ArtifactError, BackendError, GenerationError, ValueError) as e:
            _fail(str(e))
        except MemoryError:
            _fail("out of memory while quantizing; try fewer --components at a time, or a machine with more RAM")
    for comp, q in results.items():
        console.print(f"  {comp:13s} {precision:11s} {q['size_ratio_vs_fp32']:.2f}x fp32 size, {quality_words(q)}",
                      soft_wrap=True)
    typer.echo(f"added {precision} variants of {', '.join(results)} to {artifact}")


@app.command()
@_nothing_written_on_interrupt
def generate(
    prompt: str = typer.Argument(..., help="what to draw"),
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="artifact folder (default: the embedded shapes model)"),
    negative: str = typer.Option("", "--negative", help="negative prompt"),
    steps: Optional[int] = typer.Option(None, help="denoising steps (default: the model's recommended, else 25)"),
    guidance: Optional[float] = typer.Option(None, help="classifier-free guidance scale, <= 1 disables it (default: the model's recommended, else 7.5)"),
    cfg_until: Optional[float] = typer.Option(None, "--cfg-until", help="guidance only for this fraction of the steps, in [0, 1] (the rest run at half the UNet batch; diffusers' SDCFGCutoffCallback)"),
    cache_interval: Optional[int] = typer.Option(None, "--cache-interval", help="DeepCache: the full UNet every N steps, only its shallow branch between (N >= 1; 1 = off)"),
    seed: int = typer.Option(0, help="random seed"),
    rng: str = typer.Option("numpy", help="numpy, or torch to reproduce diffusers' images for a seed"),
    width: Optional[int] = typer.Option(None, help="image width, a multiple of 8 (default: the model's)"),
    height: Optional[int] = typer.Option(None, help="image height, a multiple of 8 (default: the model's)"),
    scheduler: Optional[str] = typer.Option(None, help="ddim, pndm, lms, euler, euler_a, dpmpp_2m, dpmpp_2m_karras, unipc, heun, lcm; for flow-matching models flow_euler, dpmpp_2m_flow, unipc_flow, scm (default: the model's; one that cannot sample the model is refused, naming those that can)"),
    backend: str = typer.Option("auto", help="auto, onnxruntime or openvino"),
    device: str = typer.Option("auto", help="auto, cpu, cuda, dml (onnxruntime); cpu, gpu, npu, auto (openvino); or per component, e.g. text_encoder=cpu,unet=gpu,vae=gpu"),
    precision: Optional[str] = typer.Option(None, help="component precisions, e.g. fp16 or unet=int8,vae_decoder=fp16"),
    static_shapes: Optional[bool] = typer.Option(None, "--static-shapes/--dynamic-shapes", help="OpenVINO: compile each graph for the exact size asked (cached per shape); default: on NPU only, which needs it"),
    low_memory: bool = typer.Option(False, "--low-memory", help="load each stage's graphs for it and release them after, the VAE in tiles: a fraction of the memory, a load per stage"),
    vae_tiling: str = typer.Option("auto", "--vae-tiling", help="auto (tiles above 1024x1024 pixels, or with --low-memory), on, off"),
    cuda_graph: bool = typer.Option(False, "--cuda-graph", help="ONNX Runtime CUDA: capture a CUDA graph per shape and replay it"),
    no_check: bool = typer.Option(False, "--no-check", help="skip the device check against the CPU (run once per device and artifact, then cached)"),
    t5: bool = typer.Option(True, "--t5/--no-t5", help="SD3: --no-t5 neither loads nor runs the T5 text encoder (zeros in its place, as diffusers' text_encoder_3=None)"),
    vae: Optional[str] = typer.Option(None, "--vae", help="full (default), or tiny: the artifact's tiny VAE (TAESD, from export --tiny-vae), a fraction of the decode time; its measured quality is in `edgediff info`"),
    fast: bool = typer.Option(False, "--fast", help="the savings `edgediff tune` measured to keep the quality bounds (tiny VAE, DeepCache, CFG cut-off; `edgediff info` shows them); options you give win"),
    num_images: int = typer.Option(1, "--num-images", min=1, help="images to generate (run in UNet batches of at most --max-batch)"),
    image: Optional[Path] = typer.Option(None, "--image", help="input image: img2img, or inpainting with --mask, or outpainting with --extend"),
    strength: Optional[float] = typer.Option(None, help="how much of the schedule to redo, in (0, 1] (default 0.6 for img2img, 1.0 for inpainting)"),
    mask: Optional[Path] = typer.Option(None, "--mask", help="inpainting mask, same size as --image (white = repaint)"),
    mask_blur: float = typer.Option(0.0, "--mask-blur", help="feather the pasted-back edge by this many pixels (with --keep-unmasked)"),
    keep_unmasked: bool = typer.Option(False, "--keep-unmasked", help="paste the original pixels back outside the mask"),
    extend: Optional[str] = typer.Option(None, "--extend", help="outpaint: pixels to add per side, e.g. left=128,right=128"),
    fill: str = typer.Option("edge", help="outpaint: how the new area starts: edge, reflect, mean or noise"),
    fallback: bool = typer.Option(False, "--fallback", help="rerun a reduced-precision component in fp32 if it yields NaN/Inf or a flat image"),
    threads: Optional[int] = typer.Option(None, help="intra-op threads (default: the backend's)"),
    cache_dir: Optional[str] = typer.Option(None, "--cache-dir", help="compile cache folder: each graph's optimized (ONNX Runtime) or compiled (OpenVINO) form, kept for the next load (default: $EDGEDIFF_CACHE_DIR, else ~/.cache/edgediff)"),
    no_cache: bool = typer.Option(False, "--no-cache", help="load without the compile cache (neither read nor written)"),
    ov_precision: str = typer.Option("auto", "--ov-precision", help="OpenVINO execution precision: auto (bf16 where the CPU has it), f32, bf16, f16"),
    lora: Optional[list[str]] = typer.Option(None, "--lora", help="a LoRA .safetensors merged in at load, FILE or FILE:SCALE (default scale 1.0); repeat for several (kohya/A1111, LoCon, LCM-LoRA, diffusers/PEFT)"),
    embedding: Optional[list[Path]] = typer.Option(None, "--embedding", help="a textual-inversion .safetensors whose word the prompt can then use (its token, or the file's name for A1111 and SDXL files); repeat for several"),
    control: Optional[list[str]] = typer.Option(None, "--control", help="NAME=IMAGE or NAME=IMAGE:SCALE: steer with the artifact's ControlNet NAME (export --controlnet) and its control image (resized to the generation's size); repeat for several, summed"),
    control_start: float = typer.Option(0.0, "--control-start", help="the ControlNets act from this fraction of the steps on, in [0, 1)"),
    control_end: float = typer.Option(1.0, "--control-end", help="... until this fraction, in (0, 1]"),
    preprocess: Optional[list[str]] = typer.Option(None, "--preprocess", help="NAME=canny: make that --control's image into canny edges first (default: the image is the control map: depth, pose, scribble, edges...)"),
    canny_low: float = typer.Option(100, "--canny-low", help="canny preprocessor: the low threshold"),
    canny_high: float = typer.Option(200, "--canny-high", help="canny preprocessor: the high threshold"),
    hires: Optional[float] = typer.Option(None, "--hires", help="hires fix: draw at the model's size, enlarge this many times (e.g. 2), redraw with img2img at that size"),
    hires_strength: float = typer.Option(0.5, "--hires-strength", help="hires fix: the redraw's strength, in (0, 1]"),
    hires_upscaler: Optional[Path] = typer.Option(None, "--hires-upscaler", help="hires fix: an exported upscaler folder (export-upscaler) instead of Lanczos"),
    output: Path = typer.Option(Path("edgediff.png"), "--output", "-o", help="PNG to write (several images get -1, -2 ...)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace existing output files (default: refuse)"),
    max_pixels: Optional[int] = typer.Option(None, "--max-pixels", min=1, help="per-image pixel budget (default: max(1024x1024, 4x the model's native size))"),
    max_batch: int = typer.Option(4, "--max-batch", min=1, help="images per UNet call; more run in chunks (image k is seeded seed+k either way)"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="print per-stage timings"),
) -> None:
    """Generate images from a prompt with an exported artifact (no PyTorch needed)."""
    from edgediff.runtime import ArtifactError, BackendError, GenerationError, Pipeline
    from edgediff.runtime import GenerationSettings, LoadOptions
    from edgediff.runtime.outputs import output_paths, write_result

    if model is None:
        from edgediff.models import default_model_path

        model = default_model_path()
    # everything that can be checked without the model, before it loads
    if image is None and (mask or extend is not None or strength is not None):
        _fail("--mask, --extend and --strength need an input --image")
    if mask is not None and extend is not None:
        _fail("--mask (inpainting) and --extend (outpainting) exclude each other; give one")
    if (hires_upscaler is not None or hires_strength != 0.5) and hires is None:
        _fail("--hires-strength and --hires-upscaler go with --hires SCALE")
    if hires is not None and image is not None:
        _fail("--hires redraws a txt2img image larger; for an input image use --image with --width/--height")
    try:
        _utf8(prompt, "the prompt (PROMPT)")
        _utf8(negative, "--negative")
        sides = dict(_parse_sides(extend)) if extend is not None else None
        settings = GenerationSettings((prompt,), (negative,) if negative else None, steps, guidance, seed, width,
                                      height, scheduler, num_images, rng, strength, cfg_until, cache_interval)
        paths = output_paths(output, settings.batch, overwrite)
        controls = _controls(control or [], preprocess or [], control_start, control_end, canny_low, canny_high)
    except ValueError as e:
        _fail(str(e))
    if controls and hires is not None:
        _fail("--hires does not carry --control to its second pass yet; run the two apart (generate, then --image)")
    try:
        t0 = time.perf_counter()
        options = LoadOptions(backend=backend, device=device, precision=precision, vae=vae, fast=fast,
                              fallback=fallback, threads=threads, cache=not no_cache, cache_dir=cache_dir,
                              ov_precision=ov_precision, max_pixels=max_pixels, max_batch=max_batch,
                              loras=tuple(lora or ()), embeddings=tuple(embedding or ()), static_shapes=static_shapes,
                              low_memory=low_memory, vae_tiling=vae_tiling, cuda_graph=cuda_graph,
                              check=not no_check, t5=t5)
        pipe = Pipeline.open(model, options)
        load_s = time.perf_counter() - t0
        if pipe.manifest.random_weights:
            console.print("[yellow]note:[/] this artifact has random weights (for latency measurement); it draws noise")
        with Progress(TextColumn("denoising"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      TimeRemainingColumn(), console=console, transient=not verbose) as bar:
            task = bar.add_task("steps", total=None)

            def on_step(done: int, total: int) -> None:
                bar.update(task, completed=done, total=total)

            result = pipe.generate(settings, image=image, mask=mask, extend=sides, fill=fill, mask_blur=mask_blur,
                                   keep_unmasked=keep_unmasked or sides is not None, controls=controls,
                                   callback=on_step)
            if hires is not None:
                from edgediff.runtime.upscale import Upscaler

                upscaler = None if hires_upscaler is None else Upscaler.load(
                    hires_upscaler, backend=pipe.backend, device=pipe.devices[pipe.manifest.denoiser.name],
                    threads=threads)  # beside the UNet
                result = pipe.hires_fix(result, hires, hires_strength, upscaler=upscaler, callback=on_step)
    except (ArtifactError, BackendError, GenerationError, ValueError) as e:
        _fail(str(e))
    except MemoryError:
        _fail(f"out of memory generating {num_images} image(s) at {_size_words(width, height)}; ask for a smaller "
              "size, fewer images or a smaller --max-batch")
    try:
        write_result(result, paths, overwrite)  # all or none; a name another process took meanwhile is refused
    except ValueError as e:
        _fail(str(e))
    except OSError as e:
        _fail(f"cannot write {e.filename or output}: {e.strerror}")
    for p in paths:
        typer.echo(f"wrote {p}")
    if verbose:
        _print_timings(load_s, result)


def _controls(texts: list[str], preprocess: list[str], start: float, end: float, low: float, high: float):
    """--control NAME=IMAGE[:SCALE] with --preprocess NAME=canny and the shared guidance window."""
    from edgediff.runtime import Control

    methods = {}
    for text in preprocess:
        name, sep, method = text.partition("=")
        if not sep:
            raise ValueError(f"--preprocess takes NAME=canny, got {text!r:.60}")
        methods[name.strip()] = method.strip()
    parsed = [Control.parse(t) for t in texts]
    unknown = set(methods) - {c.name for c in parsed}
    if unknown:
        raise ValueError(f"--preprocess names a --control that is not given: {', '.join(sorted(unknown))}")
    return [Control(c.name, c.image, c.scale, start, end, methods.get(c.name, "none"), low, high).checked()
            for c in parsed]


def _parse_sides(text: str):
    if not text.strip():
        raise ValueError("--extend takes side=pixels pairs such as left=128,right=128; got an empty value")
    for part in text.split(","):
        side, _, value = part.partition("=")
        try:
            yield side.strip(), int(value)
        except ValueError:
            raise ValueError(f"--extend takes side=pixels pairs such as left=128,right=128; got {part[:40]!r}") from None


def _print_timings(load_s: float, result) -> None:
    table = Table(title="timings (s)")
    for col in ("stage", "calls", "total", "first", "median of rest"):
        table.add_column(col)
    table.add_row("load", "", f"{load_s:.3f}", "", "")
    for stage, t in result.timings.summary().items():
        rest = "" if t["calls"] < 2 else f"{t['median_rest']:.3f}"
        table.add_row(stage, str(t["calls"]), f"{t['total']:.3f}", f"{t['first']:.3f}", rest)
    console.print(table)
    console.print(f"devices: {json.dumps(result.components)}")


@app.command()
def bench(
    artifact: Optional[Path] = typer.Argument(None, help="artifact folder (default: the embedded model)"),
    backend: str = typer.Option("auto", help="auto, onnxruntime or openvino"),
    device: str = typer.Option("auto", help="auto, cpu, cuda, dml, gpu, npu, or per component: text_encoder=cpu,unet=gpu"),
    precision: Optional[str] = typer.Option(None, help="component precisions, e.g. fp16 or unet=int8"),
    low_memory: bool = typer.Option(False, "--low-memory", help="one stage's graphs in memory at a time, the VAE in tiles"),
    static_shapes: Optional[bool] = typer.Option(None, "--static-shapes/--dynamic-shapes", help="OpenVINO graphs compiled per shape (default: NPU only)"),
    vae_tiling: str = typer.Option("auto", "--vae-tiling", help="auto, on, off"),
    size: Optional[str] = typer.Option(None, help="WIDTHxHEIGHT (default: the model's native size)"),
    steps: int = typer.Option(20, min=1, help="denoising steps per run"),
    runs: int = typer.Option(3, min=1, help="measured runs"),
    warmup: int = typer.Option(1, min=0, help="unmeasured warm-up runs"),
    guidance: float = typer.Option(7.5, help="guidance scale (> 1: UNet batch 2)"),
    threads: Optional[int] = typer.Option(None, help="intra-op threads"),
    ov_precision: str = typer.Option("auto", "--ov-precision", help="OpenVINO execution precision"),
    vae: str = typer.Option("full", "--vae", help="full, or tiny (the artifact's tiny VAE)"),
    cache_interval: Optional[int] = typer.Option(None, "--cache-interval", help="DeepCache: the full UNet every N steps"),
    cfg_until: Optional[float] = typer.Option(None, "--cfg-until", help="guidance only for this fraction of the steps"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="append one JSON row per run to this .jsonl file"),
    compare: Optional[list[Path]] = typer.Option(None, "--compare", help="print medians and ratios of these .jsonl files instead of running"),
    chart: Optional[Path] = typer.Option(None, "--chart", help="with --compare: also draw per-stage stacked bars as a PNG"),
) -> None:
    """Measure cold load, per-stage latency, peak memory and disk size; or compare saved rows."""
    from edgediff import bench as B
    from edgediff.runtime import ArtifactError, BackendError, GenerationError

    if compare:
        try:
            summary = B.summarize(B.read_rows(compare))
        except (OSError, ValueError) as e:
            _fail(str(e))
        if not summary:
            _fail("no rows in " + ", ".join(map(str, compare)))
        base = summary[0]
        table = Table(title=f"medians; ratio = time / first row's ({base['config']})"
                            + ("; -: the first row's total is 0" if not base["end_to_end_s"] else ""))
        for col in ("config", "runs", "load s", "text enc s", "unet 1st s", "unet step s", "vae s", "total s",
                    "ratio", "peak MB", "disk GB"):
            table.add_column(col)
        for s in summary:
            table.add_row(s["config"], str(s["runs"]), f"{s['load_s']:.2f}", f"{s['text_encoder_s']:.3f}",
                          f"{s['unet_first_s']:.3f}", f"{s['unet_rest_median_s']:.3f}", f"{s['vae_decode_s']:.3f}",
                          f"{s['end_to_end_s']:.2f}", B.ratio(s["end_to_end_s"], base["end_to_end_s"]),
                          f"{s['peak_rss_mb']:.0f}", f"{s['disk_gb']:.3f}")
        Console(width=200).print(table)
        if chart:
            try:
                B.chart(summary, chart)
            except (OSError, ValueError) as e:
                _fail(f"--chart {chart}: {e}")
            typer.echo(f"wrote {chart}")
        return
    width = height = None
    if size is not None:
        try:
            width, height = (int(v) for v in size.lower().split("x"))
        except ValueError:
            _fail(f"--size must be WIDTHxHEIGHT, e.g. 512x512; got {size!r}")
    if artifact is None:
        from edgediff.models import default_model_path

        artifact = default_model_path()
    rows_file = None
    if json_out:
        try:  # opened now: a bad path fails before the benchmark, not after it
            rows_file = open(json_out, "a")
        except OSError as e:
            _fail(f"--json {json_out}: cannot write it ({e.strerror})")
    try:
        rows = B.run_bench(artifact, backend=backend, device=device, precision=precision, width=width, height=height,
                           steps=steps, runs=runs, warmup=warmup, guidance=guidance, threads=threads,
                           ov_precision=ov_precision, vae=vae, cache_interval=cache_interval, cfg_until=cfg_until,
                           low_memory=low_memory, static_shapes=static_shapes, vae_tiling=vae_tiling)
    except (ArtifactError, BackendError, GenerationError, ValueError) as e:
        _fail(str(e))
    except MemoryError:
        _fail("out of memory during the benchmark; try a smaller --size")
    for row in rows:
        typer.echo(f"run {row['run']}: total {row['end_to_end_s']:.3f} s, unet first {row['unet_first_s']:.3f} s, "
                   f"rest median {row['unet_rest_median_s']:.3f} s, vae {row['vae_decode_s']:.3f} s, "
                   f"peak {row['peak_rss_mb']:.0f} MB")
    typer.echo(f"load {rows[0]['load_s']:.2f} s" + (f" (warm compile cache {rows[0]['load_cached_s']:.2f} s)" if rows[0]["load_cached_s"] else "")
               + f" on {rows[0]['backend']} {rows[0]['execution'][rows[0]['denoiser']]} "
               f"({rows[0]['execution_precision'][rows[0]['denoiser']]})")
    if rows_file is not None:
        with rows_file:
            B.write_rows(rows, rows_file)
        typer.echo(f"appended {len(rows)} rows to {json_out}")


@app.command()
def tune(
    artifact: Optional[Path] = typer.Argument(None, help="artifact folder (default: the embedded model)"),
    backend: str = typer.Option("onnxruntime", help="onnxruntime or openvino (what the speed is measured on)"),
    threads: Optional[int] = typer.Option(None, help="intra-op threads"),
    prompts: Optional[str] = typer.Option(None, help="prompts separated by '|' (default: a fixed set of 4; the embedded model: 48 scenes x --seeds, read back for their attributes)"),
    seeds: int = typer.Option(2, min=1, help="seeds per prompt"),
    min_psnr: float = typer.Option(20.0, help="bound: mean PSNR (dB) vs full compute"),
    min_ssim: float = typer.Option(0.70, help="bound: mean SSIM vs full compute"),
    max_accuracy_drop: float = typer.Option(0.02, help="bound (embedded model): attribute accuracy drop, absolute"),
) -> None:
    """Measure the tiny VAE, DeepCache and the CFG cut-off against full compute; record the fastest settings that
    keep the quality bounds as the artifact's fast profile (generate --fast)."""
    from edgediff.runtime import ArtifactError, BackendError, GenerationError
    from edgediff.tune import DEFAULT_PROMPTS, Bounds, tune as run_tune

    if artifact is None:
        from edgediff.models import default_model_path

        artifact = default_model_path()
    if prompts is not None and not any(p.strip() for p in prompts.split("|")):
        _fail("--prompts needs at least one prompt (separated by '|')")
    chosen = tuple(p.strip() for p in prompts.split("|") if p.strip()) if prompts is not None else DEFAULT_PROMPTS
    with console.status("tuning") as status:
        try:
            profile = run_tune(artifact, backend=backend, threads=threads, prompts=chosen, seeds=tuple(range(seeds)),
                               bounds=Bounds(min_psnr, min_ssim, max_accuracy_drop), progress=status.update)
        except (ArtifactError, BackendError, GenerationError, ValueError) as e:
            _fail(str(e))
    table = Table(title=f"{artifact}: each candidate vs full compute ({profile['measured']['images']} images)")
    for col in ("settings", "s/image", "speed-up", "PSNR dB", "SSIM", "accuracy", "within bounds"):
        table.add_column(col)
    full_s = profile["full_seconds_per_image"]
    for row in profile["candidates"]:
        acc = " ".join(f"{k[:5]} {v:.2f}" for k, v in row.get("accuracy", {}).items())
        table.add_row(", ".join(f"{k}={v}" for k, v in row["settings"].items()) or "full compute",
                      *((f"{row['seconds_per_image']:.3f}", f"{full_s / row['seconds_per_image']:.2f}x")
                        if row["seconds_per_image"] else ("–", "–")),
                      f"{row['psnr_db']:.1f}", f"{row['ssim']:.3f}", acc,
                      "yes" if row["within_bounds"] else "no: " + "; ".join(row.get("outside", [])))
    Console(width=200).print(table)
    for name, why in profile["skipped"].items():
        console.print(f"[yellow]note:[/] {name} not tried: {why}")
    typer.echo(fast_profile_words(profile))


@app.command("export-upscaler")
def export_upscaler_command(
    file: Optional[Path] = typer.Argument(None, help="an ESRGAN-family upscaler: .safetensors or .pth (RRDBNet: RealESRGAN_x4plus/x2plus; SRVGGNetCompact: realesr-general-x4v3)"),
    out: Optional[Path] = typer.Argument(None, help="a new folder for upscaler.onnx and upscaler.json"),
    random_weights: Optional[str] = typer.Option(None, "--random-weights", help="a recipe with seeded random weights instead of a file (then the only argument is OUT): realesrgan-x4plus, realesrgan-x2plus, realesr-general-x4v3, realesr-animevideov3"),
) -> None:
    """Export an upscaler to ONNX once (needs the export extra: torch); `upscale` and `generate --hires` run it."""
    from edgediff.runtime.upscale import UpscalerError

    try:
        from edgediff.export.upscaler import export_upscaler
    except ImportError as e:
        _fail(f"export-upscaler needs PyTorch: pip install 'edgediff[export]' ({e})")
    if random_weights is not None:
        file, out = None, out or file
    if out is None:
        _fail("give FILE OUT, or --random-weights RECIPE OUT")
    try:
        manifest = export_upscaler(file, out, random_weights)
    except UpscalerError as e:
        _fail(str(e))
    typer.echo(f"exported {manifest['architecture']} x{manifest['scale']} to {out} (parity vs PyTorch "
               f"{manifest['parity_vs_torch']['psnr_db']} dB)")


@app.command()
@_nothing_written_on_interrupt
def upscale(
    image: Path = typer.Argument(..., help="the image to enlarge"),
    upscaler: Path = typer.Option(..., "--upscaler", help="a folder written by export-upscaler"),
    scale: Optional[int] = typer.Option(None, "--scale", help="the factor (default: the upscaler's; smaller ones resize its result down)"),
    output: Path = typer.Option(Path("upscaled.png"), "--output", "-o", help="PNG to write"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing output file"),
    tile: int = typer.Option(256, "--tile", help="input pixels per tile at most (memory grows with it)"),
    backend: str = typer.Option("auto", help="auto, onnxruntime or openvino"),
    device: str = typer.Option("auto", help="auto, cpu, cuda, dml, gpu, npu"),
    threads: Optional[int] = typer.Option(None, help="intra-op threads"),
    max_pixels: Optional[int] = typer.Option(None, "--max-pixels", min=1, help="the upscaler's result at most this many pixels (default: 64 million, an 8000x8000 result; an input at most that over the scale squared), checked before the image is decoded"),
) -> None:
    """Enlarge an image with an exported upscaler, in overlapping tiles (no PyTorch needed)."""
    from edgediff.runtime import ArtifactError, BackendError
    from edgediff.runtime.limits import UPSCALE_MAX_PIXELS
    from edgediff.runtime.outputs import output_paths, png_info, write_png
    from edgediff.runtime.upscale import Upscaler

    try:
        output_paths(output, 1, overwrite)
        model = Upscaler.load(upscaler, backend=backend, device=device, threads=threads)
        t0 = time.perf_counter()
        result = model.upscale(image, scale, tile=tile, max_pixels=max_pixels or UPSCALE_MAX_PIXELS)  # UpscalerError is a ValueError
        seconds = time.perf_counter() - t0
    except (ArtifactError, BackendError, ValueError) as e:
        _fail(str(e))
    except MemoryError:
        _fail(f"out of memory upscaling {image}; use a smaller --tile, or a smaller image (--max-pixels bounds it)")
    factor = scale or model.scale
    try:
        write_png(result, output, png_info(f"Upscaled x{factor} with {model.architecture}",
                                           {"upscaler": str(upscaler), "architecture": model.architecture,
                                            "scale": factor, "source": str(image)}), overwrite=overwrite)
    except ValueError as e:
        _fail(str(e))
    except OSError as e:
        _fail(f"cannot write {e.filename or output}: {e.strerror}")
    typer.echo(f"wrote {output} ({result.width}x{result.height}, {model.architecture}, {seconds:.1f} s)")


cache_app = typer.Typer(no_args_is_help=True, help="The compile cache: each graph's optimized (ONNX Runtime) or compiled (OpenVINO) form, kept for the next load.")
app.add_typer(cache_app, name="cache")
CACHE_DIR_HELP = "the compile cache's folder (default: $EDGEDIFF_CACHE_DIR, else ~/.cache/edgediff)"


@cache_app.command("list")
def cache_list(cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help=CACHE_DIR_HELP)) -> None:
    """List the entries: backend, graph, the device and shapes compiled for, size, when last used."""
    from edgediff.runtime import compile_cache

    root = cache_dir or compile_cache.default_root()
    found = compile_cache.entries(root)
    staging = compile_cache.staging_folders(root)  # loads under way, or stopped (removed by clear and later loads)
    bound = compile_cache.max_bytes() / 1e9
    table = Table(title=f"compile cache {root}: {len(found)} entries" + (f", {len(staging)} unfinished" if staging
                        else "") + f", {sum(e['bytes'] for e in found + staging) / 1e9:.2f} GB "
                        f"(bound {bound:.0f} GB: $EDGEDIFF_CACHE_MAX_GB)")
    for col in ("backend", "graph", "compiled for", "MB", "last used", "graph still there"):
        table.add_column(col)
    for e in sorted(found + staging, key=lambda e: -e["last_used"]):
        settings = e["settings"]
        shapes = settings.get("shapes")
        target = str(settings.get("device", "?")) + ("" if not shapes else " " + ", ".join(
            f"{k} {'x'.join(map(str, v))}" for k, v in shapes.items()))
        if "in_use" in e:
            target = "unfinished: being written" if e["in_use"] else "unfinished: its load stopped"
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(e["last_used"])) if e["last_used"] else "?"
        table.add_row(e["backend"], e["graph"], target, f"{e['bytes'] / 1e6:.1f}", used,
                      "yes" if e["graph_exists"] else "no (stale)")
    Console(width=220).print(table)


@cache_app.command("clear")
def cache_clear(
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help=CACHE_DIR_HELP),
    stale: bool = typer.Option(False, "--stale", help="only the entries whose graph file is gone"),
) -> None:
    """Delete the entries and unfinished ones (only the cache's own folders, and none a running load uses)."""
    from edgediff.runtime import compile_cache

    root = cache_dir or compile_cache.default_root()
    count, size, busy = compile_cache.clear(root, stale_only=stale)
    typer.echo(f"removed {count} entries ({size / 1e9:.2f} GB) from {root}"
               + (f"; kept {busy} in use by a running load" if busy else ""))


@app.command()
def check(
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="artifact folder (default: the embedded shapes model)"),
    device: str = typer.Option(..., "--device", help="the device to check: gpu, npu (openvino), cuda, dml (onnxruntime), or per component"),
    backend: str = typer.Option("auto", help="auto, onnxruntime or openvino"),
    precision: Optional[str] = typer.Option(None, help="component precisions to check, e.g. fp16"),
    threads: Optional[int] = typer.Option(None, help="intra-op threads"),
    cache_dir: Optional[str] = typer.Option(None, "--cache-dir", help=CACHE_DIR_HELP),
) -> None:
    """Compare a device with the CPU, stage by stage, on one short generation; demote what differs.

    Each component's outputs on the device are measured against the CPU's for the same inputs (SNR in dB); a
    component below the bound runs at fp32 on the device, else on the CPU. The verdict is kept and applied by
    later loads on that device (generate checks automatically on first use; this command measures again)."""
    from edgediff.runtime import ArtifactError, BackendError, GenerationError, compile_cache, load_manifest
    from edgediff.runtime import device_check
    from edgediff.runtime.backends import BackendOptions
    from edgediff.runtime.pipeline import choose_vae, parse_precision
    from edgediff.runtime.placement import resolve_placement

    if model is None:
        from edgediff.models import default_model_path

        model = default_model_path()
    try:
        manifest = load_manifest(model)
        backend_name, devices = resolve_placement(backend, device, manifest.roles)
        chosen = choose_vae("full", parse_precision(precision, manifest.components), manifest.components)
        root = Path(cache_dir) if cache_dir else compile_cache.default_root()
        options = BackendOptions(threads=threads, cache_dir=root)
        folder = root / device_check.FOLDER
        key = device_check.check_key(model, manifest, backend_name, devices, chosen)
        report = device_check.check(model, manifest, backend_name, devices, chosen, options)
        device_check.save_report(folder, key, report)
    except (ArtifactError, BackendError, GenerationError, ValueError) as e:
        _fail(str(e))
    table = Table(title=f"device check on {backend_name}: each component vs the CPU (at least "
                        f"{device_check.MIN_SNR_DB:g} dB)")
    for col in ("component", "asked", "SNR dB", "runs on", "precision", "why"):
        table.add_column(col)
    for v in report.verdicts:
        table.add_row(v.component, devices.get(v.component, "?"), "cpu (reference)" if v.snr_db is None and
                      v.action == "kept" else f"{v.snr_db}", v.device, v.precision, v.why)
    Console(width=220).print(table)
    demoted = report.demoted()
    typer.echo(f"{len(demoted)} component(s) demoted" if demoted else "every component matches the CPU")


@app.command()
def info(model: Optional[Path] = typer.Argument(None, help="artifact folder (omit for the installed backends only)")) -> None:
    """Show an artifact's manifest (components, precisions, parity) and the devices of the installed backends."""
    from rich.markup import escape

    from edgediff.runtime import ArtifactError, available_devices, load_manifest

    if model is not None:
        try:
            m = load_manifest(model)
        except ArtifactError as e:
            _fail(str(e))
        # every text from the manifest escaped: a "[/x]" in it is text, not rich markup
        table = Table(title=escape(f"{model}: {m.family}, {m.prediction_type}, {m.sample_size}px default, scheduler "
                                   f"{m.scheduler}, " + "{} steps, guidance {:g}".format(*m.settings())
                                   + (" [random weights]" if m.random_weights else "")))
        for col in ("component", "precision", "MB", "inputs", "quality"):
            table.add_column(col)
        for comp, variants in m.components.items():
            for prec, v in variants.items():
                ins = ", ".join(f"{t.name}:{t.dtype}{list(t.shape)}" for t in v.inputs)
                only = f" ({', '.join(v.backends)} only)" if v.backends else ""
                speed = speed_words(m.fast_profile, comp, prec) if comp == m.denoiser.name else ""
                table.add_row(*map(escape, (comp, prec + only, f"{v.bytes / 1e6:.1f}", ins,
                                            quality_words(v.quality) + (f"; {speed}" if speed else ""))))
        Console().print(table)
        Console().print(fast_profile_words(m.fast_profile), soft_wrap=True, markup=False)
        if m.controlnets:
            Console().print("ControlNets (generate --control NAME=IMAGE): "
                            + "; ".join(f"{c.control} (from {c.source})" for c in m.controlnets), soft_wrap=True,
                            markup=False)
        provenance = json.dumps(m.provenance)
        if len(provenance) > INFO_PROVENANCE_CHARS:
            provenance = provenance[:INFO_PROVENANCE_CHARS] + f"... ({len(provenance) - INFO_PROVENANCE_CHARS:,} more characters in manifest.json)"
        Console().print(f"provenance: {provenance}", markup=False, soft_wrap=True)
    Console().print_json(json.dumps({"backends": available_devices()}))


INFO_PROVENANCE_CHARS = 2000
# what reading a malformed optional record raises: a field of the wrong type, missing, or a number that is none
UNREADABLE = (AttributeError, KeyError, TypeError, ValueError, IndexError, OverflowError, ZeroDivisionError)


def fast_profile_words(profile: dict | None) -> str:
    """``info``'s line on the tuned fast profile: what --fast uses, its speed-up and quality cost."""
    if profile is None:
        return "fast profile: none (run `edgediff tune ARTIFACT` to measure one for generate --fast)"
    try:  # the manifest checks the settings; the rest is tune's record, read as far as it is readable
        settings = ", ".join(f"{k}={v}" for k, v in profile["settings"].items()) or "full compute (no saving kept the bounds)"
    except UNREADABLE:
        return "fast profile (generate --fast): unreadable"
    try:
        q = profile.get("quality", {})
        words = (f"fast profile (generate --fast): {settings}: {float(profile['speedup']):.2f}x faster per image, "
                 f"PSNR {float(q['psnr_db']):.1f} dB, SSIM {float(q['ssim']):.3f} vs full compute")
        if isinstance(q.get("accuracy"), dict) and isinstance(profile.get("full_accuracy"), dict):
            words += ", accuracy " + " ".join(f"{k} {float(v):.2f} (full {float(profile['full_accuracy'][k]):.2f})"
                                              for k, v in q["accuracy"].items())
        measured = profile.get("measured", {})
        return words + f"; measured on {measured.get('machine', '?')}, {measured.get('backend', '?')}"
    except UNREADABLE:
        return f"fast profile (generate --fast): {settings} (its record is unreadable)"


def speed_words(profile: dict | None, component: str, precision: str) -> str:
    """What ``tune`` measured of a UNet variant alone against full compute on its machine, and whether that makes
    it recommended: a variant no faster than fp32 there is not ("" where tune did not measure it)."""
    if precision == "fp32" or not isinstance(profile, dict) or "candidates" not in profile:
        return ""
    try:
        row = next((r for r in profile["candidates"] if r.get("settings") == {component: precision}), None)
        if row is None:
            return ""
        ratio = float(row["seconds_per_image"]) / float(profile["full_seconds_per_image"])
        where = f"on {profile.get('measured', {}).get('machine', '?')}, {profile.get('measured', {}).get('backend', '?')}"
    except UNREADABLE:
        return "speed record unreadable (edgediff tune measures it again)"
    if ratio >= 1:
        return f"not recommended: no faster than fp32 {where} ({ratio:.2f}x its time per image, edgediff tune)"
    return f"{1 / ratio:.2f}x faster per image than fp32 {where} (edgediff tune)"


def quality_words(quality: dict) -> str:
    """A variant's measured quality as a reader wants it: "PSNR 65.4 dB, SSIM 1.000 vs fp32, accuracy colour
    0.94 ..." where it was gated, else "parity vs PyTorch 3.7e-06 relative"."""
    try:
        if "psnr_db" not in quality and "parity_vs_torch" in quality:
            return f"parity vs PyTorch {float(quality['parity_vs_torch']['max_rel_err']):.1e} relative"
        if "psnr_db" in quality:
            words = f"PSNR {float(quality['psnr_db']):.1f} dB, SSIM {float(quality['ssim']):.3f} vs {quality.get('vs', 'fp32')}"
            if isinstance(quality.get("accuracy"), dict):
                words += ", accuracy " + " ".join(f"{k} {float(v):.2f}" for k, v in quality["accuracy"].items()
                                                  if k != "n")
            if isinstance(quality.get("gate"), dict) and quality["gate"].get("forced"):
                words += " (below the gate, added with --force)"
            return words
    except UNREADABLE:
        return "quality record unreadable"
    return "not measured"


def main() -> None:
    try:
        app()
    except OSError as e:  # the system refused a path no command checked (a name too long, a loop, an I/O error)
        _print_error(f"{e.strerror or type(e).__name__}: {e.filename if e.filename is not None else e}")
        sys.exit(2)


if __name__ == "__main__":
    sys.exit(main())
