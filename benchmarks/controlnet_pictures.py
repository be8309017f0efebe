"""The README's ControlNet picture, made by the embedded model and its shipped ControlNet (``mask``).

Row 1: a control mask (a hand-placed shape: a star at the top left) | the prompt drawn without the ControlNet |
with it. Row 2: a drawing given to the canny preprocessor (``--preprocess mask=canny``) | its edges, the
control image | a new prompt drawn into that outline.

    python benchmarks/controlnet_pictures.py --out benchmarks/results/controlnet_shapes.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def star_mask() -> Image.Image:
    from edgediff.models.shapes.dataset import paint

    mask = Image.new("RGB", (128, 128), (0, 0, 0))
    paint(ImageDraw.Draw(mask), "star", 36, 38, 24, (255, 255, 255))  # a "small" star: 48 pixels across
    return mask


def drawing() -> Image.Image:
    from edgediff.models.shapes.dataset import COLORS, paint

    image = Image.new("RGB", (128, 128), COLORS["white"])
    paint(ImageDraw.Draw(image), "triangle", 80, 76, 40, COLORS["black"])
    return image


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=3)
    args = ap.parse_args()
    from edgediff.runtime import Control, Pipeline
    from edgediff.runtime.canny import canny

    pipe = Pipeline.load(backend="onnxruntime", device="cpu")
    mask = star_mask()
    first = "a small yellow star on a purple background"
    row1 = [mask, pipe.txt2img(first, seed=args.seed)[0],
            pipe.txt2img(first, seed=args.seed, controls=[Control("mask", mask)])[0]]
    second = "a large green triangle on a blue background"
    row2 = [drawing(), canny(drawing()),
            pipe.txt2img(second, seed=args.seed, controls=[Control("mask", drawing(), preprocess="canny")])[0]]
    grid = np.concatenate([np.concatenate([np.asarray(p.convert("RGB")) for p in row], axis=1) for row in (row1, row2)])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(args.out)
    print(f"wrote {args.out}: mask | without | with ControlNet; drawing | canny edges | with ControlNet")


if __name__ == "__main__":
    main()
