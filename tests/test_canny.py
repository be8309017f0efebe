"""The canny preprocessor (numpy) against OpenCV's ``cv2.Canny``, the one ControlNet's canny models were trained on."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from edgediff.runtime.canny import canny, edges

pytestmark = pytest.mark.fast
cv2 = pytest.importorskip("cv2")  # the dev extra's reference


def scene(noise: float, seed: int = 0, size: int = 192) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (size, size), (30, 60, 200))
    d = ImageDraw.Draw(img)
    d.ellipse([20, 30, 110, 120], fill=(220, 30, 30))
    d.polygon([(150, 10), (185, 170), (90, 180)], fill=(240, 220, 30))
    d.rectangle([60, 130, 100, 170], fill=(30, 170, 50))
    gray = np.asarray(img.convert("L"), dtype=np.float32)
    return np.clip(gray + rng.normal(0, noise, gray.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("low,high", [(100, 200), (50, 100), (20, 60)])
@pytest.mark.parametrize("noise", [0.0, 6.0])
def test_edges_match_opencv(low, high, noise):
    gray = scene(noise)
    ours = edges(gray.astype(np.float32), low, high)
    reference = cv2.Canny(gray, low, high) > 0
    assert reference.sum() > 200  # there are edges to find
    iou = (ours & reference).sum() / (ours | reference).sum()
    assert iou >= 0.95, f"IoU with cv2.Canny {iou:.3f}"
    assert (ours != reference).mean() < 0.02  # noise-edge heavy maps (20-60 on noise) differ at 1.1% of pixels


def test_canny_image_and_threshold_errors():
    image = Image.fromarray(scene(0.0)).convert("RGB")
    out = canny(image)
    array = np.asarray(out)
    assert out.mode == "RGB" and out.size == image.size
    assert set(np.unique(array)) == {0, 255} and (array[..., 0] == array[..., 2]).all()
    assert (array[..., 0] > 0).sum() < (array[..., 0] > 0).size * 0.2  # thin edges, not filled regions
    assert np.asarray(canny(image, 0, 10))[..., 0].sum() > array[..., 0].sum()  # lower thresholds: more edges
    for low, high, message in ((200, 100, "must not exceed"), (-1, 10, r"low threshold must be a number"),
                               (10, "x", "high threshold")):
        with pytest.raises(ValueError, match=message):
            canny(image, low, high)
