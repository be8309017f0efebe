"""VAE tiling (edgediff.runtime.vae_tiling): diffusers' AutoencoderKL tiled_decode / tiled_encode without torch.

Fast tier (torch-free): the algorithm on stand-in VAEs (split, bounded tiles, sizes, refusals) and the seams on the
embedded model. Torch tier: equal to diffusers' own tiled output on the tiny SD1 model, both backends.
"""

from __future__ import annotations

import numpy as np
import pytest

from edgediff.models import default_model_path
from edgediff.runtime.metrics import psnr
from edgediff.runtime.vae_tiling import Tiling, decode_tiled, encode_tiled, needs_tiling, tile_count

F = 8  # the VAE scale factor of every model here
EMBEDDED = default_model_path()
needs_embedded = pytest.mark.skipif(not (EMBEDDED / "manifest.json").exists(), reason="the embedded model is not built")


def to_u8(x: np.ndarray) -> np.ndarray:
    """[-1, 1] NCHW -> uint8 NHWC, rounded as runtime.images.to_pil does."""
    return (np.clip(x.transpose(0, 2, 3, 1) / 2 + 0.5, 0, 1) * 255).round().astype(np.uint8)


# Stand-in VAEs with no spatial context: a pixel (latent) depends on its own latent (8x8 block) alone, so every
# tile agrees with its neighbours where they overlap and tiling must give the untiled output exactly.
def fake_decode(z: np.ndarray) -> np.ndarray:
    return np.repeat(np.repeat(np.tanh(z[:, :3]), F, axis=2), F, axis=3)


