"""Upscaling without PyTorch: an exported ESRGAN-family upscaler (``edgediff export-upscaler``) run in tiles.

``Upscaler.load(folder)`` opens ``upscaler.onnx`` on either backend; ``upscaler.upscale(image)`` cuts the image
into as few tiles of at most ``tile`` pixels as cover it with neighbours sharing at least ``overlap``, spread
evenly, runs each (so a large image needs one tile's memory),
and blends the upscaled tiles with linear ramps across the overlaps, weights normalised so every pixel's
weights sum to one. ``lanczos(image, scale)`` is the fallback where no upscaler is given.

``upscaler.json`` is not trusted: its scale must be an integer from 1 to ``MAX_SCALE`` and what the graph
does, measured on load by one ``PROBE``-pixel run (the exported graphs have dynamic sizes, so no static
ratio to read). An image is upscaled only within a pixel budget (``edgediff.runtime.limits``), checked from
its header before it is decoded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .backends import BackendOptions, Session, open_session, resolve
from .errors import EdgediffError
from .images import open_image
from .limits import UPSCALE_MAX_PIXELS, upscale_budget_words
from .manifest import TensorSpec, Variant

MANIFEST = "upscaler.json"
DEFAULT_TILE = 256  # input pixels per tile at most: RRDBNet x4 upsamples 64 channels to 1024x1024 (256 MB a tensor)
DEFAULT_OVERLAP = 16
MAX_SCALE = 8  # ESRGAN-family models are x1, x2 or x4 (RRDBNet), SRVGGNetCompact any; x8 ones exist
PROBE = 16  # the side of the load's probe image: a multiple of 4, as RRDBNet x1 needs


class UpscalerError(EdgediffError, ValueError):
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
            if not path.is_file():  # missing, or a FIFO that would block the read
                raise OSError("missing, or not a regular file")
            if path.stat().st_size > 1 << 20:
                raise OSError(f"{path.stat().st_size:,} bytes; the ones export-upscaler writes are under 1 KB")
            record = json.loads(path.read_text())
            if not isinstance(record, dict):
                raise TypeError(f"a JSON {type(record).__name__}, not an object")
            arch, scale, file = record["architecture"], record["scale"], record["file"]
        except KeyError as e:
            raise UpscalerError(f"{root} is not an exported upscaler ({MANIFEST} has no {str(e)[:60]} field); make "
                                f"one with `edgediff export-upscaler FILE {root}`") from e
        except (OSError, ValueError, TypeError, RecursionError) as e:
            raise UpscalerError(f"{root} is not an exported upscaler ({MANIFEST}: {str(e)[:200]}); make one with "
                                f"`edgediff export-upscaler FILE {root}`") from e
        if not isinstance(arch, str) or not 0 < len(arch) <= 100:
            raise UpscalerError(f"{path}: architecture must be a name such as RRDBNet, got {arch!r:.60}")
        if not isinstance(scale, int) or isinstance(scale, bool) or not 1 <= scale <= MAX_SCALE:
            raise UpscalerError(f"{path}: scale must be an integer from 1 to {MAX_SCALE}, got {scale!r:.60}")
        if not isinstance(file, str) or Path(file).name != file or not (root / file).is_file():
            raise UpscalerError(f"{path} names {file!r:.100}, which is not a file in {root}")
        backend, device = resolve(backend, device)
        variant = Variant("fp32", file, (root / file).stat().st_size,
                          (TensorSpec("image", "float32", ("batch", 3, "height", "width")),),
                          (TensorSpec("upscaled", "float32", ("batch", 3, "out_height", "out_width")),))
        session = open_session(root, "upscaler", variant, backend, device, BackendOptions(threads=threads))
        measured = probe_scale(session)
        if measured != scale:
            raise UpscalerError(f"{path} says scale {scale}, but {file} enlarges x{measured} (a {PROBE}x{PROBE} "
                                f"probe came out {PROBE * measured}x{PROBE * measured}); correct the scale or "
                                "export the upscaler again")
        return cls(session, arch, scale, root)

    def upscale(self, image: Image.Image | str | Path, scale: int | None = None, tile: int = DEFAULT_TILE,
                overlap: int = DEFAULT_OVERLAP, max_pixels: int = UPSCALE_MAX_PIXELS) -> Image.Image:
        """``image`` (a PIL image or a file) upscaled by the model's factor (``scale`` must be it, or smaller: the
        result is then resized down with Lanczos, as A1111 does for a x2 request on a x4 model). The model's
        result may hold at most ``max_pixels`` pixels; a file is checked from its header, before it is decoded."""
        scale = self.scale if scale is None else scale
        if not isinstance(scale, int) or isinstance(scale, bool) or not 1 <= scale <= self.scale:
            raise UpscalerError(f"this upscaler ({self.architecture}) enlarges x{self.scale}; a scale of {scale!r:.40} "
                                f"is not one it does (accepted: 1 to {self.scale})")
        if not isinstance(max_pixels, int) or isinstance(max_pixels, bool) or max_pixels < 1:
            raise UpscalerError(f"max_pixels must be a positive integer, got {max_pixels!r:.40}")
        image = open_image(image, limit=max_pixels // self.scale**2, why=upscale_budget_words(self.scale, max_pixels))
        pixels = np.asarray(image.convert("RGB"), dtype=np.float32).transpose(2, 0, 1)[None]
        pixels /= 255.0
        out = upscale_tiled(lambda x: self.session(image=x)["upscaled"], pixels, self.scale, tile, overlap)
        del pixels
        result = Image.fromarray(to_uint8(out[0]))
        if scale != self.scale:
            result = result.resize((image.width * scale, image.height * scale), Image.LANCZOS)
        return result


def probe_scale(session: Session) -> int:
    """The factor ``session``'s graph enlarges by, from one run on a ``PROBE`` x ``PROBE`` grey image."""
    out = session(image=np.full((1, 3, PROBE, PROBE), 0.5, np.float32))["upscaled"]
    h, w = out.shape[2:] if out.ndim == 4 else (0, 0)
    if out.ndim != 4 or out.shape[:2] != (1, 3) or h != w or h % PROBE or h == 0:
        raise UpscalerError(f"{session.variant.file} is not an upscaler edgediff can run: a 1x3x{PROBE}x{PROBE} "
                            f"image came out {'x'.join(map(str, out.shape))} (expected 1x3xNxN, N a multiple of "
                            f"{PROBE})")
    return h // PROBE


def to_uint8(chw: np.ndarray, rows: int = 256) -> np.ndarray:
    """[0, 1] CHW float -> HWC uint8, rounded, a band of ``rows`` rows at a time (no full-size float temporaries)."""
    _, h, w = chw.shape
    out = np.empty((h, w, 3), np.uint8)
    for y in range(0, h, rows):
        band = chw[:, y : y + rows].transpose(1, 2, 0) * 255.0 + 0.5
        out[y : y + rows] = np.clip(band, 0, 255)
    return out


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
    out /= weight  # in place: the result's pixels are the largest array here
    return out


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
