"""Backends behind one narrow interface: ``open_session(path, spec, device, options)``.

A ``Session`` is called with named numpy arrays and returns a dict of named
arrays. Both backends read the same ONNX files. Device strings live here and
nowhere else; the pipeline never branches on the backend.

- ``onnxruntime``: devices ``cpu``, ``cuda``, ``dml`` (execution providers).
- ``openvino``: devices ``cpu``, ``gpu``, ``npu``, ``auto`` (OpenVINO's AUTO plugin).
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
from .lora import WeightPatch
from .manifest import MODEL_SUFFIXES, ArtifactError, TensorSpec, Variant, artifact_file

BACKENDS = ("onnxruntime", "openvino")
ORT_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "dml": "DmlExecutionProvider"}
OV_DEVICES = {"cpu": "CPU", "gpu": "GPU", "npu": "NPU", "auto": "AUTO"}
OV_PRECISIONS = ("auto", "f32", "bf16", "f16")
DEVICES = ("auto", "cpu", "cuda", "dml", "gpu", "npu")


class BackendError(RuntimeError):
    """A backend or device is unavailable, or a session was fed the wrong inputs."""


@dataclass
class BackendOptions:
    threads: int | None = None  # intra-op threads; None = the backend's default
    cache_dir: Path | None = None  # the compile cache's root (edgediff.runtime.compile_cache); None: off
    ov_precision: str = "auto"  # OpenVINO inference precision hint: auto = the device's default (bf16 on AMX/AVX512-BF16 CPUs)


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
    return Session(component, variant, run, backend, actual, precision, time.perf_counter() - t0, cached)


def _names(ports: list[set[str]]) -> list[str]:
    return sorted(min(names) if names else "?" for names in ports)


def _open_ort(path: Path, device: str, options: BackendOptions, outputs: list[str], patch: WeightPatch | None):
    import onnxruntime as ort

    provider = ORT_PROVIDERS[device]
    available = ort.get_available_providers()
    if provider not in available:
        raise BackendError(
            f"ONNX Runtime here has no {provider} (device {device!r}); available: {', '.join(available)}. "
            "Install onnxruntime-gpu for cuda or onnxruntime-directml for dml (not together with onnxruntime)"
        )
    if device == "cuda" and hasattr(ort, "preload_dlls"):
        ort.preload_dlls()
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if options.threads:
        so.intra_op_num_threads = options.threads
    so.log_severity_level = 4  # errors reach the user once, as our BackendError, not also as ONNX Runtime's log line
    providers = [provider] if device == "cpu" else [provider, "CPUExecutionProvider"]
    cache = _cache_entry(options, "onnxruntime", path, {"device": device}, patch) \
        if device == "cpu" else None  # CUDA/DirectML graphs are not saved: EP-specific fusions
    sess, cached = _ort_session(ort, path, so, providers, cache, patch)
    used = sess.get_providers()[0]
    if used != provider:
        raise BackendError(f"ONNX Runtime fell back to {used} for {path.parent.name} although {provider} was asked for")
    graph_inputs = [{i.name} for i in sess.get_inputs()]
    graph_outputs = [{o.name} for o in sess.get_outputs()]
    return (lambda feeds: sess.run(outputs, feeds)), used, "f32", graph_inputs, graph_outputs, cached


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


def _ort_session(ort, path: Path, so, providers: list[str], cache, patch: WeightPatch | None):
    """The session and how the cache served it: from the cache's optimized graph when it has one ("hit"), else
    optimized here (with ``patch``'s weights) and saved there ("written"; "off" when there is no cache or it
    cannot be written)."""
    if cache is not None and cache.ready:
        cached = ort.SessionOptions()
        for name in ("intra_op_num_threads", "log_severity_level"):
            setattr(cached, name, getattr(so, name))
        cached.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # it is optimized already
        try:
            return ort.InferenceSession(str(cache.folder / "model.onnx"), cached, providers=providers), "hit"
        except Exception as e:  # a damaged entry: rebuilt below from the artifact's graph
            warnings.warn(f"the compile cache's copy of {path} ({cache.folder}) does not load ({str(e)[:200]}); "
                          "rebuilding it", stacklevel=5)
            cache.discard(cache.folder)
    staging = cache.staging() if cache is not None else None
    if staging is not None:
        so.optimized_model_filepath = str(staging / "model.onnx")
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", "model.onnx.data")
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    graph, patched = (str(path), []) if patch is None else _ort_patch(ort, so, path, patch)
    try:
        sess = ort.InferenceSession(graph, so, providers=providers)
        sess.patched_weights = patched  # ONNX Runtime may use their buffers as they are: they live with the session
    except Exception as e:  # onnxruntime raises its own exception types per failure
        if staging is not None:
            cache.discard(staging)
        raise BackendError(f"ONNX Runtime could not load {path}: {e}") from e
    if staging is None:
        return sess, "off"
    return sess, "written" if cache.commit(staging) else "off"


def _open_ov(path: Path, device: str, options: BackendOptions, outputs: list[str], patch: WeightPatch | None):
    core = _ov_core()
    target = OV_DEVICES[device]
    if target == "AUTO" and [d.split(".")[0] for d in core.available_devices] == ["CPU"]:
        target = "CPU"  # nothing to choose from; CPU reports its execution precision, AUTO does not
    if target != "AUTO" and target not in {d.split(".")[0] for d in core.available_devices}:
        raise BackendError(
            f"OpenVINO has no {target} device here; available: {', '.join(core.available_devices)}"
        )
    if options.ov_precision not in OV_PRECISIONS:
        raise BackendError(f"unknown OpenVINO precision {options.ov_precision!r}; valid: {', '.join(OV_PRECISIONS)}")
    config: dict[str, Any] = {}
    if options.threads and target == "CPU":
        config["INFERENCE_NUM_THREADS"] = int(options.threads)
    if options.ov_precision != "auto":
        config["INFERENCE_PRECISION_HINT"] = options.ov_precision
    # A patched graph is compiled at each load: OpenVINO's cache finds an entry by the model it is given, so a
    # hit would still need the merge, and its exported blob imported from memory loaded slower than a fresh
    # compile (SD1.5 LoCon: 12.5 s vs 10.3 s; benchmarks/results/lora_load_sd15_cpu.md)
    cache = _cache_entry(options, "openvino", path, {"device": target, "config": config}, None) \
        if patch is None else None
    hit = cache is not None and cache.ready
    staging = None if cache is None or hit else cache.staging()
    if hit or staging is not None:
        config["CACHE_DIR"] = str(cache.folder if hit else staging)  # OpenVINO's own model cache
    try:
        compiled = core.compile_model(str(path) if patch is None else _ov_patched(core, path, patch), target, config)
    except Exception as e:  # OpenVINO raises RuntimeError subclasses with its own messages
        if staging is not None:
            cache.discard(staging)
        raise BackendError(f"OpenVINO could not compile {path} for {target}: {e}") from e
    cached = "hit" if hit else "written" if staging is not None and cache.commit(staging) else "off"
    idle = [compiled.create_infer_request()]  # a pool: one request per concurrent call ("Infer Request is busy")
    pool_lock = threading.Lock()
    graph_inputs = [set(port.get_names()) for port in compiled.inputs]
    graph_outputs = [set(port.get_names()) for port in compiled.outputs]
    ports = [compiled.output(name) for name in outputs if any(name in names for names in graph_outputs)]
    try:
        precision = str(compiled.get_property("INFERENCE_PRECISION_HINT"))
    except Exception:  # not every device reports it
        precision = "unknown"
    try:
        actual = ",".join(compiled.get_property("EXECUTION_DEVICES"))
    except Exception:
        actual = target

    def run(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        with pool_lock:
            request = idle.pop() if idle else compiled.create_infer_request()
        try:
            result = request.infer(feeds, share_inputs=True)
            return [np.array(result[port], copy=True) for port in ports]
        finally:
            with pool_lock:
                idle.append(request)

    precision = {"<Type: 'float32'>": "f32", "<Type: 'bfloat16'>": "bf16", "<Type: 'float16'>": "f16"}.get(precision, precision)
    return run, actual, precision, graph_inputs, graph_outputs, cached


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
