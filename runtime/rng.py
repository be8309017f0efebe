"""Random streams for the pipeline: numpy's, or PyTorch's CPU ``torch.randn``.

``TorchRandn(seed)`` reproduces ``torch.randn(shape, generator=torch.Generator().manual_seed(seed))``
on the CPU in float32, without torch: the same MT19937 stream, the same
24-bit uniforms and the same Box-Muller arrangement. So a seed gives the
image diffusers gives, which is what users compare against.

Ported from PyTorch ``aten/src/ATen/native/cpu/DistributionTemplates.h``
(``normal_fill``, ``normal_fill_16``) and ``aten/src/ATen/core/TransformationHelper.h``
(``uniform_real``); the scalar path for tensors under 16 elements follows
``at::normal_distribution`` (``aten/src/ATen/core/DistributionsHelper.h``).
"""

from __future__ import annotations

import numpy as np

RNG_NAMES = ("numpy", "torch")


class NumpyRandn:
    """numpy's PCG64 Gaussian stream: the default, fast and stable across platforms."""

    name = "numpy"

    def __init__(self, seed: int):
        self._gen = np.random.default_rng(seed)

    def randn(self, shape: tuple[int, ...]) -> np.ndarray:
        return self._gen.standard_normal(shape, dtype=np.float32)


class TorchRandn:
    """PyTorch's CPU ``torch.randn`` stream for ``Generator().manual_seed(seed)``, float32."""

    name = "torch"

    def __init__(self, seed: int):
        if not 0 <= seed < 2**64:
            raise ValueError(f"seed must be in [0, 2**64), got {seed}")
        # torch seeds mt19937 with the low 32 bits (init_genrand), as does
        # numpy's legacy seeding of MT19937 from an int.
        self._bits = np.random.MT19937(0)
        self._bits._legacy_seeding(seed & 0xFFFFFFFF)
        self._next_normal: float | None = None  # at::normal_distribution's cached sample

    def _u32(self, n: int) -> np.ndarray:
        return self._bits.random_raw(n).astype(np.uint64)

    def _uniform_f32(self, n: int) -> np.ndarray:
        # uniform_real<float>: (random() & (2**24 - 1)) * 2**-24
        return ((self._u32(n) & np.uint64(0xFFFFFF)).astype(np.float32) * np.float32(2.0**-24)).astype(np.float32)

    def _uniform_f64(self) -> float:
        # uniform_real<double> on random64(): two 32-bit draws, torch's
        # random64 is ((uint64)hi << 32) | lo with hi drawn first; 53 bits kept.
        hi, lo = (int(v) for v in self._u32(2))
        r = (hi << 32) | lo
        return (r & ((1 << 53) - 1)) * 2.0**-53

    @staticmethod
    def _box_muller_16(u: np.ndarray) -> np.ndarray:
        # normal_fill_16 on rows of 16 uniforms: first 8 -> cos, last 8 -> sin
        u1 = (np.float32(1.0) - u[:, :8]).astype(np.float32)
        u2 = u[:, 8:]
        radius = np.sqrt(np.float32(-2.0) * np.log(u1)).astype(np.float32)
        theta = (np.float32(2.0 * np.pi) * u2).astype(np.float32)
        return np.concatenate([radius * np.cos(theta), radius * np.sin(theta)], axis=1).astype(np.float32)

    def randn(self, shape: tuple[int, ...]) -> np.ndarray:
        size = int(np.prod(shape))
        if size < 16:
            return np.asarray([self._normal_scalar() for _ in range(size)], dtype=np.float32).reshape(shape)
        data = self._uniform_f32(size)
        whole = size - size % 16
        out = np.empty(size, dtype=np.float32)
        out[:whole] = self._box_muller_16(data[:whole].reshape(-1, 16)).reshape(-1)
        if size % 16:
            # torch recomputes the last 16 values from 16 fresh uniforms
            tail_start = size - 16
            out[tail_start:] = self._box_muller_16(self._uniform_f32(16).reshape(1, 16)).reshape(-1)
        return out.reshape(shape)

    def _normal_scalar(self) -> float:
        if self._next_normal is not None:
            value, self._next_normal = self._next_normal, None
            return value
        u1 = self._uniform_f64()
        u2 = self._uniform_f64()
        r = np.sqrt(-2.0 * np.log1p(-u2))
        theta = 2.0 * np.pi * u1
        self._next_normal = float(r * np.sin(theta))
        return float(r * np.cos(theta))


def make_rng(name: str, seed: int) -> NumpyRandn | TorchRandn:
    if name == "numpy":
        return NumpyRandn(seed)
    if name == "torch":
        return TorchRandn(seed)
    raise ValueError(f"unknown rng {name!r}; valid: {', '.join(RNG_NAMES)}")


class ImageNoise:
    """One stream per image of a batch: image ``k`` draws from ``make_rng(name, seeds[k])``.

    A draw of shape ``(batch, ...)`` stacks each image's own draw of ``(...)``,
    so an image's noise does not depend on the batch it is in: image ``k`` of a
    batch equals the image generated alone with its seed. For one image this is
    the plain stream (diffusers' single ``torch.Generator``); for several it is
    diffusers' list of generators, one per image.
    """

    def __init__(self, name: str, seeds: tuple[int, ...] | list[int]):
        self.streams = [make_rng(name, seed) for seed in seeds]

    def randn(self, shape: tuple[int, ...]) -> np.ndarray:
        if shape[0] != len(self.streams):
            raise ValueError(f"a draw of {shape[0]} rows from the noise of {len(self.streams)} images")
        if len(self.streams) == 1:
            return self.streams[0].randn(tuple(shape))
        return np.stack([stream.randn(tuple(shape[1:])) for stream in self.streams])

