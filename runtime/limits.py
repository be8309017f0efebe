"""The sizes edgediff refuses before it allocates, each stated in the error that refuses it.

- **Pixel budget per image**: ``max(1024 x 1024, 4 x the model's native area)``
  pixels (SD1.5: 1024x1024, SDXL: 2048x2048). A UNet's self-attention grows
  with the square of the latent pixels: SD1.5 at 1024x1024 already needs
  about 17 GB on the CPU, so a 100000-pixel-wide request would only end in a
  MemoryError after minutes. ``max_pixels`` (``--max-pixels``) lifts it.
- **Input images** are decoded only up to ``MAX_INPUT_PIXELS`` (an 8000x8000
  photo); the header is read first, so a decompression bomb costs nothing.
- **Upscaled images** (``edgediff upscale``): the upscaler's result at most
  ``UPSCALE_MAX_PIXELS`` (its float result and blend weights take 16 bytes a
  pixel, about 23 at the peak: 1.5 GB at the default), so an input at most
  that over the scale squared, checked from its header; ``--max-pixels``
  (API: ``max_pixels``) lifts it.
- **Images per UNet call**: ``DEFAULT_MAX_BATCH``; more images run in chunks
  of that many (``max_batch`` / ``--max-batch``). Image ``k`` is seeded
  ``seed + k`` whatever chunk it is in, so chunking changes no image.
- **Images per call**: their pixels together at most ``MAX_TOTAL_PIXELS``
  (the returned images live in memory: 256 MP is 768 MB of RGB).
- **Steps**: at most ``MAX_STEPS`` (the schedules are defined on 1000 training
  timesteps).
"""

from __future__ import annotations

MAX_INPUT_PIXELS = 64_000_000
DEFAULT_MAX_BATCH = 4
MAX_TOTAL_PIXELS = 256 * 2**20
MAX_STEPS = 1000
UPSCALE_MAX_PIXELS = 64_000_000


def pixel_budget(sample_size: int) -> int:
    """Default pixels per image for a model whose native image side is ``sample_size``."""
    return max(1024 * 1024, 4 * sample_size * sample_size)


def check_pixels(width: int, height: int, budget: int, what: str = "the image") -> None:
    if width * height > budget:
        raise ValueError(
            f"{what} would be {width}x{height} = {width * height:,} pixels, over the pixel budget of {budget:,} "
            f"per image (this model: max(1024x1024, 4x its native size)); a UNet's memory grows with the square "
            "of the pixels. If your machine has the memory, raise it with --max-pixels N (API: max_pixels=N)"
        )


def upscale_budget_words(scale: int, budget: int) -> str:
    """Why an upscale refuses an image: what it would write, the budget and how to lift it."""
    return (f"an upscale x{scale} reads at most {budget // scale**2:,} pixels, so that its result fits the pixel "
            f"budget of {budget:,} (about 23 bytes a pixel while upscaling). If your machine has the memory, raise "
            "it with --max-pixels N (API: max_pixels=N), or downscale the image first")
