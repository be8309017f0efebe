"""``fp16-cuda``: the UNet fused and converted to fp16 the way ONNX Runtime's Stable Diffusion CUDA demo does it.

ONNX Runtime's demo (``onnxruntime/transformers/models/stable_diffusion``: ``optimize_pipeline.py`` and
``ort_optimizer.py``) runs ``optimizer.optimize_model(model_type="unet", opt_level=0)`` with
``FusionOptions("unet")`` on the fp32 graph, then ``convert_float_to_float16``. The fusions, each a
``com.microsoft`` operator:

- attention: ``MultiHeadAttention`` with packed QKV (self-attention) and packed KV (cross-attention);
- ``GroupNorm`` (channels last, SiLU folded in) and ``SkipGroupNorm`` (the residual add before it);
- ``BiasSplitGelu`` (the GEGLU feed-forward) and ``BiasAdd`` (bias + residual after the transformer block);
- ``NhwcConv`` (every convolution channels last, the transposes between them merged away);
- ``LayerNormalization`` / ``SkipLayerNormalization``.

Only the CUDA execution provider has kernels for most of them (GroupNorm, SkipGroupNorm, BiasSplitGelu,
BiasAdd, NhwcConv, packed MultiHeadAttention): the variant is ``onnxruntime`` on ``cuda`` only. Where we
differ from the demo:

- inputs and outputs stay float32 (``keep_io_types=True``): the runtime feeds ``sample``, ``timestep`` and
  ``encoder_hidden_states`` as float32 and reads float32 ``out_sample`` / ``deep_feature``; the casts are two
  tiny kernels per step;
- the timestep's (and SDXL's ``time_ids``') sinusoidal projection stays fp32 up to the first linear layer, as in
  diffusers' fp16 UNet (``get_timestep_embedding`` computes in float32): ``t * freq`` at t ~ 999 loses up to
  0.25 rad in fp16;
- Constant nodes become initializers before the fp16 pass (as ``convert_fp16`` does): the converter's
  ALWAYS_FLOAT_INPUTS keeps Resize's scales fp32 only when they are initializers;
- ONNX Runtime's own graph pass saved to disk (the demo's optional ``optimize_by_ort`` / ``--inspect``) is
  left to session creation: a saved one is tied to the EP and the ORT version that wrote it;
- two bugs of ONNX Runtime 1.32's optimizer are worked around while it runs (``_optimizer_fixes``): the head
  count read that NumPy 2.4 refuses, and the removal of a graph output (SDXL's ``deep_feature``).

``convert_cpu_fused`` is the same pass with the CUDA-only fusions off and no fp16, for a CPU: its graph
runs on the CPU EP (Attention, MultiHeadAttention, Gelu, SkipLayerNormalization have CPU kernels) and must
equal the fp32 graph: it checks that the fusion pass keeps the UNet's arithmetic on our export pattern.
(tests/test_cuda_fp16.py also checks the CUDA form's fusions on a CPU: each CUDA-only operator rewritten in
standard ONNX from its spec.)
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any

import numpy as np

from edgediff.export.onnx_io import save_onnx

# the fusions only CUDA has kernels for (FusionOptions attributes), off in the CPU form
CUDA_ONLY_FUSIONS = ("enable_group_norm", "enable_skip_group_norm", "enable_bias_splitgelu", "enable_bias_add",
                     "enable_nhwc_conv", "enable_packed_qkv", "enable_packed_kv")
# inputs whose sinusoidal projections stay fp32 (the timestep up to 999, SDXL's size/crop ids up to 1024 and more)
TIME_INPUTS = ("timestep", "time_ids")
# the operators the pass makes (UnetOnnxModel.get_fused_operator_statistics, plus Gelu of the CPU form)
FUSED_OPS = ("MultiHeadAttention", "Attention", "GroupNorm", "SkipGroupNorm", "BiasSplitGelu", "BiasAdd", "NhwcConv",
             "LayerNormalization", "SkipLayerNormalization", "Gelu")


def cuda_available() -> bool:
    """ONNX Runtime here can run on a CUDA GPU: onnxruntime-gpu lists its CUDA EP even without a GPU or driver,
    so a one-node session must actually get it."""
    try:
        import onnxruntime as ort
        from onnx import TensorProto, helper
    except ImportError:
        return False
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "probe", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    try:
        if hasattr(ort, "preload_dlls"):
            ort.preload_dlls()
        so = ort.SessionOptions()
        so.log_severity_level = 4
        sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CUDAExecutionProvider"])
        return sess.get_providers()[0] == "CUDAExecutionProvider"
    except Exception:  # no device, no driver, a CUDA/cuDNN library missing
        return False


def fusion_options(cuda: bool = True):
    """The demo's ``FusionOptions("unet")`` (every UNet fusion on); ``cuda=False``: only the ones with CPU kernels."""
    from onnxruntime.transformers.fusion_options import FusionOptions

    options = FusionOptions("unet")
    if not cuda:
        for name in CUDA_ONLY_FUSIONS:
            setattr(options, name, False)
    return options


