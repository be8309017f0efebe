"""Upscaling without PyTorch: an exported ESRGAN-family upscaler (``edgediff export-upscaler``) run in tiles.

``Upscaler.load(folder)`` opens ``upscaler.onnx`` on either backend; ``upscaler.upscale(image)`` cuts the image
into as few tiles of at most ``tile`` pixels as cover it with neighbours sharing at least ``overlap``, spread
evenly, runs each (so a large image needs one tile's memory),
and blends the upscaled tiles with linear ramps across the overlaps, weights normalised so every pixel's
weights sum to one. ``lanczos(image, scale)`` is the fallback where no upscaler is given.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .backends import BackendOptions, Session, open_session, resolve
from .manifest import TensorSpec, Variant

MANIFEST = "upscaler.json"
DEFAULT_TILE = 256  # input pixels per tile at most: RRDBNet x4 upsamples 64 channels to 1024x1024 (256 MB a tensor)
DEFAULT_OVERLAP = 16


class UpscalerError(ValueError):
    """An upscaler file or folder edgediff cannot use, or a scale it does not do."""


@dataclass
class Upscaler:
    session: Session
    architecture: str
    scale: int
    root: Path

    @classmethod
    def load(cls, folder: str | Path, backend: str = "auto", device: str = "auto", threads: int | None = None) -> Upscaler:
        root = Path(folder)
        path = root / MANIFEST
        try:
            record = json.loads(path.read_text())
            arch, scale, file = str(record["architecture"]), int(record["scale"]), str(record["file"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UpscalerError(f"{root} is not an exported upscaler (its {MANIFEST} is missing or unreadable: "
                                f"{e}); make one with `edgediff export-upscaler FILE {root}`") from e
        if Path(file).name != file or not (root / file).is_file():
            raise UpscalerError(f"{path} names {file!r}, which is not a file in {root}")
        backend, device = resolve(backend, device)
        variant = Variant("fp32", file, (root / file).stat().st_size,
                          (TensorSpec("image", "float32", ("batch", 3, "height", "width")),),
                          (TensorSpec("upscaled", "float32", ("batch", 3, "out_height", "out_width")),))
        session = open_session(root, "upscaler", variant, backend, device, BackendOptions(threads=threads))
        return cls(session, arch, scale, root)

    def upscale(self, image: Image.Image, scale: int | None = None, tile: int = DEFAULT_TILE,
                overlap: int = DEFAULT_OVERLAP) -> Image.Image:
        """``image`` upscaled by the model's factor (``scale`` must be it, or smaller: the result is then
        resized down with Lanczos, as A1111 does for a x2 request on a x4 model)."""
        scale = self.scale if scale is None else scale
        if not isinstance(scale, int) or isinstance(scale, bool) or not 1 <= scale <= self.scale:
            raise UpscalerError(f"this upscaler ({self.architecture}) enlarges x{self.scale}; a scale of {scale!r} "
                                f"is not one it does (accepted: 1 to {self.scale})")
        pixels = np.asarray(image.convert("RGB"), dtype=np.float32).transpose(2, 0, 1)[None] / 255.0
        out = upscale_tiled(lambda x: self.session(image=x)["upscaled"], pixels, self.scale, tile, overlap)
        result = Image.fromarray(np.clip(out[0].transpose(1, 2, 0) * 255.0 + 0.5, 0, 255).astype(np.uint8))
        if scale != self.scale:
            result = result.resize((image.width * scale, image.height * scale), Image.LANCZOS)
        return result


def lanczos(image: Image.Image, scale: float) -> Image.Image:
    return image.resize((round(image.width * scale), round(image.height * scale)), Image.LANCZOS)


def upscale_tiled(run, pixels: np.ndarray, scale: int, tile: int, overlap: int) -> np.ndarray:
    """``run`` (NCHW float -> NCHW float ``scale`` times larger) over overlapping tiles of ``pixels``, blended."""
    if not isinstance(tile, int) or tile < 16 or not isinstance(overlap, int) or not 0 <= overlap < tile // 2:
        raise UpscalerError(f"tile must be at least 16 pixels and overlap in [0, tile/2); got tile {tile!r}, "
                            f"overlap {overlap!r}")
    _, _, h, w = pixels.shape
    if h <= tile and w <= tile:
        return run(np.ascontiguousarray(pixels))
    out = np.zeros((pixels.shape[0], 3, h * scale, w * scale), np.float32)
    weight = np.zeros((1, 1, h * scale, w * scale), np.float32)
    (ys, th), (xs, tw) = _split(h, tile, overlap), _split(w, tile, overlap)
    for y in ys:
        for x in xs:
            piece = run(np.ascontiguousarray(pixels[:, :, y : y + th, x : x + tw]))
            ph, pw = piece.shape[2:]
            ramp = _ramp(ph, overlap * scale, y > 0, y + th < h)[:, None] * \
                _ramp(pw, overlap * scale, x > 0, x + tw < w)[None, :]
            out[:, :, y * scale : y * scale + ph, x * scale : x * scale + pw] += piece * ramp
            weight[:, :, y * scale : y * scale + ph, x * scale : x * scale + pw] += ramp
    return out / weight


def _split(size: int, tile: int, overlap: int) -> tuple[list[int], int]:
    """(tile origins, tile length) covering ``size`` with as few tiles of at most ``tile`` as overlap allows,
    spread evenly: every neighbour pair shares at least ``overlap`` pixels and no tile is a sliver (a 256-pixel
    side with 192-pixel tiles is two tiles of 136, not 192 + 192)."""
    if size <= tile:
        return [0], size
    n = -(-(size - overlap) // (tile - overlap))
    length = -(-(size + (n - 1) * overlap) // n)
    return [round(i * (size - length) / (n - 1)) for i in range(n)], length


def _ramp(n: int, width: int, fade_in: bool, fade_out: bool) -> np.ndarray:
    """Weights along one side: rising over ``width`` where a neighbour overlaps before, falling where one
    overlaps after, 1 elsewhere (never 0: the edges of the image keep their weight)."""
    r = np.ones(n, np.float32)
    if width > 0:
        edge = (np.arange(width, dtype=np.float32) + 0.5) / width
        if fade_in:
            r[:width] = np.minimum(r[:width], edge)
        if fade_out:
            r[n - width :] = np.minimum(r[n - width :], edge[::-1])
    return r
