"""Backends behind one narrow interface: ``open_session(path, spec, device, options)``.

A ``Session`` is called with named numpy arrays and returns a dict of named
arrays. Both backends read the same ONNX files. Device strings live here and
nowhere else; the pipeline never branches on the backend.

- ``onnxruntime``: devices ``cpu``, ``cuda``, ``dml`` (execution providers); ``BoundRun`` feeds a session
  through IO binding (on CUDA by default, with CUDA graphs on request).
- ``openvino``: devices ``cpu``, ``gpu``, ``npu``, ``auto`` (OpenVINO's AUTO plugin); ``StaticShapes``
  compiles a graph per input shape (NPU always, elsewhere on request).

Which device each component gets is ``edgediff.runtime.placement``'s; whether a device computes what the
CPU does, ``edgediff.runtime.device_check``'s.
"""

from __future__ import annotations

import importlib.util
import os
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import compile_cache
from .errors import EdgediffError
from .lora import WeightPatch
from .manifest import MODEL_SUFFIXES, ArtifactError, TensorSpec, Variant, artifact_file, residual_inputs, zero_residuals

BACKENDS = ("onnxruntime", "openvino")
ORT_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "dml": "DmlExecutionProvider"}
OV_DEVICES = {"cpu": "CPU", "gpu": "GPU", "npu": "NPU", "auto": "AUTO"}
OV_PRECISIONS = ("auto", "f32", "bf16", "f16")
DEVICES = ("auto", "cpu", "cuda", "dml", "gpu", "npu")


class BackendError(EdgediffError, RuntimeError):
    """A backend or device is unavailable, or a session was fed the wrong inputs."""


@dataclass
class BackendOptions:
    threads: int | None = None  # intra-op threads; None = the backend's default
    cache_dir: Path | None = None  # the compile cache's root (edgediff.runtime.compile_cache); None: off
    ov_precision: str = "auto"  # OpenVINO inference precision hint: auto = the device's default (bf16 on AMX/AVX512-BF16 CPUs)
    # OpenVINO: compile each graph for the shapes it is called with (reshaped, cached per shape) instead of once with
    # dynamic shapes. None: only where the device needs it (NPU: its plugin refuses dynamic shapes)
    static_shapes: bool | None = None
    # OpenVINO static graphs of batch 1: a batch is run one item at a time (the guidance as two UNet calls, as
    # OpenVINO GenAI does on NPU). None: on NPU only
    batch_one: bool | None = None
    dml_adapter: int = 0  # DirectML: the adapter (GPU) index
    io_binding: bool | None = None  # ONNX Runtime: feed and fetch through IO binding (None: on CUDA only)
    cuda_graph: bool = False  # ONNX Runtime CUDA: capture a CUDA graph per input shape and replay it (needs io_binding)


