"""Measure what the ``shapes`` model draws: colour, background, shape and size, checked in numpy.

``classify(image)`` reads an image the way a person would check it:

- background: the median colour of the border ring, snapped to the palette;
- foreground: pixels far from the background colour; its colour is the
  palette colour most of them snap to;
- shape: solidity (object area / convex hull area) separates the star
  (concave) from the convex shapes, then the fill ratio of the bounding box
  separates square (~1.0), circle (~0.79) and triangle (~0.5);
- size: the bounding box's longer side against half the image side.

``evaluate(pipe, ...)`` generates images for a set of scenes and seeds and
reports accuracy per attribute, for seen and held-out colour-shape pairs
apart. Used by the tests, the README's figures and (later) the quantization
quality gate. numpy only: no torch.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from typing import Any, Iterable

import numpy as np

from . import dataset

_PALETTE_NAMES = list(dataset.COLORS)
_PALETTE = np.asarray([dataset.COLORS[c] for c in _PALETTE_NAMES], dtype=np.float32)
ATTRIBUTES = ("color", "background", "shape", "size")


@dataclass(frozen=True)
class Reading:
    color: str | None
    background: str
    shape: str | None
    size: str | None
    fill: float = 0.0
    solidity: float = 0.0


def _snap(rgb: np.ndarray) -> np.ndarray:
    """Index of the nearest palette colour for each RGB row."""
    d = ((rgb[:, None, :].astype(np.float32) - _PALETTE[None]) ** 2).sum(-1)
    return d.argmin(1)


def _hull_area(points: np.ndarray) -> float:
    """Area of the convex hull of integer points (Andrew's monotone chain + shoelace)."""
    pts = sorted(set(map(tuple, points.tolist())))
    if len(pts) < 3:
        return float(len(pts))

    def cross(o, a, b):
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    lower: list = []
    for p in pts:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], p) <= 0:
            lower.pop()
        lower.append(p)
    upper: list = []
    for p in reversed(pts):
        while len(upper) >= 2 and cross(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    hull = np.asarray(lower[:-1] + upper[:-1], dtype=np.float64)
    x, y = hull[:, 0], hull[:, 1]
    return float(0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))


def _segment(img: np.ndarray) -> tuple[str, np.ndarray, np.ndarray]:
    """(background name, each pixel's palette index, the foreground mask) of a float RGB image: the background is
    the median colour of the border ring, the foreground the pixels of another palette colour far from it."""
    h, w, _ = img.shape
    ring = np.concatenate([img[:3].reshape(-1, 3), img[-3:].reshape(-1, 3), img[:, :3].reshape(-1, 3), img[:, -3:].reshape(-1, 3)])
    bg_rgb = np.median(ring, axis=0)
    background = _PALETTE_NAMES[int(_snap(bg_rgb[None])[0])]
    labels = _snap(img.reshape(-1, 3)).reshape(h, w)
    mask = (labels != _PALETTE_NAMES.index(background)) & (np.abs(img - bg_rgb).sum(-1) > 90)
    return background, labels, mask


def foreground(image: np.ndarray) -> np.ndarray:
    """The drawn object's pixels (a boolean HxW mask), as ``classify`` finds them: the ControlNet's IoU."""
    return _segment(np.asarray(image)[..., :3].astype(np.float32))[2]


def classify(image: np.ndarray, new_shapes: tuple[str, ...] = ()) -> Reading:
    """Read colour, background, shape and size off one RGB uint8 image; ``new_shapes`` (of
    ``dataset.NEW_SHAPES``) are told apart too: a diamond is a convex half-filled box, like a triangle, but
    widest in the middle rather than at the bottom."""
    img = np.asarray(image)[..., :3].astype(np.float32)
    h, w, _ = img.shape
    background, labels, mask = _segment(img)
    if mask.sum() < 0.005 * h * w:
        return Reading(None, background, None, None)
    counts = np.bincount(labels[mask], minlength=len(_PALETTE_NAMES))
    color = _PALETTE_NAMES[int(counts.argmax())]
    # the object: pixels of its colour; rows/columns with a few stray pixels do not stretch the box
    obj = labels == _PALETTE_NAMES.index(color)
    rows = np.where(obj.sum(1) >= 2)[0]
    cols = np.where(obj.sum(0) >= 2)[0]
    if len(rows) < 2 or len(cols) < 2:
        return Reading(color, background, None, None)
    y0, y1, x0, x1 = rows[0], rows[-1], cols[0], cols[-1]
    box = obj[y0 : y1 + 1, x0 : x1 + 1]
    area = float(box.sum())
    fill = area / box.size
    ys, xs = np.nonzero(box)
    solidity = area / max(_hull_area(np.stack([xs, ys], 1)), 1.0)
    if solidity < 0.8:
        shape = "star"
    elif fill >= 0.88:
        shape = "square"
    elif fill >= 0.64:
        shape = "circle"
    elif "diamond" in new_shapes and 0.3 < float(np.argmax(box.sum(1))) / max(len(box) - 1, 1) < 0.7:
        shape = "diamond"
    else:
        shape = "triangle"
    size = "large" if max(y1 - y0 + 1, x1 - x0 + 1) > 0.5 * max(h, w) else "small"
    return Reading(color, background, shape, size, round(fill, 3), round(solidity, 3))


def score(reading: Reading, scene: dataset.Scene, with_size: bool = True) -> dict[str, bool]:
    result = {
        "color": reading.color == scene.color,
        "background": reading.background == scene.background,
        "shape": reading.shape == scene.shape,
    }
    if with_size:
        result["size"] = reading.size == scene.size
    return result


