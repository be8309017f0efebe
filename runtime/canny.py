"""Canny edges in numpy: the preprocessor of canny ControlNets, without OpenCV or torch.

ControlNet's canny models were trained on ``cv2.Canny(image, low, high)``
maps (lllyasviel's annotator; controlnet_aux's ``CannyDetector``): white
one-pixel edges on black. This is the same algorithm as OpenCV's default
(3x3 Sobel, L1 gradient magnitude ``|gx| + |gy|``, non-maximum suppression
along the gradient direction quantised to four bins, double threshold,
hysteresis over 8-connected pixels), on the image's luma. Written here
because the runtime has no image-processing library beyond Pillow (OpenCV
is a 40 MB wheel, scikit-image pulls SciPy); tests/test_canny.py compares it
with ``cv2.Canny``.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter

DEFAULT_LOW, DEFAULT_HIGH = 100, 200  # the thresholds of diffusers' and ControlNet's canny examples
TAN_22_5 = np.tan(np.pi / 8)


def check_thresholds(low: float, high: float) -> tuple[float, float]:
    for name, value in (("low", low), ("high", high)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 2000:
            raise ValueError(f"the canny {name} threshold must be a number in [0, 2000], got {value!r:.40}")
    if low > high:
        raise ValueError(f"the canny low threshold ({low:g}) must not exceed the high one ({high:g})")
    return float(low), float(high)


def canny(image: Image.Image, low: float = DEFAULT_LOW, high: float = DEFAULT_HIGH) -> Image.Image:
    """``image``'s edges as an RGB image: white (255) on black, as ControlNet's canny maps."""
    low, high = check_thresholds(low, high)
    gray = np.asarray(image.convert("L"), dtype=np.float32)
    return Image.fromarray(edges(gray, low, high).astype(np.uint8) * 255).convert("RGB")


def edges(gray: np.ndarray, low: float, high: float) -> np.ndarray:
    """Boolean edge map of a 2-D array of 0-255 values."""
    p = np.pad(gray, 1, mode="edge")
    gx = (p[:-2, 2:] + 2 * p[1:-1, 2:] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[1:-1, :-2] + p[2:, :-2])
    gy = (p[2:, :-2] + 2 * p[2:, 1:-1] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[:-2, 1:-1] + p[:-2, 2:])
    magnitude = np.abs(gx) + np.abs(gy)
    thin = _non_maximum_suppression(magnitude, gx, gy)
    candidates = thin > low
    return _hysteresis(candidates, thin > high)


def _non_maximum_suppression(m: np.ndarray, gx: np.ndarray, gy: np.ndarray) -> np.ndarray:
    """``m`` where it is a local maximum across the edge (ties kept on one side, as OpenCV), else 0."""
    p = np.pad(m, 1)
    h, w = m.shape

    def at(dy: int, dx: int) -> np.ndarray:
        return p[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]

    ax, ay = np.abs(gx), np.abs(gy)
    horizontal = ay <= ax * TAN_22_5  # the gradient points along x: compare left and right
    vertical = ay > ax / TAN_22_5
    rising = (gx * gy) > 0  # diagonal: down-right (y grows downwards) when the signs agree
    keep = np.where(horizontal, (m > at(0, -1)) & (m >= at(0, 1)),
                    np.where(vertical, (m > at(-1, 0)) & (m >= at(1, 0)),
                             np.where(rising, (m > at(-1, -1)) & (m >= at(1, 1)),
                                      (m > at(-1, 1)) & (m >= at(1, -1)))))
    return np.where(keep, m, 0.0)


def _hysteresis(candidates: np.ndarray, strong: np.ndarray) -> np.ndarray:
    """The candidate pixels 8-connected to a strong one: grown from the strong pixels until nothing changes."""
    grown = strong & candidates
    mask = Image.fromarray(candidates.astype(np.uint8) * 255)
    current = Image.fromarray(grown.astype(np.uint8) * 255)
    while True:
        dilated = np.asarray(current.filter(ImageFilter.MaxFilter(3))) & np.asarray(mask)
        if np.array_equal(dilated, np.asarray(current)):
            return dilated > 0
        current = Image.fromarray(dilated)