@dataclass
class Session:
    """One loaded graph. Checks every call's inputs against the manifest's signature.

    Safe to call from several threads (ONNX Runtime's ``run`` is; OpenVINO gets an
    infer request per concurrent call). It keeps nothing of a call: timing is the
    caller's (``edgediff.runtime.denoise.Job.call``).
    """

    component: str
    variant: Variant
    run: Callable[[dict[str, np.ndarray]], list[np.ndarray]]
    backend: str
    device: str  # what actually executes (provider / OpenVINO device), for reports
    execution_precision: str = "f32"
    load_seconds: float = 0.0
    compile_cache: str = "off"  # "hit": loaded from the compile cache, "written": filled it, "off": neither
    requested_device: str = ""  # the device asked for (``device`` is what executes)

    def __call__(self, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        feeds = check_inputs(self.component, self.variant.inputs, inputs)
        try:
            outputs = self.run(feeds)
        except MemoryError:
            raise
        except Exception as e:  # each backend raises its own types; the message is what matters
            first = str(e).strip().splitlines()[0][:500] if str(e).strip() else type(e).__name__
            hint = ("; that is out of memory at this size: ask for a smaller image or fewer images per UNet call "
                    "(--max-batch)") if "alloc" in first.lower() else ""
            raise BackendError(f"{self.component} ({self.variant.file}) failed on {self.backend} {self.device}: "
                               f"{first}{hint}") from e
        return {spec.name: out for spec, out in zip(self.variant.outputs, outputs)}


def check_inputs(component: str, specs: tuple[TensorSpec, ...], inputs: dict[str, Any]) -> dict[str, np.ndarray]:
    """The feeds, checked against the signature. A UNet exported with ControlNets gets zeros for the residuals
    not given (its output without a ControlNet, exactly), so callers that know nothing of them run it as before."""
    absent = [t for t in residual_inputs(specs) if t.name not in inputs]
    if absent and isinstance(inputs.get("sample"), np.ndarray):
        inputs = inputs | zero_residuals(absent, inputs["sample"].shape)
    expected = {s.name: s for s in specs}
    missing = sorted(set(expected) - set(inputs))
    extra = sorted(set(inputs) - set(expected))
    if missing or extra:
        raise BackendError(
            f"{component}: inputs {sorted(inputs)} do not match the graph's {sorted(expected)}"
            + (f" (missing {missing})" if missing else "")
            + (f" (unexpected {extra})" if extra else "")
        )
    feeds = {}
    for name, spec in expected.items():
        a = inputs[name]
        if not isinstance(a, np.ndarray):
            raise BackendError(f"{component}.{name}: expected a numpy array, got {type(a).__name__}")
        if a.dtype != np.dtype(spec.dtype):
            raise BackendError(f"{component}.{name}: expected dtype {spec.dtype}, got {a.dtype}")
        if a.ndim != len(spec.shape):
            raise BackendError(
                f"{component}.{name}: expected rank {len(spec.shape)} {list(spec.shape)}, got shape {list(a.shape)}"
            )
        for axis, (want, got) in enumerate(zip(spec.shape, a.shape)):
            if isinstance(want, int) and want != got:
                raise BackendError(
                    f"{component}.{name}: axis {axis} must be {want} (shape {list(spec.shape)}), got shape {list(a.shape)}"
                )
        feeds[name] = np.ascontiguousarray(a)
    return feeds


def installed_backends() -> list[str]:
    return [b for b, mod in (("onnxruntime", "onnxruntime"), ("openvino", "openvino")) if importlib.util.find_spec(mod)]


def resolve(backend: str, device: str) -> tuple[str, str]:
    """Pick the backend and device: ``auto`` chooses the fastest installed one.

    On CPUs OpenVINO wins when installed (SD1.5 UNet at 512x512 on an AVX-512
    BF16 CPU: 4.3 s/step vs 9.5 s for ONNX Runtime's CPU EP); CUDA and DirectML
    are ONNX Runtime's; Intel GPU and NPU are OpenVINO's.
    """
    if backend not in ("auto",) + BACKENDS:
        raise BackendError(f"unknown backend {backend!r}; valid: auto, {', '.join(BACKENDS)}")
    if device not in DEVICES:
        raise BackendError(f"unknown device {device!r}; valid: {', '.join(DEVICES)}")
    have = installed_backends()
    if not have:
        raise BackendError("no backend installed: pip install 'edgediff[cpu]' (ONNX Runtime) or 'edgediff[openvino]'")
    if backend == "auto":
        if device in ("cuda", "dml"):
            backend = "onnxruntime"
        elif device in ("gpu", "npu"):
            backend = "openvino"
        elif device == "auto" and "onnxruntime" in have and _ort_accelerator():
            backend = "onnxruntime"
        else:
            backend = "openvino" if "openvino" in have else "onnxruntime"
    if backend not in have:
        extra = {"onnxruntime": "cpu] or [cuda] or [directml", "openvino": "openvino"}[backend]
        raise BackendError(f"backend {backend} is not installed: pip install 'edgediff[{extra}]'")
    if backend == "onnxruntime":
        if device == "auto":
            device = _ort_accelerator() or "cpu"
        if device not in ORT_PROVIDERS:
            raise BackendError(f"onnxruntime runs on devices {', '.join(ORT_PROVIDERS)} (or auto); got {device!r}")
    elif device not in OV_DEVICES:
        raise BackendError(f"openvino runs on devices {', '.join(OV_DEVICES)}; got {device!r}")
    return backend, device


def require_device(backend: str, device: str) -> None:
    """BackendError unless ``backend`` can run on ``device`` here (a resolved device: not ``auto``)."""
    if backend == "onnxruntime":
        import onnxruntime as ort

        provider, available = ORT_PROVIDERS[device], ort.get_available_providers()
        if provider not in available:
            raise BackendError(
                f"ONNX Runtime here has no {provider} (device {device!r}); available: {', '.join(available)}. "
                "Install onnxruntime-gpu for cuda or onnxruntime-directml for dml (not together with onnxruntime)")
        return
    target = OV_DEVICES[device]
    have = _ov_core().available_devices
    if target != "AUTO" and target not in {d.split(".")[0] for d in have}:
        raise BackendError(f"OpenVINO has no {target} device here; available: {', '.join(have)}")


def _ort_accelerator() -> str | None:
    import onnxruntime as ort

    available = ort.get_available_providers()
    for dev in ("cuda", "dml"):
        if ORT_PROVIDERS[dev] in available:
            return dev
    return None


def open_session(root: Path, component: str, variant: Variant, backend: str, device: str, options: BackendOptions,
                 patch: WeightPatch | None = None) -> Session:
    """Load ``variant``'s graph, with ``patch``'s weights in place of the file's (LoRAs merged at load:
    ``edgediff.runtime.lora``); its input and output names must be the manifest's (else ArtifactError)."""
    path = artifact_file(root, variant.file, f"{component} {variant.precision}", MODEL_SUFFIXES)
    outputs = [spec.name for spec in variant.outputs]
    t0 = time.perf_counter()
    opener = _open_ort if backend == "onnxruntime" else _open_ov
    run, actual, precision, graph_inputs, graph_outputs, cached = opener(path, device, options, outputs, patch)
    # one graph input per manifest input (OpenVINO may give a port several names), every manifest output present
    want_inputs = [spec.name for spec in variant.inputs]
    if len(graph_inputs) != len(want_inputs) or not all(any(n in names for names in graph_inputs) for n in want_inputs) \
            or not all(any(n in names for names in graph_outputs) for n in outputs):
        raise ArtifactError(
            f"{path} ({component} {variant.precision}) is not the graph the manifest describes: it takes "
            f"{_names(graph_inputs)} and gives {_names(graph_outputs)}, the manifest says {want_inputs} -> "
            f"{outputs}. Was the file replaced by another component's? Re-export the artifact"
        )
    session = Session(component, variant, run, backend, actual, precision, time.perf_counter() - t0, cached,
                      requested_device=device)
    _report_elsewhere(session)
    if isinstance(run, StaticShapes):
        session.compile_cache = "per shape"

        def report(actual: str, precision: str, cached: str, seconds: float) -> None:
            session.device, session.execution_precision, session.compile_cache = actual, precision, cached
            session.load_seconds += seconds
            _report_elsewhere(session)

        run.report = report
    return session


def _report_elsewhere(session: Session) -> None:
    """A graph that runs on another device than the one asked for is said, never hidden (OpenVINO's AUTO
    names the devices it chose; a named device must be among the executing ones)."""
    asked = session.requested_device
    if session.backend != "openvino" or asked == "auto":
        return
    if OV_DEVICES[asked] not in {d.split(".")[0] for d in session.device.split(",")}:
        warnings.warn(f"{session.component} was asked to run on {asked} but OpenVINO executes it on "
                      f"{session.device}", stacklevel=4)


def _names(ports: list[set[str]]) -> list[str]:
    return sorted(min(names) if names else "?" for names in ports)


def _open_ort(path: Path, device: str, options: BackendOptions, outputs: list[str], patch: WeightPatch | None):
    import onnxruntime as ort

    require_device("onnxruntime", device)
    provider = ORT_PROVIDERS[device]
    if device == "cuda" and hasattr(ort, "preload_dlls"):
        ort.preload_dlls()
    providers = ort_providers(device, options)
    cache = _cache_entry(options, "onnxruntime", path, {"device": device}, patch) \
        if device == "cpu" else None  # CUDA/DirectML graphs are not saved: EP-specific fusions
    sess, cached = _ort_session(ort, path, providers, cache, patch, device, options)
    used = sess.get_providers()[0]
    if used != provider:
        raise BackendError(f"ONNX Runtime fell back to {used} for {path.parent.name} although {provider} was asked for")
    graph_inputs = [{i.name} for i in sess.get_inputs()]
    graph_outputs = [{o.name} for o in sess.get_outputs()]
    bound = options.io_binding if options.io_binding is not None else device == "cuda"
    run = BoundRun(ort, sess, device, outputs, options.cuda_graph) if bound or options.cuda_graph else \
        (lambda feeds: sess.run(outputs, feeds))
    return run, used, "f32", graph_inputs, graph_outputs, cached


def ort_session_options(ort, device: str, options: BackendOptions):
    """The session options for ``device``: memory patterns off (all devices), DirectML's sequential execution.
    (Low-memory mode keeps the memory arena: without it each step's attention buffers were allocated afresh,
    1.8x slower per SD1.5 step and a higher peak, 7.2 against 5.9 GB; weight prepacking off saved nothing.)"""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if options.threads:
        so.intra_op_num_threads = options.threads
    so.log_severity_level = 4  # errors reach the user once, as our BackendError, not also as ONNX Runtime's log line
    # Memory patterns (one block planned from the first run's allocations) pay with dynamic shapes only in memory:
    # SD1.5 at 512 on the CPU peaked at 9.96 GB with them, 7.6 GB without, at the same step time
    # (benchmarks/results/memory_sd15_cpu.md). DirectML: "does not support the use of memory pattern
    # optimizations or parallel execution" (ONNX Runtime's DirectML EP page).
    so.enable_mem_pattern = False
    if device == "dml":
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return so


def ort_providers(device: str, options: BackendOptions) -> list[Any]:
    """The execution providers, with their options: CUDA graphs on request, DirectML's adapter index."""
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device == "cuda":
        cuda = {"enable_cuda_graph": "1"} if options.cuda_graph else {}
        return [("CUDAExecutionProvider", cuda), "CPUExecutionProvider"]
    return [("DmlExecutionProvider", {"device_id": int(options.dml_adapter)}), "CPUExecutionProvider"]


class BoundRun:
    """Runs an ONNX Runtime session through IO binding: each input shape gets its own device buffers, bound
    once; a call copies into them only the inputs that changed (the prompt embeddings, fed as the same array
    at every step, are copied once), and the outputs come back from buffers bound after the shape's first run.
    With ``cuda_graph`` each shape's buffers get a graph id: ONNX Runtime captures the graph on that shape's
    first runs and replays it after, which needs the buffers to keep their addresses: inputs are updated in
    place, never rebound, and the outputs stay bound to the buffers of the shape's first run."""

    def __init__(self, ort, sess, device: str, outputs: list[str], cuda_graph: bool):
        self.ort, self.sess, self.outputs, self.cuda_graph = ort, sess, outputs, cuda_graph
        self.device_type = {"cpu": "cpu", "cuda": "cuda", "dml": "dml"}[device]
        self.slots: dict[tuple, dict[str, Any]] = {}
        self.lock = threading.Lock()  # a binding's buffers serve one call at a time

    def __call__(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        key = tuple(sorted((name, a.shape, str(a.dtype)) for name, a in feeds.items()))
        with self.lock:
            slot = self.slots.get(key)
            if slot is None:
                slot = self.slots[key] = self._bind(feeds, len(self.slots))
            else:
                for name, a in feeds.items():
                    if slot["fed"][name] is not a:  # the same array as last time: already on the device
                        slot["inputs"][name].update_inplace(a)
                        slot["fed"][name] = a
            self.sess.run_with_iobinding(slot["binding"], slot["run_options"])
            if slot["values"] is None:  # first run of this shape: keep the buffers ONNX Runtime allocated
                slot["values"] = slot["binding"].get_outputs()
                for name, value in zip(self.outputs, slot["values"]):
                    slot["binding"].bind_ortvalue_output(name, value)
            return [np.array(v.numpy(), copy=True) for v in slot["values"]]

    def _bind(self, feeds: dict[str, np.ndarray], graph_id: int) -> dict[str, Any]:
        binding = self.sess.io_binding()
        inputs = {}
        for name, a in feeds.items():
            inputs[name] = self.ort.OrtValue.ortvalue_from_numpy(a, self.device_type, 0)
            binding.bind_ortvalue_input(name, inputs[name])
        for name in self.outputs:
            binding.bind_output(name, self.device_type)
        run_options = self.ort.RunOptions()
        if self.cuda_graph:
            run_options.add_run_config_entry("gpu_graph_id", str(graph_id))
        return {"binding": binding, "inputs": inputs, "fed": dict(feeds), "values": None, "run_options": run_options}


def _cache_entry(options: BackendOptions, backend: str, path: Path, settings: dict[str, Any], patch: WeightPatch | None):
    if options.cache_dir is None:
        return None
    weights = path.with_suffix(".bin") if path.suffix == ".xml" else path.with_name(path.name + ".data")
    return compile_cache.entry(options.cache_dir, backend, path, [path, weights], settings,
                               patch=None if patch is None else patch.identity)


def _ort_patch(ort, so, path: Path, patch: WeightPatch) -> tuple[bytes, list[Any]]:
    """The graph to build the session from, with ``patch``'s weights handed over from memory: each patched
    initializer becomes an external-data reference that ``add_external_initializers`` fills, so ONNX Runtime's
    optimizers see the merged weights (``add_initializer`` overrides are lost to its layout and fp16 passes:
    measured with 1.32). Unpatched weights stay where they are (inline, or in the graph's .data file). Returns
    the graph's bytes and what must stay alive while the session is built."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path), load_external_data=False)
    names, values, keep = [], [], []
    for tensor in model.graph.initializer:
        if tensor.name in patch.changes:
            merged = np.ascontiguousarray(patch.apply(tensor.name, numpy_helper.to_array(tensor, str(path.parent))))
            tensor.dims[:] = merged.shape  # a token table grows by an embedding's rows
            tensor.ClearField("raw_data")
            tensor.data_location = onnx.TensorProto.EXTERNAL
            del tensor.external_data[:]
            for key, value in (("location", "edgediff-patched"), ("offset", "0"), ("length", str(merged.nbytes))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            names.append(tensor.name)
            values.append(ort.OrtValue.ortvalue_from_numpy(merged))
            keep.append(merged)
    _check_patched(path, patch, len(names))
    so.add_external_initializers(names, values)
    so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(path.parent))
    return model.SerializeToString(), keep + values


def _check_patched(path: Path, patch: WeightPatch, found: int) -> None:
    if found != len(patch.changes):
        raise ArtifactError(f"{path} lacks {len(patch.changes) - found} of the weights its weight map names "
                            f"({patch.component}/weights.json): the graph was replaced after export; re-export it")


def _ort_session(ort, path: Path, providers: list[Any], cache: compile_cache.Entry | None,
                 patch: WeightPatch | None, device: str, options: BackendOptions):
    """The session and how the cache served it: from the cache's optimized graph when it has one that is what it
    wrote ("hit"), else optimized here (with ``patch``'s weights) and saved there ("written"); "off" when there is
    no cache or it cannot be written. A save that fails (a full disk) costs a load without it and one warning; an
    entry that does not load is dropped and rebuilt, with a warning."""

    def build(save: Path | None):  # None: without the cache
        so = ort_session_options(ort, device, options)
        if save is not None:
            so.optimized_model_filepath = str(save / "model.onnx")
            so.add_session_config_entry("session.optimized_model_external_initializers_file_name", "model.onnx.data")
            so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        graph, patched = (str(path), []) if patch is None else _ort_patch(ort, so, path, patch)
        sess = ort.InferenceSession(graph, so, providers=providers)
        sess.patched_weights = patched  # ONNX Runtime may use their buffers as they are: they live with the session
        return sess

    def uncached():
        try:
            return build(None)
        except ArtifactError:
            raise
        except Exception as e:  # onnxruntime raises its own exception types per failure
            raise BackendError(f"ONNX Runtime could not load {path}: {e}") from e

    def hit(folder: Path):
        so = ort_session_options(ort, device, options)
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # it is optimized already
        return ort.InferenceSession(str(folder / "model.onnx"), so, providers=providers)

    return compile_cache.load(cache, path, hit, build, uncached, graph_errors=(ArtifactError,))


def _open_ov(path: Path, device: str, options: BackendOptions, outputs: list[str], patch: WeightPatch | None):
    core = _ov_core()
    target = OV_DEVICES[device]
    if target == "AUTO" and [d.split(".")[0] for d in core.available_devices] == ["CPU"]:
        target = "CPU"  # nothing to choose from; CPU reports its execution precision, AUTO does not
    require_device("openvino", device)
    if options.ov_precision not in OV_PRECISIONS:
        raise BackendError(f"unknown OpenVINO precision {options.ov_precision!r}; valid: {', '.join(OV_PRECISIONS)}")
    config: dict[str, Any] = {}
    if options.threads and target == "CPU":
        config["INFERENCE_NUM_THREADS"] = int(options.threads)
    if options.ov_precision != "auto":
        config["INFERENCE_PRECISION_HINT"] = options.ov_precision
    static = options.static_shapes if options.static_shapes is not None else target == "NPU"
    if static:
        batch_one = options.batch_one if options.batch_one is not None else target == "NPU"
        model = core.read_model(str(path)) if patch is None else _ov_patched(core, path, patch)
        run = StaticShapes(core, model, path, target, config, options, outputs, batch_one, cacheable=patch is None)
        names = ([set(p.get_names()) for p in model.inputs], [set(p.get_names()) for p in model.outputs])
        return run, target, _precision_words(options.ov_precision), names[0], names[1], "off"
    compiled, cached = _ov_compile(core, path if patch is None else _ov_patched(core, path, patch), path, target,
                                   config, options, {}, cacheable=patch is None)
    actual, precision = _ov_report(compiled, target)
    graph_inputs = [set(port.get_names()) for port in compiled.inputs]
    graph_outputs = [set(port.get_names()) for port in compiled.outputs]
    return _ov_requests(compiled, outputs), actual, precision, graph_inputs, graph_outputs, cached


def _ov_compile(core, source, path: Path, target: str, config: dict[str, Any], options: BackendOptions,
                shapes: dict[str, Any], cacheable: bool):
    """``source`` (the graph's path, or a model read and changed in memory) compiled for ``target``, through the
    compile cache where ``cacheable``: returns (compiled model, "hit" | "written" | "off"). As ``_ort_session``:
    a cache that cannot be written costs a compile without it and one warning, an entry that is not what the
    cache wrote or does not load is dropped and rebuilt.

    A patched graph (LoRAs merged) is compiled at each load: OpenVINO's cache finds an entry by the model it is
    given, so a hit would still need the merge, and its exported blob imported from memory loaded slower than a
    fresh compile (SD1.5 LoCon: 12.5 s vs 10.3 s; benchmarks/results/lora_load_sd15_cpu.md)."""
    settings = {"device": target, "config": config} | ({"shapes": shapes} if shapes else {})
    cache = _cache_entry(options, "openvino", path, settings, None) if cacheable else None

    def compile_with(cache_dir: Path | None):
        extra = {"CACHE_DIR": str(cache_dir)} if cache_dir is not None else {}  # OpenVINO's own model cache
        return core.compile_model(str(source) if isinstance(source, Path) else source, target, config | extra)

    def uncached():
        try:
            return compile_with(None)
        except Exception as e:  # OpenVINO raises RuntimeError subclasses with its own messages
            what = f" for the shapes {shapes}" if shapes else ""
            hint = "; this device needs static shapes: pass static_shapes=True (--static-shapes)" \
                if not shapes and "dynamic" in str(e).lower() else ""
            raise BackendError(f"OpenVINO could not compile {path} for {target}{what}: {str(e)[:600]}{hint}") from e

    return compile_cache.load(cache, path, compile_with, compile_with, uncached)


def _ov_report(compiled, target: str) -> tuple[str, str]:
    """(the devices that execute the compiled model, its execution precision) as OpenVINO reports them."""
    try:
        precision = _precision_words(str(compiled.get_property("INFERENCE_PRECISION_HINT")))
    except Exception:  # not every device reports it
        precision = "unknown"
    try:
        actual = ",".join(compiled.get_property("EXECUTION_DEVICES"))
    except Exception:
        actual = target
    return actual, precision


def _precision_words(hint: str) -> str:
    return {"<Type: 'float32'>": "f32", "<Type: 'bfloat16'>": "bf16", "<Type: 'float16'>": "f16"}.get(hint, hint)


def _ov_requests(compiled, outputs: list[str]) -> Callable[[dict[str, np.ndarray]], list[np.ndarray]]:
    """A compiled model's run function: a pool of infer requests, one per concurrent call ("Infer Request is
    busy" otherwise)."""
    idle = [compiled.create_infer_request()]
    pool_lock = threading.Lock()
    graph_outputs = [set(port.get_names()) for port in compiled.outputs]
    ports = [compiled.output(name) for name in outputs if any(name in names for names in graph_outputs)]

    def run(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        with pool_lock:
            request = idle.pop() if idle else compiled.create_infer_request()
        try:
            result = request.infer(feeds, share_inputs=True)
            return [np.array(result[port], copy=True) for port in ports]
        finally:
            with pool_lock:
                idle.append(request)

    return run


class StaticShapes:
    """An OpenVINO graph compiled for the exact shapes it is called with: reshaped to them, compiled (through
    the compile cache, one entry per shape) on the first call of each, kept for the next ``MAX_SHAPES``
    shapes in memory (least recently used dropped: each compiled copy holds its own weights).

    NPUs need it: their plugin refuses dynamic shapes (openvino issue 26357). With ``batch_one`` a batch runs
    one item at a time through a batch-1 graph, so the guided UNet batch is two calls, as OpenVINO GenAI runs
    the UNet on NPU; the items are independent, so the result equals the batched call's."""

    MAX_SHAPES = 2

    def __init__(self, core, model, path: Path, target: str, config: dict[str, Any], options: BackendOptions,
                 outputs: list[str], batch_one: bool, cacheable: bool):
        self.core, self.model, self.path, self.target = core, model, path, target
        self.config, self.options, self.outputs = config, options, outputs
        self.batch_one, self.cacheable = batch_one, cacheable
        self.compiled: dict[tuple, tuple[Any, Callable]] = {}  # shape key -> (compiled model, run), most recent last
        self.lock = threading.Lock()
        self.report: Callable[[str, str, str, float], None] = lambda actual, precision, cached, seconds: None

    def __call__(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        batch = {a.shape[0] for a in feeds.values() if a.ndim}
        if self.batch_one and batch and max(batch) > 1:
            parts = [self._run({k: v[i : i + 1] if v.ndim else v for k, v in feeds.items()})
                     for i in range(max(batch))]
            return [np.concatenate(outs) for outs in zip(*parts)]
        return self._run(feeds)

    def _run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        key = tuple(sorted((name, tuple(a.shape)) for name, a in feeds.items()))
        with self.lock:
            entry = self.compiled.pop(key, None)
            if entry is None:
                entry = self._compile(dict(key))
            self.compiled[key] = entry
            while len(self.compiled) > self.MAX_SHAPES:
                self.compiled.pop(next(iter(self.compiled)))
        return entry[1](feeds)

    def _compile(self, shapes: dict[str, tuple[int, ...]]):
        import openvino as ov

        t0 = time.perf_counter()
        model = self.model.clone()
        model.reshape({name: ov.PartialShape(list(shape)) for name, shape in shapes.items()})
        compiled, cached = _ov_compile(self.core, model, self.path, self.target, self.config, self.options,
                                       {k: list(v) for k, v in shapes.items()}, self.cacheable)
        actual, precision = _ov_report(compiled, self.target)
        self.report(actual, precision, cached, time.perf_counter() - t0)
        return compiled, _ov_requests(compiled, self.outputs)

    def compiled_shapes(self) -> list[dict[str, tuple[int, ...]]]:
        """The shapes compiled now, least recently used first."""
        with self.lock:
            return [dict(key) for key in self.compiled]


def _ov_patched(core, path: Path, patch: WeightPatch):
    """The graph read by OpenVINO with ``patch``'s weights: each named Constant (OpenVINO keeps the ONNX
    initializer's name) replaced by one holding the merged weight."""
    import openvino as ov

    model = core.read_model(str(path))
    found = 0
    for op in model.get_ops():
        name = op.get_friendly_name()
        if op.get_type_name() != "Constant" or name not in patch.changes:
            continue
        merged = np.ascontiguousarray(patch.apply(name, op.get_data()))
        # shares the array's memory (OpenVINO holds a reference to it for as long as it needs it): no copy
        replacement = ov.op.Constant(merged, shared_memory=True)
        replacement.set_friendly_name(name)
        for target in list(op.output(0).get_target_inputs()):
            target.replace_source_output(replacement.output(0))
        found += 1
    _check_patched(path, patch, found)
    model.validate_nodes_and_infer_types()  # a token table may have grown by an embedding's rows
    return model


_CORE = None


def _ov_core():
    global _CORE
    if _CORE is None:
        import openvino as ov

        _CORE = ov.Core()
    return _CORE


def available_devices() -> dict[str, Any]:
    """What each installed backend can run on, for ``edgediff info``."""
    info: dict[str, Any] = {}
    if "onnxruntime" in installed_backends():
        import onnxruntime as ort

        info["onnxruntime"] = {"version": ort.__version__, "providers": ort.get_available_providers()}
    if "openvino" in installed_backends():
        import openvino as ov

        core = _ov_core()
        info["openvino"] = {
            "version": ov.__version__,
            "devices": {d: core.get_property(d, "FULL_DEVICE_NAME") for d in core.available_devices},
        }
    return info


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