def prompt_set(n: int | None = None, held_out: bool | None = None, seed: int = 0) -> list[dataset.Scene]:
    """Scenes drawn from the vocabulary (all 448 when ``n`` is None), in a fixed order."""
    scenes = dataset.all_scenes(held_out)
    if n is None or n >= len(scenes):
        return scenes
    idx = np.random.default_rng(seed).choice(len(scenes), size=n, replace=False)
    return [scenes[i] for i in sorted(idx)]


def plain_scenes(held_out: bool | None = None) -> list[dataset.Scene]:
    """One scene per distinct plain prompt ("a red circle on a blue background", no size word): 224 in all."""
    return [sc for sc in dataset.all_scenes(held_out) if sc.size == dataset.SIZES[0]]


def control_cases(n: int, seed: int = 1000) -> list[tuple[dataset.Scene, np.ndarray]]:
    """``n`` scenes over the whole vocabulary (held-out colour-shape pairs included), each with its object's mask
    (boolean HxW) at a position and size drawn with ``seed``: the ControlNet's held-out set (its training used
    seed 0 and no held-out pair)."""
    rng = np.random.default_rng(seed)
    return [(scene, np.asarray(dataset.draw_with_mask(scene, rng)[1]) > 127) for scene in prompt_set(n, seed=seed)]


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks (1.0 when both are empty)."""
    union = float((a | b).sum())
    return float((a & b).sum()) / union if union else 1.0


def evaluate(
    pipe,
    scenes: Iterable[dataset.Scene],
    seeds: Iterable[int] = (0, 1),
    *,
    steps: int | None = None,
    guidance: float | None = None,
    scheduler: str | None = None,
    with_size: bool = True,
) -> dict[str, Any]:
    """Generate every scene with every seed and report accuracy per attribute, seen vs held-out.

    ``steps`` / ``guidance`` default to the artifact's recommended ones (the manifest's ``defaults``). A scene
    of a shape in ``dataset.NEW_SHAPES`` is read with that shape told apart.
    """
    steps, guidance = pipe.manifest.settings(steps, guidance)
    rows = []
    for scene in scenes:
        new_shapes = (scene.shape,) if scene.shape in dataset.NEW_SHAPES else ()  # read only where asked for
        prompt = scene.plain_prompt(with_size)
        for seed in seeds:
            (image,) = pipe.txt2img(prompt, steps=steps, guidance=guidance, seed=seed, scheduler=scheduler,
                                    width=dataset.SIZE, height=dataset.SIZE)
            reading = classify(np.asarray(image), new_shapes)
            held = (scene.color, scene.shape) in dataset.HELD_OUT
            rows.append({"prompt": prompt, "seed": seed, "held_out": held, **score(reading, scene, with_size),
                         "reading": asdict(reading)})
    return summarize(rows) | {"settings": {"steps": steps, "guidance": guidance, "scheduler": scheduler,
                                           "seeds": list(seeds)}, "rows": rows}


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for split, keep in (("all", lambda r: True), ("seen", lambda r: not r["held_out"]), ("held_out", lambda r: r["held_out"])):
        part = [r for r in rows if keep(r)]
        if not part:
            continue
        out[split] = {"n": len(part)} | {
            a: round(float(np.mean([r[a] for r in part])), 4) for a in ATTRIBUTES if a in part[0]
        }
    return out


def report(pipe, seeds: int = 2, scenes: int | None = None, *, steps: int | None = None, guidance: float | None = None,
           scheduler: str | None = None) -> dict[str, Any]:
    """The README's figures: every scene with its size word, and the plain form with one seed, per split."""
    t0 = time.perf_counter()
    kw = dict(steps=steps, guidance=guidance, scheduler=scheduler)
    with_size = evaluate(pipe, prompt_set(scenes), range(seeds), **kw)
    plain = evaluate(pipe, plain_scenes() if scenes is None else prompt_set(scenes), (0,), with_size=False, **kw)
    drop = lambda r: {k: v for k, v in r.items() if k != "rows"}  # noqa: E731
    return {"with_size": drop(with_size), "plain_form": drop(plain), "seconds": round(time.perf_counter() - t0, 1)}


def main() -> None:
    from edgediff.runtime import Pipeline

    p = argparse.ArgumentParser(description="Attribute accuracy of the shapes model")
    p.add_argument("--model", default=None, help="artifact folder (default: the embedded model)")
    p.add_argument("--backend", default="auto")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--scenes", type=int, default=None, help="random subset of scenes (default: all 448)")
    p.add_argument("--steps", type=int, default=None, help="default: the model's recommended")
    p.add_argument("--guidance", type=float, default=None, help="default: the model's recommended")
    p.add_argument("--scheduler", default=None)
    p.add_argument("--fast", action="store_true", help="with the artifact's tuned fast profile (`edgediff tune`)")
    p.add_argument("--json", default=None, help="write the report here (models/shapes/evaluation.json for the README)")
    args = p.parse_args()
    from edgediff.models import default_model_path

    pipe = Pipeline.load(args.model or default_model_path(), backend=args.backend, fast=args.fast)
    result = report(pipe, args.seeds, args.scenes, steps=args.steps, guidance=args.guidance, scheduler=args.scheduler)
    if args.fast:
        result["fast_profile"] = pipe.manifest.fast_profile["settings"]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
