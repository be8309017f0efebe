"""DeepCache (Ma et al., CVPR 2024): the full/shallow UNet pair equals diffusers and the authors' skip rule."""

from __future__ import annotations

import functools
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from edgediff.export.deepcache import DeepCacheFull, DeepCacheShallow, branch_ids, branch_of
from edgediff.export.recipes import RECIPES

torch.set_num_threads(1)

SDXL_TIME_IDS = 6
UNET_CONFIGS = {
    "sd1-lpb1": {**RECIPES["tiny-sd1"]["unet"], "cross_attention_dim": 32},
    "sd1-lpb2": {**RECIPES["tiny-sd1"]["unet"], "layers_per_block": 2, "cross_attention_dim": 32},
    "sd1-3blocks-lpb2": {
        "block_out_channels": (32, 32, 64), "layers_per_block": 2,
        "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        "attention_head_dim": 8, "norm_num_groups": 8, "cross_attention_dim": 32, "sample_size": 8,
    },
    "sdxl-lpb1": {**RECIPES["tiny-sdxl"]["unet"], "cross_attention_dim": 64},
    "sdxl-3blocks-lpb2": {
        "block_out_channels": (32, 32, 64), "layers_per_block": 2,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "attention_head_dim": (2, 4, 4), "transformer_layers_per_block": (1, 1, 2), "use_linear_projection": True,
        "addition_embed_type": "text_time", "addition_time_embed_dim": 8, "projection_class_embeddings_input_dim": 80,
        "norm_num_groups": 8, "cross_attention_dim": 64, "sample_size": 8,
    },
}


def build_unet(name: str, **overrides):
    """A seeded tiny UNet2DConditionModel in eval mode."""
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(**{**UNET_CONFIGS[name], **overrides}).eval()


@functools.cache
def shared_unet(name: str):
    """One tiny UNet per config for the tests that leave it untouched."""
    return build_unet(name)


def is_xl(unet) -> bool:
    """SDXL's text_time conditioning."""
    return unet.config.addition_embed_type == "text_time"


def unet_inputs(unet, batch: int, height: int, width: int, seed: int, timestep: float | None = None) -> tuple:
    """(sample, timestep, encoder_hidden_states[, text_embeds, time_ids]) for ``unet``."""
    g = torch.Generator().manual_seed(seed)
    c = unet.config
    timesteps = torch.full((batch,), timestep) if timestep is not None else torch.linspace(981.0, 21.0, batch)
    args = (torch.randn(batch, c.in_channels, height, width, generator=g), timesteps,
            torch.randn(batch, 7, c.cross_attention_dim, generator=g))
    if is_xl(unet):
        pooled = c.projection_class_embeddings_input_dim - SDXL_TIME_IDS * c.addition_time_embed_dim
        args += (torch.randn(batch, pooled, generator=g),
                 torch.tensor([[8.0 * height, 8.0 * width, 0.0, 0.0, 8.0 * height, 8.0 * width]] * batch))
    return args


def unet_sample(unet, args):
    """diffusers' own forward on ``unet_inputs``."""
    added = {"text_embeds": args[3], "time_ids": args[4]} if is_xl(unet) else None
    return unet(*args[:3], added_cond_kwargs=added).sample


