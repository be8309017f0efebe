"""VAE tiling: encode and decode an image larger than the VAE's working size in overlapping tiles, blended.

The VAE's memory peak grows with the image's area (its decoder's first up blocks and attention run at full
latent resolution, its last blocks at full pixel resolution); tiling bounds it by one tile, whatever the image's
size. The graphs of an artifact take dynamic spatial shapes, so a tile can be any multiple of the VAE's scale
factor (8 pixels).

The algorithm is diffusers' ``AutoencoderKL.tiled_decode`` and ``AutoencoderKL._tiled_encode`` (the same as the
deprecated ``tiled_encode``), with its ``blend_v`` / ``blend_h``:

* tiles of ``tile`` pixels (``tile / scale_factor`` latents) start every ``tile * (1 - overlap)`` along each side,
  from the top left; the last ones of a row or column are cut by the image's edge;
* each tile is run on its own, then blended with the tile above and the tile on its left (already blended,
  in that order) by a linear cross-fade over the ``tile * overlap`` rows / columns they share;
* each blended tile keeps its top left ``tile * (1 - overlap)`` square, and those squares make the output.

``encode_tiled`` blends whatever the encoder gives, all its channels: diffusers tiles the *moments* (mean and
log-variance together) then splits them, so pass the encoder that gives the moments (``latent_parameters``) and
split after; a tiny VAE's ``latents`` blend the same way.

The output equals diffusers' tiled output (to float rounding) when ``tile / scale_factor * overlap`` is a whole
number of latents, as it is for diffusers' defaults (512, 768 or 1024 pixels with 0.25). Otherwise diffusers'
pixel and latent roundings (``int(tile_latent * (1 - overlap))`` against ``int(tile_sample * overlap)``) disagree
and its output can come out a different size from the image; here the overlap is rounded down to whole latents,
so the output always has the image's size.

The seam trade-off: a tile sees only its own pixels (the convolutions' context stops at its border and the
GroupNorm statistics are the tile's, not the image's), so tiled output is not the untiled output, and two tiles
disagree where they meet. The cross-fade hides the step but cannot remove a difference in tone between tiles;
a larger tile and a larger overlap bring the output closer to the untiled one, at the cost of more VAE work
(overlap 0.25 runs about (1 / 0.75)^2 = 1.8 times the pixels of the image) and, for the tile, more memory.
Like diffusers, the tiles at the bottom and right edges can be thin slivers that lie inside their neighbour's
overlap; they are run and blended all the same (that is what keeps the output equal to diffusers').

Only numpy and the standard library: the callables given are the sessions (ONNX Runtime, OpenVINO or any other).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

__all__ = ["Tiling", "decode_tiled", "encode_tiled", "needs_tiling", "tile_count"]

DEFAULT_OVERLAP = 0.25  # diffusers' AutoencoderKL.tile_overlap_factor


@dataclass(frozen=True)
class Tiling:
    """How to tile: ``tile`` is the tile's side in image pixels (diffusers' ``tile_sample_min_size``; a multiple of
    the VAE's scale factor, checked where the scale factor is known), ``overlap`` the fraction of a tile two
    neighbours share (diffusers' ``tile_overlap_factor``), in [0, 0.5)."""

    tile: int
    overlap: float = DEFAULT_OVERLAP

    def __post_init__(self) -> None:
        if isinstance(self.tile, bool) or not isinstance(self.tile, (int, np.integer)) or self.tile <= 0:
            raise ValueError(f"the VAE tile is a positive whole number of pixels, got {self.tile!r}")
        if isinstance(self.overlap, bool) or not isinstance(self.overlap, (int, float, np.floating, np.integer)):
            raise ValueError(f"the VAE tiles' overlap is a fraction of a tile in [0, 0.5), got {self.overlap!r}")
        if not (0.0 <= float(self.overlap) < 0.5):
            raise ValueError(f"the VAE tiles' overlap is a fraction of a tile in [0, 0.5), got {self.overlap!r}: "
                             "at 0.5 or more a tile's blend would reach past the next tile's start")

    @classmethod
    def for_model(cls, sample_size_px: int, scale_factor: int = 8, overlap: float = DEFAULT_OVERLAP) -> "Tiling":
        """diffusers' defaults: a tile of the VAE's ``sample_size`` (its config's; 512 pixels for SD 1.x, 768 for
        SD 2.x at 768, 1024 for SDXL: the model's default image side, the manifest's ``sample_size``), overlap
        0.25. Images up to that size are never tiled; the tile is what the model was trained at, so every tile
        has the context the model is used to. Rounded down to a multiple of ``scale_factor``."""
        _check_scale(scale_factor)
        if isinstance(sample_size_px, bool) or not isinstance(sample_size_px, (int, np.integer)):
            raise ValueError(f"the model's sample size is a whole number of pixels, got {sample_size_px!r}")
        tile = int(sample_size_px) // scale_factor * scale_factor
        if tile <= 0:
            raise ValueError(f"the model's sample size ({sample_size_px} pixels) is smaller than the VAE's scale "
                             f"factor ({scale_factor})")
        return cls(tile, overlap)

    def latent_tile(self, scale_factor: int) -> int:
        """The tile's side in latents (diffusers' ``tile_latent_min_size``)."""
        _check_scale(scale_factor)
        if self.tile % scale_factor:
            raise ValueError(f"the VAE tile ({self.tile} pixels) must be a multiple of the VAE's scale factor "
                             f"({scale_factor}): try {max(scale_factor, self.tile // scale_factor * scale_factor)}")
        return self.tile // scale_factor

    def latent_overlap(self, scale_factor: int) -> int:
        """The latents two neighbouring tiles share: ``latent_tile * overlap``, rounded down."""
        return math.floor(self.latent_tile(scale_factor) * float(self.overlap) + 1e-9)


def needs_tiling(height_px: int, width_px: int, tiling: Tiling) -> bool:
    """Whether an image of this size is tiled: it is larger than a tile along either side (diffusers' test in
    ``_encode`` and ``_decode``); otherwise the VAE runs once on the whole image."""
    return height_px > tiling.tile or width_px > tiling.tile


def tile_count(height_px: int, width_px: int, scale_factor: int, tiling: Tiling) -> int:
    """How many VAE calls ``decode_tiled`` (and ``encode_tiled``) make for an image of this size."""
    if not needs_tiling(height_px, width_px, tiling):
        return 1
    step = (tiling.latent_tile(scale_factor) - tiling.latent_overlap(scale_factor)) * scale_factor
    return math.ceil(height_px / step) * math.ceil(width_px / step)


def decode_tiled(decode: Callable[[np.ndarray], np.ndarray], latents: np.ndarray, scale_factor: int,
                 tiling: Tiling) -> np.ndarray:
    """``decode(latent_tile) -> image_tile`` over tiles of ``latents`` (NCHW, in the decoder's units, unscaled),
    blended as diffusers' ``AutoencoderKL.tiled_decode``; one call on the whole when it fits a tile. Each call
    gets a C-contiguous float32 NCHW slice of the input's batch, at most ``tiling.tile / scale_factor`` latents
    a side, and must give (N, C, h * scale_factor, w * scale_factor). Returns float32 NCHW images."""
    t = tiling.latent_tile(scale_factor)
    o = tiling.latent_overlap(scale_factor)
    x = _check_input(latents, "latents", 1)
    h, w = x.shape[2:]
    if not needs_tiling(h * scale_factor, w * scale_factor, tiling):
        return _run(decode, x, scale_factor, 1, "decode")
    return _tiled(decode, x, tile_in=t, stride_in=t - o, blend_out=o * scale_factor,
                  keep_out=(t - o) * scale_factor, up=scale_factor, down=1, what="decode")


def encode_tiled(encode: Callable[[np.ndarray], np.ndarray], images: np.ndarray, scale_factor: int,
                 tiling: Tiling) -> np.ndarray:
    """``encode(image_tile) -> latent_tile`` over tiles of ``images`` (NCHW, [-1, 1], sides multiples of
    ``scale_factor``), blended as diffusers' ``AutoencoderKL._tiled_encode``; one call on the whole when it fits
    a tile. Each call gets a C-contiguous float32 NCHW slice of the input's batch, at most ``tiling.tile`` pixels a
    side, and must give (N, C, h / scale_factor, w / scale_factor), C whatever the encoder makes (moments: split
    the result into mean and log-variance after). Returns float32 NCHW."""
    t = tiling.latent_tile(scale_factor)
    o = tiling.latent_overlap(scale_factor)
    x = _check_input(images, "images", scale_factor)
    h, w = x.shape[2:]
    if not needs_tiling(h, w, tiling):
        return _run(encode, x, 1, scale_factor, "encode")
    return _tiled(encode, x, tile_in=t * scale_factor, stride_in=(t - o) * scale_factor, blend_out=o,
                  keep_out=t - o, up=1, down=scale_factor, what="encode")


def _check_scale(scale_factor: int) -> None:
    if isinstance(scale_factor, bool) or not isinstance(scale_factor, (int, np.integer)) or scale_factor <= 0:
        raise ValueError(f"the VAE's scale factor is a positive whole number, got {scale_factor!r}")


def _check_input(x: np.ndarray, name: str, multiple: int) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 4 or 0 in x.shape:
        raise ValueError(f"{name} must be a non-empty NCHW array, got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"{name} must be floating point, got {x.dtype}")
    if x.shape[2] % multiple or x.shape[3] % multiple:
        raise ValueError(f"{name}' sides ({x.shape[2]}x{x.shape[3]}) must be multiples of the VAE's scale factor "
                         f"({multiple})")
    return x.astype(np.float32, copy=False)


def _run(fn: Callable[[np.ndarray], np.ndarray], tile: np.ndarray, up: int, down: int, what: str) -> np.ndarray:
    """One VAE call, its output checked for shape and copied (a backend may reuse its output buffer)."""
    out = np.array(fn(np.ascontiguousarray(tile)), dtype=np.float32, copy=True)
    n, _, h, w = tile.shape
    want = (h * up // down, w * up // down)
    if out.ndim != 4 or out.shape[0] != n or out.shape[2:] != want:
        raise ValueError(f"{what} gave shape {out.shape} for a tile of shape {tile.shape}: expected "
                         f"({n}, C, {want[0]}, {want[1]})")
    return out


def _blend_v(a: np.ndarray, b: np.ndarray, extent: int) -> None:
    """diffusers' blend_v, in place on ``b``: its top rows fade in from ``a``'s bottom rows."""
    e = min(a.shape[2], b.shape[2], extent)
    if e <= 0:
        return
    ramp = np.arange(e) / e  # diffusers' y / blend_extent (Python floats), then float32 as torch does
    wb = ramp.astype(np.float32)[:, None]
    wa = (1.0 - ramp).astype(np.float32)[:, None]
    b[:, :, :e, :] = a[:, :, -e:, :] * wa + b[:, :, :e, :] * wb


def _blend_h(a: np.ndarray, b: np.ndarray, extent: int) -> None:
    """diffusers' blend_h, in place on ``b``: its left columns fade in from ``a``'s right columns."""
    e = min(a.shape[3], b.shape[3], extent)
    if e <= 0:
        return
    ramp = np.arange(e) / e
    wb = ramp.astype(np.float32)
    wa = (1.0 - ramp).astype(np.float32)
    b[:, :, :, :e] = a[:, :, :, -e:] * wa + b[:, :, :, :e] * wb


def _tiled(fn: Callable[[np.ndarray], np.ndarray], x: np.ndarray, *, tile_in: int, stride_in: int, blend_out: int,
           keep_out: int, up: int, down: int, what: str) -> np.ndarray:
    """The loop of diffusers' tiled_decode / _tiled_encode, a row of tiles at a time (only the row above is kept
    for blending, not every tile as diffusers does: the same output, a lower memory peak)."""
    n, _, h, w = x.shape
    out: np.ndarray | None = None
    above: list[np.ndarray] | None = None
    for r, i in enumerate(range(0, h, stride_in)):
        row: list[np.ndarray] = []
        for c, j in enumerate(range(0, w, stride_in)):
            tile = _run(fn, x[:, :, i : i + tile_in, j : j + tile_in], up, down, what)
            if above is not None:
                _blend_v(above[c], tile, blend_out)
            if row:
                _blend_h(row[-1], tile, blend_out)
            row.append(tile)
            if out is None:
                out = np.empty((n, tile.shape[1], h * up // down, w * up // down), np.float32)
            elif tile.shape[1] != out.shape[1]:
                raise ValueError(f"{what} gave {tile.shape[1]} channels for one tile, {out.shape[1]} for another")
            kept = tile[:, :, :keep_out, :keep_out]
            y0, x0 = r * keep_out, c * keep_out
            out[:, :, y0 : y0 + kept.shape[2], x0 : x0 + kept.shape[3]] = kept
        above = row
    assert out is not None
    return out
