"""The README's upscaling picture, made by the embedded model: one 128x128 image it drew, enlarged x2 by
Lanczos and by its shipped upscaler, and the hires fix (upscaler, then img2img at 256x256, strength 0.3: the model was trained at 128 only, and at 0.5
it redraws the shape).

    python benchmarks/upscale_pictures.py --out benchmarks/results/upscale_shapes.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

PROMPT = "a large red circle on a yellow background"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    from edgediff.models import shapes_upscaler
    from edgediff.runtime import Pipeline
    from edgediff.runtime.upscale import Upscaler, lanczos

    pipe = Pipeline.load(backend="onnxruntime", device="cpu")
    upscaler = Upscaler.load(shapes_upscaler(), backend="onnxruntime", device="cpu")
    first = pipe.txt2img(PROMPT, steps=20, seed=args.seed)
    small = first[0]
    panels = [small.resize((256, 256), Image.NEAREST), lanczos(small, 2), upscaler.upscale(small),
              pipe.hires_fix(first, 2, 0.3, upscaler=upscaler)[0]]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate([np.asarray(p) for p in panels], axis=1)).save(args.out)
    print(f"wrote {args.out}: drawn at 128 (shown x2, nearest) | Lanczos x2 | upscaler x2 | hires fix x2")


if __name__ == "__main__":
    main()
