"""Image inputs and outputs of the pipeline: PIL in, [-1, 1] CHW float32 arrays out, and back.

As diffusers' ``VaeImageProcessor`` does: RGB, Lanczos resizing to a multiple of
the VAE's scale factor, ``x / 127.5 - 1``, and rounding on the way back. Input
files are decoded only after their header says they are not too large
(``edgediff.runtime.limits``).
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from .limits import MAX_INPUT_PIXELS, check_pixels


def open_image(image: Image.Image | str | Path, what: str = "image", limit: int = MAX_INPUT_PIXELS,
               why: str | None = None) -> Image.Image:
    """A PIL image from a path (or as given), decoded only after its header says it has at most ``limit``
    pixels; ``why`` is the error's reason past that (default: the input limit, ``MAX_INPUT_PIXELS``)."""
    why = why or f"input images are read up to {limit:,} pixels: downscale it first"
    name = "" if isinstance(image, Image.Image) else f"{image} "
    if isinstance(image, Image.Image):
        size = image.size
    elif isinstance(image, (str, Path)):
        try:
            with warnings.catch_warnings():  # PIL's warning of a large image: the size is checked here instead
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                opened = Image.open(image)  # reads the header only
        except MemoryError:
            raise
        except Image.DecompressionBombError as e:  # over twice PIL's MAX_IMAGE_PIXELS: it says the count only
            count = re.search(r"\((\d+) pixels\)", str(e))
            pixels = int(count.group(1)) if count else None
            if pixels is not None and pixels > limit:
                raise ValueError(f"{what} {name}is {pixels:,} pixels; {why}") from None
            raise ValueError(f"{what} {name}is {'' if pixels is None else f'{pixels:,} pixels, '}more than PIL "
                             "decodes (its guard against decompression bombs, Image.MAX_IMAGE_PIXELS); downscale "
                             "it first") from None
        except Exception as e:  # PIL raises OSError, SyntaxError... per format
            raise ValueError(f"cannot read {what} {image} as an image ({_first_line(e)}); accepted: a file in a "
                             "format PIL opens (PNG, JPEG, WebP...)") from None
        size = opened.size
    else:
        raise ValueError(f"{what} must be a PIL image or a file path, got {type(image).__name__}")
    if size[0] * size[1] > limit:
        raise ValueError(f"{what} {name}is {size[0]}x{size[1]} = {size[0] * size[1]:,} pixels; {why}")
    if isinstance(image, Image.Image):
        return image
    try:
        opened.load()
    except MemoryError:
        raise
    except Exception as e:
        raise ValueError(f"cannot read {what} {image} as an image ({_first_line(e)}); it is damaged or truncated") from None
    return opened


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


def load_image(image: Image.Image | str | Path, width: int | None, height: int | None, multiple: int,
               max_pixels: int | None = None) -> np.ndarray:
    """An input image as [-1, 1] CHW float32, like diffusers' ``VaeImageProcessor.preprocess``.

    Any mode PIL opens; resized (Lanczos) to ``width`` x ``height`` when given,
    else to its own size rounded down to a multiple of ``multiple``; the
    result must fit ``max_pixels``.
    """
    image = open_image(image)
    for name, value in (("width", width), ("height", height)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0 or value % multiple):
            raise ValueError(f"{name} must be a positive multiple of {multiple} pixels, got {value!r:.40}")
    if (width is None and image.width < multiple) or (height is None and image.height < multiple):
        raise ValueError(f"the input image is {image.width}x{image.height} pixels; it must be at least "
                         f"{multiple}x{multiple} (its size is rounded down to a multiple of {multiple}), "
                         "or give --width/--height to resize it")
    w = width if width is not None else image.width - image.width % multiple
    h = height if height is not None else image.height - image.height % multiple
    if max_pixels is not None:
        check_pixels(w, h, max_pixels, "the input image, resized,")
    image = image.convert("RGB")
    if (w, h) != image.size:
        image = image.resize((w, h), Image.LANCZOS)
    return from_pil(image)