def rel_err(actual, expected) -> float:
    """max |actual - expected| / max |expected|."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


@pytest.mark.parametrize("size", [(9, 11), (8, 12)], ids=["odd", "even"])
@pytest.mark.parametrize("name", list(UNET_CONFIGS))
def test_full_then_shallow_is_the_unet(name, size):
    unet = shared_unet(name)
    args = unet_inputs(unet, 2, *size, seed=1)
    with torch.no_grad():
        expected = unet_sample(unet, args)
        for branch in branch_ids(unet):
            out, feature = DeepCacheFull(unet, branch)(*args)
            shallow = DeepCacheShallow(unet, branch)(*args, feature)
            assert torch.equal(out, expected), branch
            assert rel_err(shallow, out) < 1e-5, branch


def test_branch_ids_follow_the_up_blocks():
    assert branch_ids(shared_unet("sd1-lpb1")) == [0, 1, 3, 4]
    assert branch_ids(shared_unet("sd1-3blocks-lpb2")) == list(range(9))
    assert branch_of(shared_unet("sd1-3blocks-lpb2"), 7) == (2, 1)


@pytest.mark.parametrize("branch, match", [
    (2, r"layer 2 % 3 = 2 must be in \[0, 2\).*valid ids: \[0, 1, 3, 4\]"),
    (6, r"block 6 // 3 = 2 must be in \[0, 2\)"),
    (-1, r"block -1 // 3 = -1"),
    ("1", "must be an int"),
    (True, "must be an int"),
])
def test_branch_of_names_the_accepted_range(branch, match):
    with pytest.raises(ValueError, match=match):
        branch_of(shared_unet("sd1-lpb1"), branch)


@pytest.mark.parametrize("overrides, match", [
    ({"center_input_sample": True}, "center_input_sample"),
    ({"class_embed_type": "timestep"}, "class embedding"),
    ({"num_class_embeds": 10}, "class embedding"),
    ({"encoder_hid_dim": 16}, "encoder_hid_proj"),
    ({"addition_embed_type": "text"}, "addition_embed_type='text'"),
])
@pytest.mark.parametrize("module", [DeepCacheFull, DeepCacheShallow])
def test_unreplicated_features_are_refused(module, overrides, match):
    with pytest.raises(NotImplementedError, match=match):
        module(build_unet("sd1-lpb1", **overrides), 0)


def test_freeu_is_refused_at_forward():
    unet = build_unet("sd1-lpb1")
    full = DeepCacheFull(unet, 1)
    unet.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    with pytest.raises(NotImplementedError, match="FreeU"), torch.no_grad():
        full(*unet_inputs(unet, 1, 8, 8, seed=0))


def test_only_the_shallow_branch_blocks_must_be_replicated():
    unet = build_unet("sd1-lpb1", down_block_types=("CrossAttnDownBlock2D", "ResnetDownsampleBlock2D"),
                      up_block_types=("ResnetUpsampleBlock2D", "CrossAttnUpBlock2D"))
    DeepCacheShallow(unet, 1)
    with pytest.raises(NotImplementedError, match="ResnetDownsampleBlock2D in the shallow branch"):
        DeepCacheShallow(unet, 3)


def test_conditioning_inputs_are_checked():
    sd1, xl = shared_unet("sd1-lpb1"), shared_unet("sdxl-lpb1")
    sd1_args, xl_args = unet_inputs(sd1, 1, 8, 8, seed=0), unet_inputs(xl, 1, 8, 8, seed=0)
    with torch.no_grad():
        with pytest.raises(TypeError, match="pass text_embeds and time_ids"):
            DeepCacheFull(xl, 0)(*xl_args[:3])
        with pytest.raises(TypeError, match="takes neither"):
            DeepCacheFull(sd1, 0)(*sd1_args, *xl_args[3:])
        _, feature = DeepCacheFull(xl, 0)(*xl_args)
        with pytest.raises(TypeError, match=r"takes 3 inputs \(text_embeds, time_ids, deep_feature\), got 1"):
            DeepCacheShallow(xl, 0)(*xl_args[:3], feature)


class SkipRuleReference:
    """DeepCache's (Ma et al., CVPR 2024) skip rule as forward hooks that return cached module outputs."""

    def __init__(self, unet, cache_interval: int, cache_branch_id: int):
        self.unet, self.cache_interval = unet, cache_interval
        self.block, self.layer = divmod(cache_branch_id, 3)
        self.step, self.cached = 0, {}
        self.handles = [module.register_forward_hook(self._hook(key)) for key, module in self._units()]

    def _units(self):
        """(kind, block, layer, name) and module of every unit the rule caches, up blocks counted from the output."""
        unet = self.unet
        for b, down in enumerate(unet.down_blocks):
            yield from ((("down", b, i, "resnet"), m) for i, m in enumerate(down.resnets))
            yield from ((("down", b, i, "attention"), m) for i, m in enumerate(getattr(down, "attentions", [])))
            yield from ((("down", b, len(down.resnets), "downsampler"), m) for m in down.downsamplers or [])
            yield ("down", b, 0, "block"), down
        yield ("mid", 0, 0, "block"), unet.mid_block
        n_up = len(unet.up_blocks)
        for i, up in enumerate(unet.up_blocks):
            b, n_layers = n_up - 1 - i, len(up.resnets)
            yield from ((("up", b, n_layers - 1 - j, "resnet"), m) for j, m in enumerate(up.resnets))
            attentions = getattr(up, "attentions", [])
            yield from ((("up", b, n_layers - 1 - j, "attention"), m) for j, m in enumerate(attentions))
            yield from ((("up", b, 0, "upsampler"), m) for m in up.upsamplers or [])
            yield ("up", b, 0, "block"), up

    def _skipped(self, kind: str, block: int, layer: int) -> bool:
        if self.step % self.cache_interval == 0:
            return False
        if kind == "mid" or block > self.block:
            return True
        if block < self.block:
            return False
        return layer >= self.layer if kind == "down" else layer > self.layer

    def _hook(self, key):
        def hook(module, args, output):
            if self._skipped(*key[:3]):
                return self.cached[key]
            self.cached[key] = output
        return hook

    def __call__(self, args):
        out = unet_sample(self.unet, args)
        self.step += 1
        return out

    def remove(self):
        for handle in self.handles:
            handle.remove()


CACHE_INTERVAL = 3
TIMESTEPS = [981.0, 761.0, 541.0, 321.0, 101.0]  # full UNet at steps 0 and 3, the shallow branch at 1, 2 and 4


def step_inputs(unet) -> list[tuple]:
    """One batch-1 input per denoising step, each with its own latent and timestep."""
    return [unet_inputs(unet, 1, 9, 11, seed=10 + s, timestep=t) for s, t in enumerate(TIMESTEPS)]


