"""ESRGAN-family upscalers: checkpoints in Real-ESRGAN's published layout load, export to ONNX and match
PyTorch on both backends; tiles blend without seams; bad files and scales are refused by name."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from PIL import Image

from edgediff.export.upscaler import build, random_checkpoint
from edgediff.runtime.metrics import psnr
from edgediff.runtime.upscale import Upscaler, UpscalerError, upscale_tiled

from .conftest import run_cli


def test_random_checkpoints_have_the_published_layout():
    """Names and shapes of RealESRGAN_x4plus.pth and realesr-general-x4v3.pth, as published."""
    x4 = random_checkpoint("realesrgan-x4plus")
    assert x4["conv_first.weight"].shape == (64, 3, 3, 3) and x4["body.22.rdb3.conv5.weight"].shape == (64, 192, 3, 3)
    assert x4["body.0.rdb1.conv1.weight"].shape == (32, 64, 3, 3) and "body.23.rdb1.conv1.weight" not in x4
    assert random_checkpoint("realesrgan-x2plus")["conv_first.weight"].shape == (64, 12, 3, 3)
    general = random_checkpoint("realesr-general-x4v3")
    assert general["body.0.weight"].shape == (64, 3, 3, 3) and general["body.1.weight"].shape == (64,)
    assert general["body.66.weight"].shape == (48, 64, 3, 3) and "body.67.weight" not in general
    for name in ("realesrgan-x4plus", "realesr-general-x4v3"):
        build(random_checkpoint(name), name)  # loads strictly


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("upscalers")
    out = {}
    for name, state, form in (("rrdb-x4", random_checkpoint("tiny-rrdb-x4"), "pth"),
                              ("rrdb-x2", random_checkpoint("tiny-rrdb-x2"), "safetensors"),
                              ("srvgg-x4", random_checkpoint("tiny-srvgg-x4"), "safetensors")):
        path = root / f"{name}.{form}"
        if form == "pth":
            torch.save({"params_ema": state}, path)  # Real-ESRGAN's wrapper
        else:
            save_file(state, str(path))
        r = run_cli("export-upscaler", str(path), str(root / name))
        assert r.exit_code == 0, r.output
        out[name] = (root / name, state)
    return out


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
@pytest.mark.parametrize("name, arch, scale", [("rrdb-x4", "RRDBNet", 4), ("rrdb-x2", "RRDBNet", 2),
                                               ("srvgg-x4", "SRVGGNetCompact", 4)])
def test_exported_upscaler_matches_pytorch(exported, backend, name, arch, scale):
    folder, state = exported[name]
    record = json.loads((folder / "upscaler.json").read_text())
    assert (record["architecture"], record["scale"]) == (arch, scale) and record["parity_vs_torch"]["psnr_db"] >= 45
    net, _, _ = build(state, folder)
    image = np.random.default_rng(2).random((1, 3, 40, 56), dtype=np.float32)
    with torch.no_grad():
        want = net(torch.from_numpy(image)).numpy()
    up = Upscaler.load(folder, backend=backend, device="cpu")
    got = up.session(image=image)["upscaled"]
    assert got.shape == (1, 3, 40 * scale, 56 * scale)
    value = 10 * np.log10(1.0 / float(np.mean((got - want) ** 2)))
    print(f"{name} on {backend}: {value:.1f} dB vs PyTorch")
    assert value >= 45


def test_tiles_blend_without_seams(exported):
    folder, _ = exported["srvgg-x4"]
    up = Upscaler.load(folder, backend="onnxruntime", device="cpu")
    image = Image.fromarray((np.random.default_rng(3).random((100, 130, 3)) * 255).astype(np.uint8))
    whole = up.upscale(image, tile=512)
    calls = []

    def counted(x):
        calls.append(x.shape)
        return up.session(image=x)["upscaled"]

    pixels = np.asarray(image, dtype=np.float32).transpose(2, 0, 1)[None] / 255
    tiled = upscale_tiled(counted, pixels, 4, 48, 16)
    assert len(calls) > 4 and all(s[2] <= 48 and s[3] <= 48 for s in calls)
    tiled = np.clip(tiled[0].transpose(1, 2, 0) * 255 + 0.5, 0, 255).astype(np.uint8)
    value = psnr(tiled, np.asarray(whole))
    print(f"tiled vs whole: {value:.1f} dB")
    assert value >= 35
    assert up.upscale(image, scale=2).size == (260, 200)  # x2 from a x4 model: resized down


def test_bad_upscalers_and_scales_are_refused(exported, tmp_path):
    folder, _ = exported["rrdb-x4"]
    with pytest.raises(UpscalerError, match="enlarges x4; a scale of 8 is not one it does"):
        Upscaler.load(folder, backend="onnxruntime", device="cpu").upscale(Image.new("RGB", (8, 8)), 8)
    from safetensors.torch import save_file

    odd = tmp_path / "swinir.safetensors"
    save_file({"layers.0.attn.qkv.weight": torch.zeros(4, 4)}, str(odd))
    r = run_cli("export-upscaler", str(odd), str(tmp_path / "out"))
    assert r.exit_code == 2 and "not an upscaler architecture edgediff knows" in r.output and "RRDBNet" in r.output
    assert not (tmp_path / "out").exists()
    pickle = tmp_path / "evil.pth"
    pickle.write_bytes(b"not a zip file")
    r = run_cli("export-upscaler", str(pickle), str(tmp_path / "out2"))
    assert r.exit_code == 2 and "cannot be read as weights" in r.output
    r = run_cli("upscale", str(odd), "--upscaler", str(folder), "-o", str(tmp_path / "u.png"))
    assert r.exit_code == 2 and "cannot read" in r.output
    r = run_cli("upscale", str(odd), "--upscaler", str(tmp_path), "-o", str(tmp_path / "u.png"))
    assert r.exit_code == 2


def test_upscale_command_writes_the_enlarged_png(exported, tmp_path):
    folder, _ = exported["rrdb-x2"]
    Image.new("RGB", (30, 20), (200, 30, 30)).save(tmp_path / "in.png")
    r = run_cli("upscale", str(tmp_path / "in.png"), "--upscaler", str(folder), "-o", str(tmp_path / "out.png"))
    assert r.exit_code == 0, r.output
    with Image.open(tmp_path / "out.png") as out:
        assert out.size == (60, 40) and "RRDBNet" in out.text["parameters"]
    r = run_cli("upscale", str(tmp_path / "in.png"), "--upscaler", str(folder), "-o", str(tmp_path / "out.png"))
    assert r.exit_code == 2 and "already exists" in r.output


def test_hires_fix_with_an_exported_upscaler(exported, tmp_path):
    folder, _ = exported["rrdb-x2"]
    out = tmp_path / "hires.png"
    r = run_cli("generate", "a red circle on a blue background", "--steps", "4", "--hires", "2",
                "--hires-upscaler", str(folder), "--backend", "onnxruntime", "-o", str(out))
    assert r.exit_code == 0, r.output
    with Image.open(out) as image:
        assert image.size == (256, 256) and "Hires upscaler: RRDBNet x2" in image.text["parameters"]