def load_mask(mask: Image.Image | str | Path, width: int, height: int) -> np.ndarray:
    """A mask (white = repaint) as a binary float32 HxW array at the image's size."""
    mask = open_image(mask, "mask")
    if mask.size != (width, height):
        raise ValueError(
            f"mask size {mask.width}x{mask.height} differs from the image's {width}x{height}; "
            "give a mask of the same size (white = repaint, black = keep)"
        )
    gray = np.asarray(mask.convert("L"), dtype=np.float32) / 255.0
    return (gray >= 0.5).astype(np.float32)


FILL_MODES = ("edge", "reflect", "mean", "noise")
SIDES = ("left", "right", "top", "bottom")


def extend_canvas(image: Image.Image | str | Path, extend: dict[str, int], fill: str = "edge",
                  multiple: int = 8, max_pixels: int | None = None) -> tuple[Image.Image, Image.Image]:
    """The image on a larger canvas and the mask of the new area (white).

    The new area starts as ``edge`` (border pixels repeated outwards),
    ``reflect`` (mirrored), ``mean`` (the image's mean colour) or ``noise``
    (uniform random colours, seeded): the fill only seeds the noised start,
    so it matters little at strength 1.
    """
    if not isinstance(fill, str) or fill not in FILL_MODES:
        raise ValueError(f"unknown fill {fill!r:.40}; valid: {', '.join(FILL_MODES)}")
    if not isinstance(extend, dict):
        raise ValueError(f"extend must be a dict of side -> pixels, e.g. {{'left': 128}}; got {extend!r:.80}")
    unknown = [str(k)[:40] for k in extend if k not in SIDES]
    if unknown:
        raise ValueError(f"unknown side(s) {sorted(unknown)}; valid: {', '.join(SIDES)}")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 and v % multiple == 0 for v in extend.values()) \
            or not any(extend.values()):
        raise ValueError(f"extend each side by a non-negative multiple of {multiple} pixels (at least one > 0), got {extend}")
    image = open_image(image)
    width = image.width + extend.get("left", 0) + extend.get("right", 0)
    height = image.height + extend.get("top", 0) + extend.get("bottom", 0)
    if max_pixels is not None:
        check_pixels(width, height, max_pixels, "the extended canvas")
    rgb = np.asarray(image.convert("RGB"))
    pads = ((extend.get("top", 0), extend.get("bottom", 0)), (extend.get("left", 0), extend.get("right", 0)), (0, 0))
    if fill in ("edge", "reflect"):
        canvas = np.pad(rgb, pads, mode="edge" if fill == "edge" else "reflect")
    else:
        canvas = np.pad(rgb, pads, mode="constant")
        new = np.pad(np.zeros(rgb.shape[:2], bool), pads[:2], constant_values=True)
        if fill == "mean":
            canvas[new] = rgb.reshape(-1, 3).mean(0).round().astype(np.uint8)
        else:
            canvas[new] = np.random.default_rng(0).integers(0, 256, (int(new.sum()), 3), dtype=np.uint8)
    mask = np.pad(np.zeros(rgb.shape[:2], np.uint8), pads[:2], constant_values=255)
    return Image.fromarray(canvas), Image.fromarray(mask)


def paste_unmasked(generated: Image.Image, original: Image.Image, binary: np.ndarray, blur: float) -> Image.Image:
    """Original pixels outside the mask, generated ones inside, feathered over ``blur`` pixels."""
    from PIL import ImageFilter

    alpha = Image.fromarray((binary * 255).astype(np.uint8))
    if blur > 0:
        alpha = alpha.filter(ImageFilter.GaussianBlur(blur))
    return Image.composite(generated, original, alpha)


def from_pil(image: Image.Image) -> np.ndarray:
    """PIL -> [-1, 1] CHW float32, as diffusers' image processor does."""
    return (np.asarray(image.convert("RGB"), dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1.0).astype(np.float32)


def to_pil(image: np.ndarray) -> Image.Image:
    """[-1, 1] CHW float -> PIL, rounded like diffusers' ``numpy_to_pil``."""
    hwc = np.clip(image.transpose(1, 2, 0) / 2 + 0.5, 0, 1)
    return Image.fromarray((hwc * 255).round().astype(np.uint8))
