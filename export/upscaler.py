"""``edgediff export-upscaler FILE OUT``: an ESRGAN-family upscaler, exported to ONNX once.

Accepted: Real-ESRGAN's ``RRDBNet`` (RealESRGAN_x4plus, x2plus, and ESRGAN models saved with its key names)
and the compact ``SRVGGNetCompact`` (realesr-general-x4v3, realesr-animevideov3), as ``.safetensors`` or
``.pth`` (read with ``torch.load(weights_only=True)``: a pickle that would run code is refused). The
architecture, its width and depth and the scale are read from the tensors' names and shapes, as spandrel
(the library ComfyUI loads these with) does; spandrel itself is not used because it imports torchvision at
import time, and a torchvision wheel would replace the pinned CPU torch. The two networks are written out
here after Real-ESRGAN's ``basicsr`` definitions, parameter names kept, so a checkpoint loads strictly.

The folder written: ``upscaler.onnx`` (input ``image``: float32 NCHW RGB in [0, 1], any height and width;
output ``upscaled``) and ``upscaler.json`` (architecture, scale, parity against PyTorch).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from edgediff.runtime.upscale import MANIFEST, UpscalerError

ARCHITECTURES = ("RRDBNet (Real-ESRGAN x4plus / x2plus, ESRGAN)", "SRVGGNetCompact (realesr-general / animevideo)")
OPSET = 17


def read_state_dict(path: Path) -> dict[str, Any]:
    """The checkpoint's tensors: safetensors, or a .pth read with ``weights_only`` (Real-ESRGAN wraps its
    weights in ``params_ema`` / ``params``)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise UpscalerError(f"{path}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        elif path.suffix in (".pth", ".pt", ".ckpt", ".bin"):
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        else:
            raise UpscalerError(f"{path}: an upscaler is a .safetensors or .pth file")
    except UpscalerError:
        raise
    except Exception as e:  # safetensors / torch raise their own types for a damaged or unsafe file
        raise UpscalerError(f"{path} cannot be read as weights ({type(e).__name__}: {str(e)[:300]}); a .pth is read "
                            "with weights_only (no pickled code)") from e
    for wrapper in ("params_ema", "params", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UpscalerError(f"{path} holds no tensors by name")
    return state


def build(state: dict[str, Any], path: Path):
    """(torch module with the weights loaded, architecture name, scale) for a state dict of an accepted
    architecture; UpscalerError naming the accepted ones otherwise."""
    if "conv_first.weight" in state and "conv_body.weight" in state:
        net, arch = _rrdbnet(state), "RRDBNet"
    elif "body.0.weight" in state and any(re.fullmatch(r"body\.\d+\.weight", k) for k in state):
        net, arch = _srvgg(state), "SRVGGNetCompact"
    else:
        keys = ", ".join(sorted(state)[:6])
        raise UpscalerError(f"{path} is not an upscaler architecture edgediff knows (its tensors start {keys}); "
                            f"accepted: {'; '.join(ARCHITECTURES)}")
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise UpscalerError(f"{path} looks like {arch} but its tensors do not fit it: {str(e)[:300]}") from e
    return net.eval(), arch, net.scale


def export_upscaler(src: str | Path | None, out: str | Path, random_weights: str | None = None) -> dict[str, Any]:
    """Export ``src`` (or the recipe ``random_weights`` with seeded random weights) to ``out``, a new folder;
    returns the manifest written."""
    import torch

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UpscalerError(f"{out} exists and is not an empty folder; give a new folder")
    if (src is None) == (random_weights is None):
        raise UpscalerError("give an upscaler file, or --random-weights with a recipe name")
    src = Path(src) if src is not None else Path(f"random:{random_weights}")
    state = random_checkpoint(random_weights) if random_weights else read_state_dict(src)
    net, arch, scale = build(state, src)
    out.mkdir(parents=True, exist_ok=True)
    sample = torch.rand(1, 3, 48, 40, generator=torch.Generator().manual_seed(0))
    onnx_path = out / "upscaler.onnx"
    partial = out / "upscaler.partial.onnx"
    with torch.no_grad():
        torch.onnx.export(net, (sample,), str(partial), dynamo=False, opset_version=OPSET, input_names=["image"],
                          output_names=["upscaled"],
                          dynamic_axes={"image": {0: "batch", 2: "height", 3: "width"},
                                        "upscaled": {0: "batch", 2: "out_height", 3: "out_width"}})
        expected = net(sample).numpy()
    import onnxruntime as ort

    got = ort.InferenceSession(str(partial), providers=["CPUExecutionProvider"]).run(None, {"image": sample.numpy()})[0]
    mse = float(np.mean((got - expected) ** 2))
    parity = {"psnr_db": round(10 * np.log10(1.0 / max(mse, 1e-20)), 1), "max_abs_err": float(np.abs(got - expected).max())}
    partial.rename(onnx_path)
    manifest = {"format": "edgediff-upscaler", "format_version": 1, "architecture": arch, "scale": scale,
                "file": onnx_path.name, "source": str(src), "random_weights": random_weights is not None,
                "parameters": sum(p.numel() for p in net.parameters()),
                "parity_vs_torch": parity}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


# -- architecture-exact random checkpoints (latency without downloads; tests) ------------------------------------

# name -> (architecture, scale, width, depth): RRDBNet depth = RRDB blocks (growth = width / 2), SRVGG depth =
# middle convolutions (PReLU activations), as the published Real-ESRGAN models are built
RECIPES = {
    "realesrgan-x4plus": ("RRDBNet", 4, 64, 23),
    "realesrgan-x2plus": ("RRDBNet", 2, 64, 23),
    "realesr-general-x4v3": ("SRVGGNetCompact", 4, 64, 32),
    "realesr-animevideov3": ("SRVGGNetCompact", 4, 64, 16),
    "tiny-rrdb-x4": ("RRDBNet", 4, 8, 2),
    "tiny-rrdb-x2": ("RRDBNet", 2, 8, 2),
    "tiny-srvgg-x4": ("SRVGGNetCompact", 4, 8, 2),
    "shapes-x2": ("SRVGGNetCompact", 2, 32, 8),  # the embedded model's upscaler (models/shapes/training)
}


def random_checkpoint(name: str, seed: int = 0) -> dict[str, Any]:
    """Seeded random weights under the key names and shapes of basicsr's checkpoints for recipe ``name``
    (RealESRGAN_x4plus.pth's ``params_ema``; realesr-general-x4v3.pth's ``params``)."""
    import torch

    if name not in RECIPES:
        raise UpscalerError(f"unknown upscaler recipe {name!r}; known: {', '.join(RECIPES)}")
    arch, scale, feat, depth = RECIPES[name]
    g = torch.Generator().manual_seed(seed)
    state: dict[str, Any] = {}

    def conv(key: str, cin: int, cout: int) -> None:
        state[f"{key}.weight"] = torch.randn(cout, cin, 3, 3, generator=g) * (0.5 / (cin * 9) ** 0.5)
        state[f"{key}.bias"] = torch.zeros(cout)

    if arch == "RRDBNet":
        grow = feat // 2
        conv("conv_first", {4: 3, 2: 12, 1: 48}[scale], feat)
        for b in range(depth):
            for r in (1, 2, 3):
                for i in range(5):
                    conv(f"body.{b}.rdb{r}.conv{i + 1}", feat + i * grow, feat if i == 4 else grow)
        for key in ("conv_body", "conv_up1", "conv_up2", "conv_hr"):
            conv(key, feat, feat)
        conv("conv_last", feat, 3)
        return state
    index = 0
    for k in range(depth + 2):
        conv(f"body.{index}", 3 if k == 0 else feat, 3 * scale * scale if k == depth + 1 else feat)
        index += 1
        if k <= depth:
            state[f"body.{index}.weight"] = torch.full((feat,), 0.25)  # PReLU
            index += 1
    return state


# -- the two networks, after basicsr/archs (rrdbnet_arch.py, srvgg_arch.py), parameter names kept --------------


def _rrdbnet(state: dict[str, Any]):
    import torch
    from torch import nn
    from torch.nn import functional as F

    num_in = state["conv_first.weight"].shape[1]
    scale = {3: 4, 12: 2, 48: 1}.get(int(num_in))
    if scale is None:
        raise UpscalerError(f"RRDBNet with {num_in} input channels: accepted 3 (x4), 12 (x2) or 48 (x1)")
    num_feat = int(state["conv_first.weight"].shape[0])
    num_grow = int(state["body.0.rdb1.conv1.weight"].shape[0])
    num_block = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"body\.(\d+)\.", k)))

    class ResidualDenseBlock(nn.Module):
        def __init__(self):
            super().__init__()
            for i in range(5):
                out = num_feat if i == 4 else num_grow
                setattr(self, f"conv{i + 1}", nn.Conv2d(num_feat + i * num_grow, out, 3, 1, 1))
            self.lrelu = nn.LeakyReLU(negative_slope=0.2, inplace=True)

        def forward(self, x):
            features = [x]
            for i in range(4):
                features.append(self.lrelu(getattr(self, f"conv{i + 1}")(torch.cat(features, 1))))
            return self.conv5(torch.cat(features, 1)) * 0.2 + x

    class RRDB(nn.Module):
        def __init__(self):
            super().__init__()
            self.rdb1, self.rdb2, self.rdb3 = ResidualDenseBlock(), ResidualDenseBlock(), ResidualDenseBlock()

        def forward(self, x):
            return self.rdb3(self.rdb2(self.rdb1(x))) * 0.2 + x

    class RRDBNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = scale
            self.conv_first = nn.Conv2d(num_in, num_feat, 3, 1, 1)
            self.body = nn.Sequential(*[RRDB() for _ in range(num_block)])
            self.conv_body = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
            self.conv_up1 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
            self.conv_up2 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
            self.conv_hr = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
            self.conv_last = nn.Conv2d(num_feat, 3, 3, 1, 1)
            self.lrelu = nn.LeakyReLU(negative_slope=0.2, inplace=True)

        def forward(self, x):
            if scale < 4:  # x2 / x1 models see the image folded into channels (basicsr's pixel_unshuffle)
                x = F.pixel_unshuffle(x, 4 // scale)
            feat = self.conv_first(x)
            feat = feat + self.conv_body(self.body(feat))
            feat = self.lrelu(self.conv_up1(F.interpolate(feat, scale_factor=2.0, mode="nearest")))
            feat = self.lrelu(self.conv_up2(F.interpolate(feat, scale_factor=2.0, mode="nearest")))
            return self.conv_last(self.lrelu(self.conv_hr(feat)))

    return RRDBNet()


def _srvgg(state: dict[str, Any]):
    from torch import nn

    convs = sorted(int(m.group(1)) for k in state if (m := re.fullmatch(r"body\.(\d+)\.weight", k))
                   and state[k].ndim == 4)
    num_feat = int(state["body.0.weight"].shape[0])
    out_channels = int(state[f"body.{convs[-1]}.weight"].shape[0])
    scale = int(round((out_channels / 3) ** 0.5))
    if scale * scale * 3 != out_channels:
        raise UpscalerError(f"SRVGGNetCompact whose last convolution gives {out_channels} channels: not 3 x scale^2")
    prelu = "body.1.weight" in state and state["body.1.weight"].ndim == 1
    num_conv = len(convs) - 2

    class SRVGGNetCompact(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = scale
            layers = [nn.Conv2d(3, num_feat, 3, 1, 1), _act()]
            for _ in range(num_conv):
                layers += [nn.Conv2d(num_feat, num_feat, 3, 1, 1), _act()]
            layers.append(nn.Conv2d(num_feat, out_channels, 3, 1, 1))
            self.body = nn.ModuleList(layers)
            self.upsampler = nn.PixelShuffle(scale)

        def forward(self, x):
            out = x
            for layer in self.body:
                out = layer(out)
            return self.upsampler(out) + nn.functional.interpolate(x, scale_factor=float(scale), mode="nearest")

    def _act():
        return nn.PReLU(num_parameters=num_feat) if prelu else nn.LeakyReLU(negative_slope=0.1, inplace=True)

    return SRVGGNetCompact()
