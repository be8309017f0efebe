"""Property-based fuzzing (hypothesis): manifests mutated every way, and generate's arguments of every type.

The only outcomes allowed are success or a documented error: ``ArtifactError``
for a bad artifact, ``ValueError`` for a bad argument, ``BackendError``,
``GenerationError``. No other exception, no hang (examples and time bounded).
"""

from __future__ import annotations

import json
import math
import shutil
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from edgediff.models import default_model_path
from edgediff.runtime import ArtifactError, BackendError, GenerationError, Pipeline, load_manifest

DOCUMENTED = (ArtifactError, BackendError, GenerationError, ValueError)
pytestmark = pytest.mark.fast
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                        HealthCheck.too_slow])

# values a hostile manifest may hold anywhere: types, ranges, paths
hostile_values = st.one_of(
    st.none(), st.booleans(), st.integers(-2**70, 2**70), st.sampled_from([0, -1, 1, 3, 7, 77, 10**9, 2**63]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([float("nan"), float("inf"), 0.0, -0.0, 1e300]),
    st.text(max_size=20),
    st.sampled_from(["../outside/model.onnx", "/etc/passwd", "unet\\model.onnx", "unet/../../x.onnx", "", "float128",
                     "unet/model.onnx", "vae_decoder/model.onnx", "model.txt", "C:/x.onnx", "\x00.onnx"]),
    st.lists(st.integers(-3, 3), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)


def _paths(node, prefix=()):
    """Every key path of a JSON tree."""
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, prefix + (i,))


@pytest.fixture(scope="module")
def original():
    return json.loads((default_model_path() / "manifest.json").read_text())


@pytest.fixture(scope="module")
def fuzz_artifact(tmp_path_factory):
    dst = tmp_path_factory.mktemp("fuzz") / "artifact"
    shutil.copytree(default_model_path(), dst)
    return dst


@FUZZ
@given(data=st.data())
def test_mutated_manifests_load_or_fail_cleanly(original, fuzz_artifact, data):
    d = json.loads(json.dumps(original))
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        paths = [p for p in _paths(d) if p]
        path = data.draw(st.sampled_from(paths), label="path")
        parent = d
        for key in path[:-1]:
            parent = parent[key]
        if data.draw(st.booleans(), label="delete") and isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent[path[-1]] = data.draw(hostile_values, label="value")
    (fuzz_artifact / "manifest.json").write_text(json.dumps(d))
    t0 = time.perf_counter()
    try:
        manifest = load_manifest(fuzz_artifact)
    except ArtifactError:
        event("refused on load")
        return
    # what loads must also run, or fail with a documented error
    try:
        pipe = Pipeline.load(fuzz_artifact, backend="onnxruntime", device="cpu", manifest=manifest)
        pipe.txt2img("a red circle", steps=1, width=16, height=16)
        event("loaded and generated")
    except DOCUMENTED as e:
        event(f"loaded, then {type(e).__name__}")
    assert time.perf_counter() - t0 < 60


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.load(backend="onnxruntime", device="cpu")  # the embedded model


def _weird(*good):
    return st.one_of(st.sampled_from(good), st.sampled_from([None, True, -1, 0, "2", 2.5, float("nan"), float("inf"),
                                                             2**64, [], {}]))


generate_args = st.fixed_dictionaries({}, optional={
    "steps": _weird(1, 2, 1001, 10**9),
    "guidance": _weird(0.0, 1.0, 3.0, 1e30, 1e300, -1.0),
    "seed": _weird(0, 7, 2**64 - 1, -5),
    "width": _weird(16, 24, 7, 100000, 2**40),
    "height": _weird(16, 32, 9, 100000),
    "num_images": _weird(1, 2, 5),
    "scheduler": _weird("euler", "euler_a", "dpmpp_2m", "lcm", "karras9"),
    "rng": _weird("numpy", "torch", "cuda"),
    "latents": st.sampled_from([np.zeros((1, 4, 2, 2), np.float32), np.zeros(3), "noise"]),
    "callback": st.sampled_from([lambda done, total: None, "print", 5]),
})
prompts = st.one_of(st.text(max_size=300), st.lists(st.text(max_size=20), min_size=0, max_size=3),
                    st.sampled_from([None, 5, ["a", 3], "red circle " * 200]))
negatives = st.one_of(st.none(), st.text(max_size=20), st.lists(st.text(max_size=5), max_size=3), st.just(5))


@FUZZ
@given(prompt=prompts, negative=negatives, kwargs=generate_args)
def test_generate_arguments_succeed_or_fail_cleanly(pipe, prompt, negative, kwargs):
    t0 = time.perf_counter()
    try:
        images = pipe.txt2img(prompt, negative, **kwargs)
    except DOCUMENTED as e:
        event(type(e).__name__)
        return
    finally:
        assert time.perf_counter() - t0 < 60
    event("generated")
    per_prompt = kwargs.get("num_images", 1)
    assert len(images) == (1 if isinstance(prompt, str) else len(prompt)) * per_prompt
    size = (kwargs.get("width") or pipe.manifest.sample_size, kwargs.get("height") or pipe.manifest.sample_size)
    assert all(image.size == size for image in images)
    assert all(math.isfinite(float(np.asarray(image).mean())) for image in images)


# -- upscaler manifests (issue 24): upscaler.json's fields and values mutated ---------------------------------


@pytest.fixture(scope="module")
def fuzz_upscaler(tmp_path_factory):
    from edgediff.models import shapes_upscaler

    dst = tmp_path_factory.mktemp("fuzz-upscaler") / "upscaler"
    shutil.copytree(shapes_upscaler(), dst)
    return dst


@FUZZ
@given(data=st.data())
def test_mutated_upscaler_manifests_load_or_fail_cleanly(fuzz_upscaler, data):
    """Success (a x2 result of the right size) or UpscalerError / ArtifactError, in bounded time: a scale the
    graph does not do, a file elsewhere, any type anywhere."""
    from PIL import Image

    from edgediff.models import shapes_upscaler
    from edgediff.runtime.upscale import MANIFEST, Upscaler, UpscalerError

    d = json.loads((shapes_upscaler() / MANIFEST).read_text())
    if data.draw(st.integers(0, 9), label="whole record") == 0:
        d = data.draw(hostile_values, label="record")
    else:
        for _ in range(data.draw(st.integers(1, 3), label="mutations")):
            paths = [p for p in _paths(d) if p]
            path = data.draw(st.sampled_from(paths + [("scale",), ("file",), ("architecture",), ("extra",)]),
                             label="path")
            parent = d
            for key in path[:-1]:
                parent = parent[key] if isinstance(parent, (dict, list)) else {}
            if not isinstance(parent, (dict, list)):
                continue
            if isinstance(parent, dict) and data.draw(st.booleans(), label="delete"):
                parent.pop(path[-1], None)
            elif isinstance(parent, dict) or (isinstance(path[-1], int) and path[-1] < len(parent)):
                parent[path[-1]] = data.draw(st.one_of(hostile_values, st.integers(-3, 10)), label="value")
    (fuzz_upscaler / MANIFEST).write_text(json.dumps(d))
    scale = data.draw(st.one_of(st.none(), st.integers(-1, 5)), label="scale asked")
    t0 = time.perf_counter()
    try:
        up = Upscaler.load(fuzz_upscaler, backend="onnxruntime", device="cpu")
        result = up.upscale(Image.new("RGB", (20, 24), (200, 30, 30)), scale)
    except (UpscalerError, ArtifactError) as e:
        event(f"{type(e).__name__}: {str(e).split(':')[-1][:40]}")
        return
    finally:
        assert time.perf_counter() - t0 < 30
    event("upscaled")
    assert up.scale == 2 and result.size == (20 * (scale or 2), 24 * (scale or 2))


# -- LoRA and embedding files, prompts (issue 24): mutated safetensors headers and tensors; random prompt text --
#
# The only outcomes allowed: success, or LoraError (a ValueError: the CLI prints it as one error line) for a file,
# ValueError for a prompt; each example within the hypothesis deadline (no hang, no quadratic blow-up).

from datetime import timedelta  # noqa: E402

FILE_FUZZ = settings(max_examples=60, deadline=timedelta(seconds=10),
                     suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
LORA_FUZZ = settings(FILE_FUZZ, max_examples=200)  # a few ms each
PROMPT_FUZZ = settings(max_examples=100, deadline=timedelta(seconds=10),
                       suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
WIDTH = 48  # the embedded model's text width
hostile_names = st.one_of(
    st.text(max_size=12), st.sampled_from(["", "__metadata__", "lora_unet_", "x.alpha", "x.lora_down.weight",
                                           "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight",
                                           "unet.conv_in.lora_A.weight", "<fz>", "emb_params", "clip_l", "clip_g",
                                           "a\nb\x1b[31m", "q" * 5_000, "ircl", "a b"]))


def _base_tensors(kind: str) -> dict[str, np.ndarray]:
    """A valid file's tensors: a kohya LoRA on a UNet convolution and a text-encoder Linear, or an embedding."""
    rng = np.random.default_rng(0)
    if kind == "embedding":
        return {"<fz>": rng.standard_normal((2, WIDTH)).astype(np.float32)}
    out = {}
    for key, down, up in (("lora_unet_conv_in", (4, 4, 3, 3), (32, 4, 1, 1)),
                          ("lora_te_text_model_encoder_layers_0_mlp_fc1", (4, WIDTH), (192, 4))):
        out |= {f"{key}.lora_down.weight": rng.standard_normal(down).astype(np.float16),
                f"{key}.lora_up.weight": rng.standard_normal(up).astype(np.float32),
                f"{key}.alpha": np.array(2.0, np.float32)}
    return out


def _hostile_array(data, like: np.ndarray) -> np.ndarray:
    """``like`` damaged: NaN, infinite, empty, another rank, shape or dtype, values past float16 and float32."""
    with np.errstate(invalid="ignore", over="ignore"):
        return data.draw(st.sampled_from([
            np.full_like(like, np.nan), np.full_like(like, np.inf), np.zeros(0, like.dtype), np.array(1.0, like.dtype),
            like.reshape(-1), like[..., None], like.T.copy(), like.astype(np.int8), like.astype(np.float64),
            like.astype(bool), np.full_like(like, 3e38), np.zeros((3,), np.float32), np.zeros((2, 0), np.float32),
            np.zeros((0, WIDTH), np.float32), np.zeros((76, WIDTH), np.float32), np.zeros((1, WIDTH + 1), np.float32),
        ]), label="tensor")


adapter_metadata = st.one_of(
    st.text(max_size=30), st.sampled_from(['["unet.lora_alpha"]', '"x"', "8", "null", '{"unet.lora_alpha": NaN}',
                                           '{"unet.lora_alpha": 1e999}', '{"unet.lora_alpha": "8"}', "[" * 5_000,
                                           '{"unet.use_dora": true}', '{"unet.alpha_pattern": {"a": 1}}',
                                           '{"unet.lora_alpha": 8, "unet.use_rslora": true}',
                                           '{"text_encoder.lora_alpha": -3}']),
    st.dictionaries(st.sampled_from(["unet.lora_alpha", "text_encoder.lora_alpha", "unet.r", "x", "unet.use_rslora"]),
                    hostile_values, max_size=3).map(lambda d: json.dumps(d, default=str)))


def _safetensors(tensors: dict[str, np.ndarray], metadata: dict[str, str] | None) -> bytes:
    from safetensors.numpy import save

    return save(tensors, metadata=metadata)


def _mutated_file(data, kind: str) -> bytes:
    """A file of the kind, mutated: its tensors (values, shapes, dtypes, names), its metadata, its JSON header
    (any field any hostile value) or its raw bytes."""
    tensors = _base_tensors(kind)
    metadata = None
    for _ in range(data.draw(st.integers(0, 3), label="tensor mutations")):
        key = data.draw(st.sampled_from(sorted(tensors)), label="key")
        action = data.draw(st.sampled_from(["value", "rename", "delete", "add"]), label="action")
        if action == "value":
            tensors[key] = _hostile_array(data, tensors[key])
        elif action == "rename":
            tensors[data.draw(hostile_names, label="name")] = tensors.pop(key)
        elif action == "delete" and len(tensors) > 1:
            del tensors[key]
        elif action == "add":
            tensors[data.draw(hostile_names, label="name")] = _hostile_array(data, tensors[key])
    tensors.pop("__metadata__", None)  # not a tensor name safetensors can write
    if data.draw(st.booleans(), label="metadata"):
        metadata = {"lora_adapter_metadata": data.draw(adapter_metadata, label="adapter metadata")}
    try:
        raw = _safetensors(tensors, metadata)
    except Exception:  # safetensors refused to write it (an empty name...): start from the valid file
        raw = _safetensors(_base_tensors(kind), None)
    mode = data.draw(st.sampled_from(["as saved", "header", "bytes", "truncated"]), label="mode")
    if mode == "header":
        size = int.from_bytes(raw[:8], "little")
        header, body = json.loads(raw[8:8 + size]), raw[8 + size:]
        for _ in range(data.draw(st.integers(1, 3), label="header mutations")):
            path = data.draw(st.sampled_from([p for p in _paths(header) if p]), label="path")
            parent = header
            for key in path[:-1]:
                parent = parent[key]
            parent[path[-1]] = data.draw(hostile_values, label="value")
        text = json.dumps(header, default=str).encode()
        raw = len(text).to_bytes(8, "little") + text + body
    elif mode == "bytes":
        at = data.draw(st.integers(0, len(raw) - 1), label="at")
        raw = raw[:at] + bytes([data.draw(st.integers(0, 255), label="byte")]) + raw[at + 1:]
    elif mode == "truncated":
        raw = raw[:data.draw(st.integers(0, len(raw) - 1), label="length")]
    return raw


@pytest.fixture(scope="module")
def lora_target():
    """The embedded model's root, manifest and precision, as Pipeline.load gives them to the LoRA planner."""
    root = default_model_path()
    manifest = load_manifest(root)
    return root, manifest, {c: "fp32" for c in manifest.components}


def _apply(patches, target, rows_added: int = 0) -> None:
    """Each patch's merge run on zero weights of the shape the weight maps record (an embedding's adds rows)."""
    from edgediff.runtime.lora import weight_maps

    root, manifest, precision = target
    shapes = {init: (tuple(reversed(shape)) if layout == "transposed" else shape)
              for graphs in weight_maps(root, manifest, precision).values() for g in graphs
              for init, layout, shape in g.weights.values()}
    for patch in patches.values():
        for name in patch.changes:
            merged = patch.apply(name, np.zeros(shapes[name], np.float32))
            assert merged.shape == (shapes[name][0] + rows_added, *shapes[name][1:]) and merged.dtype == np.float32


@LORA_FUZZ
@given(data=st.data())
def test_mutated_lora_files_load_or_fail_cleanly(lora_target, tmp_path, data):
    from edgediff.runtime.lora import LoraError, LoraSpec, plan

    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(_mutated_file(data, "lora"))
    root, manifest, precision = lora_target
    try:
        _apply(plan([LoraSpec(path)], root, manifest, precision), lora_target)
    except LoraError as e:
        assert len(str(e)) < 3_000 and "\n" not in str(e), str(e)[:300]
        event("LoraError")
        return
    event("merged")


@FILE_FUZZ
@given(data=st.data())
def test_mutated_embedding_files_load_or_fail_cleanly(lora_target, tmp_path, data):
    from edgediff.runtime.embeddings import plan, read_embedding
    from edgediff.runtime.text import PromptTokenizer

    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(_mutated_file(data, "embedding"))
    root, manifest, precision = lora_target
    encoder = manifest.text_encoders[0]
    tokenizer = PromptTokenizer(root / encoder.tokenizer, encoder.max_length, encoder.pad_token_id)
    try:
        embedding = read_embedding(path, manifest)
        _apply(plan([embedding], {encoder.name: tokenizer}, root, manifest, precision), lora_target, embedding.count)
    except ValueError as e:  # LoraError, or the word already a token
        assert len(str(e)) < 3_000 and "\n" not in str(e), str(e)[:300]
        event(type(e).__name__)
        return
    ids = tokenizer.chunks(f"a {embedding.name} b").ids
    assert (ids >= 49408).sum() == embedding.count  # the word is found, as its vectors
    event("added")


PROMPT_PIECES = ["(", ")", "[", "]", "\\", ":", ":1.5)", ":0)", ":-2)", ":.5 )", ":" + "9" * 400 + ")", "BREAK",
                 " BREAK ", "BREAKFAST", "\n", "\t", "  ", ",", "a", "red circle", "<|endoftext|>", "<|startoftext|>",
                 "\udcff", "\ud800", "\x00", "é", "\U0010ffff", "\u2028", "\\(", "\\\\"]
prompt_texts = st.recursive(
    st.one_of(st.sampled_from(PROMPT_PIECES), st.text(max_size=8)),
    lambda inner: st.one_of(
        inner.map(lambda s: f"({s})"), inner.map(lambda s: f"[{s}]"),
        st.tuples(inner, st.sampled_from(["1.3", "0", "-1", "1e5", "2.", ".5", "99999"])).map(lambda t: f"({t[0]}:{t[1]})"),
        st.lists(inner, max_size=4).map(" ".join), inner.map(lambda s: s + " BREAK "),
        st.tuples(inner, st.sampled_from([2, 10, 500, 20_000])).map(lambda t: t[0] * t[1])),
    max_leaves=12)


@PROMPT_FUZZ
@given(prompt=prompt_texts, negative=st.one_of(st.none(), prompt_texts))
def test_random_prompts_encode_or_fail_cleanly(pipe, prompt, negative):
    """Nesting, weights, BREAK, escapes, invalid text and sizes past the cap: chunks of finite weights, or a
    ValueError; generation then runs."""
    try:
        chunks = pipe.tokenizer.chunks(prompt)
    except ValueError as e:
        assert "\n" not in str(e) and len(str(e)) < 1_000, str(e)[:300]
        event("refused")
        return
    assert np.isfinite(chunks.weights).all() and chunks.ids.shape[1] == 77
    assert ((chunks.ids >= 0) & (chunks.ids < 49408)).all()
    try:
        images = pipe.txt2img(prompt, negative, steps=1, width=16, height=16)
    except ValueError as e:  # the negative prompt refused
        assert negative is not None, e
        event("negative refused")
        return
    assert math.isfinite(float(np.asarray(images[0]).mean()))
    event("generated")
