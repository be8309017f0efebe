"""What this CPU is, read once: its model name and feature flags (``/proc/cpuinfo`` on Linux).

Used where the CPU decides something: the bench's machine record, int8-static's weight range (VNNI or not), the
compile cache's key (ONNX Runtime's saved layout and OpenVINO's kernels are CPU-specific).
"""

from __future__ import annotations

import functools
import platform


@functools.lru_cache(maxsize=1)
def cpu() -> tuple[str, frozenset[str]]:
    """(model name, flags); the platform's processor string and no flags where /proc/cpuinfo cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return platform.processor() or platform.machine(), frozenset()
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "")
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith(("flags", "Features"))), [])
    return model or platform.processor() or platform.machine(), frozenset(flags)


def has_vnni() -> bool:
    """Whether this CPU multiplies int8 with VNNI (AVX-512 VNNI or AVX-VNNI)."""
    return bool({"avx512_vnni", "avx_vnni"} & cpu()[1])