def fake_encode(x: np.ndarray) -> np.ndarray:
    n, c, h, w = x.shape
    pooled = x.reshape(n, c, h // F, F, w // F, F).mean(axis=(3, 5))
    return np.concatenate([pooled, pooled[:, :1] * 2, -pooled], axis=1)  # 7 channels: any count blends


class Spy:
    def __init__(self, fn):
        self.fn, self.shapes = fn, []

    def __call__(self, t: np.ndarray) -> np.ndarray:
        self.shapes.append(t.shape)
        return self.fn(t)


@pytest.mark.fast
def test_decode_and_encode_split_into_bounded_tiles():
    rng = np.random.default_rng(0)
    tiling = Tiling(64)  # 8 latents, overlap 2: tiles every 6 latents
    z = rng.standard_normal((1, 4, 20, 28)).astype(np.float32)  # 4 x 5 tiles, a 2-latent sliver at the bottom
    spy = Spy(fake_decode)
    out = decode_tiled(spy, z, F, tiling)
    assert len(spy.shapes) == tile_count(160, 224, F, tiling) == 20
    assert all(s[0] == 1 and s[2] <= 8 and s[3] <= 8 for s in spy.shapes), spy.shapes
    assert (2, 8) in [s[2:] for s in spy.shapes]  # diffusers' edge sliver, inside its neighbour's overlap
    assert out.shape == (1, 3, 160, 224) and out.dtype == np.float32
    np.testing.assert_allclose(out, fake_decode(z), atol=1e-6)

    x = rng.uniform(-1, 1, (2, 3, 160, 224)).astype(np.float32)  # a batch travels whole through each call
    spy = Spy(fake_encode)
    moments = encode_tiled(spy, x, F, tiling)
    assert len(spy.shapes) == 20
    assert all(s[0] == 2 and s[2] <= 64 and s[3] <= 64 for s in spy.shapes), spy.shapes
    assert moments.shape == (2, 7, 20, 28)
    np.testing.assert_allclose(moments, fake_encode(x), atol=1e-6)


@pytest.mark.fast
@pytest.mark.parametrize("tile,overlap,lat", [(64, 0.25, (16, 16)), (64, 0.0, (17, 9)), (40, 0.25, (25, 30)),
                                              (128, 0.375, (33, 17)), (8, 0.25, (3, 5)), (24, 0.49, (20, 7))])
def test_output_has_the_image_size(tile, overlap, lat):
    """Any tile and overlap, any size (diffusers' own output is 248x294 for 200x240 at tile 40: its pixel and
    latent roundings of the overlap disagree there)."""
    rng = np.random.default_rng(1)
    z = rng.standard_normal((1, 4, *lat)).astype(np.float32)
    out = decode_tiled(fake_decode, z, F, Tiling(tile, overlap))
    np.testing.assert_allclose(out, fake_decode(z), atol=1e-6)
    x = rng.uniform(-1, 1, (1, 3, lat[0] * F, lat[1] * F)).astype(np.float32)
    np.testing.assert_allclose(encode_tiled(fake_encode, x, F, Tiling(tile, overlap)), fake_encode(x), atol=1e-6)


@pytest.mark.fast
def test_an_image_within_a_tile_is_one_call():
    tiling = Tiling(64)
    for lat in ((8, 8), (4, 8), (3, 5)):
        z = np.zeros((1, 4, *lat), np.float32)
        spy = Spy(fake_decode)
        decode_tiled(spy, z, F, tiling)
        assert spy.shapes == [z.shape] and not needs_tiling(lat[0] * F, lat[1] * F, tiling)
        x = np.zeros((1, 3, lat[0] * F, lat[1] * F), np.float32)
        spy = Spy(fake_encode)
        encode_tiled(spy, x, F, tiling)
        assert spy.shapes == [x.shape] and tile_count(lat[0] * F, lat[1] * F, F, tiling) == 1
    assert needs_tiling(72, 64, tiling) and needs_tiling(64, 72, tiling)


@pytest.mark.fast
def test_bad_tiling_is_refused():
    z = np.zeros((1, 4, 16, 16), np.float32)
    with pytest.raises(ValueError, match="multiple of the VAE's scale factor"):
        decode_tiled(fake_decode, z, F, Tiling(100))
    with pytest.raises(ValueError, match="multiple of the VAE's scale factor"):
        encode_tiled(fake_encode, np.zeros((1, 3, 128, 128), np.float32), F, Tiling(60))
    for overlap in (0.5, 0.7, -0.1, float("nan"), "0.25"):
        with pytest.raises(ValueError, match="overlap"):
            Tiling(64, overlap)
    for tile in (0, -64, 64.0, True, None):
        with pytest.raises(ValueError, match="tile"):
            Tiling(tile)
    with pytest.raises(ValueError, match="scale factor"):
        decode_tiled(fake_decode, z, 0, Tiling(64))
    with pytest.raises(ValueError, match="multiples of the VAE's scale factor"):
        encode_tiled(fake_encode, np.zeros((1, 3, 100, 128), np.float32), F, Tiling(64))
    with pytest.raises(ValueError, match="NCHW"):
        decode_tiled(fake_decode, z[0], F, Tiling(64))
    with pytest.raises(ValueError, match="expected"):  # a decoder that does not upscale by the scale factor
        decode_tiled(lambda t: t[:, :3], z, F, Tiling(64))


@pytest.mark.fast
def test_for_model_is_diffusers_default():
    assert Tiling.for_model(512) == Tiling(512, 0.25)  # SD 1.x's VAE sample_size
    assert Tiling.for_model(1024, 8).latent_tile(8) == 128 and Tiling.for_model(1024).latent_overlap(8) == 32
    assert Tiling.for_model(100).tile == 96  # rounded down to the scale factor
    with pytest.raises(ValueError):
        Tiling.for_model(4)


# ---- the embedded model: tiled vs untiled


@pytest.fixture(scope="module")
def embedded():
    """The embedded model and two 256x256 images it drew (twice its 128-pixel sample size), as the denoiser's
    latents (its VAE's encoding of them) and [-1, 1] NCHW."""
    from edgediff.runtime import Pipeline, load_manifest

    pipe = Pipeline.load(EMBEDDED, backend="onnxruntime", device="cpu")
    images = []
    prompts = (("a small yellow star on a purple background", 0), ("a large green square on a red background", 2))
    for prompt, seed in prompts:
        drawn = pipe.txt2img(prompt, seed=seed, width=256, height=256, steps=8).images[0]
        images.append(np.asarray(drawn, np.float32).transpose(2, 0, 1) / 127.5 - 1)
    images = np.stack(images)
    return pipe, load_manifest(EMBEDDED), pipe.encode(images), images


def seam_excess(tiled: np.ndarray, untiled: np.ndarray) -> float:
    """The largest step between neighbouring rows or columns of the tiled image beyond the untiled image's same
    step (mean absolute uint8 difference along the row / column): where tiles meet with no blend, a seam. The
    image's outer 8 pixels are left out: the VAE treats its borders apart, tiled or not."""
    worst = 0.0
    for axis in (1, 2):  # NHWC rows, columns
        other = (0, 2, 3) if axis == 1 else (0, 1, 3)
        step = lambda a: np.abs(np.diff(a.astype(np.float64), axis=axis)).mean(axis=other)  # noqa: E731
        worst = max(worst, float((step(tiled) - step(untiled))[F:-F].max()))
    return worst


@pytest.mark.fast
@needs_embedded
def test_tiled_decode_on_the_embedded_model(embedded):
    """Tiles of the model's sample size (diffusers' default: 128 pixels, overlap 0.25, 3 x 3 tiles on 256):
    no seam where tiles meet, but not the untiled image either. This tiny VAE leans on its context (GroupNorm
    statistics, the image's borders): its tiled decode is 27 and 30 dB from the untiled one (flat areas take
    tile-sized blotches), and no tile smaller than the image reached 35 dB (64 to 192 pixel tiles, overlaps
    0.25 to 0.45, on 128 to 256 pixel images: 19 to 34 dB). Overlap 0, the hard-tiled baseline, leaves a step
    of 31 levels at a tile border; blended, no row or column steps more than 1.2 levels beyond the untiled."""
    pipe, m, latents, _ = embedded
    tiling = Tiling.for_model(m.sample_size, m.vae_scale_factor)
    assert tiling == Tiling(128, 0.25)
    spy = Spy(pipe.decode)  # the pipeline's decode (scaled latents, one image a call) is a decoder like any
    untiled = to_u8(pipe.decode(latents))
    tiled = to_u8(np.concatenate([decode_tiled(spy, z[None], m.vae_scale_factor, tiling) for z in latents]))
    assert len(spy.shapes) == 2 * 9 and max(max(s[2:]) for s in spy.shapes) == 16
    hard = to_u8(np.concatenate([decode_tiled(pipe.decode, z[None], m.vae_scale_factor, Tiling(128, 0.0))
                                 for z in latents]))
    scores = [psnr(t, u) for t, u in zip(tiled, untiled)]
    seams, hard_seams = seam_excess(tiled, untiled), seam_excess(hard, untiled)
    print(f"embedded tiled decode vs untiled: PSNR {', '.join(f'{s:.1f}' for s in scores)} dB; seam excess "
          f"{seams:.1f} levels (overlap 0: {hard_seams:.1f}, PSNR {psnr(hard, untiled):.1f} dB)")
    assert min(scores) >= 24.0, scores
    assert seams <= 2.5 and hard_seams >= 10.0, (seams, hard_seams)


@pytest.mark.fast
@needs_embedded
def test_tiled_encode_on_the_embedded_model(embedded):
    """The moments (mean and log-variance) tiled then split, as diffusers does; decoded untiled, the image stays
    within a few dB of the untiled encoding's."""
    pipe, m, _, images = embedded
    session = pipe.session("vae_encoder")
    moments = lambda x: session(sample=x)["latent_parameters"]  # noqa: E731
    untiled = np.concatenate([moments(x[None]) for x in images])
    spy = Spy(moments)
    tiled = np.concatenate([encode_tiled(spy, x[None], m.vae_scale_factor, Tiling(128)) for x in images])
    assert tiled.shape == untiled.shape == (2, 2 * m.latent_channels, 32, 32)
    assert len(spy.shapes) == 2 * 9 and max(max(s[2:]) for s in spy.shapes) == 128
    decode = pipe.sessions["vae_decoder"]
    back = lambda mom: to_u8(np.concatenate([decode(latent_sample=k[None, : m.latent_channels])["sample"]  # noqa: E731
                                             for k in mom]))
    via_untiled, via_tiled = back(untiled), back(tiled)
    scores = [psnr(t, u) for t, u in zip(via_tiled, via_untiled)]
    print(f"embedded tiled encode (decoded untiled) vs untiled encode: PSNR {', '.join(f'{s:.1f}' for s in scores)} dB")
    assert min(scores) >= 24.0, scores


# ---- the torch tier: equal to diffusers' own tiled VAE


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_tiled_vae_matches_diffusers(tiny_sd1, backend):
    """diffusers' AutoencoderKL with enable_tiling and a 64-pixel tile (8 latents, its overlap 0.25) against
    decode_tiled / encode_tiled with the artifact's sessions and the same tiling: 4 x 5 tiles, one row of
    2-latent slivers at the bottom."""
    torch = pytest.importorskip("torch")
    from diffusers import AutoencoderKL

    from edgediff.runtime import Pipeline

    src, artifact = tiny_sd1
    vae = AutoencoderKL.from_pretrained(src / "vae").eval()
    tiling = Tiling(64)
    vae.enable_tiling()
    vae.tile_sample_min_size, vae.tile_latent_min_size = tiling.tile, tiling.latent_tile(F)
    assert vae.tile_overlap_factor == tiling.overlap

    rng = np.random.default_rng(3)
    z = rng.standard_normal((1, 4, 20, 28)).astype(np.float32)
    x = np.clip(rng.normal(0, 0.5, (1, 3, 160, 224)), -1, 1).astype(np.float32)
    with torch.no_grad():
        ref_image = vae.decode(torch.from_numpy(z)).sample.numpy()
        ref_moments = vae.encode(torch.from_numpy(x)).latent_dist.parameters.numpy()  # raw moments, unclamped
        vae.disable_tiling()
        plain_image = vae.decode(torch.from_numpy(z)).sample.numpy()

    kw = {"ov_precision": "f32"} if backend == "openvino" else {}
    pipe = Pipeline.load(artifact, backend=backend, device="cpu", **kw)
    decoder, encoder = pipe.sessions["vae_decoder"], pipe.session("vae_encoder")
    spy = Spy(lambda t: decoder(latent_sample=t)["sample"])
    image = decode_tiled(spy, z, F, tiling)
    moments = encode_tiled(lambda t: encoder(sample=t)["latent_parameters"], x, F, tiling)
    assert len(spy.shapes) == 20

    assert image.shape == ref_image.shape and moments.shape == ref_moments.shape
    err_image, err_moments = float(np.abs(image - ref_image).max()), float(np.abs(moments - ref_moments).max())
    score = psnr(to_u8(image), to_u8(ref_image))
    print(f"{backend}: tiled decode vs diffusers' PSNR {score:.1f} dB, max abs {err_image:.1e}; tiled encode "
          f"moments max abs {err_moments:.1e}; diffusers tiled vs untiled max abs "
          f"{np.abs(ref_image - plain_image).max():.2f}")
    assert score >= 40.0 and err_image < 1e-4, (score, err_image)
    assert err_moments < 1e-4, err_moments
    assert np.abs(ref_image - plain_image).max() > 1e-2  # the tiled output really is the tiled algorithm's