def optimize_unet(src: Path, cuda: bool = True):
    """``src``'s graph through the transformer optimizer's UNet fusions: an ``onnxruntime.transformers`` OnnxModel."""
    from onnxruntime.transformers.optimizer import optimize_model

    with _optimizer_fixes():
        m = optimize_model(str(src), model_type="unet", num_heads=0, hidden_size=0,  # both read from the graph
                           opt_level=0, optimization_options=fusion_options(cuda), use_gpu=cuda)
    produced = {o for n in m.model.graph.node for o in n.output}
    dangling = [o.name for o in m.model.graph.output if o.name not in produced]
    if dangling:
        raise RuntimeError(f"the UNet fusion pass lost the graph outputs {dangling} of {src}")
    return m


def fused_counts(model) -> dict[str, int]:
    """How many of each fused operator ``model`` (ModelProto) has, over FUSED_OPS."""
    ops = [n.op_type for n in model.graph.node]
    return {op: ops.count(op) for op in FUSED_OPS}


def convert_cuda_fp16(src: Path, dst: Path) -> dict[str, Any]:
    """Write ``src``'s UNet, fused for the CUDA EP and in fp16 with float32 inputs and outputs, to ``dst``
    (with ``<dst>.data`` beside it when over the protobuf limit); returns the method's description."""
    import onnxruntime
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST

    m = optimize_unet(src, cuda=True)
    _constants_to_initializers(m.model)
    time_proj = _timestep_projection(m.model)
    m.convert_float_to_float16(keep_io_types=True, op_block_list=list(DEFAULT_OP_BLOCK_LIST), node_block_list=time_proj)
    _save(m, dst)
    options = fusion_options(cuda=True)
    return {
        "tool": f"onnxruntime.transformers.optimizer (model_type unet, FusionOptions('unet'): ONNX Runtime "
                f"{onnxruntime.__version__}'s Stable Diffusion CUDA recipe) + convert_float_to_float16",
        "backends": ("onnxruntime",),
        "devices": ["cuda"],  # the fused kernels below exist only in the CUDA execution provider
        "weights": "fp16", "io": "fp32",
        "fused_ops": fused_counts(m.model),
        "fusions": sorted(k for k, v in vars(options).items() if k.startswith("enable_") and v is True),
        "kept_float": {"time_projection_nodes": len(time_proj)},
    }


def convert_cpu_fused(src: Path, dst: Path) -> dict[str, Any]:
    """The same pass with only the fusions that have CPU kernels, kept fp32: a graph the CPU EP runs, to check
    against ``src``. Returns its fused operator counts."""
    m = optimize_unet(src, cuda=False)
    _save(m, dst)
    return {"fused_ops": fused_counts(m.model), "devices": ["cpu", "cuda"], "weights": "fp32"}