def full_and_shallow_run(unet, branch: int, steps: list[tuple]) -> list:
    """DeepCacheFull every CACHE_INTERVAL steps, DeepCacheShallow fed its last feature in between."""
    full, shallow = DeepCacheFull(unet, branch), DeepCacheShallow(unet, branch)
    outs = []
    for s, args in enumerate(steps):
        if s % CACHE_INTERVAL == 0:
            out, feature = full(*args)
        else:
            out = shallow(*args, feature)
        outs.append(out)
    return outs


def reference_run(unet, branch: int, steps: list[tuple]) -> list:
    """The UNet under SkipRuleReference, one call per step."""
    reference = SkipRuleReference(unet, CACHE_INTERVAL, branch)
    try:
        return [reference(args) for args in steps]
    finally:
        reference.remove()


@pytest.mark.parametrize("name", ["sd1-3blocks-lpb2", "sdxl-3blocks-lpb2"])
def test_decomposition_follows_the_skip_rule(name):
    unet = shared_unet(name)
    steps = step_inputs(unet)
    with torch.no_grad():
        fresh = [unet_sample(unet, args) for args in steps]
        for branch in branch_ids(unet):
            expected = reference_run(unet, branch, steps)
            for s, (out, ref) in enumerate(zip(full_and_shallow_run(unet, branch, steps), expected)):
                assert rel_err(out, ref) < 1e-5, (branch, s)
                cached_step = s % CACHE_INTERVAL != 0
                assert (rel_err(ref, fresh[s]) > 1e-3) == cached_step, (branch, s)


@pytest.mark.parametrize("branch", [0, 1, 3, 5, 8])
def test_deepcache_library_agrees(branch):
    deepcache = pytest.importorskip("DeepCache")  # .ci/run installs the authors' helper (deepcache 0.1.1, --no-deps)
    unet = build_unet("sd1-3blocks-lpb2")  # the library rebinds its modules' forward
    steps = step_inputs(unet)
    pipe = SimpleNamespace(unet=unet, scheduler=SimpleNamespace(timesteps=TIMESTEPS))
    helper = deepcache.DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=CACHE_INTERVAL, cache_branch_id=branch)
    with torch.no_grad():
        helper.enable()
        try:
            library = [unet_sample(unet, args) for args in steps]
        finally:
            helper.disable()
        reference = reference_run(unet, branch, steps)
        decomposed = full_and_shallow_run(unet, branch, steps)
    for s in range(len(TIMESTEPS)):
        assert rel_err(reference[s], library[s]) < 1e-5, s
        assert rel_err(decomposed[s], library[s]) < 1e-5, s


ONNX_INPUTS = ("sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids")
ONNX_AXES = {"sample": {0: "batch", 2: "height", 3: "width"}, "timestep": {0: "batch"},
             "encoder_hidden_states": {0: "batch"}, "text_embeds": {0: "batch"}, "time_ids": {0: "batch"},
             "out_sample": {0: "batch", 2: "height", 3: "width"},
             "deep_feature": {0: "batch", 2: "feature_height", 3: "feature_width"}}


def export_onnx(module, args, input_names, output_names, path):
    """torch.onnx's TorchScript exporter at opset 17, batch and spatial axes dynamic."""
    torch.onnx.export(module, args, str(path), dynamo=False, opset_version=17, input_names=input_names,
                      output_names=output_names, dynamic_axes={k: ONNX_AXES[k] for k in input_names + output_names})


@pytest.mark.parametrize("name, branch", [("sd1-3blocks-lpb2", 4), ("sdxl-lpb1", 3)])
def test_onnx_export_runs_at_other_sizes(name, branch, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    unet = shared_unet(name)
    full, shallow = DeepCacheFull(unet, branch), DeepCacheShallow(unet, branch)
    conditioning = list(ONNX_INPUTS[:5 if is_xl(unet) else 3])
    args = unet_inputs(unet, 2, 9, 11, seed=3)
    with torch.no_grad():
        _, feature = full(*args)
        export_onnx(full, args, conditioning, ["out_sample", "deep_feature"], tmp_path / "full.onnx")
        export_onnx(shallow, args + (feature,), conditioning + ["deep_feature"], ["out_sample"],
                    tmp_path / "shallow.onnx")
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    full_session = ort.InferenceSession(str(tmp_path / "full.onnx"), options, providers=["CPUExecutionProvider"])
    shallow_session = ort.InferenceSession(str(tmp_path / "shallow.onnx"), options, providers=["CPUExecutionProvider"])
    for batch, height, width in [(1, 12, 16), (3, 13, 10)]:
        args = unet_inputs(unet, batch, height, width, seed=4)
        with torch.no_grad():
            out, feature = full(*args)
            shallow_out = shallow(*args, feature)
        feeds = {k: v.numpy() for k, v in zip(conditioning, args)}
        onnx_out, onnx_feature = full_session.run(None, feeds)
        onnx_shallow_out, = shallow_session.run(None, {**feeds, "deep_feature": onnx_feature})
        assert rel_err(onnx_out, out) < 1e-4
        assert rel_err(onnx_feature, feature) < 1e-4
        assert rel_err(onnx_shallow_out, shallow_out) < 1e-4
