"""The procedurally drawn dataset of the embedded ``shapes`` model (numpy + PIL, no downloads).

One flat-coloured shape (circle, square, triangle, star) of a size (small,
large) on a flat background, 128x128 pixels, with an English caption drawn
from several templates and synonyms, so the text encoder learns words rather
than one fixed sentence. The same vocabulary defines the evaluation prompts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SIZE = 128
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "orange": (245, 140, 20),
    "purple": (140, 40, 180),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle", "star")
# Shapes the base model never saw in training, each taught by a LoRA shipped with it (models/shapes/loras/,
# made by models/shapes/training/train_lora.py). Not colours: the model's VAE, trained on the eight colours
# above, decodes any other colour as one of them, so no LoRA of the UNet and text encoder could teach one.
NEW_SHAPES = ("diamond",)
SIZES = ("small", "large")
# Colour-shape pairs never drawn in training: the evaluation reports them apart.
HELD_OUT: frozenset[tuple[str, str]] = frozenset(
    {("red", "star"), ("green", "triangle"), ("blue", "circle"), ("yellow", "square"), ("purple", "star")}
)
# Object side as a fraction of the image side, per size word.
SIZE_RANGE = {"small": (0.28, 0.40), "large": (0.62, 0.78)}

SYNONYMS = {
    "circle": ("circle", "circle", "disc", "round dot"),
    "square": ("square", "square", "box", "block"),
    "triangle": ("triangle", "triangle", "triangle"),
    "star": ("star", "star", "five-pointed star"),
    "small": ("small", "small", "little", "tiny"),
    "large": ("large", "large", "big", "huge"),
}
TEMPLATES = (
    "a {size} {color} {shape} on a {bg} background",
    "a {color} {shape} on a {bg} background",
    "a {size} {color} {shape} on {bg}",
    "{color} {shape}, {bg} background",
    "a {bg} background with a {size} {color} {shape}",
    "a {shape} colored {color} on a {bg} background",
    "a {size} {shape} in {color} against a {bg} backdrop",
    "{size} {color} {shape} over {bg}",
    "on a {bg} background, a {color} {shape}",
    "a picture of a {size} {color} {shape} on a {bg} background",
)


@dataclass(frozen=True)
class Scene:
    color: str
    shape: str
    size: str
    background: str

    def plain_prompt(self, with_size: bool = True) -> str:
        """The plain caption form the evaluation uses."""
        size = f"{self.size} " if with_size else ""
        return f"a {size}{self.color} {self.shape} on a {self.background} background"


def all_scenes(held_out: bool | None = None) -> list[Scene]:
    """Every scene of the vocabulary; ``held_out`` True/False keeps only held-out / seen pairs."""
    scenes = [
        Scene(c, s, z, b)
        for c in COLORS
        for s in SHAPES
        for z in SIZES
        for b in COLORS
        if b != c
    ]
    if held_out is None:
        return scenes
    return [sc for sc in scenes if ((sc.color, sc.shape) in HELD_OUT) == held_out]


def scenes_of(shape: str) -> list[Scene]:
    """Every scene with a ``shape`` object (one of NEW_SHAPES, say): each colour, size and background."""
    return [Scene(c, shape, z, b) for c in COLORS for z in SIZES for b in COLORS if b != c]


def star_points(cx: float, cy: float, r: float, inner: float = 0.45) -> list[tuple[float, float]]:
    pts = []
    for k in range(10):
        radius = r if k % 2 == 0 else r * inner
        a = -math.pi / 2 + k * math.pi / 5
        pts.append((cx + radius * math.cos(a), cy + radius * math.sin(a)))
    return pts


def draw(scene: Scene, rng: np.random.Generator) -> Image.Image:
    """Render ``scene`` with a random exact size in its range and a random position that fits."""
    return draw_with_mask(scene, rng)[0]


def draw_with_mask(scene: Scene, rng: np.random.Generator) -> tuple[Image.Image, Image.Image]:
    """``draw``'s render and the object's mask (an "L" image, 255 on the object): the ControlNet's data."""
    img = Image.new("RGB", (SIZE, SIZE), COLORS[scene.background])
    mask = Image.new("L", (SIZE, SIZE), 0)
    lo, hi = SIZE_RANGE[scene.size]
    side = rng.uniform(lo, hi) * SIZE
    margin = 4
    cx = rng.uniform(margin + side / 2, SIZE - margin - side / 2)
    cy = rng.uniform(margin + side / 2, SIZE - margin - side / 2)
    paint(ImageDraw.Draw(img), scene.shape, cx, cy, side / 2, COLORS[scene.color])
    paint(ImageDraw.Draw(mask), scene.shape, cx, cy, side / 2, 255)
    return img, mask


def paint(d: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    """One shape of half-side ``r`` centred at (cx, cy)."""
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
    elif shape == "diamond":
        d.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    else:
        # the star's bounding box is ~0.95 r below the centre: shift so it is centred
        d.polygon(star_points(cx, cy + 0.1 * r, r * 1.05), fill=fill)


def caption(scene: Scene, rng: np.random.Generator) -> str:
    template = TEMPLATES[rng.integers(len(TEMPLATES))]
    names = SYNONYMS.get(scene.shape, (scene.shape,))
    shape = names[rng.integers(len(names))]
    size = SYNONYMS[scene.size][rng.integers(len(SYNONYMS[scene.size]))]
    text = template.format(size=size, color=scene.color, shape=shape, bg=scene.background)
    return " ".join(text.split())


def sample(rng: np.random.Generator, n: int) -> tuple[np.ndarray, list[str], list[Scene]]:
    """``n`` training examples (held-out pairs excluded): uint8 images [n, 128, 128, 3], captions, scenes."""
    scenes = all_scenes(held_out=False)
    picks = [scenes[i] for i in rng.integers(len(scenes), size=n)]
    images = np.stack([np.asarray(draw(s, rng)) for s in picks])
    return images, [caption(s, rng) for s in picks], picks


def low_resolution(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A render halved (box filter), blurred a little and noised: the soft-edged low-resolution side of the
    shipped upscaler's training pairs (``training/train_upscaler.py``), as the model's VAE draws edges."""
    from PIL import ImageFilter

    side = image.shape[0] // 2
    small = Image.fromarray(image).resize((side, side), Image.BOX)
    small = small.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.0, 0.8))))
    noisy = np.asarray(small, dtype=np.float32) + rng.normal(0, rng.uniform(0, 3), (side, side, 3))
    return np.clip(noisy + 0.5, 0, 255).astype(np.uint8)