# ---------------------------------------------------------------------------


def _save(m, dst: Path) -> None:
    m.topological_sort()
    if any(n.domain == "com.microsoft" for n in m.model.graph.node) and \
            not any(o.domain == "com.microsoft" for o in m.model.opset_import):
        m.model.opset_import.add(domain="com.microsoft", version=1)
    save_onnx(m.model, dst)


def _constants_to_initializers(model) -> None:
    from onnx import numpy_helper

    keep = []
    for node in model.graph.node:
        if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
            model.graph.initializer.append(numpy_helper.from_array(numpy_helper.to_array(node.attribute[0].t),
                                                                   node.output[0]))
        else:
            keep.append(node)
    del model.graph.node[:]
    model.graph.node.extend(keep)


def _timestep_projection(model) -> list[str]:
    """Names of the nodes from the ``timestep`` (and SDXL's ``time_ids``) input to the first linear layer
    (diffusers' ``time_proj`` / ``add_time_proj``: the broadcast, ``t * freq``, Sin, Cos, Concat), kept fp32 by
    the fp16 pass."""
    inputs = [i.name for i in model.graph.input if i.name in TIME_INPUTS]
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    seen: dict[int, Any] = {}
    frontier = list(inputs)
    while frontier:
        for node in consumers.get(frontier.pop(), []):
            if node.op_type in ("Gemm", "MatMul") or id(node) in seen:
                continue
            seen[id(node)] = node
            frontier.extend(node.output)
    return sorted(n.name for n in seen.values() if n.name)  # the fp16 pass blocks nodes by name


@contextlib.contextmanager
def _optimizer_fixes():
    """Two bugs of ONNX Runtime 1.32's UNet optimizer, fixed while we run it (and put back after):

    - FusionAttentionUnet reads the head count with ``int(array([n]))``, an error since NumPy 2.4 (TypeError:
      only 0-dimensional arrays ...): read it from the one element;
    - UnetOnnxModel.remove_useless_div drops a ``Div`` by 1 whose output is a graph output (SDXL's
      ``deep_feature``, DeepCache's feature, is a resnet's ``/ output_scale_factor``), leaving the output
      unproduced: such a Div stays.

    The optimizer imports its modules under their bare names (``onnx_model_unet``, ``fusion_attention_unet``): the
    classes to patch are the ones ``optimizer.MODEL_TYPES["unet"]`` holds, not ``onnxruntime.transformers.*``'s."""
    from onnxruntime.transformers.optimizer import MODEL_TYPES

    unet_cls = MODEL_TYPES["unet"][0]
    cls = sys.modules[unet_cls.__module__].FusionAttentionUnet
    original = cls.get_num_heads
    original_div = unet_cls.remove_useless_div

    def get_num_heads(self, reshape_q, is_torch2: bool = False) -> int:
        if is_torch2:
            parent = self.model.get_parent(reshape_q, 1)
            if parent is not None and parent.op_type == "Concat" and len(parent.input) == 4:
                value = self.model.get_constant_value(parent.input[2])
                if isinstance(value, np.ndarray) and value.size == 1 and int(value.reshape(-1)[0]) > 0:
                    return int(value.reshape(-1)[0])
            return 0
        return original(self, reshape_q, is_torch2)

    def remove_useless_div(self) -> None:
        outputs = {o.name for o in self.model.graph.output}
        useless = [n for n in self.nodes() if n.op_type == "Div" and n.output[0] not in outputs
                   and self.find_constant_input(n, 1.0) == 1]
        for node in useless:
            self.replace_input_of_all_nodes(node.output[0], node.input[0])
        if useless:
            self.remove_nodes(useless)

    cls.get_num_heads = get_num_heads
    unet_cls.remove_useless_div = remove_useless_div
    try:
        yield
    finally:
        cls.get_num_heads = original
        unet_cls.remove_useless_div = original_div
